"""A small pretrained T5 family (FLAN-T5 layout, three sizes) for the quality benchmark's encoder-decoder rows.

The paper's largest gains are with FLAN-T5 Pilots and a Copilot initialised from a smaller FLAN-T5. The Hub is not
reachable here, so this module pretrains tiny stand-ins: `T5ForConditionalGeneration` models ("small", "base",
"large") in FLAN-T5's layout (gated-gelu MLP, untied LM head), trained as FLAN-T5 was, prompt -> answer, on the
corpus and with the character tokenizer of the LLaMA family (benchmarks/model_family.py), which leaves out the
downstream task families. "large" has about the parameters of "base" plus an encoder-decoder Copilot shaped like
"small".

Cached like the LLaMA family, under `model_family/t5-<hash>/` of the same cache root; the hash covers this
module's code, the LLaMA family module's (the corpus) and every setting, and the build is single-threaded and
seeded.

    python benchmarks/t5_family.py [--cache-dir DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from model_family import (
    FamilySpec,
    Log,
    ModelFamily,
    build_corpus,
    build_tokenizer,
    cache_root,
    code_fingerprint,
    corpus_fingerprint,
    corpus_spec,
    learning_rate,
    parameter_count,
)
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration


@dataclass(frozen=True)
class T5MemberSpec:
    """One member's T5 shape (as many decoder as encoder blocks) and peak learning rate."""

    name: str
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    learning_rate: float


@dataclass(frozen=True)
class T5FamilySpec:
    """The three shapes and the batch; the corpus, steps and schedule are the LLaMA family's (`schedule`)."""

    # large (948,608 parameters) >= base (801,152) + an encoder-decoder Copilot shaped like small on base
    # (136,256 with the 101-token vocabulary).
    members: tuple[T5MemberSpec, ...] = (
        T5MemberSpec("small", 64, 2, 4, 128, 3e-3),
        T5MemberSpec("base", 128, 2, 4, 256, 2e-3),
        T5MemberSpec("large", 128, 2, 4, 352, 2e-3),
    )
    schedule: FamilySpec = FamilySpec()
    batch_size: int = 48  # examples per step: about the LLaMA family's 8 x 256 tokens

    def with_steps(self, steps: int) -> T5FamilySpec:
        return dataclasses.replace(self, schedule=self.schedule.with_steps(steps))


