"""Every code block of README.md and docs/*.md runs as written.

A file's ```python blocks run in order in one fresh namespace (a later block may use an earlier block's
names), with nothing in their text changed, in a temporary working directory that stands in for the
repository root offline:

- `examples/`: the repository's (its data and scripts);
- `Qwen/Qwen2.5-0.5B`: a tiny random LLaMA with a character tokenizer; `from_pretrained` reads a local
  folder of that name before it asks the Hub, so the blocks keep the Hub id a reader would use;
- `tiny-pilot`: what `python examples/make_tiny_pilot.py --output_dir tiny-pilot` writes.

The Hub is switched off: a block that reaches for it fails. A block that cannot run offline carries
`<!-- not run: <why> -->` on the line before it; `NOT_RUN` lists every such block, and each must still
compile. Shell blocks are not run, but each `hf-copilot` command in them must parse, each `examples/*.py`
they name must exist and each `make` target must be in the Makefile.
"""

from __future__ import annotations

import json
import re
import shlex
import string
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch

from hf_copilot import PilotCopilotForCausalLM
from hf_copilot.experiments.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md"))]
STAND_IN_PILOT = "Qwen/Qwen2.5-0.5B"

PYTHON, SHELL = ("python", "py", "python3"), ("bash", "sh", "shell")
# (file, first line of the block): every block marked `<!-- not run: ... -->`, and nothing else.
NOT_RUN = {
    ("docs/howto-copilot-checkpoints.md", 'model.push_copilot_to_hub("me/my-copilot")'),
}

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<language>\w*)\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.S | re.M
)
NOT_RUN_MARKER = re.compile(r"<!-- not run: (?P<why>.+?) -->")


@dataclass(frozen=True)
class Block:
    doc: str
    language: str
    line: int  # of the block's first code line in the file, 1-based
    code: str
    not_run: str | None  # why, for a block marked not to run

    @property
    def first_line(self) -> str:
        return self.code.strip().splitlines()[0]


def code_blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        preceding = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        marker = NOT_RUN_MARKER.fullmatch(preceding)
        blocks.append(
            Block(
                doc,
                match["language"],
                text.count("\n", 0, match.start("code")) + 1,
                textwrap.dedent(match["code"]),
                marker["why"] if marker else None,
            )
        )
    return blocks


def make_pilot(folder: Path, texts: list[str], scratch: Path) -> None:
    """examples/make_tiny_pilot.py's Pilot, its tokenizer covering the characters of `texts`."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from make_tiny_pilot import make_tiny_pilot
    finally:
        sys.path.remove(str(ROOT / "examples"))
    corpus = scratch / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    make_tiny_pilot(str(folder), train_file=str(corpus))


@pytest.fixture
def repository_stand_in(tmp_path, monkeypatch):
    """The working directory the blocks run in (see the module docstring), offline."""
    root, scratch = tmp_path / "root", tmp_path / "scratch"
    root.mkdir()
    scratch.mkdir()
    (root / "examples").symlink_to(ROOT / "examples")
    corpus = (ROOT / "examples" / "data" / "tiny_corpus.jsonl").read_text().splitlines()
    make_pilot(root / "tiny-pilot", [json.loads(line)["text"] for line in corpus], scratch)
    make_pilot(root / STAND_IN_PILOT, [string.printable], scratch)  # digits and signs for the tasks too
    monkeypatch.chdir(root)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return root


def the_copilot_only_checkpoint_holds_the_trained_copilot(namespace: dict) -> None:
    """docs/howto-train.md: the Copilot trained on a frozen SFT Pilot loads back onto that Pilot."""
    assert namespace["args"].freeze_pilot
    reloaded = PilotCopilotForCausalLM.from_pretrained("copilot/final")
    for ours, theirs in zip(reloaded.parameters(), namespace["model"].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


CHECKS_AFTER = {"docs/howto-train.md": the_copilot_only_checkpoint_holds_the_trained_copilot}


@pytest.mark.parametrize("doc", [doc for doc in DOCS if any(b.language in PYTHON for b in code_blocks(doc))])
def test_the_python_blocks_of_each_file_run_in_order(doc, repository_stand_in):
    namespace = {"__name__": "__main__"}
    for block in code_blocks(doc):
        if block.language not in PYTHON:
            continue
        # Padded so that a traceback names the line of the markdown file.
        code = compile("\n" * (block.line - 1) + block.code, str(ROOT / doc), "exec")
        if block.not_run is None:
            exec(code, namespace)
    if doc in CHECKS_AFTER:
        CHECKS_AFTER[doc](namespace)


def test_exactly_the_listed_blocks_are_marked_not_to_run():
    marked = {(b.doc, b.first_line) for doc in DOCS for b in code_blocks(doc) if b.not_run is not None}
    assert marked == NOT_RUN


def test_every_block_is_found():
    """A fence the pattern missed (odd indentation, an unclosed block) would go untested."""
    for doc in DOCS:
        fences = sum(1 for line in (ROOT / doc).read_text().splitlines() if line.strip().startswith("```"))
        assert fences == 2 * len(code_blocks(doc)), doc


def shell_commands(block: Block) -> list[list[str]]:
    """The block's commands, continuation lines joined and comments dropped."""
    return [shlex.split(line, comments=True) for line in block.code.replace("\\\n", " ").splitlines()]


def test_the_shell_blocks_name_real_commands_options_scripts_and_targets():
    makefile = (ROOT / "Makefile").read_text()
    commands = [
        words
        for doc in DOCS
        for block in code_blocks(doc)
        if block.language in SHELL
        for words in shell_commands(block)
        if words
    ]
    assert any(words[0] == "hf-copilot" for words in commands)
    for words in commands:
        if words[0] == "hf-copilot":
            try:
                build_parser().parse_args(words[1:])
            except SystemExit:  # argparse's way of refusing a command or an option
                pytest.fail(f"hf-copilot does not accept: {shlex.join(words)}")
        if words[0] == "make":
            for target in words[1:]:
                assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target
        for word in words:
            if re.fullmatch(r"examples/\S+\.py", word):
                assert (ROOT / word).is_file(), word
