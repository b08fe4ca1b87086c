"""Shared recipes for the CLI and the benchmarks: build a Pilot, train an arm, evaluate Pilot vs fused.

Every arm of an experiment goes through `train_arm`, so the Pilot's initialisation, the data order and
the number of steps are the same whether the Copilot is there or not (SPEC section 7).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)

from ..configuration_pilot_copilot import CopilotConfig
from ..modeling_pilot_copilot import PilotCopilotForCausalLM
from ..trainer import CopilotTrainer
from ..training_args import CopilotTrainingArguments
from .data import DataCollatorForCompletion, tokenize_examples
from .evaluation import DEFAULT_LAMBDAS, evaluate_task, sweep_lambda
from .tasks import Example, Task
from .tokenizer import build_char_tokenizer

ARMS = ("pilot", "pilot_copilot", "pilot_matched")


@dataclass
class PilotShape:
    """A LLaMA-layout Pilot built from a config with random weights (no download needed)."""

    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    max_position_embeddings: int = 256

    def build(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size or 2 * self.hidden_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)


@dataclass
class T5Shape:
    """A T5-layout encoder-decoder Pilot built from a config with random weights."""

    hidden_size: int = 64
    num_hidden_layers: int = 2  # in the encoder and in the decoder
    num_attention_heads: int = 4
    dropout_rate: float = 0.1  # T5's own default

    def build(self, tokenizer: PreTrainedTokenizerBase, seed: int) -> T5ForConditionalGeneration:
        torch.manual_seed(seed)
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=self.hidden_size,
            d_kv=self.hidden_size // self.num_attention_heads,
            d_ff=2 * self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_decoder_layers=self.num_hidden_layers,
            num_heads=self.num_attention_heads,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            dropout_rate=self.dropout_rate,
            tie_word_embeddings=False,
        )
        return T5ForConditionalGeneration(config)


@dataclass
class TrainingRecipe:
    """The optimisation settings every arm shares."""

    epochs: float = 3.0
    batch_size: int = 32
    learning_rate: float = 3e-3
    copilot_learning_rate: float | None = None
    warmup_steps: int = 20
    seed: int = 0
    logging_steps: int = 50
    mistake_log_replay: int = 0
    freeze_pilot: bool = False
    extra: dict = field(default_factory=dict)

    def arguments(self, output_dir: str, with_copilot: bool) -> TrainingArguments:
        common = dict(
            output_dir=output_dir,
            per_device_train_batch_size=self.batch_size,
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=self.warmup_steps,
            seed=self.seed,
            data_seed=self.seed,
            logging_steps=self.logging_steps,
            save_strategy="no",
            report_to=[],
            dataloader_pin_memory=torch.cuda.is_available(),
            **self.extra,
        )
        if not with_copilot:
            return TrainingArguments(**common)
        return CopilotTrainingArguments(
            **common,
            copilot_learning_rate=self.copilot_learning_rate,
            mistake_log_replay=self.mistake_log_replay,
            freeze_pilot=self.freeze_pilot,
        )


def task_tokenizer(task: Task, seed: int = 0, sample_size: int = 2000) -> PreTrainedTokenizerBase:
    """A character tokenizer covering every split of an offline task."""
    texts = [
        example.prompt + example.answer
        for split in ("train", "validation", "test")
        for example in task.examples(split, sample_size // (1 if split == "train" else 4), seed=seed)
    ]
    return build_char_tokenizer(texts)


def load_pilot(pilot: str, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A Pilot and its tokenizer from a local path or a Hub id (the latter needs Hub access)."""
    model = AutoModelForCausalLM.from_pretrained(pilot, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(pilot)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def matched_shape(
    shape: PilotShape | T5Shape, target_parameters: int, tokenizer: PreTrainedTokenizerBase
) -> PilotShape | T5Shape:
    """The Pilot shape (more layers, then wider; a T5 only wider) whose parameter count is closest to
    `target_parameters`."""
    if isinstance(
        shape, T5Shape
    ):  # counted by building: T5's relative-position tables make a formula brittle
        widths = range(shape.hidden_size, 4 * shape.hidden_size + 1, 2 * shape.num_attention_heads)
        candidates = [replace(shape, hidden_size=width) for width in widths]
        return min(candidates, key=lambda c: abs(c.build(tokenizer, 0).num_parameters() - target_parameters))
    best, best_gap = shape, float("inf")
    for layers in range(shape.num_hidden_layers, 4 * shape.num_hidden_layers + 1):
        for hidden in range(shape.hidden_size, 4 * shape.hidden_size + 1, shape.num_attention_heads * 2):
            candidate = PilotShape(
                hidden, layers, shape.num_attention_heads, None, shape.max_position_embeddings
            )
            count = pilot_parameter_count(candidate, len(tokenizer))
            if abs(count - target_parameters) < best_gap:
                best, best_gap = candidate, abs(count - target_parameters)
    return best


def pilot_parameter_count(shape: PilotShape, vocab_size: int) -> int:
    """Parameters of a LLaMA Pilot of this shape, without building it."""
    hidden, inner = shape.hidden_size, shape.intermediate_size or 2 * shape.hidden_size
    per_layer = 4 * hidden * hidden + 3 * hidden * inner + 2 * hidden
    return shape.num_hidden_layers * per_layer + 2 * vocab_size * hidden + hidden


def train_arm(
    arm: str,
    pilot: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_examples: Sequence[Example],
    recipe: TrainingRecipe,
    output_dir: str,
    copilot_config: CopilotConfig | None = None,
    fusion: dict | None = None,
    copilot_init: str | PreTrainedModel | None = None,
) -> tuple[PreTrainedModel, list[dict]]:
    """Fine-tune one arm: the Pilot alone with the stock Trainer, or Pilot + Copilot with CopilotTrainer
    (its Copilot from `copilot_config`, or shaped like and initialised from the decoder `copilot_init`)."""
    if arm not in ARMS:
        raise ValueError(f"Unknown arm {arm!r}: choose one of {ARMS}.")
    dataset = tokenize_examples(train_examples, tokenizer)
    collator = DataCollatorForCompletion(tokenizer)
    with_copilot = arm == "pilot_copilot"
    args = recipe.arguments(os.path.join(output_dir, arm), with_copilot)
    if with_copilot:
        model = PilotCopilotForCausalLM.from_pilot(
            pilot, copilot_config, copilot_init=copilot_init, **(fusion or {})
        )
        trainer = CopilotTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    else:
        model = pilot
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    model.eval()
    return model, trainer.state.log_history


@dataclass
class FusedEvaluation:
    """Test accuracy of the Pilot alone and fused, with lambda chosen on validation."""

    pilot_accuracy: float
    fused_accuracy: float
    best_lambda: float
    validation_sweep: dict[float, float]
    metrics: dict[str, float] = field(default_factory=dict)


def evaluate_pilot_copilot(
    model: PilotCopilotForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    validation: Sequence[Example],
    test: Sequence[Example],
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    batch_size: int = 64,
    progress: bool = True,
    min_gain: float = 0.0,
    **generate_kwargs,
) -> FusedEvaluation:
    """Pick lambda on validation (`sweep_lambda`, with `min_gain`), then report test accuracy at lambda = 0 (the
    Pilot) and at that lambda."""
    best, sweep = sweep_lambda(
        model,
        tokenizer,
        validation,
        task,
        lambdas=lambdas,
        min_gain=min_gain,
        batch_size=batch_size,
        progress=progress,
        **generate_kwargs,
    )

    def on_test(copilot_lambda: float) -> dict:
        return evaluate_task(
            model,
            tokenizer,
            test,
            task,
            batch_size=batch_size,
            progress=progress,
            copilot_lambda=copilot_lambda,
            **generate_kwargs,
        )

    pilot = on_test(0.0)
    fused = pilot if best == 0 else on_test(best)
    metrics = {k: v for k, v in fused.items() if isinstance(v, float)}
    return FusedEvaluation(pilot["accuracy"], fused["accuracy"], best, sweep, metrics)
