"""Metrics through the `evaluate` library, loaded from folders shipped with the package.

`evaluate.load("exact_match")` fetches its script from the Hub; the copy here loads offline.
"""

from __future__ import annotations

import os
from functools import cache

import evaluate

_HERE = os.path.dirname(os.path.abspath(__file__))


@cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    """An `evaluate` metric shipped in hf_copilot/experiments/metrics/<name>/."""
    path = os.path.join(_HERE, name)
    if not os.path.isdir(path):
        raise ValueError(
            f"No metric {name!r} ships with hf_copilot: choose one of {sorted(os.listdir(_HERE))}."
        )
    return evaluate.load(path)


def exact_match(predictions: list[str], references: list[str]) -> float:
    return load_metric("exact_match").compute(predictions=predictions, references=references)["exact_match"]