def t5_config(member: T5MemberSpec, tokenizer: PreTrainedTokenizerFast) -> T5Config:
    """FLAN-T5's layout, scaled down: gated-gelu MLP, untied LM head, decoding starts from the pad token."""
    return T5Config(
        vocab_size=len(tokenizer),
        d_model=member.d_model,
        d_kv=member.d_model // member.num_heads,
        d_ff=member.d_ff,
        num_layers=member.num_layers,
        num_decoder_layers=member.num_layers,
        num_heads=member.num_heads,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def seq2seq_batches(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast
) -> tuple[list[list[int]], list[list[int]]]:
    """Sources as generate() sees the prompts, targets the answer then eos (as tokenize_seq2seq_examples)."""
    sources = tokenizer([p for p, _ in pairs])["input_ids"]
    answers = tokenizer([a for _, a in pairs], add_special_tokens=False)["input_ids"]
    return sources, [a + [tokenizer.eos_token_id] for a in answers]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def batch_at(
    sources: list[list[int]], targets: list[list[int]], indices: list[int], pad_token_id: int
) -> dict[str, torch.Tensor]:
    input_ids = pad([sources[i] for i in indices], pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": input_ids != pad_token_id,
        "labels": pad([targets[i] for i in indices], -100),
    }


def train_member(
    member: T5MemberSpec,
    config: T5Config,
    sources: list[list[int]],
    targets: list[list[int]],
    spec: T5FamilySpec,
    log: Log = print,
) -> tuple[T5ForConditionalGeneration, float, float]:
    """Pretrain one member from a seeded init on a seeded example order; (model, final loss, seconds)."""
    schedule = spec.schedule
    torch.manual_seed(schedule.seed)
    model = T5ForConditionalGeneration(config)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": schedule.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=member.learning_rate,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    order_rng = random.Random(schedule.seed)
    order: list[int] = []
    losses: list[float] = []
    start = last = time.perf_counter()
    for step in range(schedule.steps):
        if len(order) < spec.batch_size:  # a new epoch: a fresh seeded order
            order = list(range(len(sources)))
            order_rng.shuffle(order)
        indices, order = order[: spec.batch_size], order[spec.batch_size :]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule, member.learning_rate)
        loss = model(**batch_at(sources, targets, indices, config.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % max(1, schedule.steps // 20) == 0 or step + 1 == schedule.steps:
            now = time.perf_counter()
            log(
                f"[t5 {member.name}] step {step + 1}/{schedule.steps} loss {loss.item():.4f} ({now - last:.1f}s)"
            )
            last = now
    tail = losses[-max(1, schedule.steps // 20) :]
    model.eval()
    return model, sum(tail) / len(tail), time.perf_counter() - start


@torch.no_grad()
def validation_loss(
    model: T5ForConditionalGeneration, sources: list[list[int]], targets: list[list[int]], pad_token_id: int
) -> float:
    """Mean answer-token cross-entropy on held-out corpus pairs."""
    total, count = 0.0, 0
    for start in range(0, len(sources), 64):
        indices = list(range(start, min(start + 64, len(sources))))
        batch = batch_at(sources, targets, indices, pad_token_id)
        tokens = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return total / count


@torch.no_grad()
def exact_match(
    model: T5ForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    validation: dict[str, list[tuple[str, str]]],
    log: Log = print,
) -> float:
    """Greedy answers to the first held-out prompt of each generator: a quick look that pretraining took."""
    correct = total = 0
    for name, pairs in validation.items():
        if not pairs:
            continue
        prompt, answer = pairs[0]
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=len(answer) + 8, do_sample=False)
        completion = tokenizer.decode(output[0], skip_special_tokens=True)
        correct += completion.strip() == answer.strip()
        total += 1
        log(f"  {name:24s} {prompt!r} -> {completion!r} (gold {answer!r})")
    return correct / max(1, total)


def own_code_fingerprint() -> str:
    """This module's syntax tree (docstrings left out), so editing comments keeps the cache."""
    tree = ast.parse(Path(__file__).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


def hash_inputs(spec: T5FamilySpec) -> dict[str, Any]:
    return {
        "code": own_code_fingerprint(),
        "corpus_code": code_fingerprint(),
        "corpus": corpus_spec(spec.schedule),
        "family": dataclasses.asdict(spec),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": 1,
    }


def family_hash(spec: T5FamilySpec) -> str:
    payload = json.dumps(hash_inputs(spec), sort_keys=True, default=str)
    return "t5-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_family(spec: T5FamilySpec, target: Path, log: Log = print) -> dict[str, Any]:
    """Build the family into `target` (a fresh folder); returns the manifest it also writes there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        started = time.perf_counter()
        corpus = build_corpus(spec.schedule, log)
        tokenizer = build_tokenizer(corpus)
        tokenizer.save_pretrained(target / "tokenizer")
        train_pairs = [p for pairs in corpus["train"].values() for p in pairs]
        validation_pairs = [p for pairs in corpus["validation"].values() for p in pairs]
        sources, targets = seq2seq_batches(train_pairs, tokenizer)
        validation_sources, validation_targets = seq2seq_batches(validation_pairs, tokenizer)
        log(
            f"corpus: {len(train_pairs)} train, {len(validation_pairs)} validation pairs; training sees "
            f"{spec.schedule.steps * spec.batch_size / len(train_pairs):.2f} epochs"
        )
        members: dict[str, Any] = {}
        for member in spec.members:
            config = t5_config(member, tokenizer)
            model, final_loss, seconds = train_member(member, config, sources, targets, spec, log)
            loss = validation_loss(model, validation_sources, validation_targets, tokenizer.pad_token_id)
            log(
                f"[t5 {member.name}] {parameter_count(model):,} parameters, final train loss {final_loss:.4f}, "
                f"validation answer loss {loss:.4f}, {seconds:.0f}s"
            )
            sanity = None
            if member.name == "base":
                sanity = exact_match(model, tokenizer, corpus["validation"], log)
                log(f"[t5 base] exact match on one held-out prompt per generator: {sanity:.0%}")
            model.save_pretrained(target / member.name)
            tokenizer.save_pretrained(target / member.name)
            members[member.name] = {
                "path": member.name,
                "parameters": parameter_count(model),
                "config": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
                "learning_rate": member.learning_rate,
                "final_train_loss": final_loss,
                "validation_answer_loss": loss,
                "seconds": seconds,
                **({"sanity_exact_match": sanity} if sanity is not None else {}),
            }
        manifest = {
            "hash": family_hash(spec),
            "tokenizer_path": "tokenizer",
            "vocab_size": len(tokenizer),
            "members": members,
            "corpus_sha256": corpus_fingerprint(corpus),
            "seconds": time.perf_counter() - started,
            "hash_inputs": hash_inputs(spec),
        }
        (target / "family.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def load_t5_family(
    cache_dir: str | None = None, build: bool = True, *, spec: T5FamilySpec | None = None, log: Log = print
) -> ModelFamily:
    """The cached T5 family for `spec` (the defaults unless given), built first when missing and `build`;
    load members with `AutoModelForSeq2SeqLM.from_pretrained(members[name])`."""
    spec = spec or T5FamilySpec()
    root = cache_root(cache_dir)
    path = root / family_hash(spec)
    manifest_path = path / "family.json"
    if not manifest_path.exists():
        if not build:
            raise FileNotFoundError(f"No T5 family at {path}; call load_t5_family(build=True) to build it.")
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
        try:
            log(f"building T5 family {path.name} in {scratch}")
            build_family(spec, scratch, log)
            scratch.chmod(0o755)
            try:
                scratch.rename(path)
            except OSError:  # another process finished the same family first: theirs is identical
                if not manifest_path.exists():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    manifest = json.loads(manifest_path.read_text())
    return ModelFamily(
        path=str(path),
        tokenizer_path=str(path / manifest["tokenizer_path"]),
        members={name: str(path / m["path"]) for name, m in manifest["members"].items()},
        parameters={name: m["parameters"] for name, m in manifest["members"].items()},
        manifest=manifest,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="cache root (as benchmarks/model_family.py)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per member")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    spec = T5FamilySpec() if args.steps is None else T5FamilySpec().with_steps(args.steps)
    family = load_t5_family(args.cache_dir, spec=spec, log=lambda message: print(message, flush=True))
    print(json.dumps({k: v for k, v in family.manifest.items() if k != "hash_inputs"}, indent=2, default=str))
    print(f"T5 family at {family.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
