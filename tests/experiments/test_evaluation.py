"""Accuracy through generate() and the lambda sweep, on tiny random-weight Llamas."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_copilot.experiments.data import (
    DataCollatorForCompletion,
    tokenize_examples,
    tokenize_seq2seq_examples,
)
from hf_copilot.experiments.evaluation import DEFAULT_LAMBDAS, best_lambda, evaluate_task, sweep_lambda
from hf_copilot.experiments.recipes import T5Shape
from hf_copilot.experiments.tasks import ArithmeticTask, RecommendationTask
from hf_copilot.experiments.tokenizer import build_char_tokenizer

TASK = ArithmeticTask(digits=1)
TOKENIZER = build_char_tokenizer(alphabet="0123456789+-*=:, UserhistoyNxm.")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and many times faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(model_class: type[LlamaForCausalLM] = LlamaForCausalLM) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=TOKENIZER.pad_token_id,
        bos_token_id=TOKENIZER.bos_token_id,
        eos_token_id=TOKENIZER.eos_token_id,
    )
    return model_class(config).eval()


def test_batched_left_padded_generation_matches_one_by_one():
    model, examples = tiny_llama(), TASK.examples("test", 7)
    batched = evaluate_task(model, TOKENIZER, examples, TASK, batch_size=3, progress=False)
    single = evaluate_task(model, TOKENIZER, examples, TASK, batch_size=1, progress=False)
    assert batched["generations"] == single["generations"]
    assert batched["predictions"] == [TASK.extract_answer(text) for text in batched["generations"]]
    assert batched["accuracy"] == TASK.score(batched["generations"], examples)["accuracy"]
    # Default budget: the longest gold answer plus eos.
    assert (
        max(len(TOKENIZER(text, add_special_tokens=False)["input_ids"]) for text in batched["generations"])
        <= 3
    )


def test_a_pilot_fit_on_the_examples_scores_one():
    model, examples = tiny_llama(), TASK.examples("train", 8)
    batch = DataCollatorForCompletion(TOKENIZER)(list(tokenize_examples(examples, TOKENIZER)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):  # 120 steps left this seed short of memorising all 8 (loss 0.89)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    result = evaluate_task(model, TOKENIZER, examples, TASK, progress=False)
    assert result["accuracy"] == 1.0
    assert result["predictions"] == [e.answer for e in examples]
    assert model.training  # evaluation puts the model back in the mode it found it in


def test_an_encoder_decoder_pilot_fit_on_the_examples_scores_one():
    """Its generate() returns the decoder's tokens only: nothing of the prompt is cut from them."""
    examples = TASK.examples("train", 8)
    model = T5Shape(32, 1, 4, dropout_rate=0.0).build(TOKENIZER, seed=0)
    batch = DataCollatorForCompletion(TOKENIZER)(list(tokenize_seq2seq_examples(examples, TOKENIZER)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    result = evaluate_task(model, TOKENIZER, examples, TASK, progress=False)
    assert result["predictions"] == [e.answer for e in examples]
    assert result["accuracy"] == 1.0


def test_several_returned_sequences_give_ranked_predictions():
    task = RecommendationTask()
    examples = task.examples("test", 3)
    result = evaluate_task(
        tiny_llama(), TOKENIZER, examples, task, num_beams=4, num_return_sequences=4, progress=False
    )
    assert [len(ranked) for ranked in result["predictions"]] == [4, 4, 4]
    assert {"accuracy", "hit@1", "hit@5", "hit@10", "ndcg@1", "ndcg@5", "ndcg@10"} <= set(result)


def test_empty_examples_are_an_error():
    with pytest.raises(ValueError, match="no examples"):
        evaluate_task(tiny_llama(), TOKENIZER, [], TASK)


class LambdaRecordingLlama(LlamaForCausalLM):
    """Stands in for a fused model: accepts `copilot_lambda` and answers right only for some values."""

    answers: dict[str, str]
    good_lambdas: set[float]
    seen: list[float]

    def generate(self, input_ids=None, copilot_lambda=1.0, **kwargs):
        self.seen.append(copilot_lambda)
        if copilot_lambda not in self.good_lambdas:
            return super().generate(input_ids=input_ids, **kwargs)
        prompts = TOKENIZER.batch_decode(input_ids, skip_special_tokens=True)
        answers = [TOKENIZER(self.answers[p], add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, answers))
        padded = [a + [TOKENIZER.eos_token_id] * (width - len(a)) for a in answers]
        return torch.cat([input_ids, torch.tensor(padded)], dim=1)


def test_sweep_picks_the_smallest_of_the_best_lambdas():
    examples = TASK.examples("validation", 5)
    model = tiny_llama(LambdaRecordingLlama)
    model.answers = {e.prompt: e.answer for e in examples}
    model.good_lambdas, model.seen = {0.5, 0.8, 3.0}, []
    best, scores = sweep_lambda(model, TOKENIZER, examples, TASK, progress=False)
    assert model.seen == list(DEFAULT_LAMBDAS)
    assert best == 0.5
    assert scores[0.5] == scores[0.8] == scores[3.0] == 1.0
    assert all(scores[lam] < 1.0 for lam in DEFAULT_LAMBDAS if lam not in model.good_lambdas)


def test_best_lambda_keeps_the_pilot_unless_the_best_gains_min_gain():
    scores = {0.0: 40 / 400, 0.5: 48 / 400, 1.0: 48 / 400, 2.0: 44 / 400}
    assert best_lambda(scores) == 0.5
    assert best_lambda(scores, min_gain=0.02) == 0.5  # 48/400 - 40/400 is 0.019999... in floats
    assert best_lambda(scores, min_gain=0.0201) == 0.0
    assert best_lambda({0.0: 0.5, 1.0: 0.4}, min_gain=0.1) == 0.0
    assert best_lambda({0.5: 0.1, 1.0: 0.3}) == 1.0  # no margin: lambda 0 need not be scored


@pytest.mark.parametrize(
    ("scores", "min_gain", "message"),
    [
        ({}, 0.0, "at least one"),
        ({0.0: 0.1}, -0.01, "min_gain must be >= 0"),
        ({0.0: 0.1, 1.0: 0.5}, float("nan"), "min_gain must be >= 0 and finite"),
        ({0.0: 0.1, 1.0: 0.5}, float("inf"), "min_gain must be >= 0 and finite"),
        ({1.0: 0.2}, 0.01, "include 0"),
    ],
)
def test_best_lambda_refuses_what_it_cannot_compare(scores, min_gain, message):
    with pytest.raises(ValueError, match=message):
        best_lambda(scores, min_gain)


def test_sweep_with_min_gain_returns_the_pilot_where_the_gain_is_smaller():
    examples = TASK.examples("validation", 5)
    model = tiny_llama(LambdaRecordingLlama)
    model.answers = {e.prompt: e.answer for e in examples}
    model.good_lambdas, model.seen = {0.5}, []
    best, scores = sweep_lambda(model, TOKENIZER, examples, TASK, lambdas=(0, 0.5), progress=False)
    gain = scores[0.5] - scores[0.0]
    assert best == 0.5 and gain > 0
    for min_gain, chosen in ((gain, 0.5), (gain + 0.01, 0.0)):
        again, same_scores = sweep_lambda(
            model, TOKENIZER, examples, TASK, lambdas=(0, 0.5), min_gain=min_gain, progress=False
        )
        assert (again, same_scores) == (chosen, scores)


def test_sweep_refuses_a_margin_without_lambda_0_before_generating():
    model = tiny_llama(LambdaRecordingLlama)
    model.good_lambdas, model.seen = set(), []
    with pytest.raises(ValueError, match="include 0"):
        sweep_lambda(model, TOKENIZER, TASK.examples("validation", 2), TASK, lambdas=(0.5, 1), min_gain=0.01)
    assert model.seen == []


def test_sweep_needs_lambdas():
    with pytest.raises(ValueError, match="at least one lambda"):
        sweep_lambda(tiny_llama(), TOKENIZER, TASK.examples("validation", 2), TASK, lambdas=())
