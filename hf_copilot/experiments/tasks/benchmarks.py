"""The paper's benchmarks, read from their public file formats through `datasets`.

Prompts follow the paper's evaluation setup (the LLM-Adapters formats): math benchmarks give the
question and expect a number (AQuA: a letter); commonsense benchmarks use "Answer format: ..."
prompts and expect an option label such as "answer2". Expected row formats (JSON or JSON lines):

- gsm8k: question, answer ("... #### 72")
- svamp: Body, Question, Answer
- aqua: question, options (["A)21", ...]), correct (AQuA-RAT)
- mawps: instruction, answer (the LLM-Adapters release of MAWPS, as used by the paper)
- piqa: goal, sol1, sol2, label (0/1) or a labels file (the original release's *-labels.lst)
- boolq: question, answer (true/false); the paper's prompt leaves the passage out
- siqa: context, question, answerA, answerB, answerC, label (1-3) or a labels file
- hellaswag: activity_label, ctx, endings, label (0-3)
- winogrande: sentence, option1, option2, answer ("1"/"2")
- obqa: question_stem, choices ({text: [...], label: [...]}), answerKey
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from datasets import Dataset, get_dataset_split_names, load_dataset

from .base import (
    SPLITS,
    Example,
    Task,
    check_split,
    choice_labels,
    choice_prompt,
    extract_choice,
    extract_number,
    normalize_number,
)

_ANSWER = "Please choose the correct answer to the question"


def _gsm8k(row: dict[str, Any]) -> Example:
    solution = row["answer"]
    return Example(f"{row['question'].strip()}\n", normalize_number(solution.split("####")[-1].strip()))


def _svamp(row: dict[str, Any]) -> Example:
    return Example(f"{row['Body'].strip()} {row['Question'].strip()}\n", normalize_number(str(row["Answer"])))


def _aqua(row: dict[str, Any]) -> Example:
    options = " ".join(
        f"({label.strip()}) {text.strip()}" for label, text in (o.split(")", 1) for o in row["options"])
    )
    return Example(f"{row['question'].strip()} Answer Choices: {options}\n", row["correct"].strip())


def _mawps(row: dict[str, Any]) -> Example:
    return Example(f"{row['instruction'].strip()}\n", normalize_number(str(row["answer"])))


def _piqa(row: dict[str, Any]) -> Example:
    question = choice_prompt(
        "Please choose the correct solution to the question",
        row["goal"],
        [row["sol1"], row["sol2"]],
        "solution",
    )
    return Example(f"{question}\n", f"solution{int(row['label']) + 1}")


def _boolq(row: dict[str, Any]) -> Example:
    question = f"Please answer the following question with true or false, question: {row['question']}?"
    return Example(f"{question}\n\nAnswer format: true/false\n", str(row["answer"]).lower())


def _siqa(row: dict[str, Any]) -> Example:
    options = [row["answerA"], row["answerB"], row["answerC"]]
    question = choice_prompt(_ANSWER, f"{row['context']} {row['question']}", options, "answer")
    return Example(f"{question}\n", f"answer{int(row['label'])}")


def _hellaswag(row: dict[str, Any]) -> Example:
    question = choice_prompt(
        "Please choose the correct ending to complete the given sentence",
        f"{row['activity_label']}: {row['ctx']}",
        row["endings"],
        "ending",
    )
    return Example(f"{question}\n", f"ending{int(row['label']) + 1}")


def _winogrande(row: dict[str, Any]) -> Example:
    question = choice_prompt(
        "Please choose the correct answer to fill in the blank to complete the given sentence",
        row["sentence"],
        [row["option1"], row["option2"]],
        "option",
    )
    return Example(f"{question}\n", f"option{int(row['answer'])}")


def _obqa(row: dict[str, Any]) -> Example:
    choices = row["choices"]
    question = choice_prompt(_ANSWER, row["question_stem"], choices["text"], "answer")
    return Example(f"{question}\n", f"answer{choices['label'].index(row['answerKey']) + 1}")


def _extract_letter(text: str) -> str:
    """AQuA: the last standalone option letter A-E."""
    letters = re.findall(r"\b([A-E])\b", text)
    return letters[-1] if letters else ""


@dataclass(frozen=True)
class BenchmarkFormat:
    """How one benchmark's rows become Examples, and how its answers are read back."""

    convert: Callable[[dict[str, Any]], Example]
    extract_answer: Callable[[str], str]


BENCHMARKS: dict[str, BenchmarkFormat] = {
    "gsm8k": BenchmarkFormat(_gsm8k, partial(extract_number, last=True)),
    "svamp": BenchmarkFormat(_svamp, partial(extract_number, last=True)),
    "aqua": BenchmarkFormat(_aqua, _extract_letter),
    "mawps": BenchmarkFormat(_mawps, partial(extract_number, last=True)),
    "piqa": BenchmarkFormat(_piqa, partial(extract_choice, labels=choice_labels("solution", 2))),
    "boolq": BenchmarkFormat(_boolq, partial(extract_choice, labels=("true", "false"))),
    "siqa": BenchmarkFormat(_siqa, partial(extract_choice, labels=choice_labels("answer", 3))),
    "hellaswag": BenchmarkFormat(_hellaswag, partial(extract_choice, labels=choice_labels("ending", 4))),
    "winogrande": BenchmarkFormat(_winogrande, partial(extract_choice, labels=choice_labels("option", 2))),
    "obqa": BenchmarkFormat(_obqa, partial(extract_choice, labels=choice_labels("answer", 4))),
}


