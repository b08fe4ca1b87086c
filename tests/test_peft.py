"""PEFT (LoRA) with a Copilot: every way users save and load such models, and what CopilotTrainer refuses.

- A LoRA Pilot inside the wrapper: `save_pretrained` (and Trainer checkpoints) record the adapter in config.json,
  so the Auto classes, `from_pretrained` and remote code rebuild it; checkpoints written before that are refused
  naming the fix. A merged Pilot saves as a plain checkpoint; a Copilot attaches to it when allowed.
- The Pilot's adapter folder as a Copilot's base: one call loads both (transformers applies the adapter).
- PEFT on the whole wrapper: LoRA targets match the Copilot's LLaMA-named layers too; CopilotTrainer refuses a
  Copilot so frozen, and `modules_to_save=["copilot"]` is the fix. `AutoPeftModelForCausalLM` loads such an adapter
  with its Copilot when the wrapper came from a folder.
"""

from __future__ import annotations

import json
import math
import re
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import (
    FIRST_REGULAR_TOKEN,
    VOCAB_SIZE,
    build_batch,
    build_pilot,
    build_pilot_copilot,
    run_without_hf_copilot,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_copilot import CopilotTrainer, CopilotTrainingArguments, PilotCopilotForCausalLM, copilot_final_phase
from hf_copilot.peft_checks import adapter_layers

peft = pytest.importorskip("peft")
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402

Q_V = ["q_proj", "v_proj"]


def exactly(text: str) -> str:
    return f"^{re.escape(text)}$"


def trained_lora(pilot, target_modules=Q_V, seed: int = 0):
    """`get_peft_model` with lora_B drawn at random (zero at init): the adapter changes the Pilot's outputs."""
    pilot = get_peft_model(
        pilot, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, task_type="CAUSAL_LM")
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pilot.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return pilot


def saved_pilot(directory):
    build_pilot("llama").save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**build_batch(), return_fused=True)
    return out.logits, out.fused_logits


def assert_same_outputs(model, loaded) -> None:
    for expected, actual in zip(outputs(model), outputs(loaded), strict=True):
        assert torch.equal(actual, expected)


def counting_rows(n: int = 8) -> list[dict[str, list[int]]]:
    """Rows of 8 counting tokens (token j+1 = token j + 1), the first 2 unlabelled."""
    span = VOCAB_SIZE - FIRST_REGULAR_TOKEN
    rows = []
    for i in range(n):
        ids = [FIRST_REGULAR_TOKEN + (3 * i + k) % span for k in range(8)]
        rows.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return rows


def training_args(tmp_path, **overrides) -> CopilotTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        dataloader_pin_memory=False,
        copilot_final_epochs=0.0,
    )
    return CopilotTrainingArguments(**{**settings, **overrides})


# --------------------------------------------------------------------------------------------------
# A LoRA Pilot inside the wrapper: save_pretrained, Trainer checkpoints


