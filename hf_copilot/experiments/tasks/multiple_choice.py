"""Commonsense-style multiple choice in the paper's prompt format, from synthetic facts a model can learn.

Each template draws distinct options and knows which one is right ("Which number is the largest?",
"Who has the most cookies?", ...); the target is the option label, e.g. "answer2".
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from .base import Example, GeneratedTask, choice_labels, choice_prompt, extract_choice

INSTRUCTION = "Please choose the correct answer to the question"
_NAMES = ("Ann", "Tom", "Mia", "Ben", "Eva", "Sam", "Leo", "Zoe")
_THINGS = ("apples", "pencils", "stickers", "marbles", "cookies", "cards")

# A template returns (question, options, index of the correct option).
_Template = Callable[[random.Random, int], tuple[str, list[str], int]]


def _largest(rng: random.Random, k: int) -> tuple[str, list[str], int]:
    numbers = rng.sample(range(1, 100), k)
    return "Which number is the largest?", [str(x) for x in numbers], numbers.index(max(numbers))


def _smallest(rng: random.Random, k: int) -> tuple[str, list[str], int]:
    numbers = rng.sample(range(1, 100), k)
    return "Which number is the smallest?", [str(x) for x in numbers], numbers.index(min(numbers))


def _even(rng: random.Random, k: int) -> tuple[str, list[str], int]:
    numbers = [2 * x + 1 for x in rng.sample(range(50), k - 1)]
    correct = rng.randrange(k)
    numbers.insert(correct, 2 * rng.randrange(1, 50))
    return "Which number is even?", [str(x) for x in numbers], correct


def _first_letter(rng: random.Random, k: int) -> tuple[str, list[str], int]:
    letters = rng.sample(string.ascii_lowercase, k)
    return "Which letter comes first in the alphabet?", letters, letters.index(min(letters))


def _most(rng: random.Random, k: int) -> tuple[str, list[str], int]:
    names, thing = rng.sample(_NAMES, k), rng.choice(_THINGS)
    counts = rng.sample(range(1, 20), k)
    facts = ", ".join(f"{name} has {count} {thing}" for name, count in zip(names, counts, strict=True))
    return f"{facts}. Who has the most {thing}?", names, counts.index(max(counts))


_TEMPLATES: tuple[_Template, ...] = (_largest, _smallest, _even, _first_letter, _most)


@dataclass
class MultipleChoiceTask(GeneratedTask):
    """`num_choices` options per question (2 to 8); the right one sits at a uniformly random position."""

    name: ClassVar[str] = "multiple_choice"
    num_choices: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.num_choices <= len(_NAMES):
            raise ValueError(f"num_choices must be between 2 and {len(_NAMES)}, got {self.num_choices}.")

    def sample(self, rng: random.Random) -> Example:
        template = rng.choice(_TEMPLATES)
        question, options, correct = template(rng, self.num_choices)
        return Example(
            prompt=choice_prompt(INSTRUCTION, question, options, "answer") + "\n",
            answer=f"answer{correct + 1}",
            meta={"template": template.__name__.strip("_"), "options": options},
        )

    def extract_answer(self, text: str) -> str:
        return extract_choice(text, choice_labels("answer", self.num_choices))
