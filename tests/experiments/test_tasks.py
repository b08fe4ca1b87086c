"""Offline tasks: exact prompts, determinism, disjoint splits, answer extraction and metrics."""

from __future__ import annotations

import math

import pytest

from hf_copilot.experiments.tasks import (
    SPLITS,
    TASKS,
    ArithmeticTask,
    Example,
    MultipleChoiceTask,
    RecommendationTask,
    WordProblemsTask,
    get_task,
    hit_at_k,
    ndcg_at_k,
    split_of,
)

GENERATED = ("arithmetic", "word_problems", "multiple_choice", "recommendation")


def test_arithmetic_exact_prompts_for_seed_0():
    examples = get_task("arithmetic").examples("test", 2, seed=0)
    assert [(e.prompt, e.answer) for e in examples] == [("845+433=", "1278"), ("279+276=", "555")]
    assert examples[0].meta == {"a": 845, "b": 433, "op": "+"}


def test_recommendation_exact_prompts_for_seed_0():
    examples = get_task("recommendation").examples("train", 2, seed=0)
    assert [(e.prompt, e.answer) for e in examples] == [
        ("User history: 28, 90, 14. Next item:", " 84"),
        ("User history: 96, 92, 8. Next item:", " 50"),
    ]


def test_multiple_choice_prompt_is_the_papers_format():
    example = get_task("multiple_choice").examples("test", 1, seed=0)[0]
    assert example.prompt == (
        "Please choose the correct answer to the question: Which number is even?\n\n"
        "Answer1: 93\n\nAnswer2: 20\n\nAnswer format: answer1/answer2\n"
    )
    assert example.answer == "answer2"


@pytest.mark.parametrize("name", GENERATED)
def test_examples_are_deterministic_and_prefix_stable(name):
    task = get_task(name)
    assert task.examples("train", 20, seed=3) == task.examples("train", 20, seed=3)
    assert task.examples("train", 20, seed=3)[:5] == task.examples("train", 5, seed=3)
    assert task.examples("train", 20, seed=3) != task.examples("train", 20, seed=4)


@pytest.mark.parametrize("name", GENERATED)
def test_splits_never_share_a_prompt(name):
    task = get_task(name)
    prompts = {
        split: {e.prompt for seed in (0, 1) for e in task.examples(split, 150, seed)} for split in SPLITS
    }
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert all(split_of(prompt) == split for split in SPLITS for prompt in prompts[split])


def test_examples_within_a_split_are_distinct():
    examples = get_task("arithmetic", digits=2).examples("train", 500)
    assert len({e.prompt for e in examples}) == 500


def test_too_small_a_prompt_space_is_a_clear_error():
    # 1-digit addition has 100 prompts, about 10 of them in the test split.
    with pytest.raises(ValueError, match="prompt space is too small"):
        ArithmeticTask(digits=1).examples("test", 50)


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="Unknown split"):
        get_task("arithmetic").examples("dev", 1)


def test_arithmetic_answers_are_correct_for_every_operation():
    examples = ArithmeticTask(digits=2, operations="+-*").examples("train", 300)
    assert {e.meta["op"] for e in examples} == {"+", "-", "*"}
    for e in examples:
        a, b = e.meta["a"], e.meta["b"]
        assert e.prompt == f"{a}{e.meta['op']}{b}="
        assert int(e.answer) == {"+": a + b, "-": a - b, "*": a * b}[e.meta["op"]] >= 0
        assert 10 <= a <= 99 and 10 <= b <= 99


def test_word_problem_rationale_steps_are_correct_and_end_in_the_answer():
    plain = WordProblemsTask().examples("train", 100)
    worked = WordProblemsTask(rationale=True).examples("train", 100)
    assert [e.prompt for e in plain] == [e.prompt for e in worked]
    assert len({e.meta["template"] for e in plain}) == 5
    for short, long in zip(plain, worked, strict=True):
        steps, final = long.answer.split(". #### ")
        assert final == short.answer and int(short.answer) >= 0
        assert 2 <= len(steps.split(". ")) <= 3
        for step in steps.split(". "):
            expression, result = step.split("=")
            assert eval(expression.replace("/", "//")) == int(result)
        assert WordProblemsTask().extract_answer(long.answer) == short.answer


