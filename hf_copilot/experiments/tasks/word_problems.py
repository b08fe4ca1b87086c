"""GSM-style word problems from templates: two or three arithmetic steps on small numbers.

Each template draws its numbers so that every intermediate result is a non-negative integer, and
records its steps, so the target can carry a GSM8K-style worked solution ("3+4=7. 7*2=14. #### 14").
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import Example, GeneratedTask, extract_number

_NAMES = (("Ann", "she"), ("Tom", "he"), ("Mia", "she"), ("Ben", "he"), ("Eva", "she"), ("Sam", "he"))
_THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "cards")


class _Steps:
    """Records each arithmetic step of a solution as "a op b=result"; the last result is the answer."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.result = 0

    def __call__(self, a: int, op: str, b: int) -> int:
        self.result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
        self.lines.append(f"{a}{op}{b}={self.result}")
        return self.result


def _buy_and_give(rng: random.Random, m: int, steps: _Steps) -> str:
    (name, he), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(1, m), rng.randint(1, m)
    c = rng.randint(1, a + b)
    steps(steps(a, "+", b), "-", c)
    return (
        f"{name} has {a} {thing}. {he.capitalize()} buys {b} more and gives away {c}. "
        f"How many {thing} does {name} have now?"
    )


def _boxes_then_eat(rng: random.Random, m: int, steps: _Steps) -> str:
    (name, _), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, m), rng.randint(2, m)
    c = rng.randint(1, a * b)
    steps(steps(a, "*", b), "-", c)
    return (
        f"{name} buys {a} boxes with {b} {thing} in each box and loses {c} {thing}. "
        f"How many {thing} are left?"
    )


def _change(rng: random.Random, m: int, steps: _Steps) -> str:
    (name, he), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    price, count = rng.randint(1, m), rng.randint(2, m)
    paid = price * count + rng.randint(0, m)
    steps(paid, "-", steps(price, "*", count))
    return (
        f"{thing.capitalize()} cost {price} dollars each. {name} buys {count} {thing} "
        f"and pays {paid} dollars. How much change does {he} get?"
    )


def _share(rng: random.Random, m: int, steps: _Steps) -> str:
    (name, he), thing = rng.choice(_NAMES), rng.choice(_THINGS)
    friends, each, extra = rng.randint(2, m), rng.randint(1, m), rng.randint(1, m)
    total = friends * each
    steps(steps(total, "/", friends), "+", extra)
    return (
        f"{name} shares {total} {thing} equally among {friends} friends. "
        f"Then {he} gives each friend {extra} more. How many {thing} does each friend have?"
    )


def _times_as_many(rng: random.Random, m: int, steps: _Steps) -> str:
    ((name, _), (other, _)), thing = rng.sample(_NAMES, 2), rng.choice(_THINGS)
    a, times = rng.randint(1, m), rng.randint(2, 5)
    together = steps(a, "+", steps(a, "*", times))
    c = rng.randint(1, together)
    steps(together, "-", c)
    return (
        f"{name} has {a} {thing}. {other} has {times} times as many. Together they give away {c}. "
        f"How many {thing} do they have left?"
    )


_TEMPLATES: tuple[Callable[[random.Random, int, _Steps], str], ...] = (
    _buy_and_give,
    _boxes_then_eat,
    _change,
    _share,
    _times_as_many,
)


@dataclass
class WordProblemsTask(GeneratedTask):
    """Word problems with integer answers; the answer is the last number the model writes.

    `source="gsm_symbolic"` draws GSM8K-derived problems from the optional `reasoning_gym` package
    instead of the built-in templates (`pip install reasoning-gym`).
    """

    name: ClassVar[str] = "word_problems"
    max_number: int = 20
    rationale: bool = False
    source: Literal["templates", "gsm_symbolic"] = "templates"

    def __post_init__(self) -> None:
        if self.max_number < 2:
            raise ValueError(f"max_number must be >= 2, got {self.max_number}.")
        if self.source not in ("templates", "gsm_symbolic"):
            raise ValueError(f"source must be 'templates' or 'gsm_symbolic', got {self.source!r}.")
        if self.source == "gsm_symbolic":
            try:
                import reasoning_gym  # noqa: F401
            except ImportError as error:
                raise ImportError("source='gsm_symbolic' needs `pip install reasoning-gym`.") from error

    def sample(self, rng: random.Random) -> Example:
        if self.source == "gsm_symbolic":
            return self._sample_gsm_symbolic(rng)
        template = rng.choice(_TEMPLATES)
        steps = _Steps()
        question = template(rng, self.max_number, steps)
        answer = f"{'. '.join(steps.lines)}. #### {steps.result}" if self.rationale else str(steps.result)
        return Example(prompt=f"{question}\n", answer=answer, meta={"template": template.__name__.strip("_")})

    def _sample_gsm_symbolic(self, rng: random.Random) -> Example:
        import reasoning_gym

        entry = reasoning_gym.create_dataset("gsm_symbolic", seed=rng.randrange(2**31), size=1)[0]
        answer = entry["metadata"]["answer_cot"] if self.rationale else entry["answer"]
        return Example(prompt=f"{entry['question']}\n", answer=answer, meta={"template": "gsm_symbolic"})

    def extract_answer(self, text: str) -> str:
        return extract_number(text, last=True)
