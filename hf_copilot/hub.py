"""Hub uploads: the exact folder a push sends, and its model card (SPEC section 6).

Two kinds of upload, both built by `stage_for_upload` and sent by `push_to_hub`:
- the whole model: config.json with `auto_map`, the Hub-facing modeling files, safetensors weights,
  generation_config.json and README.md, so `AutoModelForCausalLM.from_pretrained(repo,
  trust_remote_code=True)` works without hf_copilot installed;
- the Copilot alone (PEFT-style): what `save_copilot` writes (Copilot weights, a config naming the base
  Pilot and its fingerprint, the fusion settings) and README.md; it loads with
  `PilotCopilotForCausalLM.from_pretrained(repo)` onto its base Pilot.

Importing hf_copilot makes `PilotCopilotForCausalLM.push_to_hub` / `push_copilot_to_hub` this module's
`push_to_hub` (`attach_push_methods`); the Hub-facing modeling file knows nothing of it, so a model loaded
with `trust_remote_code` where hf_copilot is not installed keeps transformers' generic `push_to_hub`. A
Trainer writes the same card with `build_model_card(model, ...).save(os.path.join(output_dir, "README.md"))`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from functools import partialmethod

import torch
import transformers
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from .checkpointing import atomic_save_directory, pilot_fingerprint
from .configuration_pilot_copilot import FUSION_FIELDS
from .modeling_pilot_copilot import PilotCopilotForCausalLM

PAPER = "Transformer Copilot: Learning from The Mistake Log in LLM Fine-tuning (Zou et al., 2025)"
PAPER_URL = "https://arxiv.org/abs/2505.16270"
MODEL_CARD_TAGS = ("hf-copilot", "transformer-copilot", "pilot-copilot", "arxiv:2505.16270")
README_NAME = "README.md"
USAGE_PROMPT = "Hello"
# The hyperparameters a card lists when it is given the run's TrainingArguments.
TRAINING_FIELDS = (
    "learning_rate",
    "copilot_learning_rate",
    "lr_scheduler_type",
    "copilot_lr_scheduler_type",
    "warmup_steps",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "copilot_weight_decay",
    "copilot_final_weight_decay",
    "copilot_fallback_weight_decay",
    "max_grad_norm",
    "seed",
    "copilot_loss_weight",
    "copilot_final_epochs",
    "freeze_pilot",
    "mistake_log_size",
    "mistake_log_window",
    "mistake_log_replay",
    "mistake_log_topk",
)


def hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it can name a Hub model (not a local folder), else None.

    The Hub rejects a card whose `base_model` is not a model id, so local paths stay out of the metadata.
    """
    if not name_or_path or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _check_evaluation_results(evaluation_results: Mapping[str, float] | None) -> dict[str, float]:
    results = dict(evaluation_results or {})
    for metric, value in results.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"evaluation_results maps a metric name to one finite number; {metric!r} has {value!r}."
            )
    return results


