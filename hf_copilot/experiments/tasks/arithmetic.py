"""Multi-digit arithmetic ("123+456=" -> "579"): the paper's math tasks reduced to their core skill."""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass
from typing import ClassVar

from .base import Example, GeneratedTask, extract_number

_OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass
class ArithmeticTask(GeneratedTask):
    """`digits`-digit operands, one operation per prompt drawn from `operations`.

    Subtraction puts the larger operand first, so every answer is a non-negative integer.
    """

    name: ClassVar[str] = "arithmetic"
    digits: int = 3
    operations: str = "+"

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise ValueError(f"digits must be >= 1, got {self.digits}.")
        unknown = set(self.operations) - set(_OPERATIONS)
        if not self.operations or unknown:
            raise ValueError(
                f"operations must be a non-empty string of {''.join(_OPERATIONS)}, got {self.operations!r}."
            )

    def sample(self, rng: random.Random) -> Example:
        low = 10 ** (self.digits - 1) if self.digits > 1 else 0
        a, b = rng.randint(low, 10**self.digits - 1), rng.randint(low, 10**self.digits - 1)
        op = rng.choice(self.operations)
        if op == "-" and a < b:
            a, b = b, a
        return Example(
            prompt=f"{a}{op}{b}=", answer=str(_OPERATIONS[op](a, b)), meta={"a": a, "b": b, "op": op}
        )

    def extract_answer(self, text: str) -> str:
        """The first number the model writes (the answer comes straight after "=")."""
        return extract_number(text, last=False)
