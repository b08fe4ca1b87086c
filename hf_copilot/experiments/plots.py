"""PNG plots of a run: training losses and the validation lambda sweep."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_and_sweep(history: list[dict], sweeps: dict[str, dict[float, float]], path: str) -> None:
    """Left: Pilot and Copilot losses by step; right: validation accuracy by copilot_lambda, one line per
    feedback mode (lambda = 0 is the Pilot alone)."""
    figure, (losses, lambdas) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("pilot_loss", "Pilot loss (CE)"), ("copilot_loss", "Copilot loss (RMSE)")):
        points = [(row["step"], row[key]) for row in history if key in row]
        if points:
            losses.plot(*zip(*points, strict=True), marker=".", label=label)
    losses.set_xlabel("optimizer step")
    losses.set_title("Training")
    if losses.lines:
        losses.legend()
    for mode, sweep in sweeps.items():
        ordered = sorted(sweep.items())
        lambdas.plot(
            [lam for lam, _ in ordered], [acc for _, acc in ordered], marker="o", label=f"feedback={mode}"
        )
    lambdas.set_xlabel("copilot_lambda")
    lambdas.set_ylabel("validation accuracy")
    lambdas.set_title("Fusion weight")
    lambdas.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
