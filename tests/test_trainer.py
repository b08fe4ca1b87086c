"""CopilotTrainer: a drop-in Trainer that fine-tunes the Pilot and trains the Copilot (SPEC sections 4, 6).

Every run uses tiny random LLaMA Pilots (conftest.py) on "counting" sequences (token j+1 = token j + 1):
a random Pilot does not know the rule, the Copilot can learn it from the errors it sees, so its loss falls
within a few steps. Sequences differ in length and in label count, so that normalising per micro-batch
instead of per optimizer batch would show.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    FIRST_REGULAR_TOKEN,
    PAD_TOKEN_ID,
    VOCAB_SIZE,
    build_multimodal_pilot,
    build_pilot,
    multimodal_example,
    tiny_copilot_config,
)
from datasets import Dataset
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_copilot import PilotCopilotCache, PilotCopilotForCausalLM, copilot_final_phase, fuse_scores
from hf_copilot.copilot_final_phase import phase_optimizer
from hf_copilot.mistake_log_entry import copilot_squared_error, shift_right
from hf_copilot.modeling_copilot import CopilotModel
from hf_copilot.trainer import CopilotTrainer, NonFiniteTrainingError, copilot_token_count
from hf_copilot.training_args import CopilotTrainingArguments

NUM_REGULAR = VOCAB_SIZE - FIRST_REGULAR_TOKEN


# --------------------------------------------------------------------------------------------------
# Data and models


def counting_rows(n: int = 16, seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of 6-18 counting tokens; the first 1-4 tokens (the prompt) have label -100."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 6 + (i * 5) % 13
        start = int(torch.randint(0, NUM_REGULAR, (1,), generator=generator))
        ids = [FIRST_REGULAR_TOKEN + (start + k) % NUM_REGULAR for k in range(length)]
        prompt = 1 + i % 4
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-pads with PAD (attention 0, label -100)."""
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(row["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_model(seed: int = 0, pilot=None, error_form: str = "linear") -> PilotCopilotForCausalLM:
    pilot = build_pilot("llama", seed=seed) if pilot is None else pilot
    torch.manual_seed(seed + 1)
    config = tiny_copilot_config(intermediate_size=64, error_form=error_form)
    return PilotCopilotForCausalLM.from_pilot(pilot, config)


def settings(tmp_path, **overrides) -> dict:
    """Arguments shared by the stock and the Copilot runs."""
    return {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_pin_memory": False,
        **overrides,
    }


def make_args(
    tmp_path,
    copilot_learning_rate=3e-2,
    copilot_final_epochs=0.0,
    copilot_fallback_weight_decay=None,
    **overrides,
) -> CopilotTrainingArguments:
    """The joint run alone unless a test asks for the Copilot-only phase after it; that phase once (the few
    batches of a test's phase seldom take R^2 above 0.05) unless a test asks for the fallback."""
    return CopilotTrainingArguments(
        copilot_learning_rate=copilot_learning_rate,
        copilot_final_epochs=copilot_final_epochs,
        copilot_fallback_weight_decay=copilot_fallback_weight_decay,
        **settings(tmp_path, **overrides),
    )


def make_trainer(tmp_path, model=None, rows=None, trainer_class=CopilotTrainer, **overrides):
    return trainer_class(
        model=make_model() if model is None else model,
        args=make_args(tmp_path, **overrides),
        train_dataset=counting_rows() if rows is None else rows,
        data_collator=collate,
    )


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# Arguments


def test_arguments_default_to_the_papers_method_and_parse_from_the_command_line(tmp_path):
    args = CopilotTrainingArguments(output_dir=str(tmp_path))
    assert isinstance(args, TrainingArguments)
    assert (args.copilot_learning_rate, args.copilot_loss_weight, args.freeze_pilot) == (None, 1.0, False)
    assert (args.mistake_log_size, args.mistake_log_replay, args.mistake_log_topk) == (None, 0, 64)

    (parsed,) = HfArgumentParser(CopilotTrainingArguments).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--copilot_learning_rate",
            "3e-4",
            "--freeze_pilot",
            "--mistake_log_topk",
            "0",
        ]
    )
    assert (parsed.copilot_learning_rate, parsed.freeze_pilot, parsed.mistake_log_topk) == (3e-4, True, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"copilot_learning_rate": 0.0}, "copilot_learning_rate must be a positive number"),
        ({"copilot_learning_rate": float("nan")}, "copilot_learning_rate must be a positive number"),
        ({"copilot_loss_weight": -1.0}, "copilot_loss_weight must be a finite number >= 0"),
        ({"copilot_weight_decay": -0.1}, "copilot_weight_decay must be a finite number >= 0"),
        (
            {"copilot_final_weight_decay": math.inf},
            r"copilot_final_weight_decay must be a finite number >= 0, or None to use copilot_weight_decay",
        ),
        ({"copilot_final_weight_decay": True}, "copilot_final_weight_decay must be a finite number >= 0"),
        (
            {"copilot_fallback_weight_decay": math.nan},
            "copilot_fallback_weight_decay must be a finite number >= 0",
        ),
        ({"mistake_log_size": -1}, "mistake_log_size must be an integer >= 0, or None"),
        ({"mistake_log_size": 0, "mistake_log_window": 2}, r"mistake_log_window \(2\) cannot exceed"),
        ({"mistake_log_replay": -1}, "mistake_log_replay must be an integer >= 0"),
        ({"mistake_log_topk": -2}, "mistake_log_topk must be an integer >= 0"),
        ({"mistake_log_size": 4, "mistake_log_replay": 5}, r"mistake_log_replay \(5\) cannot exceed"),
        ({"freeze_pilot": True, "copilot_loss_weight": 0.0}, "trains nothing"),
        ({"label_smoothing_factor": 0.1}, "label_smoothing_factor=0.1 is not supported"),
        ({"mistake_log_on_device": "yes"}, "mistake_log_on_device must be True or False"),
    ],
)
def test_arguments_reject_invalid_values(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        CopilotTrainingArguments(output_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize(
    ("settings", "entries"),
    [
        ({}, 0),  # the Copilot reads only the fresh entry
        ({"mistake_log_window": 3}, 3),
        ({"mistake_log_window": 3, "mistake_log_replay": 1}, 3),  # replay draws its rows from the window
        ({"mistake_log_replay": 2}, 128),  # replay draws whole entries from the paper's log
        ({"mistake_log_size": 16}, 16),
        ({"mistake_log_size": 0}, 0),
    ],
)
def test_the_log_keeps_as_many_entries_as_the_copilot_reads_unless_told(tmp_path, settings, entries):
    args = CopilotTrainingArguments(output_dir=str(tmp_path), **settings)
    assert args.mistake_log_entries == entries
    trainer = make_trainer(tmp_path, **settings)
    assert trainer.mistake_log_callback.mistake_log.capacity == entries


def test_a_log_that_keeps_no_entries_trains_exactly_as_a_full_one_and_logs_the_same_statistics(tmp_path):
    kept = make_trainer(tmp_path, logging_steps=1, mistake_log_size=128)
    kept.train()
    default = make_trainer(tmp_path, logging_steps=1)
    default.train()
    assert max_difference(default.model, kept.model) == 0.0
    assert (
        len(default.mistake_log_callback.mistake_log) == 0 and len(kept.mistake_log_callback.mistake_log) == 4
    )
    assert logged(default, "mistake_log/entries") == [0.0] * 4
    for name in ("copilot_r2", "mistake_log/mean_error_norm", "mistake_log/pilot_gold_prob"):
        assert logged(default, name) == logged(kept, name), name
    assert logged(default, "mistake_log/memory_mb") == [0.0] * 4


def test_trainer_names_the_fix_for_stock_arguments_or_a_bare_pilot(tmp_path):
    with pytest.raises(TypeError, match="replace TrainingArguments"):
        CopilotTrainer(model=make_model(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    with pytest.raises(TypeError, match=r"PilotCopilotForCausalLM.from_pilot\(model\)"):
        CopilotTrainer(model=build_pilot("llama"), args=make_args(tmp_path))


# --------------------------------------------------------------------------------------------------
# Optimizer


def test_optimizer_has_pilot_and_copilot_groups_under_one_schedule(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=3, warmup_steps=0, lr_scheduler_type="linear", copilot_lr_scheduler_type=None
    )
    model = trainer.model
    trainer.train()
    groups = trainer.optimizer.param_groups
    copilot_ids = {id(p) for p in model.copilot.parameters()}
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once

    names = {id(p): name for name, p in model.named_parameters()}
    for group in groups:
        kinds = {id(p) in copilot_ids for p in group["params"]}
        assert len(kinds) == 1  # a group holds Pilot or Copilot parameters, never both
        is_copilot = kinds.pop()
        assert group["initial_lr"] == (3e-2 if is_copilot else 1e-2)
        # After 3 of 3 linear-decay steps every group is at the same fraction (0) of its peak.
        assert group["lr"] == pytest.approx(0.0)
        for p in group["params"]:  # the Copilot's weights at the default copilot_weight_decay, 1
            is_norm = "norm" in names[id(p)]
            assert group["weight_decay"] == (0.0 if is_norm else 1.0 if is_copilot else 0.1), names[id(p)]
    assert len(groups) == 4


def test_the_copilot_follows_its_own_schedule(tmp_path):
    """Default: constant after warmup while the Pilot's rate decays (cosine here)."""
    trainer = make_trainer(tmp_path, max_steps=4, warmup_steps=2, lr_scheduler_type="cosine")
    seen = []
    trainer.add_callback(RecordLearningRates(seen))
    trainer.train()
    copilot_ids = {id(p) for p in trainer.model.copilot.parameters()}
    for group_index, group in enumerate(trainer.optimizer.param_groups):
        is_copilot = id(group["params"][0]) in copilot_ids
        rates = [step[group_index] for step in seen]
        if is_copilot:
            assert rates == pytest.approx([0.0, 1.5e-2, 3e-2, 3e-2])
        else:  # cosine over the 2 steps after warmup
            assert rates == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    with pytest.raises(ValueError, match="not a per-step schedule"):
        make_trainer(tmp_path, max_steps=2, copilot_lr_scheduler_type="reduce_lr_on_plateau").train()


class RecordLearningRates(TrainerCallback):
    def __init__(self, seen: list):
        self.seen = seen

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.seen.append([group["lr"] for group in optimizer.param_groups])


def test_copilot_weight_decay_defaults_to_one_and_none_follows_the_pilots(tmp_path):
    """The default decays the Copilot's weights at 1 whatever the Pilot's `weight_decay`; None takes the Pilot's."""
    default = CopilotTrainingArguments(output_dir=str(tmp_path), weight_decay=0.3)
    assert default.copilot_weight_decay == 1.0
    assert default.effective_copilot_weight_decay == 1.0
    following = CopilotTrainingArguments(
        output_dir=str(tmp_path), weight_decay=0.3, copilot_weight_decay=None
    )
    assert following.effective_copilot_weight_decay == 0.3


def test_copilot_weight_decay_applies_to_the_copilots_weights_in_both_phases(tmp_path, monkeypatch):
    """Joint groups: the Copilot's weights decay at copilot_weight_decay, the Pilot's at weight_decay, norms not
    at all; the Copilot-only phase's AdamW splits the Copilot's parameters the same way."""
    phase_groups = []

    class RecordingAdamW(torch.optim.AdamW):
        """Keeps the groups of the last AdamW built: the phase's, which starts after the joint run's."""

        def __init__(self, params, **kwargs):
            phase_groups[:] = list(params)
            super().__init__(phase_groups, **kwargs)

    monkeypatch.setattr(copilot_final_phase.torch.optim, "AdamW", RecordingAdamW)
    trainer = make_trainer(tmp_path, max_steps=1, copilot_weight_decay=0.5, copilot_final_epochs=0.25)
    trainer.train()
    model = trainer.model
    names = {id(p): name for name, p in model.named_parameters()}
    copilot_ids = {id(p) for p in model.copilot.parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            expected = 0.0 if "norm" in names[id(p)] else 0.5 if id(p) in copilot_ids else 0.1
            assert group["weight_decay"] == expected, names[id(p)]
    assert sorted(id(p) for group in phase_groups for p in group["params"]) == sorted(copilot_ids)
    for group in phase_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if "norm" in names[id(p)] else 0.5), names[id(p)]


def recorded_phase_optimizers(monkeypatch) -> list[torch.optim.Optimizer]:
    """The optimizers the Copilot-only phase builds, as it builds them."""
    built = []

    def recording(*args):
        built.append(phase_optimizer(*args))
        return built[-1]

    monkeypatch.setattr(copilot_final_phase, "phase_optimizer", recording)
    return built


def test_the_copilot_only_phase_uses_the_runs_optimizer_settings(tmp_path, monkeypatch):
    """optim, betas and epsilon hold for the phase as for the joint run (here the fused AdamW, Trainer's default),
    at the Copilot's peak learning rate."""
    built = recorded_phase_optimizers(monkeypatch)
    settings = dict(optim="adamw_torch_fused", adam_beta2=0.95, adam_epsilon=1e-6, copilot_learning_rate=3e-3)
    trainer = make_trainer(tmp_path, max_steps=1, copilot_final_epochs=0.25, **settings)
    trainer.train()
    (phase,) = built
    joint = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert type(phase) is type(joint) is torch.optim.AdamW
    for optimizer in (phase, joint):
        assert optimizer.defaults["fused"] is True
        assert (optimizer.defaults["betas"], optimizer.defaults["eps"]) == ((0.9, 0.95), 1e-6)
    assert {group["initial_lr"] for group in phase.param_groups} == {3e-3}
    copilot_ids = {id(p) for p in trainer.model.copilot.parameters()}
    assert sorted(id(p) for group in phase.param_groups for p in group["params"]) == sorted(copilot_ids)


def test_an_optimizer_factory_leaves_the_phase_on_adamw_with_the_runs_betas(tmp_path, monkeypatch):
    """An `optim` that builds its own parameter groups (a factory, as for Muon) cannot take the phase's Copilot
    groups: the phase runs AdamW with the run's betas and epsilon, and the joint run warns that the Copilot trains
    at the Pilot's learning rate."""
    built = recorded_phase_optimizers(monkeypatch)

    def sgd_factory():
        return lambda model, lr: torch.optim.SGD(model.parameters(), lr=lr)

    trainer = CopilotTrainer(
        model=make_model(),
        args=make_args(tmp_path, max_steps=1, copilot_final_epochs=0.25, adam_beta1=0.8, adam_epsilon=1e-7),
        train_dataset=counting_rows(),
        data_collator=collate,
        optimizer_cls_and_kwargs=(sgd_factory, {"lr": 1e-2}),
    )
    with pytest.warns(UserWarning, match="builds its own parameter groups"):
        trainer.train()
    assert type(trainer.optimizer.optimizer) is torch.optim.SGD
    (phase,) = built
    assert type(phase) is torch.optim.AdamW
    assert (phase.defaults["betas"], phase.defaults["eps"]) == ((0.8, 0.999), 1e-7)


def test_copilot_learning_rate_defaults_to_the_pilots(tmp_path):
    trainer = make_trainer(tmp_path, copilot_learning_rate=None, max_steps=1)
    trainer.train()
    assert {group["initial_lr"] for group in trainer.optimizer.param_groups} == {1e-2}


# --------------------------------------------------------------------------------------------------
# The objective


# The Pilot's loss is the stock one bit for bit and its gradient the same to the last bit of each element (the loss's
# backward reads p from an exponential of its own). SGD keeps such differences that small; AdamW's normalised steps
# turn them into differences up to the order of the learning rate where a gradient element is near zero.
PILOT_PARAMETER_TOLERANCE = {"sgd": 1e-6, "adamw_torch": 1e-4}


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_joint_training_fine_tunes_the_pilot_exactly_as_the_stock_trainer(tmp_path, optim):
    """The Copilot reads detached states and is clipped on its own: the Pilot's updates do not change."""
    stock_pilot = build_pilot("llama")
    stock = Trainer(
        model=stock_pilot,
        args=TrainingArguments(**settings(tmp_path, optim=optim)),
        train_dataset=counting_rows(),
        data_collator=collate,
    )
    stock.train()
    trainer = make_trainer(tmp_path, optim=optim)
    trainer.train()

    assert logged(trainer, "pilot_loss") == pytest.approx(logged(stock, "loss"), rel=1e-6)
    # A drop-in script reads the Pilot's loss where it read it before; the objective has its own name.
    assert logged(trainer, "loss") == pytest.approx(logged(stock, "loss"), rel=1e-6)
    assert logged(trainer, "train_loss") == pytest.approx(logged(stock, "train_loss"), rel=1e-6)
    assert logged(trainer, "joint_loss") == pytest.approx(
        [
            p + c**2
            for p, c in zip(logged(trainer, "pilot_loss"), logged(trainer, "copilot_loss"), strict=True)
        ],
        rel=1e-6,
    )
    assert min(logged(stock, "grad_norm")) > 1.0  # clipping (max_grad_norm=1) was active at every step
    assert max_difference(trainer.model.pilot, stock_pilot) < PILOT_PARAMETER_TOLERANCE[optim]


def test_the_pilots_own_inputs_reach_it_as_under_the_stock_trainer(tmp_path):
    """Trainer drops the dataset columns its model's forward does not name. The wrapper's forward hands the rest to
    the Pilot, so a multimodal Pilot's `pixel_values` and `token_type_ids` stay, and its steps are the stock ones."""
    rows = []
    for seed in range(8):
        example = multimodal_example(3, 4, seed=seed)
        labels = example["input_ids"].clone()
        labels[: len(labels) - 4] = -100  # the text after the image
        rows.append({**{key: value.tolist() for key, value in example.items()}, "labels": labels.tolist()})
    dataset = Dataset.from_list(rows)
    stock_pilot = build_multimodal_pilot()
    stock = Trainer(
        model=stock_pilot, args=TrainingArguments(**settings(tmp_path, optim="sgd")), train_dataset=dataset
    )
    trainer = CopilotTrainer(
        model=PilotCopilotForCausalLM.from_pilot(build_multimodal_pilot(), tiny_copilot_config()),
        args=make_args(tmp_path, optim="sgd"),
        train_dataset=dataset,
    )
    assert set(next(iter(trainer.get_train_dataloader()))) == set(rows[0])
    stock.train()
    trainer.train()
    assert logged(trainer, "pilot_loss") == pytest.approx(logged(stock, "loss"), rel=1e-6)
    assert max_difference(trainer.model.pilot, stock_pilot) < PILOT_PARAMETER_TOLERANCE["sgd"]


class PerMicroBatchTrainer(CopilotTrainer):
    """The naive alternative: each micro-batch normalised by its own token count, then divided by 4."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # Trainer then counts no num_items_in_batch


@pytest.mark.parametrize("error_form", ["linear", "reweight"])  # the squared error and the cross-entropy
def test_gradient_accumulation_4x2_updates_both_models_exactly_as_batch_8(tmp_path, error_form):
    sgd = dict(optim="sgd", learning_rate=0.1, copilot_learning_rate=0.3)
    big = make_trainer(tmp_path, make_model(error_form=error_form), per_device_train_batch_size=8, **sgd)
    big.train()
    accumulated = make_trainer(
        tmp_path,
        make_model(error_form=error_form),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        **sgd,
    )
    accumulated.train()
    naive = make_trainer(
        tmp_path,
        make_model(error_form=error_form),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        trainer_class=PerMicroBatchTrainer,
        **sgd,
    )
    naive.train()

    # The micro-batches carry different numbers of labels, so per-micro-batch means weigh tokens unequally.
    batches = list(accumulated.get_train_dataloader())
    assert len({int((batch["labels"][:, 1:] != -100).sum()) for batch in batches}) > 2
    assert max_difference(big.model, make_model(error_form=error_form)) > 1e-3  # the parameters moved
    for part in ("pilot", "copilot"):
        # A few float32 ulps of a unit-scale weight (norm weights start at 1): sums taken in another order
        # round differently on some CPUs; the per-micro-batch means are off by far more.
        assert max_difference(getattr(big.model, part), getattr(accumulated.model, part)) < 5e-7
        assert max_difference(getattr(big.model, part), getattr(naive.model, part)) > 1e-5
    assert logged(accumulated, "pilot_loss") == pytest.approx(logged(big, "pilot_loss"), rel=1e-6)
    assert logged(accumulated, "copilot_loss") == pytest.approx(logged(big, "copilot_loss"), rel=1e-6)


@pytest.mark.parametrize("error_form", ["linear", "reweight"])  # the squared error and the cross-entropy
def test_the_copilot_only_phase_accumulates_exactly_as_one_batch(tmp_path, monkeypatch, error_form):
    """Its step is the user's optimizer batch, not the micro-batch: the same gradients at 2 x 4 as at 8 x 1."""
    sgd = dict(optim="sgd", learning_rate=0.1, copilot_learning_rate=0.03, copilot_final_epochs=2.0)
    gradients = {}
    phase_optimizers = recorded_phase_optimizers(monkeypatch)

    def phase_gradients(**settings):
        """The gradients each step of the phase's optimizer applies (SGD, as the joint run's)."""
        captured = []

        def capture(optimizer, args, kwargs):
            if phase_optimizers and optimizer is phase_optimizers[-1]:
                captured.append([p.grad.clone() for p in optimizer.param_groups[0]["params"]])

        handle = register_optimizer_step_pre_hook(capture)
        try:
            trainer = make_trainer(tmp_path, make_model(error_form=error_form), **sgd, **settings)
            trainer.train()
        finally:
            handle.remove()
        return trainer, captured

    big, gradients["big"] = phase_gradients(per_device_train_batch_size=8)
    accumulated, gradients["accumulated"] = phase_gradients(
        per_device_train_batch_size=2, gradient_accumulation_steps=4
    )
    assert logged(accumulated, "copilot_final/step") == logged(big, "copilot_final/step") == [1, 2, 3, 4]
    # Micro-batches carry different numbers of labels (a mean of means would differ); the step is the mean over
    # all of them. The first step's loss comes from the same weights; later ones differ by the float noise of
    # summing in another order.
    big_losses, accumulated_losses = (logged(t, "copilot_final/copilot_loss") for t in (big, accumulated))
    assert accumulated_losses[0] == pytest.approx(big_losses[0], rel=1e-6)
    assert accumulated_losses[1:] == pytest.approx(big_losses[1:], rel=1e-5)
    assert len(gradients["big"]) == len(gradients["accumulated"]) == 4
    # W_out's gradient is a difference of two sums (W sum g h h^T - sum g e h^T): its rounding scales with the
    # tensor's largest entries, so near-zero entries are compared at that scale.
    for expected, actual in zip(gradients["big"][0], gradients["accumulated"][0], strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_copilot_objective_counts_fresh_and_replayed_positions_of_the_whole_step(tmp_path):
    """L = L_P + w * (sum of squared errors over fresh + replayed positions) / N_C of the optimizer step."""
    trainer = make_trainer(
        tmp_path,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        mistake_log_size=4,
        mistake_log_replay=2,
        copilot_loss_weight=0.5,
        copilot_feedback_fraction=0.0,  # the observed stream, as in the reference below
    )
    model = trainer.model.train()
    rows = counting_rows(10)
    with torch.no_grad():
        for start in (4, 6, 8):  # three entries in the log
            trainer.mistake_log_callback.add(
                model(**collate(rows[start : start + 2]), return_mistake_log=True).mistake_log_entry
            )
        batches = [collate(rows[0:2]), collate(rows[2:4])]
        _, num_items_in_batch = trainer.get_batch_samples(iter(batches), 2, trainer.args.device)
        step = trainer._copilot_step
        replays = list(step.replays)
        assert [replay.x_tilde.shape[0] for replay in replays] == [4, 4]  # two entries of two rows each

        fresh_tokens = [copilot_token_count(b["labels"], b["attention_mask"]) for b in batches]
        replay_tokens = [replay.loss_mask.sum() for replay in replays]
        assert int(step.num_tokens) == int(sum(fresh_tokens) + sum(replay_tokens))
        assert int(num_items_in_batch) == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)

        loss = trainer.compute_loss(model, batches[0], num_items_in_batch=num_items_in_batch)
        out = model(**batches[0], num_items_in_batch=num_items_in_batch)
        assert int(out.copilot_num_tokens) == int(fresh_tokens[0])  # the trainer's count is the model's rule
        replay = replays[0]
        predictions = model.copilot(
            shift_right(model.copilot.embed_errors(replay.errors)),
            replay.x_tilde,
            replay.h_bar,
            replay.attention_mask,
            pilot_errors=replay.errors,
        )
        replay_error, _ = copilot_squared_error(predictions, replay)
        expected = out.pilot_loss + 0.5 * (out.copilot_squared_error + replay_error) / step.num_tokens
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert len(trainer.mistake_log_callback.mistake_log) == 4  # the fresh entry joined the log


def test_with_a_window_the_copilot_trains_on_log_rows_of_recent_rounds_only(tmp_path):
    """L_C = the Copilot's squared error on rows drawn from the last `window` entries / their count."""
    trainer = make_trainer(
        tmp_path,
        per_device_train_batch_size=2,
        mistake_log_size=4,
        mistake_log_window=2,
        copilot_feedback_fraction=0.0,
    )
    model = trainer.model.train()
    rows = counting_rows(12)
    with torch.no_grad():
        for start in (4, 6, 8):  # three entries; the window holds the last two (rows 6-9)
            trainer.mistake_log_callback.add(
                model(**collate(rows[start : start + 2]), return_mistake_log=True).mistake_log_entry
            )
        batch = collate(rows[0:2])
        _, num_items_in_batch = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
        step = trainer._copilot_step
        sampled = step.copilot_batches[0]
        recent = {tuple(collate(rows[i : i + 1])["input_ids"][0, :3].tolist()) for i in range(6, 10)}
        assert sampled.x_tilde.shape[0] == 2  # as many rows as the micro-batch: the same compute
        embeddings = model.pilot.get_input_embeddings().weight
        for row in range(2):
            tokens = (sampled.x_tilde[row, :3] @ embeddings.t()).argmax(-1)  # x_tilde is the embedding output
            assert tuple(tokens.tolist()) in recent
        assert int(step.num_tokens) == int(sampled.loss_mask.sum())
        loss = trainer.compute_loss(model, batch, num_items_in_batch=num_items_in_batch)
        out = model(**batch, num_items_in_batch=num_items_in_batch)
        predicted = model.copilot(
            shift_right(model.copilot.embed_errors(sampled.errors)),
            sampled.x_tilde,
            sampled.h_bar,
            sampled.attention_mask,
            pilot_errors=sampled.errors,
        )
        squared_error, count = copilot_squared_error(predicted, sampled)
    assert loss.item() == pytest.approx((out.pilot_loss + squared_error / count).item(), rel=1e-6)


def test_an_on_device_log_keeps_its_entries_on_the_training_device_and_trains_the_same(tmp_path):
    """`mistake_log_on_device` puts the ring buffer on `args.device` (on a CPU-only machine that is the CPU too:
    the test pins that the setting reaches the log and changes nothing else)."""
    settings = dict(per_device_train_batch_size=2, mistake_log_window=2, max_steps=3, logging_steps=1)
    host = make_trainer(tmp_path, **settings)
    host.train()
    on_device = make_trainer(tmp_path, mistake_log_on_device=True, **settings)
    on_device.train()
    host_log, device_log = (t.mistake_log_callback.mistake_log for t in (host, on_device))
    assert host_log.store_device == torch.device("cpu")
    assert device_log.store_device == on_device.args.device
    assert len(device_log) == 2 and device_log.latest().x_tilde.device == on_device.args.device
    assert logged(on_device, "copilot_loss") == logged(host, "copilot_loss")
    assert max_difference(host.model, on_device.model) == 0.0


def test_copilot_final_epochs_train_the_copilot_alone_on_the_final_pilot(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2, copilot_final_epochs=2.0, logging_steps=2)
    final_pilot, copilots = {}, []

    class Snapshot(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            final_pilot.update(snapshot(model.pilot))
            copilots.append(snapshot(model.copilot))

    trainer.add_callback(Snapshot())
    trainer.train()
    model = trainer.model
    assert all(torch.equal(value, final_pilot[name]) for name, value in model.pilot.state_dict().items())
    assert any(
        not torch.equal(value, copilots[0][name]) for name, value in model.copilot.state_dict().items()
    )
    steps = logged(trainer, "copilot_final/step")
    assert steps == [2, 4, 6, 8]  # 16 rows / batch 4 = 4 batches an epoch, two epochs
    losses = logged(trainer, "copilot_final/copilot_loss")
    assert losses[-1] < losses[0]
    assert all(p.requires_grad for p in model.pilot.parameters())  # restored for later training


def test_copilot_final_epochs_refuse_a_stream_before_the_joint_run(tmp_path):
    rows = list(counting_rows())

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    trainer = make_trainer(tmp_path, rows=Stream(), max_steps=2, copilot_final_epochs=1.0)
    before = snapshot(trainer.model)
    with pytest.raises(
        ValueError, match="no length .*Stream.*copilot_final_epochs=0.*train_copilot_on_final_pilot"
    ):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(value, before[name]) for name, value in trainer.model.state_dict().items())
    # The way the message names: the joint run on the stream, then the phase on a sized dataset.
    trainer.args.copilot_final_epochs = 0.0
    trainer.train()
    trainer.train_dataset = rows
    trainer.train_copilot_on_final_pilot(1.0)
    assert logged(trainer, "copilot_final/step")[-1] == 4  # 16 rows / batch 4


@pytest.mark.parametrize(("max_steps", "phase_steps"), [(2, 16), (6, 48), (20, 96)])
def test_the_default_phase_is_twenty_four_epochs_but_never_longer_than_eight_joint_runs(
    tmp_path, max_steps, phase_steps
):
    trainer = make_trainer(tmp_path, max_steps=max_steps, copilot_final_epochs=None, logging_steps=1)
    trainer.train()
    # 16 rows / batch 4 = 4 batches an epoch: 24 epochs are 96 batches, capped at 8 x the joint run's.
    assert logged(trainer, "copilot_final/step") == list(range(1, phase_steps + 1))


def test_the_default_phase_on_a_stream_is_eight_joint_runs_long_and_absent_with_freeze_pilot(tmp_path):
    rows = list(counting_rows())

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(rows)

    streamed = make_trainer(tmp_path, rows=Stream(), max_steps=2, copilot_final_epochs=None, logging_steps=1)
    streamed.train()
    assert logged(streamed, "copilot_final/step") == list(range(1, 17))  # the stream read again past its end
    frozen = make_trainer(tmp_path, freeze_pilot=True, max_steps=2, copilot_final_epochs=None)
    frozen.train()  # the whole run already trained the Copilot alone on the final Pilot
    assert logged(frozen, "copilot_final/step") == []
    assert CopilotTrainingArguments(output_dir=str(tmp_path)).copilot_final_epochs is None


def phase_after_two_joint_steps(tmp_path, name: str, epochs: float = 2.0, **overrides) -> CopilotTrainer:
    """Two joint steps, then Copilot-only epochs logged once an epoch (16 rows / batch 4 = 4 batches)."""
    trainer = make_trainer(tmp_path / name, max_steps=2, logging_steps=4, **overrides)
    trainer.train()
    trainer.train_copilot_on_final_pilot(epochs)
    return trainer


def phase_logs(trainer: CopilotTrainer) -> list[dict]:
    return [
        entry for entry in trainer.state.log_history if any(k.startswith("copilot_final/") for k in entry)
    ]


def phase_values(entries: list[dict]) -> list[dict]:
    """The `copilot_final/*` values of log entries, without Trainer's `epoch`."""
    return [{k: v for k, v in entry.items() if k.startswith("copilot_final/")} for entry in entries]


def test_a_phase_that_learnt_nothing_runs_again_from_its_start_with_the_fallback_weight_decay(
    tmp_path, monkeypatch
):
    # Every phase counts as having learnt nothing here, so the second phase runs whatever the Copilot learnt.
    monkeypatch.setattr(copilot_final_phase, "NOTHING_LEARNT_R2", math.inf)
    fallback = phase_after_two_joint_steps(tmp_path, "fallback", copilot_fallback_weight_decay=0.1)
    first = phase_after_two_joint_steps(tmp_path, "first")
    # The joint run at weight decay 1 (the default) in all three; the phase at 0.1 from a Copilot drawn afresh.
    direct = make_trainer(tmp_path / "direct", max_steps=2, logging_steps=4)
    direct.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(direct.args.seed)
        fresh = CopilotModel(direct.model.copilot.config)
    direct.model.copilot.load_state_dict(fresh.state_dict())
    direct.args.copilot_weight_decay = 0.1
    direct.train_copilot_on_final_pilot(2.0)

    assert max_difference(fallback.model, direct.model) == 0.0  # the same batches, order and start
    assert max_difference(fallback.model.copilot, first.model.copilot) > 0.0
    first_phase, second_phase = phase_logs(fallback)[:2], phase_logs(fallback)[3:]
    strip = phase_values(phase_logs(first))
    assert phase_values(first_phase) == strip
    # The decision reads the first phase's last epoch: its last logging window here.
    decision = phase_logs(fallback)[2]
    assert decision["copilot_final/fallback_weight_decay"] == 0.1
    assert decision["copilot_final/r2_before_fallback"] == strip[-1]["copilot_final/copilot_r2"]
    assert phase_values(second_phase) == phase_values(phase_logs(direct))
    assert all(p.requires_grad for p in fallback.model.pilot.parameters())


def test_a_phase_that_learnt_something_or_decays_no_more_than_the_fallback_runs_once(tmp_path, monkeypatch):
    learnt = phase_after_two_joint_steps(tmp_path, "learnt", epochs=6.0, copilot_fallback_weight_decay=0.1)
    assert phase_logs(learnt)[-1]["copilot_final/copilot_r2"] > copilot_final_phase.NOTHING_LEARNT_R2
    without = phase_after_two_joint_steps(tmp_path, "without", epochs=6.0)
    assert max_difference(learnt.model, without.model) == 0.0
    assert phase_logs(learnt) == phase_logs(without) and len(phase_logs(learnt)) == 6

    monkeypatch.setattr(copilot_final_phase, "NOTHING_LEARNT_R2", math.inf)
    low = phase_after_two_joint_steps(
        tmp_path, "low", copilot_weight_decay=0.1, copilot_fallback_weight_decay=0.1
    )
    assert [k for entry in phase_logs(low) for k in entry if "fallback" in k] == []
    assert len(phase_logs(low)) == 2


def test_copilot_final_weight_decay_is_the_phases_and_the_second_phase_runs_when_it_is_above_the_fallback(
    tmp_path, monkeypatch
):
    split = phase_after_two_joint_steps(
        tmp_path, "split", copilot_weight_decay=0.1, copilot_final_weight_decay=1.0
    )
    by_hand = make_trainer(tmp_path / "by_hand", max_steps=2, logging_steps=4, copilot_weight_decay=0.1)
    by_hand.train()
    by_hand.args.copilot_weight_decay = 1.0
    by_hand.train_copilot_on_final_pilot(2.0)
    assert max_difference(split.model, by_hand.model) == 0.0
    low = phase_after_two_joint_steps(tmp_path, "low", copilot_weight_decay=0.1)
    assert max_difference(split.model.copilot, low.model.copilot) > 0.0

    # The second phase compares the fallback with the phase's decay, not the joint run's.
    monkeypatch.setattr(copilot_final_phase, "NOTHING_LEARNT_R2", math.inf)
    fallback = phase_after_two_joint_steps(
        tmp_path,
        "fallback",
        copilot_weight_decay=0.1,
        copilot_final_weight_decay=1.0,
        copilot_fallback_weight_decay=0.1,
    )
    assert phase_logs(fallback)[2]["copilot_final/fallback_weight_decay"] == 0.1
    assert max_difference(fallback.model.pilot, low.model.pilot) == 0.0  # the same joint run at 0.1


def test_nothing_learnt_means_an_r2_below_five_percent():
    learnt_nothing = copilot_final_phase.learnt_nothing
    assert [learnt_nothing(r2) for r2 in (-0.2, 0.0, 0.019, 0.0499)] == [True] * 4
    assert [learnt_nothing(r2) for r2 in (0.05, 0.057, 0.9, None)] == [False] * 4


# --------------------------------------------------------------------------------------------------
# Read-backs from the training device


class _ReadBacks(TorchDispatchMode):
    """Counts values read back to the host: `.item()`, `bool()`, `float()` and `int()` of a tensor
    (`aten._local_scalar_dense`, however reached) and `.tolist()`. On an accelerator each waits for the work
    queued before it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def counting_read_backs(trainer_class, monkeypatch) -> type:
    """`trainer_class` recording the read-backs of each micro-batch (`training_step`: forward, loss, backward) and
    of each gradient-norm step (`_get_grad_norm`, before the optimizer step)."""
    counters: list[_ReadBacks] = []
    original_tolist = torch.Tensor.tolist

    def tolist(tensor):
        for counter in counters:
            counter.count += 1
        return original_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    class Counting(trainer_class):
        def _counted(self, name, method, *args, **kwargs):
            counter = _ReadBacks()
            counters.append(counter)
            try:
                with counter:
                    return method(*args, **kwargs)
            finally:
                counters.remove(counter)
                self.read_backs.setdefault(name, []).append(counter.count)

        def training_step(self, *args, **kwargs):
            return self._counted("micro-batch", super().training_step, *args, **kwargs)

        def _get_grad_norm(self, *args, **kwargs):
            return self._counted("gradient norm", super()._get_grad_norm, *args, **kwargs)

    Counting.read_backs = {}
    return Counting


@pytest.mark.parametrize("overrides", [{}, {"mistake_log_window": 2}])
def test_a_training_step_reads_back_only_what_the_stock_step_does_plus_one_check(
    tmp_path, monkeypatch, overrides
):
    """Every micro-batch of the joint run reads back exactly as often as the stock Trainer's on the same Pilot
    (the Pilot's own forward decides that); the optimizer step adds one read-back, of every finite check at once."""
    settings_ = {"gradient_accumulation_steps": 2, "max_steps": 3, "logging_steps": 100}
    ours = make_trainer(
        tmp_path, trainer_class=counting_read_backs(CopilotTrainer, monkeypatch), **settings_, **overrides
    )
    ours.train()
    stock = counting_read_backs(Trainer, monkeypatch)(
        model=build_pilot("llama"),
        args=TrainingArguments(**settings(tmp_path, **settings_)),
        train_dataset=counting_rows(),
        data_collator=collate,
    )
    stock.train()
    assert len(ours.read_backs["micro-batch"]) == len(stock.read_backs["micro-batch"]) == 6
    assert ours.read_backs["micro-batch"] == stock.read_backs["micro-batch"]
    assert ours.read_backs["gradient norm"] == [n + 1 for n in stock.read_backs["gradient norm"]]


# --------------------------------------------------------------------------------------------------
# Logging and evaluation


def test_logs_pilot_loss_copilot_rmse_and_mistake_log_stats_averaged_over_the_window(tmp_path):
    every_step = make_trainer(tmp_path, logging_steps=1, mistake_log_size=8)
    every_step.train()
    every_two = make_trainer(tmp_path, logging_steps=2, mistake_log_size=8)
    every_two.train()

    pilot = logged(every_step, "pilot_loss")
    assert logged(every_two, "pilot_loss") == pytest.approx(
        [sum(pilot[0:2]) / 2, sum(pilot[2:4]) / 2], rel=1e-6
    )
    # One entry per forward pass; the window averages the per-micro-batch values.
    assert logged(every_step, "mistake_log/entries") == [1.0, 2.0, 3.0, 4.0]
    assert logged(every_two, "mistake_log/entries") == [1.5, 3.5]
    # The window's RMSE pools the squared errors: it lies between the per-step RMSEs.
    copilot = logged(every_step, "copilot_loss")
    for i, window_rmse in enumerate(logged(every_two, "copilot_loss")):
        assert min(copilot[2 * i : 2 * i + 2]) <= window_rmse <= max(copilot[2 * i : 2 * i + 2])
    for key in (
        "mistake_log/memory_mb",
        "mistake_log/mean_error_norm",
        "mistake_log/pilot_gold_prob",
        "mistake_log/topk_dropped_mass",
    ):
        assert len(logged(every_two, key)) == 2, key
    assert all(0 < value < 1 for value in logged(every_two, "mistake_log/pilot_gold_prob"))


@torch.no_grad()
def test_evaluation_reports_pilot_and_fused_token_accuracy(tmp_path):
    from conftest import randomize_copilot

    model = make_model()
    randomize_copilot(model, std=0.5)  # a Copilot strong enough to change some argmaxes
    trainer = make_trainer(tmp_path, model=model, per_device_eval_batch_size=3)
    rows = counting_rows(7, seed=1)
    metrics = trainer.evaluate(eval_dataset=rows)

    model.eval()
    nll = labels = pilot_correct = fused_correct = squared_error = copilot_tokens = 0.0
    for start in range(0, len(rows), 3):  # the evaluation batches
        batch = collate(rows[start : start + 3])
        out = model(**batch, return_fused=True)
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        nll += torch.nn.functional.cross_entropy(out.logits[:, :-1].transpose(1, 2), targets, reduction="sum")
        labels += mask.sum()
        pilot_correct += ((out.logits[:, :-1].argmax(-1) == targets) & mask).sum()
        fused_correct += ((out.fused_logits[:, :-1].argmax(-1) == targets) & mask).sum()
        squared_error += out.copilot_squared_error
        copilot_tokens += out.copilot_num_tokens
    assert metrics["eval_pilot_token_accuracy"] == pytest.approx(float(pilot_correct / labels))
    assert metrics["eval_fused_token_accuracy"] == pytest.approx(float(fused_correct / labels))
    assert metrics["eval_pilot_token_accuracy"] != metrics["eval_fused_token_accuracy"]
    assert metrics["eval_pilot_loss"] == pytest.approx(float(nll / labels), rel=1e-5)
    assert metrics["eval_copilot_loss"] == pytest.approx(math.sqrt(squared_error / copilot_tokens), rel=1e-5)
    # eval_loss is the Pilot's, as the stock Trainer computes it on the Pilot alone.
    stock = Trainer(
        model=model.pilot,
        args=TrainingArguments(**settings(tmp_path, per_device_eval_batch_size=3)),
        eval_dataset=rows,
        data_collator=collate,
    )
    assert metrics["eval_loss"] == pytest.approx(stock.evaluate()["eval_loss"], rel=1e-6)
    assert metrics["eval_joint_loss"] == pytest.approx(
        metrics["eval_pilot_loss"] + metrics["eval_copilot_loss"] ** 2, rel=1e-6
    )


def incremental_greedy_steps(model, row: dict[str, list[int]]) -> list[tuple[bool, float, float]]:
    """Reference: decode token by token with the cache, as generate() does, feeding the gold answer.

    For each answer token: whether the fused argmax at its position is that token, ||f_C - e||^2 for the f_C that
    decoding formed there, and ||e||^2 (e = onehot(token) - the Pilot's probabilities).
    """
    ids = torch.tensor([row["input_ids"]])
    prompt = next(j for j, label in enumerate(row["labels"]) if label != -100)
    cache = PilotCopilotCache(config=model.config.get_text_config(decoder=True))
    cache.prompt_length = prompt
    out = model(ids[:, :prompt], cache=cache, use_cache=True)
    steps = []
    for position in range(prompt, ids.shape[1]):
        predicted = cache.copilot.at(position - 1)[0]
        scores = fuse_scores(out.logits[:, -1], predicted, model.config.copilot_lambda, model.config.fusion)
        error = F.one_hot(ids[:, position], scores.shape[-1]) - out.logits[:, -1].softmax(-1)
        steps.append(
            (
                int(scores.argmax(-1)) == int(ids[0, position]),
                float((predicted - error).square().sum()),
                float(error.square().sum()),
            )
        )
        out = model(ids[:, position : position + 1], cache=cache, use_cache=True)
    return steps


@pytest.mark.parametrize("copilot_feedback", ["copilot", "observed"])
def test_fused_token_accuracy_and_r2_are_what_incremental_greedy_decoding_forms(tmp_path, copilot_feedback):
    from conftest import randomize_copilot

    model = make_model()
    model.config.copilot_feedback = copilot_feedback
    randomize_copilot(model, std=0.5)  # strong enough that the feedback modes pick differently
    trainer = make_trainer(tmp_path, model=model, per_device_eval_batch_size=3)
    rows = counting_rows(7, seed=1)
    metrics = trainer.evaluate(eval_dataset=rows)
    model.eval()
    with torch.no_grad():
        steps = [step for row in rows for step in incremental_greedy_steps(model, row)]
        model.config.copilot_feedback = "observed"
        observed = [step for row in rows for step in incremental_greedy_steps(model, row)]

    def accuracy_and_r2(decoded):
        choices, residuals, norms = zip(*decoded, strict=True)
        return sum(choices) / len(choices), 1.0 - sum(residuals) / sum(norms)

    accuracy, r2 = accuracy_and_r2(steps)
    accuracy_observed, r2_observed = accuracy_and_r2(observed)
    assert metrics["eval_fused_token_accuracy"] == pytest.approx(accuracy)
    assert metrics["eval_fused_token_accuracy_observed"] == pytest.approx(accuracy_observed)
    assert metrics["eval_copilot_r2"] == pytest.approx(r2, rel=1e-4)
    assert metrics["eval_copilot_r2_observed"] == pytest.approx(r2_observed, rel=1e-4)
    if copilot_feedback == "copilot":
        assert [s[0] for s in steps] != [s[0] for s in observed]
        assert abs(r2 - r2_observed) > 0.01


class RecordingTrainer(CopilotTrainer):
    """Keeps each training micro-batch with the Pilot's and the Copilot's weights before it."""

    def compute_loss(self, model, inputs, *args, **kwargs):
        if model.training:
            self.recorded.append((inputs, snapshot(model.pilot), snapshot(model.copilot)))
        return super().compute_loss(model, inputs, *args, **kwargs)


def r2_and_loss_reference(model, batches) -> tuple[float, float]:
    """R^2 = 1 - sum ||f_C - e||^2 / sum ||e||^2 over loss-mask positions, from dense errors; and copilot_loss:
    the RMSE, or under the cross-entropy the mean of -log (p + f_C)[y]."""
    residual = total = log_loss = count = 0.0
    for batch, pilot, copilot in batches:
        if pilot is not None:
            model.pilot.load_state_dict(pilot)
            model.copilot.load_state_dict(copilot)
        with torch.no_grad():
            out = model(**batch, return_mistake_log=True)
        error = out.mistake_log_entry.errors.dense()
        mask = out.mistake_log_entry.loss_mask
        residual += float(((out.predicted_error - error).square().sum(-1) * mask).sum())
        total += float((error.square().sum(-1) * mask).sum())
        fused = out.logits.softmax(-1) + out.predicted_error
        gold = fused.gather(-1, batch["input_ids"].roll(-1, dims=1).unsqueeze(-1)).squeeze(-1)
        log_loss += float(-(gold.log() * mask).sum())
        count += float(mask.sum())
    if model.copilot.config.error_loss == "squared_error":
        return 1.0 - residual / total, math.sqrt(residual / count)
    return 1.0 - residual / total, log_loss / count


@pytest.mark.parametrize("error_form", ["linear", "reweight"])  # the squared error and the cross-entropy
def test_copilot_r2_and_loss_in_logs_and_evaluation_equal_an_independent_computation(tmp_path, error_form):
    trainer = make_trainer(
        tmp_path,
        make_model(error_form=error_form),
        trainer_class=RecordingTrainer,
        max_steps=3,
        logging_steps=3,
        copilot_feedback_fraction=0.0,
    )
    trainer.recorded = []
    trainer.train()
    model = trainer.model
    final = snapshot(model)
    rows = counting_rows(7, seed=1)
    metrics = trainer.evaluate(eval_dataset=rows)
    model.eval()
    r2, loss = r2_and_loss_reference(model, [(collate(rows[i : i + 8]), None, None) for i in range(0, 7, 8)])
    assert (metrics["eval_copilot_r2"], metrics["eval_copilot_loss"]) == pytest.approx((r2, loss), rel=1e-4)
    # Training: each step's Copilot, before its update, on that step's batch, over the logging window.
    model.train()
    r2, loss = r2_and_loss_reference(model, trainer.recorded)
    assert (logged(trainer, "copilot_r2"), logged(trainer, "copilot_loss")) == (
        pytest.approx([r2], rel=1e-4),
        pytest.approx([loss], rel=1e-4),
    )
    model.load_state_dict(final)


# --------------------------------------------------------------------------------------------------
# Checkpoints and resume


class StopAtStep(TrainerCallback):
    """Simulates an interruption right after step `step` (and its checkpoint)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def resume_settings(tmp_path, name: str) -> dict:
    return dict(
        output_dir=str(tmp_path / name),
        max_steps=6,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=3,
        mistake_log_size=4,
        mistake_log_replay=2,
    )


@pytest.mark.parametrize(
    "sampling",
    [
        {"mistake_log_window": 0},
        {"mistake_log_window": 2},
        {"mistake_log_window": 0, "copilot_final_epochs": None},  # the default Copilot-only phase after it
    ],
)
def test_resume_from_checkpoint_continues_exactly(tmp_path, sampling):
    uninterrupted = make_trainer(tmp_path, **resume_settings(tmp_path, "uninterrupted"), **sampling)
    uninterrupted.train()

    interrupted = make_trainer(tmp_path, **resume_settings(tmp_path, "interrupted"), **sampling)
    interrupted.add_callback(StopAtStep(3))
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    # The checkpoint holds the Copilot (model weights), its optimizer state and the Mistake Log entries a
    # resumed run reads: all 3 for replay from the whole log, the last 2 with a window of 2.
    state = torch.load(checkpoint / "mistake_log.pt", weights_only=True)
    expected = 2 if sampling["mistake_log_window"] else 3
    assert len(state["mistake_log"]["entries"]) == expected and "replay_generator" in state
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == len(list(interrupted.model.parameters()))

    resumed = make_trainer(
        tmp_path, model=make_model(seed=7), **resume_settings(tmp_path, "interrupted"), **sampling
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert max_difference(resumed.model, uninterrupted.model) < 1e-6
    for key in ("pilot_loss", "copilot_loss", "loss"):
        assert len(logged(resumed, key)) == 6
        assert logged(resumed, key) == pytest.approx(logged(uninterrupted, key), rel=1e-6), key
    final_losses = logged(resumed, "copilot_final/copilot_loss")
    assert len(final_losses) == (48 if "copilot_final_epochs" in sampling else 0)  # 8 x the 6 joint steps
    assert final_losses == pytest.approx(logged(uninterrupted, "copilot_final/copilot_loss"), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# Modes: frozen Pilot, gradient checkpointing, LoRA Pilot


def test_torch_compile_trains_pilot_and_copilot_exactly_as_eager_training_does(tmp_path):
    """Trainer's `torch_compile=True` (an existing script's --torch_compile) compiles Pilot + Copilot for the joint
    steps. Under dynamo's tracing and AOT autograd with eager kernels (`aot_eager`; inductor's fused kernels
    round differently) the logged losses and the weights are eager training's exactly, the Copilot-only phase's
    included."""
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        compile_args = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
        trainer = make_trainer(
            tmp_path, make_model(error_form="reweight"), copilot_final_epochs=1.0, **compile_args
        )
        trainer.train()
        runs[compiled] = trainer
    torch._dynamo.reset()
    assert isinstance(runs[True].model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(runs[False].model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    for key in ("pilot_loss", "copilot_loss", "copilot_r2", "copilot_final/copilot_loss"):
        assert len(logged(runs[True], key)) == 4
        assert logged(runs[True], key) == logged(runs[False], key)
    assert max_difference(runs[True].model, make_model(error_form="reweight")) > 1e-2  # it trained
    assert max_difference(runs[True].model, runs[False].model) == 0.0


def test_freeze_pilot_trains_only_the_copilot_and_its_loss_falls(tmp_path):
    model = make_model()
    pilot_before = snapshot(model.pilot)
    trainer = make_trainer(
        tmp_path,
        model=model,
        freeze_pilot=True,
        max_steps=16,
        per_device_train_batch_size=8,
        copilot_learning_rate=1e-2,
    )
    trainer.train()
    assert all(torch.equal(value, pilot_before[name]) for name, value in model.pilot.state_dict().items())
    assert not any(p.requires_grad for p in model.pilot.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.copilot.parameters()}
    assert not any(id(p) in optimized or p in trainer.optimizer.state for p in model.pilot.parameters())
    copilot_loss = logged(trainer, "copilot_loss")
    assert sum(copilot_loss[-3:]) / 3 < 0.8 * sum(copilot_loss[:3]) / 3


def test_gradient_checkpointing_on_the_pilot(tmp_path):
    plain = make_trainer(tmp_path, max_steps=6, copilot_lr_scheduler_type=None)
    plain.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias of activation_checkpointing
        checkpointed = make_trainer(
            tmp_path, max_steps=6, gradient_checkpointing=True, copilot_lr_scheduler_type=None
        )
    checkpointed.train()
    assert checkpointed.model.pilot.is_activation_checkpointing
    assert logged(checkpointed, "pilot_loss") == pytest.approx(logged(plain, "pilot_loss"), rel=1e-5)
    copilot_loss = logged(checkpointed, "copilot_loss")
    assert copilot_loss[-1] < copilot_loss[0]
    assert max_difference(checkpointed.model, plain.model) < 1e-5


def lora_pilot(seed: int = 0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(build_pilot("llama", seed=seed), config)


def test_lora_pilot_trains_its_adapter_and_the_copilot_but_not_its_base_weights(tmp_path):
    """PEFT goes on the Pilot before wrapping, as in a stock PEFT script; the Copilot trains in full."""
    from peft import PeftModel

    pilot = lora_pilot()
    adapter_before = snapshot(pilot)
    model = make_model(pilot=pilot)
    assert all(
        torch.equal(value, adapter_before[name]) for name, value in pilot.state_dict().items()
    )  # untouched
    before = snapshot(model)
    trainer = make_trainer(tmp_path, model=model, max_steps=3)
    trainer.train()
    after = model.state_dict()
    for name, value in after.items():
        if "lora_B" in name or name.startswith("copilot."):
            assert not torch.equal(value, before[name]), f"{name} did not train"
        elif "lora_A" not in name:
            assert torch.equal(value, before[name]), f"base weight {name} changed"

    batch = collate(counting_rows(4, seed=2))
    model.eval()
    with torch.no_grad():
        expected = model(**batch, return_fused=True).fused_logits
    # Trainer checkpoints (and save_model) hold the whole structure: they load into the same construction.
    trainer.save_model(str(tmp_path / "saved"))
    from safetensors.torch import load_file

    rebuilt = make_model(seed=3, pilot=lora_pilot(seed=3)).eval()
    rebuilt.load_state_dict(load_file(str(tmp_path / "saved" / "model.safetensors")), strict=True)
    # For deployment: the adapter alone (peft) plus the Copilot alone, back onto the base Pilot.
    model.pilot.save_pretrained(str(tmp_path / "adapter"))
    model.save_copilot(str(tmp_path / "copilot"))
    adapted = PeftModel.from_pretrained(build_pilot("llama"), str(tmp_path / "adapter"))
    deployed = PilotCopilotForCausalLM.from_copilot_checkpoint(adapted, str(tmp_path / "copilot")).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(**batch, return_fused=True).fused_logits, expected)
        assert torch.equal(deployed(**batch, return_fused=True).fused_logits, expected)


def test_lora_on_the_whole_wrapper_that_freezes_the_copilot_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    # target_modules restricted to the Pilot: every Copilot weight is frozen by PEFT.
    config = peft.LoraConfig(r=4, target_modules=r"pilot\..*\.(q_proj|v_proj)")
    wrapped = peft.get_peft_model(make_model(), config)
    with pytest.raises(ValueError, match="apply the adapter to the Pilot before wrapping"):
        CopilotTrainer(model=wrapped, args=make_args(tmp_path))

    # The fix the message names: modules_to_save=["copilot"] trains a full copy of the Copilot.
    config = peft.LoraConfig(r=4, target_modules=r"pilot\..*\.(q_proj|v_proj)", modules_to_save=["copilot"])
    wrapped = peft.get_peft_model(make_model(), config)
    before = snapshot(wrapped)
    trainer = CopilotTrainer(
        model=wrapped,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=counting_rows(),
        data_collator=collate,
    )
    trainer.train()
    changed = {name for name, value in wrapped.state_dict().items() if not torch.equal(value, before[name])}
    copilot_copy = {name for name in before if ".copilot.modules_to_save." in name}
    assert copilot_copy and copilot_copy <= changed
    assert all("lora_" in name or ".copilot.modules_to_save." in name for name in changed)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_an_empty_dataset_is_refused_before_training(tmp_path):
    trainer = make_trainer(tmp_path, rows=[])
    with pytest.raises(ValueError, match=r"train_dataset is empty \(0 examples\)"):
        trainer.train()
    with pytest.raises(ValueError, match=r"The eval dataset is empty"):
        trainer.evaluate(eval_dataset=[])


def test_a_dataset_without_labels_names_the_fix(tmp_path):
    def collate_without_labels(rows):
        batch = collate(rows)
        del batch["labels"]
        return batch

    trainer = CopilotTrainer(
        model=make_model(),
        args=make_args(tmp_path),
        train_dataset=counting_rows(),
        data_collator=collate_without_labels,
    )
    with pytest.raises(
        ValueError, match=r"no `labels` \(keys: input_ids, attention_mask\).*DataCollatorForLanguageModeling"
    ):
        trainer.train()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequences_longer_than_the_pilot_accepts_name_the_limit(tmp_path, arch):
    model = make_model(pilot=build_pilot(arch))
    long_row = {"input_ids": [FIRST_REGULAR_TOKEN] * 70, "labels": [FIRST_REGULAR_TOKEN] * 70}
    trainer = make_trainer(tmp_path, model=model, rows=counting_rows(3) + [long_row])
    with pytest.raises(
        ValueError, match=r"sequences of 70 tokens but the Pilot takes at most 64 positions.*max_length=64"
    ):
        trainer.train()


@pytest.mark.parametrize(
    ("part", "name", "step"), [("pilot", "pilot_loss", 3), ("copilot", "copilot_loss", 2)]
)
def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path, part, name, step):
    model = make_model()
    # The Copilot's final norm: training applies W_out implicitly to its output (a hooked head would run).
    head = model.pilot.lm_head if part == "pilot" else model.copilot.norm
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) == step else output

    head.register_forward_hook(poison)
    # One Copilot pass per step (no exposure pass), so the hook's call count is the step.
    trainer = make_trainer(
        tmp_path, model=model, max_steps=5, copilot_feedback_fraction=0.0, mistake_log_size=8
    )
    with pytest.raises(NonFiniteTrainingError, match=rf"{name} is nan at training step {step} "):
        trainer.train()
    assert trainer.state.global_step == step - 1  # the poisoned step made no update
    assert len(trainer.mistake_log_callback.mistake_log) == step - 1  # nor kept its entry


def test_a_micro_batch_without_labels_warns_at_its_step_and_adds_nothing_to_the_gradients(tmp_path):
    unlabelled = [{**row, "labels": [-100] * len(row["labels"])} for row in counting_rows(4)]
    rows = counting_rows(4) + unlabelled  # micro-batches of 4, unshuffled below: the second has no labels
    trainer = make_trainer(tmp_path, rows=rows, max_steps=1, gradient_accumulation_steps=2)
    reference = make_trainer(tmp_path, rows=counting_rows(4), max_steps=1)
    for run in (trainer, reference):
        run.get_train_dataloader = lambda run=run: torch.utils.data.DataLoader(
            run.train_dataset, batch_size=4, collate_fn=collate
        )
    with pytest.warns(
        UserWarning, match=r"Every label in this batch is -100: there is nothing to learn from"
    ):
        trainer.train()
    reference.train()
    assert max_difference(trainer.model, reference.model) == 0.0
