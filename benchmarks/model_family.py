"""A small pretrained LLaMA family (one tokenizer, three sizes) for the quality benchmark, built offline.

The paper fine-tunes *pretrained* LLMs on downstream tasks and attaches a Copilot; the Hub is not reachable
here, so this module pretrains its own tiny stand-ins: `LlamaForCausalLM` models ("small", "base", "large")
sharing one character-level tokenizer, trained with causal LM loss on a broad corpus of short generated
prompt/answer texts. The corpus mixes reasoning-gym generators with a few of our own and a public-domain
novel, and leaves out the four downstream task families (arithmetic, word problems, 2-choice multiple
choice, recommendation) and their prompt formats, so fine-tuning on those still has something to learn.

"large" has about the parameters of "base" plus a Copilot the size of "small", so that the benchmark can
compare a Pilot + Copilot with a bigger Pilot of the same total size.

The family is cached under `${HF_COPILOT_CACHE:-~/.cache/hf_copilot}/model_family/<hash>/`, `<hash>` being
the first 16 hex of the sha256 of every input that determines the weights; it is built in a temporary folder
and renamed into place, so a reader never sees half a family. The hash covers this module's code too (its
syntax tree, so editing comments or docstrings keeps the cache). The same inputs give the same weights in any
process on one CPU: single-threaded, seeded, and the corpus free of set-order (string hash seed) dependence.
Another CPU's kernels round differently, so the hash names the inputs, not the weights (docs/results.md).

    python benchmarks/model_family.py [--cache-dir DIR] [--steps N]

needs the `benchmarks` extra (`pip install -e .[benchmarks]`, for reasoning-gym).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import shutil
import string
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

try:  # the experiments helpers moved under hf_copilot.experiments; keep working with the old layout
    from hf_copilot.experiments.tokenizer import build_char_tokenizer
except ImportError:  # pragma: no cover - older checkouts
    from hf_copilot.tokenizer import build_char_tokenizer

ALPHABET = "".join(c for c in string.printable if c not in "\r\x0b\x0c")
"""Printable ASCII plus tab and newline: every downstream task's text is covered by the tokenizer."""

SPECIAL_STRINGS = ("<pad>", "<s>", "</s>", "<unk>")
DOWNSTREAM_MARKERS = (
    "Please choose the correct answer",
    "Answer format:",
    "Answer1:",
    "User history:",
    "Next item:",
)
"""Pieces of the downstream prompt formats: a corpus text containing one would leak a downstream task."""

Item = dict[str, Any]
Formatter = Callable[[Item], "tuple[str, str] | None"]
Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------------------
# Specification: everything that determines the family's weights.


@dataclass(frozen=True)
class MemberSpec:
    """One family member's LLaMA shape and learning rate (smaller models take a larger one)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    learning_rate: float


@dataclass(frozen=True)
class FamilySpec:
    """The corpus, the three shapes and the optimisation: the cache key hashes this, versions and code."""

    # large (938,624 parameters) ~ base (817,536) + a Copilot shaped like small on base (121,792 with the
    # 101-token vocabulary, the formula in benchmarks/common.py). 1000 steps of 8 x 256 tokens train all three
    # in about 7 minutes on one core.
    members: tuple[MemberSpec, ...] = (
        MemberSpec("small", 64, 2, 4, 176, 3e-3),
        MemberSpec("base", 128, 4, 4, 344, 2e-3),
        MemberSpec("large", 128, 5, 4, 304, 2e-3),
    )
    steps: int = 1000
    batch_size: int = 8
    block_size: int = 256
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    examples_per_generator: int = 3000
    validation_percent: int = 3
    max_chars: int = 120

    def with_steps(self, steps: int) -> FamilySpec:
        return dataclasses.replace(self, steps=steps)


@dataclass
class ModelFamily:
    """A built family on disk: load members with `AutoModelForCausalLM.from_pretrained(members[name])`."""

    path: str
    tokenizer_path: str
    members: dict[str, str]
    parameters: dict[str, int]
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------------------
# Corpus: reasoning-gym generators reformatted into short prompts, plus our own generators.


def _join(values: list[Any]) -> str:
    return ", ".join(str(v) for v in values)


def _yes_no(value: Any) -> str:
    return "Yes" if value in (True, "True", "Yes") else "No"


def _rg_question(item: Item) -> tuple[str, str]:
    """reasoning-gym's own wording, for the generators whose questions are already short."""
    return item["question"] + "\n", str(item["answer"])


