"""Build a tiny random-weight Pilot (LLaMA layout) and a character tokenizer, for running the examples offline.

    python examples/make_tiny_pilot.py --output_dir /tmp/tiny-pilot
    python examples/finetune_with_copilot.py --pilot /tmp/tiny-pilot --output_dir /tmp/copilot-run

With Hub access, pass any causal LM instead (`--pilot Qwen/Qwen2.5-0.5B`); this helper only stands in for it.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_copilot.experiments.tokenizer import build_char_tokenizer

DEFAULT_TRAIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_corpus.jsonl")


def make_tiny_pilot(output_dir: str, train_file: str = DEFAULT_TRAIN_FILE, seed: int = 0) -> str:
    with open(train_file) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tokenizer = build_char_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--train_file", default=DEFAULT_TRAIN_FILE)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    print(make_tiny_pilot(options.output_dir, options.train_file, options.seed))
