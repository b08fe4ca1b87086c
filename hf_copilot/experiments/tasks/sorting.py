"""Sorting digits ("sort 83152=" -> "12358"): an exact task whose answer is a set read back in order."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from .base import Example, GeneratedTask


@dataclass
class SortingTask(GeneratedTask):
    """`length` random digits (repeats allowed) to be written back in ascending order."""

    name: ClassVar[str] = "sorting"
    length: int = 8

    def __post_init__(self) -> None:
        if self.length < 2:
            raise ValueError(f"length must be >= 2, got {self.length}.")

    def sample(self, rng: random.Random) -> Example:
        digits = "".join(rng.choice("0123456789") for _ in range(self.length))
        return Example(prompt=f"sort {digits}=", answer="".join(sorted(digits)))

    def extract_answer(self, text: str) -> str:
        """The first run of digits the model writes (leading zeros kept: they are part of the answer)."""
        digits = ""
        for character in text.strip():
            if not character.isdigit():
                break
            digits += character
        return digits