def build_model_card(
    model,
    evaluation_results: Mapping[str, float] | None = None,
    copilot_only: bool = False,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    eval_dataset: str | None = None,
    tags: Sequence[str] | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    datasets: str | list[str] | None = None,
    training_details: str | None = None,
    training_args=None,
    tokenizer_source: str | None = None,
) -> ModelCard:
    """The README.md of an upload: Hub metadata, what the model is, how to load it, its evaluation.

    `base_model` defaults to the Pilot's `name_or_path` (kept out of the metadata when it is a local
    path). `evaluation_results` ({metric: value}) become a model-index on `eval_dataset` (default
    "custom") and a table. `training_args` (the run's TrainingArguments) become a hyperparameter table,
    `training_details` free markdown under it. `tokenizer_source` is where the usage code loads the
    tokenizer from (the repository itself when the upload holds it).
    """
    results = _check_evaluation_results(evaluation_results)
    base = base_model or model.pilot.config.name_or_path or None
    base_id = hub_model_id(base)
    default_name = "Copilot" if copilot_only else "Pilot + Copilot"
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else None) or default_name
    fusion = {key: getattr(model.config, key) for key in FUSION_FIELDS}
    card_tags = [*MODEL_CARD_TAGS, *([] if copilot_only else ["custom_code"])]
    card_tags += [*(getattr(model, "model_tags", None) or []), *(tags or [])]
    copilot_metadata = {
        "checkpoint": "copilot-only" if copilot_only else "pilot+copilot",
        **fusion,
        "copilot_parameters": model.copilot.num_parameters(),
        "pilot_parameters": model.pilot.num_parameters(),
    }
    if copilot_only:  # a short digest: config.json holds the fingerprint itself
        digest = hashlib.sha256(pilot_fingerprint(model.pilot).encode()).hexdigest()[:16]
        copilot_metadata["pilot_fingerprint_sha256"] = digest
    eval_results = [
        EvalResult(
            task_type=_pipeline_tag(model),
            dataset_type=eval_dataset or "custom",
            dataset_name=eval_dataset or "custom",
            metric_type=metric,
            metric_name=metric,
            metric_value=value,
        )
        for metric, value in results.items()
    ]
    card_data = ModelCardData(
        base_model=base_id,
        base_model_relation="adapter" if copilot_only and base_id else None,
        library_name="transformers",
        pipeline_tag=_pipeline_tag(model),
        tags=card_tags,
        language=language,
        license=license,
        datasets=datasets,
        model_name=model_name,
        eval_results=eval_results or None,
        transformer_copilot=copilot_metadata,
    )
    training = _training_section(training_args, training_details)
    body = _card_body(
        model, model_name, repo_id, base, copilot_only, fusion, results, training, tokenizer_source
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _training_section(training_args, training_details: str | None) -> str | None:
    lines = []
    if training_args is not None:
        lines += ["| hyperparameter | value |", "| --- | --- |"]
        lines += [
            f"| `{name}` | `{getattr(training_args, name)}` |"
            for name in TRAINING_FIELDS
            if hasattr(training_args, name)
        ]
    if training_details:
        lines += ["", training_details.strip()] if lines else [training_details.strip()]
    return "\n".join(lines) or None


def _auto_class(model) -> str:
    return "AutoModelForSeq2SeqLM" if model.config.is_encoder_decoder else "AutoModelForCausalLM"


def _pipeline_tag(model) -> str:
    return "text2text-generation" if model.config.is_encoder_decoder else "text-generation"


def _requirements(model) -> list[str]:
    """What loading the upload needs: a LoRA Pilot's adapter is rebuilt with peft."""
    peft = (
        ["peft"]
        if getattr(model.config, "pilot_peft_config", None) or hasattr(model.pilot, "peft_config")
        else []
    )
    return ["transformers", "torch", "safetensors", *peft]


def _framework_versions() -> list[str]:
    try:
        hf_copilot_version = importlib.metadata.version("hf-copilot")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        from . import __version__ as hf_copilot_version
    return [
        f"- hf_copilot {hf_copilot_version}",
        f"- transformers {transformers.__version__}",
        f"- torch {torch.__version__}",
    ]


def _card_body(
    model, model_name, repo_id, base, copilot_only, fusion, results, training, tokenizer_source
) -> str:
    repo = repo_id or "<repo_id>"
    pilot_config = model.pilot.config
    copilot_config = model.copilot.config
    pilot = f"`{base}`" if base else "the fine-tuned Pilot"
    what = (
        f"This repository holds only the **Copilot**; it loads onto its base Pilot {pilot}."
        if copilot_only
        else f"This repository holds the whole model: the Pilot ({pilot}) and its Copilot."
    )
    tokenizer = tokenizer_source or "<the Pilot's tokenizer>"
    loads = (
        "# Loads the base Pilot named in the checkpoint and attaches the Copilot; a Pilot other than the one\n"
        "# the Copilot was trained with is refused."
        if copilot_only
        else "# The model's code ships with it: hf_copilot need not be installed."
    )
    lines = [
        f"# {model_name}",
        "",
        f"A [Transformer Copilot]({PAPER_URL}) model: a small Copilot transformer learnt the Pilot's per-token "
        "errors from the Mistake Log while the Pilot was fine-tuned, and `generate()` adds its predicted "
        f"error to the Pilot's next-token distribution. {what}",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| Pilot | {pilot} ({pilot_config.model_type}, {_human(model.pilot.num_parameters())} parameters) |",
        f"| Copilot | {copilot_config.num_hidden_layers} layers, hidden size {copilot_config.hidden_size}, "
        f"{_human(model.copilot.num_parameters())} parameters |",
        *(f"| `{key}` | `{value}` |" for key, value in fusion.items()),
        "",
        "## Usage",
        "",
        f"`pip install {' '.join(_requirements(model))}`, then:",
        "",
        "```python",
        f"from transformers import {_auto_class(model)}, AutoTokenizer",
        "",
        # AutoTokenizer reads the repository's config.json too, whose auto_map names the model's code.
        f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer}"{", trust_remote_code=True" if tokenizer == repo else ""})',
        loads,
        f'model = {_auto_class(model)}.from_pretrained("{repo}", trust_remote_code=True)',
        "",
        f'inputs = tokenizer(["{USAGE_PROMPT}"], return_tensors="pt")  # batches: tokenizer.padding_side = "left"',
        "# copilot_lambda=0 gives the Pilot's own output; the default is the checkpoint's "
        f"copilot_lambda={fusion['copilot_lambda']}.",
        "outputs = model.generate(**inputs, max_new_tokens=32)",
        "print(tokenizer.batch_decode(outputs, skip_special_tokens=True))",
        "```",
        "",
        "Tools that score text by reading `model(...).logits` (log-likelihoods, e.g. lm-evaluation-harness) score the "
        'Pilot alone unless the model is loaded with `forward_logits="fused"`; for lm-evaluation-harness: '
        f"`--model_args pretrained={repo},trust_remote_code=True,forward_logits=fused`.",
        "",
    ]
    if results:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {metric} | {value:.4g} |" for metric, value in results.items()]
        lines.append("")
    if training:
        lines += ["## Training", "", training, ""]
    lines += ["## Framework versions", "", *_framework_versions(), ""]
    lines += ["## Citation", "", f"{PAPER}, [arXiv:2505.16270]({PAPER_URL}).", ""]
    return "\n".join(lines)


