"""Accuracy through the standard `generate()`, and the choice of `copilot_lambda` on a validation split.

Metrics are computed here (by each task's `score`) rather than with `evaluate.load`, which fetches
metric scripts from the Hub and so fails offline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .tasks import Example, Task

# The paper's grid plus 0 (the Pilot alone) and, beyond the paper, larger weights (SPEC section 5).
DEFAULT_LAMBDAS = (0.0, 0.1, 0.3, 0.5, 0.8, 1.0, 2.0, 3.0)
GAIN_ROUNDING = 1e-9  # accuracies are fractions k/n: their differences carry float error far below this


def evaluate_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    task: Task,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Generate for every prompt (left-padded batches, greedy unless told otherwise) and score.

    Returns the task's metrics, `predictions` (extracted answers) and `generations` (decoded text).
    With `num_return_sequences=n > 1` each prediction is the list of n answers, best first, which
    ranking metrics (Hit@K, NDCG@K) use. `max_new_tokens` defaults to the longest gold answer plus
    eos. Extra keyword arguments go to `generate()` (e.g. `copilot_lambda` for a fused model).
    """
    if not examples:
        raise ValueError("evaluate_task got no examples.")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "The tokenizer has no pad token: set one (e.g. tokenizer.pad_token = tokenizer.eos_token)."
        )
    if max_new_tokens is None:
        answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
        max_new_tokens = max(len(ids) for ids in answers) + 1
    generate_kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id, **generate_kwargs}
    prompts = [e.prompt for e in examples]
    was_training = model.training
    model.eval()
    generations: list[list[str]] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=f"eval {task.name}", disable=not progress):
            batch = prompts[start : start + batch_size]
            generations += _generate(
                model, tokenizer, batch, max_new_tokens=max_new_tokens, **generate_kwargs
            )
    finally:
        model.train(was_training)
    ranked = any(len(texts) > 1 for texts in generations)
    results = generations if ranked else [texts[0] for texts in generations]
    predictions = [
        [task.extract_answer(t) for t in texts] if ranked else task.extract_answer(texts[0])
        for texts in generations
    ]
    return {**task.score(results, examples), "predictions": predictions, "generations": results}


def _generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], **generate_kwargs: Any
) -> list[list[str]]:
    """The decoded continuations of each prompt (several with `num_return_sequences`), best first."""
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    with torch.no_grad():
        output = model.generate(**inputs, **generate_kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    if not model.config.is_encoder_decoder:  # a decoder-only model's output starts with the prompt
        sequences = sequences[:, inputs["input_ids"].shape[1] :]
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    per_prompt = len(texts) // len(prompts)
    return [texts[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]


def best_lambda(scores: Mapping[float, float], min_gain: float = 0.0) -> float:
    """The lambda with the best score, the smallest among ties; 0 (the Pilot alone) unless that score beats
    lambda 0's by at least `min_gain` (up to rounding: 48/400 - 40/400 reaches 0.02).

    A margin trades small gains for never choosing a Copilot on a validation gain that chance could give:
    benchmarks/results/lambda_margin/ measures the trade on the committed sweeps.
    """
    if not scores:
        raise ValueError("best_lambda needs at least one lambda's score.")
    check_min_gain(scores, min_gain)
    best = max(scores, key=lambda lam: (scores[lam], -lam))
    if best == 0 or scores[best] - scores.get(0.0, scores[best]) >= min_gain - GAIN_ROUNDING:
        return best
    return 0.0


def check_min_gain(lambdas: Iterable[float], min_gain: float) -> None:
    """A margin is a validation gain over lambda 0, so it needs lambda 0 among the lambdas."""
    if not 0 <= min_gain < math.inf:  # NaN fails every comparison: it would always keep lambda 0
        raise ValueError(
            f"min_gain must be >= 0 and finite (a validation gain over lambda 0), got {min_gain}."
        )
    if min_gain > 0 and 0 not in lambdas:
        raise ValueError(
            f"min_gain={min_gain} compares the best lambda with lambda 0 (the Pilot alone), which is not among "
            "the lambdas: include 0."
        )


def sweep_lambda(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    val_examples: Sequence[Example],
    task: Task,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    metric: str = "accuracy",
    min_gain: float = 0.0,
    **evaluate_kwargs: Any,
) -> tuple[float, dict[float, float]]:
    """The `copilot_lambda` chosen on the validation `metric` (`best_lambda`, with `min_gain`), and all scores.

    The model's `generate()` must accept `copilot_lambda` (a fused Pilot + Copilot does).
    """
    if not lambdas:
        raise ValueError("sweep_lambda needs at least one lambda.")
    check_min_gain(lambdas, min_gain)  # before any generation
    scores = {
        float(lam): evaluate_task(
            model, tokenizer, val_examples, task, copilot_lambda=lam, **evaluate_kwargs
        )[metric]
        for lam in lambdas
    }
    return best_lambda(scores, min_gain), scores
