"""Fine-tune a causal LM with the stock Hugging Face Trainer: the reference for finetune_with_copilot.py.

    python examples/stock_finetune.py --pilot <path or hub id> --output_dir out/stock --max_steps 200

The usual recipe (as in transformers' run_clm.py): tokenize a text dataset, group it into blocks, train with
DataCollatorForLanguageModeling, save. `diff examples/stock_finetune.py examples/finetune_with_copilot.py`
shows everything the Copilot changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import chain

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

DEFAULT_TRAIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_corpus.jsonl")


@dataclass
class ScriptArguments:
    pilot: str = field(metadata={"help": "Path or Hub id of the causal LM to fine-tune."})
    train_file: str = field(default=DEFAULT_TRAIN_FILE, metadata={"help": "JSON lines with a `text` field."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training sequence."})


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses(argv)
    tokenizer = AutoTokenizer.from_pretrained(script_args.pilot)
    model = AutoModelForCausalLM.from_pretrained(script_args.pilot)

    raw = load_dataset("json", data_files=script_args.train_file, split="train")
    tokenized = raw.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=raw.column_names)
    block_size = min(script_args.block_size, tokenizer.model_max_length)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = len(concatenated["input_ids"]) // block_size * block_size
        return {
            k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()
        }

    train_dataset = tokenized.map(group_texts, batched=True)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
