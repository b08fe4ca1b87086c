"""What every task shares: the example type, the task interface, split assignment and answer checking."""

from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..metrics import exact_match

SPLITS = ("train", "validation", "test")

Prediction = str | Sequence[str]
"""A generated answer, or a ranked list of answers (best first) when several were returned."""


@dataclass(frozen=True)
class Example:
    """One prompt and the text the model should generate after it (the training target)."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {SPLITS}.")


class Task(ABC):
    """A prompt format, a source of examples, answer extraction and a metric."""

    name: str

    @abstractmethod
    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` examples of `split`; the same arguments always give the same list."""

    @abstractmethod
    def extract_answer(self, text: str) -> str:
        """The answer a generated text commits to, in the form gold answers are compared in."""

    def score(self, predictions: Sequence[Prediction], examples: Sequence[Example]) -> dict[str, float]:
        """Exact-match `accuracy` of extracted answers; a ranked list counts by its first entry.

        Gold answers go through `extract_answer` too, so a target with a worked solution is scored
        by its final answer.
        """
        check_predictions(predictions, examples)
        top = [p if isinstance(p, str) else (p[0] if p else "") for p in predictions]
        predicted = [self.extract_answer(p) for p in top]
        gold = [self.extract_answer(e.answer) for e in examples]
        return {"accuracy": exact_match(predicted, gold)}


def check_predictions(predictions: Sequence[Prediction], examples: Sequence[Example]) -> None:
    if len(predictions) != len(examples):
        raise ValueError(f"Got {len(predictions)} predictions for {len(examples)} examples.")
    if not examples:
        raise ValueError("Cannot score an empty list of examples.")


def split_of(prompt: str) -> str:
    """The split a generated prompt belongs to: 10% test, 10% validation, 80% train.

    Fixed by a hash of the prompt text alone, so a prompt can never be in two splits whatever the
    seeds, sizes or sampling order, and it lands in the same split on every machine.
    """
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % 100
    if bucket < 10:
        return "test"
    if bucket < 20:
        return "validation"
    return "train"


class GeneratedTask(Task):
    """A task whose examples are sampled offline; subclasses only say how to draw one example."""

    @abstractmethod
    def sample(self, rng: random.Random) -> Example:
        """Draw one example (of any split) from `rng`."""

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """`n` distinct examples whose prompts `split_of` assigns to `split`.

        Sampling is sequential from a generator seeded by (task, split, seed), so a shorter list is a
        prefix of a longer one.
        """
        check_split(split)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        found: dict[str, Example] = {}
        for _ in range(1000 + 100 * n):
            if len(found) == n:
                break
            example = self.sample(rng)
            if example.prompt not in found and split_of(example.prompt) == split:
                found[example.prompt] = example
        if len(found) < n:
            raise ValueError(
                f"Found only {len(found)} distinct {split} prompts for {self.name!r} (asked for {n}): "
                "its prompt space is too small; ask for fewer examples or widen the task's options."
            )
        return list(found.values())


_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """Canonical text of a number, so that "1,000", "1000" and "1000.0" compare equal."""
    value = Decimal(text.replace(",", ""))
    return format(value.normalize(), "f") if value != value.to_integral_value() else str(int(value))


def extract_number(text: str, last: bool = True) -> str:
    """The last (or first) number in `text`, normalised; "" when there is none."""
    matches = _NUMBER.findall(text)
    if not matches:
        return ""
    return normalize_number(matches[-1] if last else matches[0])


def choice_labels(word: str, count: int) -> tuple[str, ...]:
    """Option labels of the paper's multiple-choice prompts: ("answer1", "answer2", ...)."""
    return tuple(f"{word}{i}" for i in range(1, count + 1))


def choice_prompt(instruction: str, question: str, options: Sequence[str], word: str) -> str:
    """The paper's multiple-choice prompt (the LLM-Adapters commonsense format).

    `choice_prompt("Please choose the correct answer to the question", "Which is larger?", ["37", "52"],
    "answer")` gives "Please choose the correct answer to the question: Which is larger?\\n\\nAnswer1: 37
    \\n\\nAnswer2: 52\\n\\nAnswer format: answer1/answer2".
    """
    labels = choice_labels(word, len(options))
    lines = [f"{instruction}: {question}"]
    lines += [f"{label.capitalize()}: {option}" for label, option in zip(labels, options, strict=True)]
    lines.append(f"Answer format: {'/'.join(labels)}")
    return "\n\n".join(lines)


def extract_choice(text: str, labels: Sequence[str]) -> str:
    """The first option label in `text` (case-insensitive); "" when there is none."""
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(rf"\b({alternatives})\b", text.lower())
    return match.group(1) if match else ""