RG_GENERATORS: dict[str, tuple[dict[str, Any], Formatter]] = {
    # name: (reasoning-gym config, formatter to a compact prompt/answer); the formatters drop the long
    # instructions reasoning-gym prepends, which would not fit the tiny models' context.
    # isomorphic_strings and ransom_note are left out: they draw with rng.choice(list(a_set)), which depends
    # on the process's string hash seed, so the corpus would differ between runs; own versions stand in.
    "letter_counting": (
        {"min_words": 2, "max_words": 6},
        lambda x: (
            f'How many "{x["metadata"]["target_letter"]}" in "{" ".join(x["metadata"]["span"])}"?\n',
            x["answer"],
        ),
    ),
    "spell_backward": (
        {"min_word_len": 3, "max_word_len": 9},
        lambda x: (f"Spell backward: {x['metadata']['word']}\n", x["answer"]),
    ),
    "word_sequence_reversal": (
        {"min_words": 2, "max_words": 6},
        lambda x: (f"Reverse the list: {_join(x['metadata']['words'])}\n", x["answer"]),
    ),
    "word_sorting": (
        {"min_words": 2, "max_words": 6, "min_word_length": 3, "max_word_length": 9},
        lambda x: (
            f"Sort {x['metadata']['direction']}: {_join(x['metadata']['original_words'])}\n",
            _join(x["metadata"]["sorted_words"]),
        ),
    ),
    "number_sorting": (
        {
            "min_numbers": 3,
            "max_numbers": 7,
            "min_decimals": 0,
            "max_decimals": 1,
            "min_value": -100,
            "max_value": 100,
        },
        lambda x: (
            f"Sort the numbers {x['metadata']['direction']}: {_join(x['metadata']['original_numbers'])}\n",
            _join(x["metadata"]["sorted_numbers"]),
        ),
    ),
    "number_filtering": (
        {
            "min_numbers": 3,
            "max_numbers": 6,
            "min_decimals": 0,
            "max_decimals": 1,
            "min_value": -50,
            "max_value": 50,
        },
        lambda x: (
            "{} numbers {} than {}: {}\n".format(
                *x["metadata"]["operation"].capitalize().split("_"),
                x["metadata"]["filter_value"],
                _join(x["metadata"]["original_numbers"]),
            ),
            _join(x["metadata"]["result"]) or "none",
        ),
    ),
    "gcd": (
        {"min_value": 1, "max_value": 200},
        lambda x: (f"gcd({_join(x['metadata']['numbers'])}) = ", x["answer"]),
    ),
    "lcm": (
        {"min_value": 1, "max_value": 40},
        lambda x: (f"lcm({_join(x['metadata']['numbers'])}) = ", x["answer"]),
    ),
    "base_conversion": (
        {"min_base": 2, "max_base": 16, "min_value": 0, "max_value": 300},
        lambda x: (
            f"Convert {x['metadata']['source_repr']} from base {x['metadata']['source_base']} "
            f"to base {x['metadata']['target_base']}:\n",
            x["answer"],
        ),
    ),
    "caesar_cipher": (
        {"min_words": 1, "max_words": 5, "min_rotation": 1, "max_rotation": 5},
        lambda x: (
            f"Caesar shift {x['metadata']['rotation']}, decode: {x['metadata']['cipher_text']}\n",
            x["answer"],
        ),
    ),
    "count_bits": (
        {"min_n": 1, "max_n": 4095},
        lambda x: (f"Number of 1 bits in {x['metadata']['number']}:\n", x["answer"]),
    ),
    "prime_factorization": (
        {"min_value": 2, "max_value": 500},
        lambda x: (
            f"Prime factors of {x['metadata']['number']}:\n",
            " * ".join(map(str, x["metadata"]["factors"])),
        ),
    ),
    "count_primes": (
        {"min_n": 1, "max_n": 200},
        lambda x: (
            f"Primes from {x['metadata']['start']} to {x['metadata']['end']}: how many?\n",
            x["answer"],
        ),
    ),
    "simple_equations": ({"min_terms": 2, "max_terms": 3, "min_value": 1, "max_value": 30}, _rg_question),
    "number_sequence": (
        {"min_terms": 4, "max_terms": 7, "min_value": -50, "max_value": 50},
        lambda x: (f"Continue: {x['question']}\n", x["answer"]),
    ),
    "fraction_simplification": (
        {"min_value": 1, "max_value": 60, "min_factor": 1, "max_factor": 12, "styles": ("plain",)},
        lambda x: (f"Simplify {x['metadata']['numerator']}/{x['metadata']['denominator']}:\n", x["answer"]),
    ),
    "syllogism": (
        {},
        lambda x: (
            f"{x['metadata']['premise1']}. {x['metadata']['premise2']}. "
            f"So {x['metadata']['conclusion'][0].lower()}{x['metadata']['conclusion'][1:]}?\n",
            _yes_no(x["metadata"]["is_valid"]),
        ),
    ),
    "palindrome_generation": (
        {"min_length": 3, "max_length": 8},
        lambda x: (f"Palindrome from letters {''.join(x['metadata']['letters'])}:\n", x["answer"]),
    ),
    "letter_jumble": (
        {"min_word_len": 2, "max_word_len": 9, "min_words": 1, "max_words": 4},
        lambda x: (f"Unscramble: {' '.join(x['metadata']['scrambled_words'])}\n", x["answer"]),
    ),
    "sentence_reordering": (
        {"min_words_in_sentence": 3, "max_words_in_sentence": 12},
        lambda x: (f"Put the words in order: {x['question'].split(': ', 1)[1]}\n", x["answer"]),
    ),
    "calendar_arithmetic": (
        {"tasks": ["weekday_offset", "weekday_of_date", "is_leap_year", "count_days"]},
        _rg_question,
    ),
    "time_intervals": ({"task_types": ["time", "date"]}, _rg_question),
    "family_relationships": (
        {"min_family_size": 3, "max_family_size": 4},
        lambda x: (
            f"{x['question'].split(chr(10))[0]} Who is {x['metadata']['person1']} to {x['metadata']['person2']}?\n",
            x["answer"],
        ),
    ),
}