def test_multiple_choice_gold_option_is_right():
    task = MultipleChoiceTask(num_choices=3)
    for e in task.examples("train", 200):
        options, gold = e.meta["options"], int(e.answer.removeprefix("answer")) - 1
        assert e.prompt.endswith("Answer format: answer1/answer2/answer3\n")
        if e.meta["template"] == "largest":
            assert int(options[gold]) == max(map(int, options))
        elif e.meta["template"] == "even":
            assert [int(o) % 2 for o in options].count(0) == 1 and int(options[gold]) % 2 == 0
        elif e.meta["template"] == "first_letter":
            assert options[gold] == min(options)


def test_recommendation_target_follows_the_users_genre():
    task = RecommendationTask()
    answers: dict[str, str] = {}
    for seed in range(3):
        for e in task.examples("train", 200, seed):
            order = task.genres[e.meta["genre"]]
            history = e.meta["history"]
            assert sum(item in order for item in history) >= len(history) - 1
            assert int(e.answer) in order
            # The target is a function of the prompt: the same history never has two next items.
            assert answers.setdefault(e.prompt, e.answer) == e.answer


def test_extract_answer():
    assert get_task("arithmetic").extract_answer("579</s>12") == "579"
    assert get_task("word_problems").extract_answer("3+4=7. 7*2=14. #### 1,400.0") == "1400"
    assert get_task("word_problems").extract_answer("no number") == ""
    choice = get_task("multiple_choice", num_choices=2)
    assert choice.extract_answer("the correct answer is Answer2") == "answer2"
    assert choice.extract_answer("answer10") == ""
    assert get_task("recommendation").extract_answer(" 33 17") == "33"


def test_score_is_exact_match_accuracy_on_extracted_answers():
    task = get_task("arithmetic")
    examples = [Example("1+1=", "2"), Example("2+2=", "4"), Example("3+3=", "6")]
    assert task.score(["2", "4 and more", "5"], examples) == {"accuracy": 2 / 3}
    assert task.score([["2", "9"], ["1"], ["6"]], examples) == {"accuracy": 2 / 3}
    with pytest.raises(ValueError, match="2 predictions for 3 examples"):
        task.score(["2", "4"], examples)


def test_ranking_metrics_by_hand():
    ranked = ["5", "9", "33", "8"]
    assert hit_at_k(ranked, "33", 1) == 0.0 and hit_at_k(ranked, "33", 3) == 1.0
    assert ndcg_at_k(ranked, "33", 5) == 0.5  # 1 / log2(3 + 1)
    assert ndcg_at_k(ranked, "5", 1) == 1.0
    assert ndcg_at_k(ranked, "33", 2) == 0.0
    assert ndcg_at_k(ranked, "7", 10) == 0.0


def test_recommendation_score_on_ranked_lists():
    task = RecommendationTask()
    examples = [Example("h1", " 33"), Example("h2", " 7")]
    # Example 1: hit at rank 3 (a repeated item keeps its best rank); example 2: hit at rank 1.
    scores = task.score([[" 5", "5", "9 ", "33"], ["7"]], examples)
    assert scores["accuracy"] == scores["hit@1"] == 0.5
    assert scores["hit@5"] == scores["hit@10"] == 1.0
    assert scores["ndcg@1"] == 0.5
    assert math.isclose(scores["ndcg@5"], (0.5 + 1.0) / 2)
    # One greedy answer per example: Hit@K equals Hit@1.
    assert task.score(["33", "8"], examples)["hit@10"] == 0.5


def test_registry():
    assert set(GENERATED) <= set(TASKS)
    assert get_task("arithmetic", digits=2, operations="-").examples("train", 1)[0].prompt.count("-") == 1
    with pytest.raises(ValueError, match="Unknown task"):
        get_task("chess")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ArithmeticTask(operations="/"), "operations"),
        (lambda: ArithmeticTask(digits=0), "digits"),
        (lambda: WordProblemsTask(source="web"), "source"),
        (lambda: MultipleChoiceTask(num_choices=1), "num_choices"),
        (lambda: RecommendationTask(num_items=10), "num_items"),
        (lambda: RecommendationTask(noise=2.0), "noise"),
        (lambda: RecommendationTask(min_history=2), "min_history"),
    ],
)
def test_invalid_options_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_gsm_symbolic_source_when_reasoning_gym_is_installed():
    pytest.importorskip("reasoning_gym")
    task = WordProblemsTask(source="gsm_symbolic")
    examples = task.examples("test", 3)
    assert examples == task.examples("test", 3)
    assert all(split_of(e.prompt) == "test" and e.answer.lstrip("-").isdigit() for e in examples)