@pytest.mark.parametrize(("arch", "target_modules"), [("llama", Q_V), ("gemma", "all-linear")])
def test_a_lora_pilot_checkpoint_rebuilds_its_adapter_through_every_loader(arch, target_modules, tmp_path):
    model = build_pilot_copilot(trained_lora(build_pilot(arch), target_modules))
    model.save_pretrained(tmp_path / "saved")
    recorded = json.loads((tmp_path / "saved" / "config.json").read_text())["pilot_peft_config"]
    assert list(recorded) == ["default"]
    assert recorded["default"]["peft_type"] == "LORA" and recorded["default"]["r"] == 4
    # The tensors keep their PEFT names: what Trainer resume loads into the same construction.
    assert any(
        name.startswith("pilot.base_model.model.")
        for name in load_file(tmp_path / "saved" / "model.safetensors")
    )

    for loaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "saved"),
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "saved"),
    ):
        assert isinstance(loaded.pilot, PeftModel)
        assert_same_outputs(model, loaded.eval())
        # As get_peft_model left it: the adapter trains, the base weights do not, the Copilot does.
        trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
        assert trainable == {name for name, p in model.named_parameters() if p.requires_grad}
        assert any("lora_A" in name for name in trainable) and not any(
            "base_layer" in name for name in trainable
        )
    if arch == "gemma":  # tied embeddings stay tied inside the PeftModel
        base = loaded.pilot.get_base_model()
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    batch = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(**batch, return_fused=True)
    torch.save(
        {"module": type(model).__module__, "pilot": type(model.pilot).__name__, "fused": out.fused_logits},
        sys.argv[3],
    )
    """
)


def test_remote_code_rebuilds_the_lora_pilot_without_hf_copilot(tmp_path):
    model = build_pilot_copilot(trained_lora(build_pilot("llama")))
    model.save_pretrained(tmp_path / "saved")
    torch.save(build_batch(), tmp_path / "batch.pt")
    run_without_hf_copilot(REMOTE_CODE_SCRIPT, tmp_path, "saved", "batch.pt", "out.pt")
    remote = torch.load(tmp_path / "out.pt")
    assert remote["module"].startswith("transformers_modules")
    assert remote["pilot"] == "PeftModelForCausalLM"
    assert torch.equal(remote["fused"], outputs(model)[1])


def test_a_lora_pilot_checkpoint_without_peft_installed_names_the_fix(tmp_path, monkeypatch):
    build_pilot_copilot(trained_lora(build_pilot("llama"))).save_pretrained(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "peft", None)  # how Python spells "not installed"
    message = (
        "This checkpoint's Pilot carries a PEFT adapter (pilot_peft_config in config.json): pip install peft to load "
        "it, or save it again with the adapter merged into the Pilot: model.pilot = model.pilot.merge_and_unload(); "
        "model.save_pretrained(path)."
    )
    with pytest.raises(ImportError, match=exactly(message)):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "saved")


def test_a_lora_pilot_checkpoint_that_does_not_record_its_adapter_is_refused_naming_the_fix(tmp_path):
    """As written before config.json recorded the adapter: loading it gave a random Pilot, now it is refused."""
    build_pilot_copilot(trained_lora(build_pilot("llama"))).save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["pilot_peft_config"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    message = (
        f"The weights in {tmp_path / 'old'} are not those of the model its config.json describes (missing tensors: "
        "21 (pilot.lm_head.weight, pilot.model.embed_tokens.weight, pilot.model.layers.0.input_layernorm.weight, "
        "...); unexpected tensors: 29 (pilot.base_model.model.lm_head.weight, "
        "pilot.base_model.model.model.embed_tokens.weight, pilot.base_model.model.model.layers.0.input_layernorm"
        ".weight, ...)): a missing tensor would be left randomly initialised. Its Pilot carried a PEFT adapter "
        "(pilot.base_model.model.* tensors) that config.json does not record. Rebuild the model as it was trained "
        "and load the file into it: pilot = get_peft_model(base_pilot, lora_config); model = "
        "PilotCopilotForCausalLM.from_pilot(pilot, copilot_config); model.load_state_dict(safetensors.torch."
        "load_file(<checkpoint>/model.safetensors)); then model.save_pretrained(path) writes a folder that loads "
        "(it records the adapter)."
    )
    for load in (AutoModelForCausalLM.from_pretrained, PilotCopilotForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=exactly(message)):
            load(tmp_path / "old")


def test_trainer_checkpoints_of_a_lora_pilot_resume_and_load_through_the_auto_classes(tmp_path):
    def trainer(**overrides):
        model = build_pilot_copilot(get_peft_model(build_pilot("llama"), LoraConfig(r=4, target_modules=Q_V)))
        args = training_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, **overrides)
        return CopilotTrainer(model=model, args=args, train_dataset=counting_rows())

    uninterrupted = trainer()
    uninterrupted.train()
    final = tmp_path / "run" / "checkpoint-4"
    assert_same_outputs(uninterrupted.model.eval(), AutoModelForCausalLM.from_pretrained(final).eval())

    resumed = trainer(output_dir=str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    for (name, expected), actual in zip(
        uninterrupted.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.allclose(actual, expected, atol=1e-6), name


# --------------------------------------------------------------------------------------------------
# Merged LoRA Pilots; the Pilot's adapter folder as a Copilot's base


def test_a_lora_pilots_loss_keeps_the_entrys_probabilities_on_its_base_model(tmp_path):
    """PeftModel hands the labels to its base model, whose loss function the wrapper stands in for."""
    model = build_pilot_copilot(trained_lora(saved_pilot(tmp_path / "base")))
    batch = build_batch()
    out = model(**batch, return_mistake_log=True)
    assert torch.equal(out.pilot_loss, model.pilot(**batch).loss)
    assert torch.equal(
        out.mistake_log_entry.errors.probs, torch.log_softmax(out.logits.detach().float(), dim=-1).exp()
    )
    assert "_loss_function" not in vars(model.pilot.get_base_model())


def test_a_merged_lora_pilot_saves_as_a_plain_checkpoint_and_takes_its_copilot_when_allowed(
    tmp_path, monkeypatch
):
    pilot = saved_pilot(tmp_path / "base")
    model = build_pilot_copilot(trained_lora(pilot))
    model.pilot.save_pretrained(tmp_path / "adapter")
    model.save_copilot(tmp_path / "copilot", base_model_name_or_path=str(tmp_path / "adapter"))
    lora_logits, lora_fused = outputs(model)

    # A Copilot-only folder onto the merged Pilot: other tensors, so only on purpose.
    merged = PeftModel.from_pretrained(
        saved_pilot(tmp_path / "base"), tmp_path / "adapter"
    ).merge_and_unload()
    difference = "its architecture differs: tensor names differ (21 tensors here, 29 in the Copilot's Pilot)"
    with pytest.raises(ValueError, match=re.escape(f"different Pilot ({difference})")):
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=merged)
    with pytest.warns(
        UserWarning, match=exactly(f"Attaching a Copilot trained with another Pilot: {difference}.")
    ):
        attached = PilotCopilotForCausalLM.from_pretrained(
            tmp_path / "copilot", pilot=merged, allow_other_pilot=True
        )
    merged_logits, merged_fused = outputs(attached.eval())
    # The same function up to float rounding (merging adds B @ A into the weights).
    assert torch.allclose(merged_logits, lora_logits, atol=1e-5)
    assert torch.allclose(merged_fused, lora_fused, atol=1e-2)
    assert torch.equal(merged_fused.argmax(-1), lora_fused.argmax(-1))

    # The whole model with the adapter merged: a plain checkpoint, which loads without peft.
    model.pilot = model.pilot.merge_and_unload()
    model.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["pilot_peft_config"] is None
    monkeypatch.setitem(sys.modules, "peft", None)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_same_outputs(model, loaded)


def test_a_copilot_whose_base_is_the_pilots_adapter_folder_loads_with_it_in_one_call(tmp_path):
    model = build_pilot_copilot(trained_lora(saved_pilot(tmp_path / "base")))
    model.pilot.save_pretrained(tmp_path / "adapter")  # its base_model_name_or_path: tmp_path / "base"
    model.save_copilot(tmp_path / "copilot", base_model_name_or_path=str(tmp_path / "adapter"))
    # transformers applies the adapter to its base (not a PeftModel): the same tensors, the same fingerprint.
    for load in (AutoModelForCausalLM.from_pretrained, PilotCopilotForCausalLM.from_pretrained):
        loaded = load(tmp_path / "copilot").eval()
        assert adapter_layers(loaded.pilot)
        assert_same_outputs(model, loaded)
    # The deployment path of docs/howto-train.md: the adapter with peft, then the Copilot onto it.
    adapted = PeftModel.from_pretrained(saved_pilot(tmp_path / "base"), tmp_path / "adapter")
    assert_same_outputs(
        model, PilotCopilotForCausalLM.from_pretrained(tmp_path / "copilot", pilot=adapted).eval()
    )


# --------------------------------------------------------------------------------------------------
# PEFT on the whole wrapper


def whole_model_lora(model=None, **config):
    model = build_pilot_copilot(build_pilot("llama")) if model is None else model
    return get_peft_model(model, LoraConfig(r=4, **config))


FIX = (
    "apply the adapter to the Pilot before wrapping (pilot = get_peft_model(pilot, lora_config); "
    "PilotCopilotForCausalLM.from_pilot(pilot)), or add modules_to_save=['copilot'] to the adapter config "
    "(the whole Copilot then trains and no adapter layer lands on it)."
)


@pytest.mark.parametrize(
    ("target_modules", "landed"),
    [
        (
            Q_V,
            "4 of the Copilot's layers (copilot.layers.0.self_attn.q_proj, copilot.layers.0.self_attn.v_proj, "
            "copilot.layers.1.self_attn.q_proj, ...)",
        ),
        (
            "all-linear",
            "16 of the Copilot's layers (copilot.error_proj, copilot.layers.0.self_attn.q_proj, "
            "copilot.layers.0.self_attn.k_proj, ...)",
        ),
    ],
)
def test_lora_targets_that_land_on_the_copilot_are_refused_naming_them(target_modules, landed, tmp_path):
    wrapped = whole_model_lora(target_modules=target_modules)
    message = (
        f"The PEFT adapter landed on {landed} and froze the rest: 0.0% of the Copilot's weights train. The Copilot "
        "reuses LLaMA's layer names, so target_modules meant for the Pilot (or 'all-linear') match its layers too; "
        f"a Copilot is trained from its initialisation and needs all of its weights. To train it, {FIX}"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        CopilotTrainer(model=wrapped, args=training_args(tmp_path))


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": r"pilot\..*\.(q_proj|v_proj)"},
        {"target_modules": Q_V, "exclude_modules": r"copilot\..*"},
    ],
)
def test_lora_on_the_pilots_layers_alone_still_freezes_the_copilot_and_is_refused(config, tmp_path):
    wrapped = whole_model_lora(**config)
    assert not adapter_layers(wrapped.get_base_model().copilot)  # peft 0.21 honours both forms
    message = (
        "The Copilot is frozen: 0.0% of its weights train, and a Copilot is trained from its initialisation. "
        f"With PEFT, {FIX}"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        CopilotTrainer(model=wrapped, args=training_args(tmp_path))


def test_modules_to_save_copilot_keeps_every_adapter_off_the_copilot_and_trains_it(tmp_path):
    wrapped = whole_model_lora(target_modules="all-linear", modules_to_save=["copilot"])
    copilot = wrapped.get_base_model().copilot
    assert not adapter_layers(copilot)
    assert adapter_layers(wrapped.get_base_model().pilot)
    trained = copilot.modules_to_save["default"]
    before = {name: p.detach().clone() for name, p in trained.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adapter-base warning: see the next test
        trainer = CopilotTrainer(model=wrapped, args=training_args(tmp_path), train_dataset=counting_rows())
    trainer.train()
    assert all(not torch.equal(p, before[name]) for name, p in trained.named_parameters())


def test_the_second_phase_redraws_the_copilot_that_modules_to_save_trains(tmp_path, monkeypatch):
    monkeypatch.setattr(copilot_final_phase, "NOTHING_LEARNT_R2", math.inf)  # the second phase always runs
    wrapped = whole_model_lora(target_modules="all-linear", modules_to_save=["copilot"])
    copilot = wrapped.get_base_model().copilot
    original = {name: p.detach().clone() for name, p in copilot.original_module.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adapter-base warning
        trainer = CopilotTrainer(
            model=wrapped,
            args=training_args(tmp_path, copilot_final_epochs=1.0),
            train_dataset=counting_rows(),
        )
    trainer.train()
    assert [
        e["copilot_final/fallback_weight_decay"]
        for e in trainer.state.log_history
        if "copilot_final/fallback_weight_decay" in e
    ] == [0.1]
    assert all(torch.equal(p, original[name]) for name, p in copilot.original_module.named_parameters())

    trained = copilot.modules_to_save["default"]
    copilot_final_phase.redraw(copilot, seed=3)
    torch.manual_seed(3)
    fresh = type(trained)(trained.config)
    assert all(torch.equal(p, q) for p, q in zip(trained.parameters(), fresh.parameters(), strict=True))
    assert all(torch.equal(p, original[name]) for name, p in copilot.original_module.named_parameters())


@pytest.mark.parametrize("folder", ["whole", "copilot-only"])
def test_auto_peft_model_loads_a_whole_model_adapter_with_its_copilot(folder, tmp_path):
    """peft names the wrapper's name_or_path as the adapter's base: a folder that loads the whole model."""
    model = build_pilot_copilot(saved_pilot(tmp_path / "pilot"))
    if folder == "whole":
        model.save_pretrained(tmp_path / "start")
    else:
        model.save_copilot(tmp_path / "start")
    wrapped = whole_model_lora(
        PilotCopilotForCausalLM.from_pretrained(tmp_path / "start"),
        target_modules=Q_V,
        modules_to_save=["copilot"],
        task_type="CAUSAL_LM",
    )
    trainer = CopilotTrainer(model=wrapped, args=training_args(tmp_path), train_dataset=counting_rows())
    trainer.train()
    wrapped.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "start")

    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(loaded.get_base_model(), PilotCopilotForCausalLM)
    assert_same_outputs(wrapped.eval(), loaded)


def test_a_whole_model_adapter_of_a_from_pilot_model_warns_that_it_names_the_pilot(tmp_path):
    pilot_path = str(tmp_path / "pilot")
    wrapped = whole_model_lora(
        build_pilot_copilot(saved_pilot(pilot_path)), target_modules=Q_V, modules_to_save=["copilot"]
    )
    message = (
        f"The PEFT adapter on the whole model names {pilot_path!r}, the Pilot alone, as its base: "
        "AutoPeftModelForCausalLM.from_pretrained(<adapter>) will not load it with its Copilot. Load it with "
        "PeftModel.from_pretrained(model, <adapter>) onto the same construction, or build the model from a folder "
        "before get_peft_model (model.save_copilot(folder); model = PilotCopilotForCausalLM.from_pretrained(folder)): "
        "the adapter then names that folder."
    )
    with pytest.warns(UserWarning, match=exactly(message)):
        trainer = CopilotTrainer(model=wrapped, args=training_args(tmp_path), train_dataset=counting_rows())
    trainer.train()
    wrapped.save_pretrained(tmp_path / "adapter")
    # The loader the warning names: the same construction (its Copilot copy comes from the adapter).
    rebuilt = build_pilot_copilot(saved_pilot(pilot_path), seed=5)
    loaded = PeftModel.from_pretrained(rebuilt, tmp_path / "adapter").eval()
    assert_same_outputs(wrapped.eval(), loaded)


def test_the_model_card_of_a_lora_pilot_installs_peft(tmp_path):
    from hf_copilot.hub import build_model_card

    assert (
        "`pip install transformers torch safetensors peft`"
        in build_model_card(build_pilot_copilot(trained_lora(build_pilot("llama")))).text
    )
    assert (
        "`pip install transformers torch safetensors`" in build_model_card(build_pilot_copilot("llama")).text
    )