@dataclass
class BenchmarkTask(Task):
    """A benchmark read from local files (`data_files`: split -> path(s)) or from a Hub dataset id.

    `hub_id` calls `datasets.load_dataset(hub_id, hub_config)` and so needs Hub access.
    `labels_files` (split -> path, one label per line) adds a `label` column, for releases that
    ship labels apart from the rows (PIQA, SIQA). `validation_from_train=n` makes up a missing
    validation split (GSM8K ships train and test only) from `n` training examples, which training
    then leaves out; the draw is fixed, and a smaller `n` picks a subset of a larger one's.
    """

    name: str
    data_files: Mapping[str, str | Sequence[str]] | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    labels_files: Mapping[str, str] = field(default_factory=dict)
    validation_from_train: int = 0

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise ValueError(f"Unknown benchmark {self.name!r}: choose one of {sorted(BENCHMARKS)}.")
        if (self.data_files is None) == (self.hub_id is None):
            raise ValueError(
                "Give exactly one of data_files (local files per split) or hub_id (a Hub dataset)."
            )
        for split in [*(self.data_files or {}), *self.labels_files]:
            check_split(split)
        if self.validation_from_train < 0:
            raise ValueError(f"validation_from_train must be >= 0, got {self.validation_from_train}.")

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """The split's examples in file order, or `n` of them drawn with `seed`.

        Prompts that also occur in a later split (validation, test) are dropped, so training data
        never contains an evaluation prompt and the test split stays whole.
        """
        check_split(split)
        later = [s for s in SPLITS[SPLITS.index(split) + 1 :] if s in self._splits()]
        held_out = {example.prompt for s in later for example in self._load(s)}
        examples = [example for example in self._load(split) if example.prompt not in held_out]
        if n is None:
            return examples
        if n > len(examples):
            raise ValueError(f"Asked for {n} examples but the {self.name} {split} split has {len(examples)}.")
        return random.Random(seed).sample(examples, n)

    def extract_answer(self, text: str) -> str:
        return BENCHMARKS[self.name].extract_answer(text)

    def validation_is_held_out(self) -> bool:
        """Whether the validation split is made of training examples (`validation_from_train`)."""
        stored = self._stored_splits()
        return bool(self.validation_from_train) and "validation" not in stored and "train" in stored

    def _splits(self) -> list[str]:
        splits = self._stored_splits()
        return [*splits, "validation"] if self.validation_is_held_out() else splits

    def _stored_splits(self) -> list[str]:
        if self.data_files is not None:
            return list(self.data_files)
        return get_dataset_split_names(self.hub_id, self.hub_config)

    def _load(self, split: str) -> list[Example]:
        if split == "validation" and self.validation_is_held_out():
            return self._held_out_validation()
        rows = self._rows(split)
        convert = BENCHMARKS[self.name].convert
        examples = []
        for index, row in enumerate(rows):
            try:
                examples.append(convert(row))
            except (KeyError, ValueError, TypeError, AttributeError) as error:
                raise ValueError(
                    f"Row {index} of the {self.name} {split} split is not in the {self.name} format "
                    f"(see hf_copilot.tasks.benchmarks): {error!r}"
                ) from error
        return examples

    def _held_out_validation(self) -> list[Example]:
        """`validation_from_train` training examples, not in test, in file order: a prefix of one fixed
        permutation."""
        test = (
            {example.prompt for example in self._load("test")} if "test" in self._stored_splits() else set()
        )
        train = [example for example in self._load("train") if example.prompt not in test]
        if self.validation_from_train >= len(train):
            raise ValueError(
                f"validation_from_train={self.validation_from_train} would leave nothing of the {len(train)} "
                f"training examples of {self.name} to train on."
            )
        order = list(range(len(train)))
        random.Random(0).shuffle(order)
        return [train[i] for i in sorted(order[: self.validation_from_train])]

    def _rows(self, split: str) -> Dataset:
        if self.hub_id is not None:
            rows = load_dataset(self.hub_id, self.hub_config, split=split)
        elif split not in self.data_files:
            hint = (
                " Pass validation_from_train=n to hold out n training examples as validation."
                if split == "validation" and "train" in self.data_files
                else ""
            )
            raise ValueError(
                f"No data file for the {split} split of {self.name}; data_files has {list(self.data_files)}."
                + hint
            )
        else:
            rows = load_dataset("json", data_files={split: self.data_files[split]}, split=split)
        if split in self.labels_files:
            labels = Path(self.labels_files[split]).read_text().split()
            if len(labels) != len(rows):
                raise ValueError(f"{self.labels_files[split]} has {len(labels)} labels for {len(rows)} rows.")
            rows = rows.add_column("label", labels)
        return rows