def _random_text(rng: random.Random, low: int, high: int, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _copy(rng: random.Random) -> tuple[str, str]:
    """Copying random printable text gives every character of the alphabet a trained embedding."""
    text = _random_text(rng, 3, 24, ALPHABET[:95])
    return f"Copy: {text}\n", text


def _reverse_digits(rng: random.Random) -> tuple[str, str]:
    digits = _random_text(rng, 3, 14, string.digits)
    return f"Reverse the digits {digits}\n", digits[::-1]


def _count_chars(rng: random.Random) -> tuple[str, str]:
    text = _random_text(rng, 1, 20, string.ascii_lowercase + string.digits)
    return f"Length of '{text}':\n", str(len(text))


def _count_char(rng: random.Random) -> tuple[str, str]:
    text = _random_text(rng, 4, 24, "abcxyz")
    target = rng.choice("abcxyz")
    return f"Occurrences of {target} in {text}:\n", str(text.count(target))


def _sort_digits(rng: random.Random) -> tuple[str, str]:
    digits = _random_text(rng, 3, 12, string.digits)
    return f"Sort the digits {digits}\n", "".join(sorted(digits))


def _change_case(rng: random.Random) -> tuple[str, str]:
    text = _random_text(rng, 2, 16, string.ascii_letters + " ")
    if rng.random() < 0.5:
        return f"Uppercase: {text}\n", text.upper()
    return f"Lowercase: {text}\n", text.lower()


def _same_pattern(rng: random.Random) -> tuple[str, str]:
    """Isomorphic strings, as reasoning-gym's `isomorphic_strings` (whose draws depend on set order)."""
    first = _random_text(rng, 2, 7, "abcdefgh")
    letters = rng.sample(string.ascii_lowercase, 26)
    second = "".join(letters[ord(c) - ord("a")] for c in first)
    if rng.random() < 0.5 and len(set(first)) > 1:  # half the time, map two letters to one
        at = rng.randrange(len(first))
        other = rng.choice([i for i, c in enumerate(first) if c != first[at]])
        second = second[:at] + second[other] + second[at + 1 :]
    same = len({*zip(first, second, strict=True)}) == len(set(first)) == len(set(second))
    return f"Same letter pattern? {first} {second}\n", "Yes" if same else "No"


def _spellable(rng: random.Random) -> tuple[str, str]:
    """reasoning-gym's `ransom_note` (whose draws depend on set order): can a word be cut from letters."""
    word = _random_text(rng, 1, 5, string.ascii_lowercase)
    pool = list(word) + [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 9))]
    if rng.random() < 0.5:
        pool.remove(rng.choice(word))
    rng.shuffle(pool)
    ok = all(pool.count(c) >= word.count(c) for c in set(word))
    return f"Can {word} be cut out of {''.join(pool)}?\n", "Yes" if ok else "No"


