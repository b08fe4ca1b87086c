"""Does a small validation gain carry to test? The trade of `sweep_lambda(min_gain=...)`, on committed sweeps.

Every Copilot record of a quality result holds its validation sweep (accuracy at each lambda), the test accuracy at
the lambda chosen, and the test accuracy of its Pilot (lambda 0). A margin only ever replaces the chosen lambda by 0,
so its test accuracy under every margin is known exactly from the record, without running a model:

    python benchmarks/lambda_margin.py   # reads benchmarks/results/quality.json, writes benchmarks/results/lambda_margin/

The margin is judged here on the test split of runs whose lambdas were chosen without it: this measures what a margin
would have cost and saved, it does not tune one.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hf_copilot.experiments.evaluation import best_lambda  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MARGINS = (0.0, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05)


def sweep_of(record: dict) -> dict[float, float]:
    return {float(lam): score for lam, score in record["validation_sweep"].items()}


def copilot_records(records: list[dict]) -> list[dict]:
    """The records with a validation sweep, checked: the chosen lambda is what `best_lambda` picks from it."""
    chosen = [r for r in records if r.get("validation_sweep") and r.get("pilot_accuracy") is not None]
    for record in chosen:
        if best_lambda(sweep_of(record)) != record["lambda"]:
            raise ValueError(f"A record's lambda is not its sweep's best: {record}")
    return chosen


def lift_under_margin(record: dict, min_gain: float) -> tuple[float, bool]:
    """The record's test lift over its Pilot had its lambda been chosen with `min_gain`, and whether the margin
    turned the Copilot off (a margin only ever replaces the chosen lambda by 0)."""
    turned_off = record["lambda"] != 0 and best_lambda(sweep_of(record), min_gain) == 0
    accuracy = record["pilot_accuracy"] if turned_off else record["test_accuracy"]
    return accuracy - record["pilot_accuracy"], turned_off


def summarise(records: list[dict], margins, eval_size: int) -> list[dict]:
    """Per margin: the mean test lift, how many records end below their Pilot, and in prompts of the test split,
    the lifts the margin gave up (gains turned off) and the losses it avoided."""
    rows = []
    for margin in margins:
        outcomes = [lift_under_margin(r, margin) for r in records]
        recorded = [r["test_accuracy"] - r["pilot_accuracy"] for r in records]
        off = [lift for lift, (_, turned_off) in zip(recorded, outcomes, strict=True) if turned_off]
        rows.append(
            {
                "min_gain": margin,
                "records": len(records),
                "copilot_on": sum(
                    1
                    for r, (_, turned_off) in zip(records, outcomes, strict=True)
                    if r["lambda"] != 0 and not turned_off
                ),
                "mean_lift": sum(lift for lift, _ in outcomes) / len(outcomes),
                "below_pilot": sum(1 for lift, _ in outcomes if lift < 0),
                "gains_given_up_prompts": round(sum(lift for lift in off if lift > 0) * eval_size),
                "losses_avoided_prompts": round(-sum(lift for lift in off if lift < 0) * eval_size),
            }
        )
    return rows


def small_gain_records(records: list[dict], below: float) -> list[dict]:
    """The records whose chosen lambda beat lambda 0 on validation by less than `below`: where a margin acts."""
    rows = []
    for r in records:
        gain = sweep_of(r)[r["lambda"]] - sweep_of(r)[0.0]
        if r["lambda"] != 0 and gain < below:
            rows.append(
                {key: r[key] for key in ("regime", "task", "seed", "arm", "feedback", "lambda", "copilot_r2")}
                | {"validation_gain": gain, "test_lift": r["test_accuracy"] - r["pilot_accuracy"]}
            )
    return sorted(rows, key=lambda row: row["validation_gain"])


def write_markdown(path: str, result: dict) -> None:
    n = result["eval_size"]
    lines = [
        "# Lambda chosen with a margin: what it would have cost and saved",
        "",
        f"Command: `{result['command']}`  ",
        f"Records: {result['records_from']} ({result['summary'][0]['records']} Copilot records, every regime, "
        f"task, seed, arm and feedback mode; {n} validation and {n} test prompts each).",
        "",
        "`sweep_lambda(min_gain=m)` keeps the Pilot alone (lambda 0) unless the best lambda's validation accuracy "
        "beats lambda 0's by at least m. The records chose lambda without a margin, so each margin's test "
        "accuracy is the record's (where the Copilot stays on) or its Pilot's (where the margin turns it off). "
        "Judged on test after the fact: this measures the trade, it does not tune m.",
        "",
        "| min_gain | Copilot on | mean test lift | records below their Pilot | gains given up (test prompts) "
        "| losses avoided (test prompts) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['min_gain']:g} | {row['copilot_on']} | {row['mean_lift']:+.4f} | {row['below_pilot']} "
            f"| {row['gains_given_up_prompts']} | {row['losses_avoided_prompts']} |"
        )
    lines += [
        "",
        f"Records whose chosen lambda gained less than {result['small_gain_below']:g} on validation (where a "
        "margin up to that size acts):",
        "",
        "| regime | task | seed | arm | feedback | lambda | held-out R^2 | validation gain | test lift |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["small_gain_records"]:
        r2 = "-" if r["copilot_r2"] is None else f"{r['copilot_r2']:.3f}"
        lines.append(
            f"| {r['regime']} | {r['task']} | {r['seed']} | {r['arm']} | {r['feedback']} | {r['lambda']:g} | {r2} "
            f"| {r['validation_gain']:+.4f} | {r['test_lift']:+.4f} |"
        )
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")


def write_plot(path: str, records: list[dict], result: dict) -> None:
    figure, (scatter, trade) = plt.subplots(1, 2, figsize=(11, 4.2))
    used = [r for r in records if r["lambda"] != 0]
    gains = [sweep_of(r)[r["lambda"]] - sweep_of(r)[0.0] for r in used]
    lifts = [r["test_accuracy"] - r["pilot_accuracy"] for r in used]
    scatter.scatter(gains, lifts, s=14, c=["tab:red" if lift < 0 else "tab:blue" for lift in lifts])
    scatter.axhline(0, color="grey", lw=0.8)
    scatter.set_xscale("log")  # a chosen lambda > 0 beat lambda 0, so every gain is positive
    scatter.set_xlabel("validation gain of the chosen lambda over lambda 0")
    scatter.set_ylabel("test lift over the Pilot")
    scatter.set_title("Each Copilot record (lambda > 0)")
    margins = [row["min_gain"] for row in result["summary"]]
    trade.plot(
        margins, [row["gains_given_up_prompts"] for row in result["summary"]], "o-", label="gains given up"
    )
    trade.plot(
        margins, [row["losses_avoided_prompts"] for row in result["summary"]], "s-", label="losses avoided"
    )
    trade.set_xlabel("min_gain")
    trade.set_ylabel("test prompts, summed over records")
    trade.set_title("What a margin trades")
    trade.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", default=os.path.join(RESULTS, "quality.json"))
    parser.add_argument("--eval-size", type=int, default=400, help="the records' test prompts (quality.py's)")
    parser.add_argument("--margins", type=float, nargs="+", default=list(MARGINS))
    parser.add_argument("--output-dir", default=os.path.join(RESULTS, "lambda_margin"))
    args = parser.parse_args(argv)
    with open(args.records) as handle:
        records = copilot_records(json.load(handle)["records"])
    small_gain_below = max(args.margins)
    result = {
        "command": "python benchmarks/lambda_margin.py" + ("" if argv is None else " " + " ".join(argv)),
        "records_from": os.path.relpath(args.records, os.path.dirname(RESULTS)),
        "eval_size": args.eval_size,
        "summary": summarise(records, args.margins, args.eval_size),
        "small_gain_below": small_gain_below,
        "small_gain_records": small_gain_records(records, small_gain_below),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "lambda_margin.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    write_markdown(os.path.join(args.output_dir, "lambda_margin.md"), result)
    write_plot(os.path.join(args.output_dir, "lambda_margin.png"), records, result)
    return result


if __name__ == "__main__":
    main()
