"""Metrics load through `evaluate` from the package's own folders, without the Hub."""

import evaluate
import pytest

from hf_copilot.experiments.metrics import exact_match, load_metric


def test_exact_match_is_an_evaluate_module_loaded_from_the_package():
    metric = load_metric("exact_match")
    assert isinstance(metric, evaluate.EvaluationModule)
    assert metric.compute(predictions=["12", "7", "x"], references=["12", "8", "x"]) == {"exact_match": 2 / 3}


def test_exact_match_compares_whole_strings():
    assert exact_match(["answer1", "answer2"], ["answer1", "answer21"]) == 0.5


def test_unknown_metric_names_the_ones_that_ship():
    with pytest.raises(ValueError, match="exact_match"):
        load_metric("bleu")
