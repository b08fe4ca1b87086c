"""Benchmark loaders: each public format becomes Examples in the paper's prompt format."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_copilot.experiments.tasks import BENCHMARKS, BenchmarkTask, get_task

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"

# benchmark -> (fixture file, first prompt, all answers)
EXPECTED = {
    "gsm8k": (
        "gsm8k_test.jsonl",
        "Lena bakes 12 muffins and sells 5 of them. How many muffins does she have left?\n",
        ["7", "1500"],
    ),
    "svamp": (
        "svamp.json",
        "Jack had 8 pens and Mary had 5 pens. Jack gave 3 pens to Mary. How many pens does Jack have now?\n",
        ["5", "7.5"],
    ),
    "aqua": (
        "aqua.jsonl",
        "A train covers 60 km in 1.5 hours. What is its speed in km/h? "
        "Answer Choices: (A) 30 (B) 40 (C) 45 (D) 50 (E) 90\n",
        ["B", "D"],
    ),
    "mawps": (
        "mawps.json",
        "Tom has 9 marbles . He loses 4 marbles . How many marbles does Tom have ?\n",
        ["5", "0.25"],
    ),
    "boolq": (
        "boolq.jsonl",
        "Please answer the following question with true or false, question: is the sun a star?\n\n"
        "Answer format: true/false\n",
        ["true", "false"],
    ),
    "siqa": (
        "siqa.jsonl",
        "Please choose the correct answer to the question: Riley finished the marathon after months of "
        "training. How would Riley feel afterwards?\n\nAnswer1: bored\n\nAnswer2: proud\n\nAnswer3: confused"
        "\n\nAnswer format: answer1/answer2/answer3\n",
        ["answer2", "answer1"],
    ),
    "hellaswag": (
        "hellaswag.jsonl",
        "Please choose the correct ending to complete the given sentence: Making tea: A woman fills a kettle "
        "with water. she\n\nEnding1: paints the kettle blue.\n\nEnding2: puts it on the stove to boil.\n\n"
        "Ending3: throws the kettle away.\n\nEnding4: sings to the water.\n\n"
        "Answer format: ending1/ending2/ending3/ending4\n",
        ["ending2", "ending4"],
    ),
    "winogrande": (
        "winogrande.jsonl",
        "Please choose the correct answer to fill in the blank to complete the given sentence: The trophy did "
        "not fit in the suitcase because the _ was too big.\n\nOption1: trophy\n\nOption2: suitcase\n\n"
        "Answer format: option1/option2\n",
        ["option1", "option2"],
    ),
    "obqa": (
        "obqa.jsonl",
        "Please choose the correct answer to the question: Which of these conducts electricity best?\n\n"
        "Answer1: wood\n\nAnswer2: copper wire\n\nAnswer3: rubber\n\nAnswer4: glass\n\n"
        "Answer format: answer1/answer2/answer3/answer4\n",
        ["answer2", "answer3"],
    ),
}


def test_every_benchmark_has_a_fixture():
    assert set(EXPECTED) | {"piqa"} == set(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_converts_the_public_format(name):
    file, first_prompt, answers = EXPECTED[name]
    task = get_task(name, data_files={"test": str(FIXTURES / file)})
    examples = task.examples("test")
    assert examples[0].prompt == first_prompt
    assert [e.answer for e in examples] == answers
    # Gold answers read back as themselves, so a model that writes them scores 1.
    assert task.score([f"the correct answer is {e.answer}" for e in examples], examples) == {"accuracy": 1.0}


def test_piqa_labels_from_a_separate_file():
    task = get_task(
        "piqa",
        data_files={"validation": str(FIXTURES / "piqa.jsonl")},
        labels_files={"validation": str(FIXTURES / "piqa-labels.lst")},
    )
    examples = task.examples("validation")
    assert examples[0].prompt == (
        "Please choose the correct solution to the question: To dry wet shoes quickly,\n\n"
        "Solution1: stuff them with newspaper.\n\nSolution2: put them in the freezer.\n\n"
        "Answer format: solution1/solution2\n"
    )
    assert [e.answer for e in examples] == ["solution1", "solution2"]


def test_answer_extraction():
    assert BENCHMARKS["gsm8k"].extract_answer("12 - 5 = 7 muffins.\n#### 7") == "7"
    assert BENCHMARKS["svamp"].extract_answer("The answer is 7.50") == "7.5"
    assert BENCHMARKS["aqua"].extract_answer("60 / 1.5 = 40. The answer is (B).") == "B"
    assert BENCHMARKS["boolq"].extract_answer("the correct answer is False") == "false"
    assert BENCHMARKS["hellaswag"].extract_answer("ending5 or ending3") == "ending3"


def test_train_drops_prompts_of_the_test_split():
    task = get_task(
        "gsm8k",
        data_files={"train": str(FIXTURES / "gsm8k_train.jsonl"), "test": str(FIXTURES / "gsm8k_test.jsonl")},
    )
    train = task.examples("train")
    assert [e.prompt for e in train] == [
        "Omar reads 4 pages a day for 6 days. How many pages does he read?\n",
        "A box holds 8 pens. How many pens are in 3 boxes?\n",
    ]
    assert len(task.examples("test")) == 2


def test_a_missing_validation_split_is_held_out_of_train_and_left_out_of_it():
    files = {"train": str(FIXTURES / "gsm8k_train.jsonl"), "test": str(FIXTURES / "gsm8k_test.jsonl")}
    with pytest.raises(ValueError, match="No data file for the validation split.*validation_from_train"):
        get_task("gsm8k", data_files=files).examples("validation")
    task = get_task("gsm8k", data_files=files, validation_from_train=1)
    assert task.validation_is_held_out()
    validation, train, test = task.examples("validation"), task.examples("train"), task.examples("test")
    assert len(validation) == 1 and len(train) == 1  # 3 rows, one of them also in test
    assert {e.prompt for e in validation} | {e.prompt for e in train} == {
        "Omar reads 4 pages a day for 6 days. How many pages does he read?\n",
        "A box holds 8 pens. How many pens are in 3 boxes?\n",
    }
    assert not {e.prompt for e in validation + train} & {e.prompt for e in test}
    assert get_task("gsm8k", data_files=files, validation_from_train=1).examples("validation") == validation
    with pytest.raises(ValueError, match="would leave nothing of the 2 training examples"):
        get_task("gsm8k", data_files=files, validation_from_train=2).examples("validation")
    with_validation = {**files, "validation": str(FIXTURES / "gsm8k_test.jsonl")}
    assert not get_task("gsm8k", data_files=with_validation, validation_from_train=1).validation_is_held_out()


def test_sampling_n_examples_is_seeded():
    task = get_task("gsm8k", data_files={"train": str(FIXTURES / "gsm8k_train.jsonl")})
    assert task.examples("train", 2, seed=1) == task.examples("train", 2, seed=1)
    assert len(task.examples("train", 3)) == 3
    with pytest.raises(ValueError, match="has 3"):
        task.examples("train", 4)


def test_wrong_format_names_the_benchmark(tmp_path):
    file = tmp_path / "rows.jsonl"
    file.write_text('{"question": "q", "solution": "1"}\n')
    with pytest.raises(ValueError, match="not in the gsm8k format"):
        get_task("gsm8k", data_files={"test": str(file)}).examples("test")


def test_invalid_sources_are_rejected():
    with pytest.raises(ValueError, match="exactly one of data_files"):
        BenchmarkTask("gsm8k")
    with pytest.raises(ValueError, match="exactly one of data_files"):
        BenchmarkTask("gsm8k", data_files={"test": "x.jsonl"}, hub_id="openai/gsm8k")
    with pytest.raises(ValueError, match="Unknown benchmark"):
        BenchmarkTask("mmlu", data_files={"test": "x.jsonl"})
    with pytest.raises(ValueError, match="No data file for the train split"):
        get_task("gsm8k", data_files={"test": str(FIXTURES / "gsm8k_test.jsonl")}).examples("train")
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        get_task(
            "piqa",
            data_files={"test": str(FIXTURES / "gsm8k_train.jsonl")},
            labels_files={"test": str(FIXTURES / "piqa-labels.lst")},
        ).examples("test")