def _novel_text() -> str:
    """A public-domain novel reasoning-gym ships, with its typography folded to ASCII: plain English."""
    from reasoning_gym.data import read_data_file

    text = read_data_file("in_the_year_2889.txt")
    start, end = text.find("*** START"), text.find("*** END")
    text = text[text.find("\n", start) + 1 : end] if start >= 0 and end > start else text
    for fancy, plain in {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2014": "--"}.items():
        text = text.replace(fancy, plain)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return " ".join(text.split())


def _novel_span_generator() -> Callable[[random.Random], tuple[str, str]]:
    text = _novel_text()

    def span(rng: random.Random) -> tuple[str, str]:
        start = text.find(" ", rng.randrange(len(text) - 200)) + 1
        piece = text[start : start + rng.randint(60, 115)].rsplit(" ", 1)[0]
        cut = len(piece) // 2
        return piece[:cut], piece[cut:]

    return span


OWN_GENERATORS: dict[str, Callable[[], Callable[[random.Random], tuple[str, str]]]] = {
    "copy": lambda: _copy,
    "reverse_digits": lambda: _reverse_digits,
    "string_length": lambda: _count_chars,
    "count_char": lambda: _count_char,
    "sort_digits": lambda: _sort_digits,
    "change_case": lambda: _change_case,
    "same_pattern": lambda: _same_pattern,
    "spellable": lambda: _spellable,
    "novel_text": _novel_span_generator,
}


def reasoning_gym_version() -> str:
    """The installed reasoning-gym (part of the hash: its generators may change between releases)."""
    try:
        return metadata.version("reasoning-gym")
    except metadata.PackageNotFoundError:
        raise ImportError(
            "The model family's corpus needs reasoning-gym: pip install -e '.[benchmarks]'"
        ) from None


def corpus_spec(spec: FamilySpec) -> dict[str, Any]:
    """The corpus part of the hash: generator names, their configs and the package versions behind them."""
    return {
        "reasoning_gym": reasoning_gym_version(),
        "reasoning_gym_generators": {name: config for name, (config, _) in RG_GENERATORS.items()},
        "own_generators": sorted(OWN_GENERATORS),
        "examples_per_generator": spec.examples_per_generator,
        "validation_percent": spec.validation_percent,
        "max_chars": spec.max_chars,
        "seed": spec.seed,
        "alphabet": ALPHABET,
    }


def _acceptable(prompt: str, answer: str, max_chars: int) -> bool:
    """Short, ASCII, no special-token strings and nothing of the downstream formats."""
    text = prompt + answer
    return (
        0 < len(text) <= max_chars
        and bool(answer.strip())
        and all(c in ALPHABET for c in text)
        and not any(s in text for s in SPECIAL_STRINGS + DOWNSTREAM_MARKERS)
    )


def _rg_examples(name: str, n: int, seed: int, max_chars: int) -> Iterator[tuple[str, str]]:
    import reasoning_gym

    config, formatter = RG_GENERATORS[name]
    dataset = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    for index in range(n):
        example = formatter(dataset[index])
        if example is not None and _acceptable(example[0], str(example[1]), max_chars):
            yield example[0], str(example[1])


def _own_examples(name: str, n: int, seed: int, max_chars: int) -> Iterator[tuple[str, str]]:
    sample = OWN_GENERATORS[name]()
    rng = random.Random(f"{name}/{seed}")
    for _ in range(n):
        prompt, answer = sample(rng)
        if _acceptable(prompt, answer, max_chars):
            yield prompt, answer


def _is_validation(prompt: str, percent: int) -> bool:
    """Split by a hash of the prompt, so a prompt is never in both splits whatever was drawn."""
    digest = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 100 < percent


def build_corpus(spec: FamilySpec, log: Log = print) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{"train"|"validation": {generator: [(prompt, answer)]}}, the same on every run for the same spec."""
    corpus: dict[str, dict[str, list[tuple[str, str]]]] = {"train": {}, "validation": {}}
    sources = [(name, _rg_examples) for name in RG_GENERATORS] + [
        (name, _own_examples) for name in OWN_GENERATORS
    ]
    for name, examples in sources:
        start = time.perf_counter()
        pairs = list(examples(name, spec.examples_per_generator, spec.seed, spec.max_chars))
        validation = [p for p in pairs if _is_validation(p[0], spec.validation_percent)]
        corpus["validation"][name] = list(dict.fromkeys(validation))
        corpus["train"][name] = [p for p in pairs if not _is_validation(p[0], spec.validation_percent)]
        log(
            f"corpus {name:24s} kept {len(pairs):5d}/{spec.examples_per_generator} "
            f"(validation {len(corpus['validation'][name])}) in {time.perf_counter() - start:.1f}s"
        )
    return corpus


# --------------------------------------------------------------------------------------------------------
# Tokenizer and data: sequences "<s>prompt answer</s>" packed whole into blocks that start at position 0.


def corpus_fingerprint(corpus: dict[str, dict[str, list[tuple[str, str]]]]) -> str:
    """A hash of the corpus text itself, to compare two builds (the corpus must not vary between runs)."""
    return hashlib.sha256(json.dumps(corpus, sort_keys=True).encode()).hexdigest()[:16]


def build_tokenizer(corpus: dict[str, dict[str, list[tuple[str, str]]]]) -> PreTrainedTokenizerFast:
    """One character tokenizer for all members, over printable ASCII and anything the corpus adds."""
    texts = (p + a for split in corpus.values() for pairs in split.values() for p, a in pairs)
    return build_char_tokenizer([ALPHABET, "".join(set("".join(texts)))])


def pack(
    pairs: list[tuple[str, str]], tokenizer: PreTrainedTokenizerFast, block_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, answer_mask) blocks of whole shuffled examples, right-padded with pad.

    Blocks start with an example's bos at position 0, as fine-tuning and generation see them, while packing
    still trains every position up to the context length.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    prompts = tokenizer([pairs[i][0] for i in order])["input_ids"]
    answers = tokenizer([pairs[i][1] for i in order], add_special_tokens=False)["input_ids"]
    blocks: list[list[int]] = []
    masks: list[list[int]] = []
    ids: list[int] = []
    mask: list[int] = []
    for prompt, answer in zip(prompts, answers, strict=True):
        sequence = prompt + answer + [tokenizer.eos_token_id]
        if len(sequence) > block_size:
            continue
        if len(ids) + len(sequence) > block_size:
            blocks.append(ids)
            masks.append(mask)
            ids, mask = [], []
        ids += sequence
        mask += [0] * len(prompt) + [1] * (len(answer) + 1)
    if ids:
        blocks.append(ids)
        masks.append(mask)
    input_ids = torch.full((len(blocks), block_size), tokenizer.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((len(blocks), block_size), dtype=torch.bool)
    for row, (block, block_mask) in enumerate(zip(blocks, masks, strict=True)):
        input_ids[row, : len(block)] = torch.tensor(block)
        answer_mask[row, : len(block)] = torch.tensor(block_mask, dtype=torch.bool)
    return input_ids, answer_mask


def labels_of(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    return input_ids.masked_fill(input_ids == pad_token_id, -100)


# --------------------------------------------------------------------------------------------------------
# Models and training.


def llama_config(member: MemberSpec, tokenizer: PreTrainedTokenizerFast, block_size: int) -> LlamaConfig:
    """A LLaMA layout as the paper's Pilots have it, scaled down, with untied embeddings as in LLaMA-2 7B."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=member.hidden_size,
        intermediate_size=member.intermediate_size,
        num_hidden_layers=member.num_hidden_layers,
        num_attention_heads=member.num_attention_heads,
        num_key_value_heads=member.num_attention_heads,
        max_position_embeddings=block_size,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def learning_rate(step: int, spec: FamilySpec, peak: float) -> float:
    """Linear warmup then cosine decay to `min_lr_fraction` of the peak."""
    warmup = max(1, int(spec.warmup_fraction * spec.steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, spec.steps - warmup)
    return peak * (
        spec.min_lr_fraction + (1 - spec.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def _optimizer(model: torch.nn.Module, spec: FamilySpec, peak: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains stay undecayed), as LLaMA was trained."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), eps=1e-8)


def train_member(
    member: MemberSpec,
    config: LlamaConfig,
    train_ids: torch.Tensor,
    spec: FamilySpec,
    pad_token_id: int,
    log: Log = print,
) -> tuple[LlamaForCausalLM, float, float]:
    """Pretrain one member from a seeded init on a seeded block order; (model, final loss, seconds).

    Final loss is the mean over the last 5% of steps, a steadier number than the very last batch.
    """
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = _optimizer(model, spec, member.learning_rate)
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(train_ids), generator=generator)
    losses: list[float] = []
    tokens = 0
    start = last = time.perf_counter()
    for step in range(spec.steps):
        offset = (step * spec.batch_size) % len(order)
        if offset + spec.batch_size > len(order):  # a new epoch: a fresh seeded order
            order = torch.randperm(len(train_ids), generator=generator)
            offset = 0
        batch = train_ids[order[offset : offset + spec.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, spec, member.learning_rate)
        loss = model(
            input_ids=batch, attention_mask=batch != pad_token_id, labels=labels_of(batch, pad_token_id)
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        tokens += int((batch != pad_token_id).sum())
        if (step + 1) % max(1, spec.steps // 20) == 0 or step + 1 == spec.steps:
            now = time.perf_counter()
            log(
                f"[{member.name}] step {step + 1}/{spec.steps} loss {loss.item():.4f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {tokens / (now - start):.0f} tokens/s "
                f"({now - last:.1f}s)"
            )
            last = now
    tail = losses[-max(1, spec.steps // 20) :]
    model.eval()
    return model, sum(tail) / len(tail), time.perf_counter() - start


@torch.no_grad()
def validation_losses(
    model: LlamaForCausalLM, input_ids: torch.Tensor, answer_mask: torch.Tensor, pad_token_id: int
) -> dict[str, float]:
    """Mean token cross-entropy on held-out corpus text, over all tokens and over answer tokens only."""
    total = answer = 0.0
    count = answer_count = 0
    for start in range(0, len(input_ids), 16):
        ids, mask = input_ids[start : start + 16], answer_mask[start : start + 16]
        logits = model(input_ids=ids, attention_mask=ids != pad_token_id).logits[:, :-1].float()
        targets, target_is_answer = ids[:, 1:], mask[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        real = targets != pad_token_id
        total += float(nll[real].sum())
        count += int(real.sum())
        answer += float(nll[target_is_answer].sum())
        answer_count += int(target_is_answer.sum())
    return {"loss": total / count, "answer_loss": answer / max(1, answer_count)}


@torch.no_grad()
def sanity_check(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    validation: dict[str, list[tuple[str, str]]],
    log: Log = print,
) -> dict[str, Any]:
    """Greedy completions of one held-out prompt per generator: a quick look that pretraining took.

    Returns exact-match accuracy over those prompts and the samples themselves.
    """
    samples = []
    for name, pairs in validation.items():
        if not pairs:
            continue
        prompt, answer = pairs[0]
        inputs = tokenizer(prompt, return_tensors="pt")
        output = model.generate(
            **inputs,
            max_new_tokens=len(answer) + 8,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"generator": name, "prompt": prompt, "answer": answer, "completion": completion})
        mark = "ok " if completion.strip() == answer.strip() else "   "
        log(f"  {mark}{name:24s} {prompt!r} -> {completion!r} (gold {answer!r})")
    correct = sum(s["completion"].strip() == s["answer"].strip() for s in samples)
    return {"exact_match": correct / max(1, len(samples)), "samples": samples}


# --------------------------------------------------------------------------------------------------------
# Cache: hash, atomic build, manifest.


def _is_docstring(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def code_fingerprint() -> str:
    """A hash of this module's and the tokenizer builder's code, docstrings, comments and layout left out.

    The formatters, own generators and training loop all shape the weights; hashing their syntax trees
    rebuilds the family whenever they change, with no version number to remember to bump.
    """
    digest = hashlib.sha256()
    for source in (Path(__file__).read_text(), inspect.getsource(build_char_tokenizer)):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(getattr(node, "body", None), list):
                node.body = [child for child in node.body if not _is_docstring(child)] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:16]


def hash_inputs(spec: FamilySpec) -> dict[str, Any]:
    """Everything that determines the weights, as JSON-able data; its hash names the cache folder."""
    return {
        "code": code_fingerprint(),
        "corpus": corpus_spec(spec),
        "family": dataclasses.asdict(spec),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": 1,
    }


def family_hash(spec: FamilySpec) -> str:
    payload = json.dumps(hash_inputs(spec), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """`cache_dir`, else $HF_COPILOT_CACHE, else ~/.cache/hf_copilot; families live under its model_family/."""
    root = cache_dir or os.environ.get("HF_COPILOT_CACHE") or Path.home() / ".cache" / "hf_copilot"
    return Path(root).expanduser() / "model_family"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_family(spec: FamilySpec, target: Path, log: Log = print) -> dict[str, Any]:
    """Build the family into `target` (a fresh folder); returns the manifest it also writes there.

    Single-threaded and seeded throughout, so the weights depend on the spec and versions alone.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        started = time.perf_counter()
        corpus = build_corpus(spec, log)
        tokenizer = build_tokenizer(corpus)
        tokenizer.save_pretrained(target / "tokenizer")
        train_pairs = [p for pairs in corpus["train"].values() for p in pairs]
        validation_pairs = [p for pairs in corpus["validation"].values() for p in pairs]
        train_ids, _ = pack(train_pairs, tokenizer, spec.block_size, spec.seed)
        validation_ids, validation_mask = pack(validation_pairs, tokenizer, spec.block_size, spec.seed)
        train_tokens = int((train_ids != tokenizer.pad_token_id).sum())
        log(
            f"corpus: {len(train_pairs)} train examples in {len(train_ids)} blocks ({train_tokens} tokens, "
            f"{train_tokens / train_ids.numel():.0%} fill), {len(validation_pairs)} validation examples; "
            f"vocabulary {len(tokenizer)}; training sees {spec.steps * spec.batch_size / len(train_ids):.2f} epochs"
        )
        members: dict[str, Any] = {}
        for member in spec.members:
            config = llama_config(member, tokenizer, spec.block_size)
            model, final_loss, seconds = train_member(
                member, config, train_ids, spec, tokenizer.pad_token_id, log
            )
            validation = validation_losses(model, validation_ids, validation_mask, tokenizer.pad_token_id)
            log(
                f"[{member.name}] {parameter_count(model):,} parameters, final train loss {final_loss:.4f}, "
                f"validation loss {validation['loss']:.4f} (answers {validation['answer_loss']:.4f}), {seconds:.0f}s"
            )
            sanity = None
            if member.name == "base":
                log("[base] greedy completions of held-out prompts:")
                sanity = sanity_check(model, tokenizer, corpus["validation"], log)
                log(f"[base] exact match on those: {sanity['exact_match']:.0%}")
            model.save_pretrained(target / member.name)
            tokenizer.save_pretrained(target / member.name)
            members[member.name] = {
                "path": member.name,
                "parameters": parameter_count(model),
                "config": {k: v for k, v in config.to_dict().items() if not k.startswith("_")},
                "learning_rate": member.learning_rate,
                "final_train_loss": final_loss,
                "validation_loss": validation["loss"],
                "validation_answer_loss": validation["answer_loss"],
                "seconds": seconds,
                **({"sanity_check": sanity} if sanity else {}),
            }
        manifest = {
            "hash": family_hash(spec),
            "tokenizer_path": "tokenizer",
            "vocab_size": len(tokenizer),
            "members": members,
            "generators": {
                "reasoning_gym": sorted(RG_GENERATORS),
                "own": sorted(OWN_GENERATORS),
                "train_examples": {k: len(v) for k, v in corpus["train"].items()},
                "validation_examples": {k: len(v) for k, v in corpus["validation"].items()},
            },
            "train_tokens": train_tokens,
            "corpus_sha256": corpus_fingerprint(corpus),
            "seconds": time.perf_counter() - started,
            "hash_inputs": hash_inputs(spec),
        }
        (target / "family.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


def _family_from(path: Path, manifest: dict[str, Any]) -> ModelFamily:
    return ModelFamily(
        path=str(path),
        tokenizer_path=str(path / manifest["tokenizer_path"]),
        members={name: str(path / m["path"]) for name, m in manifest["members"].items()},
        parameters={name: m["parameters"] for name, m in manifest["members"].items()},
        manifest=manifest,
    )


def load_family(
    cache_dir: str | None = None, build: bool = True, *, spec: FamilySpec | None = None, log: Log = print
) -> ModelFamily:
    """The cached family for `spec` (the defaults unless given), built first when missing and `build`.

    `cache_dir` replaces $HF_COPILOT_CACHE (default ~/.cache/hf_copilot) as the cache root.
    """
    spec = spec or FamilySpec()
    root = cache_root(cache_dir)
    path = root / family_hash(spec)
    manifest_path = path / "family.json"
    if not manifest_path.exists():
        if not build:
            raise FileNotFoundError(f"No model family at {path}; call load_family(build=True) to build it.")
        root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
        try:
            log(f"building model family {path.name} in {scratch}")
            build_family(spec, scratch, log)
            scratch.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
            try:
                scratch.rename(path)
            except OSError:  # another process finished the same family first: theirs is identical
                if not manifest_path.exists():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _family_from(path, json.loads(manifest_path.read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache-dir", default=None, help="cache root (default $HF_COPILOT_CACHE or ~/.cache/hf_copilot)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help=f"training steps per member (default {FamilySpec.steps})"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    spec = FamilySpec() if args.steps is None else FamilySpec().with_steps(args.steps)

    def log(message: str) -> None:
        print(message, flush=True)

    family = load_family(args.cache_dir, spec=spec, log=log)
    print(json.dumps(family.manifest, indent=2, default=str))
    print(f"model family at {family.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