def stage_for_upload(
    model,
    folder: str | os.PathLike,
    copilot_only: bool = False,
    evaluation_results: Mapping[str, float] | None = None,
    *,
    max_shard_size: int | str = "50GB",
    base_model: str | None = None,
    tokenizer=None,
    **card_kwargs,
) -> list[str]:
    """Write exactly the files an upload sends into `folder` (new or empty); return their names, sorted.

    Whole model: `save_pretrained` + README.md. Copilot only: `save_copilot` + README.md; `base_model`
    then also replaces the base Pilot named in the checkpoint (useful when the Pilot was loaded from a
    local copy of a Hub model). `tokenizer` (or, when not given, the one saved beside a Pilot loaded from
    a local folder) is uploaded too, so the card's usage code runs as written. Written atomically: a
    failure leaves no partial folder behind.
    """
    folder = os.fspath(folder)
    if os.path.isfile(folder) or (os.path.isdir(folder) and os.listdir(folder)):
        raise FileExistsError(f"stage_for_upload writes a new folder; {folder!r} already holds files.")
    base = base_model or model.pilot.config.name_or_path or None
    if copilot_only and hub_model_id(base) is None:
        warnings.warn(
            f"The Copilot-only checkpoint names its base Pilot as {base!r}, which is not a Hub model id: others "
            "cannot load it in one call. Pass base_model='<hub id of the Pilot>' (the very Pilot the Copilot was "
            "trained with; push a jointly fine-tuned Pilot first).",
            stacklevel=2,
        )
    tokenizer = tokenizer if tokenizer is not None else _local_tokenizer(model.pilot.config.name_or_path)
    repo = card_kwargs.get("repo_id") or "<repo_id>"
    source = repo if tokenizer is not None else hub_model_id(base)
    if source is None:
        warnings.warn(
            "No tokenizer is known for this upload: pass tokenizer=<the Pilot's tokenizer> so that it is uploaded "
            "and the model card's usage code runs as written.",
            stacklevel=2,
        )
    card = build_model_card(
        model, evaluation_results, copilot_only, base_model=base, tokenizer_source=source, **card_kwargs
    )
    with atomic_save_directory(folder) as staging:
        if copilot_only:
            model.save_copilot(staging, base_model_name_or_path=base, max_shard_size=max_shard_size)
        else:
            model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        card.save(os.path.join(staging, README_NAME))
    return sorted(os.listdir(folder))


def _local_tokenizer(name_or_path: str | None):
    """The tokenizer saved beside a Pilot loaded from a local folder, or None."""
    if not name_or_path or not os.path.isfile(os.path.join(name_or_path, "tokenizer_config.json")):
        return None
    return transformers.AutoTokenizer.from_pretrained(name_or_path)


def push_to_hub(
    model,
    repo_id: str,
    *,
    copilot_only: bool = False,
    evaluation_results: Mapping[str, float] | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "50GB",
    base_model: str | None = None,
    tokenizer=None,
    **card_kwargs,
):
    """Create `repo_id` if needed and upload the folder `stage_for_upload` builds, in one commit.

    The arguments are those of `PreTrainedModel.push_to_hub` plus the card's (see `build_model_card`).
    The card replaces any README.md in the repository. Returns the `CommitInfo`.
    """
    api = HfApi(library_name="hf_copilot")
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "upload")
        stage_for_upload(
            model,
            folder,
            copilot_only,
            evaluation_results,
            max_shard_size=max_shard_size,
            base_model=base_model,
            tokenizer=tokenizer,
            repo_id=repo_id,
            **card_kwargs,
        )
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message or ("Upload Copilot" if copilot_only else "Upload Pilot + Copilot"),
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def attach_push_methods(model_class: type = PilotCopilotForCausalLM) -> None:
    """`model.push_to_hub(repo_id, ...)` and `model.push_copilot_to_hub(repo_id, ...)` with the model card."""
    model_class.push_to_hub = push_to_hub
    model_class.push_copilot_to_hub = partialmethod(push_to_hub, copilot_only=True)


__all__ = ["attach_push_methods", "build_model_card", "hub_model_id", "push_to_hub", "stage_for_upload"]
