"""CopilotSFTTrainer: trl's SFTTrainer (its data handling, its metrics) with CopilotTrainer's joint objective.

Every run uses the real trl SFTTrainer on tiny random LLaMA Pilots (conftest.py) and a character tokenizer
built here, with a chat template that marks the assistant's turns. The reference for the Pilot is a plain
trl `SFTTrainer` on an identical Pilot: with separate clipping and the detached Mistake Log the Pilot must
train exactly as it does there, whatever trl does to the data. SGD keeps the comparison sharp: unlike Adam
it does not normalise a wrongly scaled gradient away.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import EOS_TOKEN_ID, build_pilot, tiny_copilot_config

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, decoders, models, processors  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import hf_copilot  # noqa: E402
from hf_copilot import PilotCopilotForCausalLM  # noqa: E402
from hf_copilot.sft import CopilotSFTConfig, CopilotSFTTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'][0] }}>{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}</s>{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
)

TEXTS = [
    "the cat sat on the mat",
    "a dog ran",
    "one two three four five",
    "abc def",
    "zz yy xx ww",
    "hello world",
    "red hen",
    "the sun is up",
]
PROMPTS = ["what is ab?", "say hi:", "spell xyz:", "a b c?"]
COMPLETIONS = [" ab.", " hi.", " x y z", " d"]
CONVERSATIONS = [
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}],
    [
        {"role": "user", "content": "abc?"},
        {"role": "assistant", "content": "def"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": "ghi jk"},
    ],
    [{"role": "user", "content": "count"}, {"role": "assistant", "content": "one two"}],
]


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Characters of the data plus pad/bos/eos/unk at conftest's ids 0-3; encoding prepends bos."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    characters = sorted(set("".join(TEXTS + PROMPTS + COMPLETIONS) + "abcdefghijklmnopqrstuvwxyz <>?:."))
    vocab = {token: index for index, token in enumerate(specials + characters)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(specials)
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert tokenizer.eos_token_id == EOS_TOKEN_ID and len(tokenizer) <= 64
    return tokenizer


DATASETS = {
    "text": lambda: Dataset.from_dict({"text": TEXTS}),
    "prompt_completion": lambda: Dataset.from_dict({"prompt": PROMPTS * 2, "completion": COMPLETIONS * 2}),
    "conversational": lambda: Dataset.from_dict({"messages": CONVERSATIONS * 2}),
}


def make_model(seed: int = 0) -> PilotCopilotForCausalLM:
    pilot = build_pilot("llama", seed=seed)
    torch.manual_seed(seed + 1)
    return PilotCopilotForCausalLM.from_pilot(pilot, tiny_copilot_config(intermediate_size=64))


def settings(tmp_path, **overrides) -> dict:
    """SFTConfig fields shared by the plain trl run and the Copilot run (trl's defaults otherwise)."""
    return {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 3,
        "optim": "sgd",
        "learning_rate": 0.5,
        "max_grad_norm": 1.0,
        "bf16": False,  # trl's default is bf16; float32 compares to 1e-6
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
        **overrides,
    }


def copilot_trainer(tmp_path, dataset, model=None, **overrides) -> CopilotSFTTrainer:
    return CopilotSFTTrainer(
        model=make_model() if model is None else model,
        args=CopilotSFTConfig(**{"copilot_final_epochs": 0.0, **settings(tmp_path, **overrides)}),
        train_dataset=dataset,
        processing_class=char_tokenizer(),
    )


def record_copilot_batches(trainer: CopilotSFTTrainer) -> list[tuple[int, int, int]]:
    """(rows, Copilot positions, length) of every Mistake Log entry the trainer adds."""
    recorded = []
    callback = trainer.mistake_log_callback
    add = callback.add

    def recording_add(entry, **kwargs):
        recorded.append((entry.loss_mask.shape[0], int(entry.loss_mask.sum()), entry.loss_mask.shape[1]))
        add(entry, **kwargs)

    callback.add = recording_add
    return recorded


def logged(trainer, key: str) -> list[float]:
    return [log[key] for log in trainer.state.log_history if key in log]


# --------------------------------------------------------------------------------------------------
# The Pilot trains exactly as under trl's SFTTrainer; the Copilot trains on the same positions


@pytest.mark.parametrize(
    "data, options",
    [
        ("text", {}),
        ("prompt_completion", {}),  # completion-only loss: trl's default for prompt/completion data
        ("conversational", {"assistant_only_loss": True}),
        ("text", {"packing": True, "max_length": 40}),  # "bfd": padding-free under trl
    ],
    ids=["text", "prompt_completion", "conversational", "packing_bfd"],
)
def test_the_pilot_trains_exactly_as_under_sft_trainer_and_the_copilot_trains_too(
    tmp_path, monkeypatch, data, options
):
    monkeypatch.setattr(hf_copilot.sft, "_METRICS_CHUNK", 5)  # trl's metrics read the logits in chunks
    model = make_model()
    copilot_before = [p.detach().clone() for p in model.copilot.parameters()]
    gradient_seen = {name: False for name, _ in model.copilot.named_parameters()}
    for name, parameter in model.copilot.named_parameters():
        parameter.register_hook(
            lambda grad, name=name: gradient_seen.update({name: gradient_seen[name] or bool(grad.any())})
        )
    trainer = copilot_trainer(tmp_path, DATASETS[data](), model=model, **options)
    trainer.train()
    reference = SFTTrainer(
        model=build_pilot("llama"),
        args=SFTConfig(**settings(tmp_path / "reference", **options)),
        train_dataset=DATASETS[data](),
        processing_class=char_tokenizer(),
    )
    reference.train()

    for key in ("loss", "mean_token_accuracy", "entropy"):
        assert logged(trainer, key) == pytest.approx(logged(reference, key), abs=1e-6, rel=0), key
    assert logged(trainer, "num_tokens") == logged(reference, "num_tokens")
    for (name, ours), theirs in zip(
        model.pilot.named_parameters(), reference.model.parameters(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=name)
    assert any(
        (p - q).abs().max() > 1e-3
        for p, q in zip(model.pilot.parameters(), build_pilot("llama").parameters(), strict=True)
    )
    # Every Copilot weight is reached by the Copilot's loss; SGD moves all but the smallest gradients (a
    # cross-attention layer's query norm can get ~1e-7, below float32's resolution at 1.0 at this rate).
    assert all(gradient_seen.values()), [name for name, seen in gradient_seen.items() if not seen]
    changed = [not torch.equal(p, q) for p, q in zip(model.copilot.parameters(), copilot_before, strict=True)]
    assert sum(changed) >= len(changed) - 1
    assert len(logged(trainer, "copilot_loss")) == len(logged(trainer, "copilot_r2")) == 3
    assert logged(trainer, "joint_loss")[0] > logged(trainer, "loss")[0]
    assert "forward" not in vars(model)  # trl's fused LM head is removed from the wrapper


@pytest.mark.parametrize("data", ["text", "prompt_completion"])
def test_the_dataset_keeps_the_columns_sft_trainer_keeps(tmp_path, data):
    """trl chooses the columns its own preparation and collators read; CopilotTrainer's wider choice (the Pilot's
    forward inputs too) does not apply under it."""
    trainer = copilot_trainer(tmp_path, DATASETS[data]())
    reference = SFTTrainer(
        model=build_pilot("llama"),
        args=SFTConfig(**settings(tmp_path / "reference")),
        train_dataset=DATASETS[data](),
        processing_class=char_tokenizer(),
    )
    for each in (trainer, reference):
        each._set_signature_columns_if_needed()
    assert trainer._signature_columns == reference._signature_columns
    assert trainer.train_dataset.column_names == reference.train_dataset.column_names


def test_completion_only_loss_reaches_the_copilot(tmp_path):
    tokenizer = char_tokenizer()
    trainer = copilot_trainer(tmp_path, DATASETS["prompt_completion"](), max_steps=2)
    batches = record_copilot_batches(trainer)
    trainer.train()
    # Two steps of 2 x 2 rows: each of the 8 examples once. trl adds eos to each completion.
    completion_tokens = sum(
        len(tokenizer(c + "</s>", add_special_tokens=False).input_ids) for c in COMPLETIONS
    )
    assert [rows for rows, _, _ in batches] == [2, 2, 2, 2]
    assert (
        sum(count for _, count, _ in batches)
        == 2 * completion_tokens
        == 2 * sum(len(c) + 1 for c in COMPLETIONS)
    )


def test_completion_only_loss_false_trains_the_copilot_on_the_prompts_too(tmp_path):
    trainer = copilot_trainer(
        tmp_path, DATASETS["prompt_completion"](), max_steps=2, completion_only_loss=False
    )
    batches = record_copilot_batches(trainer)
    trainer.train()
    # bos + prompt + completion + eos per example; every position but the last predicts the next token.
    tokens = sum(len(p) + len(c) + 2 - 1 for p, c in zip(PROMPTS, COMPLETIONS, strict=True))
    assert sum(count for _, count, _ in batches) == 2 * tokens


def test_conversational_assistant_only_loss_reaches_the_copilot(tmp_path):
    trainer = copilot_trainer(
        tmp_path,
        DATASETS["conversational"](),
        max_steps=3,
        gradient_accumulation_steps=1,
        assistant_only_loss=True,
    )
    batches = record_copilot_batches(trainer)
    trainer.train()
    # Three steps of 2 rows: each of the 6 conversations once; each assistant turn and its eos.
    assistant_tokens = sum(
        len(m["content"]) + 1 for c in CONVERSATIONS for m in c if m["role"] == "assistant"
    )
    assert sum(count for _, count, _ in batches) == 2 * assistant_tokens


def test_packing_gives_the_copilot_one_row_per_packed_sequence(tmp_path):
    trainer = copilot_trainer(
        tmp_path,
        DATASETS["text"](),
        packing=True,
        max_length=40,
        max_steps=-1,
        num_train_epochs=1,
        gradient_accumulation_steps=1,
    )
    batches = record_copilot_batches(trainer)
    trainer.train()  # one epoch
    # Fewer packed examples than texts; every text (bos + text + eos) comes back as its own row.
    assert len(trainer.train_dataset) < len(TEXTS)
    assert len(batches) == -(-len(trainer.train_dataset) // 2)
    assert sum(rows for rows, _, _ in batches) == len(TEXTS)
    assert sum(count for _, count, _ in batches) == sum(len(text) + 1 for text in TEXTS)
    assert max(length for _, _, length in batches) <= max(len(text) + 2 for text in TEXTS)


def test_wrapped_packing_keeps_trls_rows(tmp_path):
    trainer = copilot_trainer(
        tmp_path,
        DATASETS["text"](),
        packing=True,
        packing_strategy="wrapped",
        max_length=16,
        max_steps=1,
        gradient_accumulation_steps=1,
    )
    batches = record_copilot_batches(trainer)
    trainer.train()
    # Rows of 16 tokens cut across texts, as trl builds them: the Pilot and the Copilot see the same rows.
    assert batches == [(2, 2 * 15, 16)]


# --------------------------------------------------------------------------------------------------
# Evaluation, adapters, the SFT-then-freeze path


def test_evaluation_logs_copilot_and_trl_metrics(tmp_path):
    trainer = CopilotSFTTrainer(
        model=make_model(),
        args=CopilotSFTConfig(**settings(tmp_path)),
        train_dataset=DATASETS["text"](),
        eval_dataset=DATASETS["conversational"](),
        processing_class=char_tokenizer(),
    )
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_copilot_r2", "eval_fused_token_accuracy", "eval_mean_token_accuracy"):
        assert key in metrics, key
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(
        metrics["eval_pilot_token_accuracy"], abs=1e-6
    )
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_pilot_loss"], abs=1e-5)


def test_peft_config_adapts_the_pilot_and_trains_the_whole_copilot(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model()
    pilot_before = {n: p.detach().clone() for n, p in model.pilot.named_parameters()}
    copilot_before = [p.detach().clone() for p in model.copilot.parameters()]
    trainer = CopilotSFTTrainer(
        model=model,
        args=CopilotSFTConfig(**settings(tmp_path, max_steps=2)),  # trl's default gradient checkpointing on
        train_dataset=DATASETS["text"](),
        processing_class=char_tokenizer(),
        peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    trainer.train()
    assert isinstance(model.pilot, peft.PeftModel)
    lora = {n: p for n, p in model.pilot.named_parameters() if "lora_B" in n}
    assert len(lora) == 4 and all(p.abs().max() > 0 for p in lora.values())  # lora_B starts at 0
    for name, p in model.pilot.get_base_model().named_parameters():
        if "lora" not in name:
            assert torch.equal(p, pilot_before[name.replace(".base_layer", "")]), name
    assert all(not torch.equal(p, q) for p, q in zip(model.copilot.parameters(), copilot_before, strict=True))


def test_sft_then_freeze_pilot_trains_only_the_copilot(tmp_path):
    sft = SFTTrainer(
        model=build_pilot("llama"),
        args=SFTConfig(**settings(tmp_path / "sft", max_steps=2)),
        train_dataset=DATASETS["text"](),
        processing_class=char_tokenizer(),
    )
    sft.train()
    sft.save_model(str(tmp_path / "sft-pilot"))
    pilot = AutoModelForCausalLM.from_pretrained(tmp_path / "sft-pilot")
    model = PilotCopilotForCausalLM.from_pilot(pilot, tiny_copilot_config())
    pilot_before = [p.detach().clone() for p in model.pilot.parameters()]
    copilot_before = [p.detach().clone() for p in model.copilot.parameters()]
    trainer = copilot_trainer(
        tmp_path / "copilot", DATASETS["text"](), model=model, freeze_pilot=True, max_steps=2
    )
    trainer.train()
    assert all(torch.equal(p, q) for p, q in zip(model.pilot.parameters(), pilot_before, strict=True))
    assert all(not torch.equal(p, q) for p, q in zip(model.copilot.parameters(), copilot_before, strict=True))
    assert logged(trainer, "loss") == pytest.approx(logged(trainer, "pilot_loss"))


# --------------------------------------------------------------------------------------------------
# Refused settings and the optional dependency


def test_settings_that_would_bypass_the_joint_loss_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"loss_type='dft'.*Set loss_type='nll'"):
        CopilotSFTConfig(**settings(tmp_path, loss_type="dft"))
    with pytest.raises(ValueError, match="use_liger_kernel=True is not supported"):
        CopilotSFTConfig(**settings(tmp_path, use_liger_kernel=True))
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        CopilotSFTConfig(**settings(tmp_path, label_smoothing_factor=0.1))
    with pytest.raises(TypeError, match=r"needs CopilotSFTConfig, got SFTConfig"):
        CopilotSFTTrainer(
            model=make_model(), args=SFTConfig(**settings(tmp_path)), train_dataset=DATASETS["text"]()
        )
    with pytest.raises(TypeError, match=r"got LlamaForCausalLM: wrap your model"):
        CopilotSFTTrainer(
            model=build_pilot("llama"),
            args=CopilotSFTConfig(**settings(tmp_path)),
            train_dataset=DATASETS["text"](),
            processing_class=char_tokenizer(),
        )


def test_config_keeps_sft_config_defaults_and_adds_the_copilots(tmp_path):
    # use_cpu: trl's default bf16=True needs it on a machine without a GPU.
    config = CopilotSFTConfig(output_dir=str(tmp_path), use_cpu=True)
    reference = SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    for name in ("learning_rate", "logging_steps", "gradient_checkpointing", "bf16", "max_length", "packing"):
        assert getattr(config, name) == getattr(reference, name), name
    assert (config.copilot_loss_weight, config.freeze_pilot, config.mistake_log_size) == (1.0, False, None)


def test_importing_hf_copilot_does_not_import_trl_and_the_sft_classes_name_the_extra_without_it():
    script = (
        "import sys, hf_copilot\n"
        "print('trl' in sys.modules)\n"
        "sys.modules['trl'] = None\n"
        "try:\n    hf_copilot.CopilotSFTTrainer\nexcept ImportError as error:\n    print(error)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    imported, message = result.stdout.split("\n")[:2]
    assert imported == "False"
    assert re.match(
        r'CopilotSFTTrainer and CopilotSFTConfig need trl>=[\d.]+: pip install "hf-copilot\[trl\]"', message
    )


def test_the_sft_classes_are_importable_from_hf_copilot():
    assert hf_copilot.CopilotSFTTrainer is CopilotSFTTrainer
    assert hf_copilot.CopilotSFTConfig is CopilotSFTConfig
