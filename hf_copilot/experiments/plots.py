"""PNG plots of a run: training losses and the validation lambda sweep."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_and_sweep(history: list[dict], sweeps: dict[str, dict[float, float]], path: str) -> None:
    """Left: Pilot and Copilot losses by step; middle: the Copilot's R^2 (a Copilot that predicts nothing
    stays at 0); right: validation accuracy by copilot_lambda, one line per feedback mode (lambda = 0 is the
    Pilot alone)."""
    figure, (losses, r2, lambdas) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("pilot_loss", "Pilot loss (CE)"), ("copilot_loss", "Copilot loss (error_loss)")):
        points = [(row["step"], row[key]) for row in history if key in row]
        if points:
            losses.plot(*zip(*points, strict=True), marker=".", label=label)
    losses.set_xlabel("optimizer step")
    losses.set_title("Training")
    if losses.lines:
        losses.legend()
    for key, label in (("copilot_r2", "joint training"), ("copilot_final/copilot_r2", "Copilot alone")):
        # The Copilot-only phase counts its own steps after the joint run's last one.
        points = [(row["step"] + row.get("copilot_final/step", 0), row[key]) for row in history if key in row]
        if points:
            r2.plot(*zip(*points, strict=True), marker=".", label=label)
    r2.axhline(0.0, color="grey", linewidth=0.5)
    r2.set_xlabel("optimizer step")
    r2.set_title("Copilot R^2 on its training batches")
    if r2.lines:
        r2.legend()
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
