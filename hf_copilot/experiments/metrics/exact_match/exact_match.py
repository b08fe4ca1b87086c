"""Exact match of extracted answers, as an `evaluate` metric that loads from this folder (no Hub)."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference (answers already extracted).",
            citation="",
            inputs_description="predictions, references: lists of strings of equal length",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        hits = sum(
            prediction == reference for prediction, reference in zip(predictions, references, strict=True)
        )
        return {"exact_match": hits / len(references)}
