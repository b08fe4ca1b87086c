"""Tasks generated offline (and loaders for the paper's benchmarks), one interface for all of them."""

from collections.abc import Callable
from functools import partial
from typing import Any

from .arithmetic import ArithmeticTask
from .base import SPLITS, Example, GeneratedTask, Task, split_of
from .benchmarks import BENCHMARKS, BenchmarkTask
from .multiple_choice import MultipleChoiceTask
from .recommendation import RecommendationTask, hit_at_k, ndcg_at_k
from .sorting import SortingTask
from .word_problems import WordProblemsTask

TASKS: dict[str, Callable[..., Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    WordProblemsTask.name: WordProblemsTask,
    MultipleChoiceTask.name: MultipleChoiceTask,
    RecommendationTask.name: RecommendationTask,
    SortingTask.name: SortingTask,
    **{name: partial(BenchmarkTask, name) for name in BENCHMARKS},
}


def get_task(name: str, **options: Any) -> Task:
    """The task called `name`, built with `options` (e.g. `get_task("arithmetic", digits=2)`)."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}: choose one of {sorted(TASKS)}.")
    return TASKS[name](**options)


__all__ = [
    "BENCHMARKS",
    "SPLITS",
    "TASKS",
    "ArithmeticTask",
    "BenchmarkTask",
    "Example",
    "GeneratedTask",
    "MultipleChoiceTask",
    "RecommendationTask",
    "SortingTask",
    "Task",
    "WordProblemsTask",
    "get_task",
    "hit_at_k",
    "ndcg_at_k",
    "split_of",
]
