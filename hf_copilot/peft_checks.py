"""What `CopilotTrainer` checks on a PEFT model: the Copilot trains whole, and an adapter on the whole model names
a base that loads the whole model.

A Copilot is trained from its initialisation, so an adapter that freezes it (PEFT applied to the whole wrapper
without `modules_to_save=["copilot"]`) would leave it nearly random. The Copilot reuses LLaMA's layer names
(q_proj, v_proj, ...), so LoRA `target_modules` meant for the Pilot, or "all-linear", match its layers too.
"""

from __future__ import annotations

import warnings

from torch import nn

MIN_TRAINED_FRACTION = 0.5  # a Copilot with less of its weights trainable is refused
PILOT_FIRST = (
    "apply the adapter to the Pilot before wrapping (pilot = get_peft_model(pilot, lora_config); "
    "PilotCopilotForCausalLM.from_pilot(pilot)), or add modules_to_save=['copilot'] to the adapter config "
    "(the whole Copilot then trains and no adapter layer lands on it)."
)


def adapter_layers(module: nn.Module) -> list[str]:
    """Names of the PEFT adapter layers (LoRA and the like) inside `module`."""
    # peft's BaseTunerLayer, recognised without importing peft.
    return [name for name, child in module.named_modules() if name and hasattr(type(child), "get_base_layer")]


def check_copilot_trains(copilot: nn.Module) -> None:
    """Refuse a Copilot of which less than half the weights train, naming the adapter layers that landed on it.

    Counted: the weights the Copilot runs with, i.e. not the adapters' own (lora_A, lora_B, ...) and not the frozen
    original that `modules_to_save` keeps beside its trained copy.
    """
    adapters = adapter_layers(copilot)
    own = tuple(f"{name}." for name in adapters)
    total = trained = 0
    for name, parameter in copilot.named_parameters():
        is_adapter = name.startswith(own) and ".base_layer." not in name
        if is_adapter or "original_module." in name:
            continue
        total += parameter.numel()
        trained += parameter.numel() if parameter.requires_grad else 0
    fraction = trained / max(total, 1)
    if fraction >= MIN_TRAINED_FRACTION:
        return
    if adapters:
        shown = ", ".join(f"copilot.{name}" for name in adapters[:3]) + (", ..." if len(adapters) > 3 else "")
        raise ValueError(
            f"The PEFT adapter landed on {len(adapters)} of the Copilot's layers ({shown}) and froze the rest: "
            f"{fraction:.1%} of the Copilot's weights train. The Copilot reuses LLaMA's layer names, so "
            "target_modules meant for the Pilot (or 'all-linear') match its layers too; a Copilot is trained from "
            f"its initialisation and needs all of its weights. To train it, {PILOT_FIRST}"
        )
    raise ValueError(
        f"The Copilot is frozen: {fraction:.1%} of its weights train, and a Copilot is trained from its "
        f"initialisation. With PEFT, {PILOT_FIRST}"
    )


def warn_if_adapter_base_is_the_pilot(model: nn.Module, pilot_copilot: nn.Module) -> None:
    """Warn when PEFT on the whole model records the Pilot alone (or nothing) as the adapter's base model.

    peft records the wrapper's `name_or_path`; a wrapper built with `from_pilot` carries its Pilot's, so
    `AutoPeftModelForCausalLM` would load that Pilot without a Copilot.
    """
    configs = getattr(model, "peft_config", None)
    if model is pilot_copilot or not isinstance(configs, dict):
        return
    pilot_path = pilot_copilot.pilot.config.name_or_path
    for config in configs.values():
        base = getattr(config, "base_model_name_or_path", None)
        if base and base != pilot_path:
            continue
        named = f"names {base!r}, the Pilot alone," if base else "names no base model"
        warnings.warn(
            f"The PEFT adapter on the whole model {named} as its base: AutoPeftModelForCausalLM.from_pretrained("
            "<adapter>) will not load it with its Copilot. Load it with PeftModel.from_pretrained(model, <adapter>) "
            "onto the same construction, or build the model from a folder before get_peft_model "
            "(model.save_copilot(folder); model = PilotCopilotForCausalLM.from_pretrained(folder)): the adapter "
            "then names that folder.",
            stacklevel=3,
        )
        return


__all__ = ["adapter_layers", "check_copilot_trains", "warn_if_adapter_base_is_the_pilot"]
