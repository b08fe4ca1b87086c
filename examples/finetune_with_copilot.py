"""Fine-tune a causal LM (the Pilot) and train its Copilot: stock_finetune.py with three changes.

    python examples/make_tiny_pilot.py --output_dir /tmp/tiny-pilot   # offline stand-in for a Hub model
    python examples/finetune_with_copilot.py --pilot /tmp/tiny-pilot --output_dir out/copilot --max_steps 200

`diff examples/stock_finetune.py examples/finetune_with_copilot.py`: the model is wrapped with
PilotCopilotForCausalLM.from_pilot, Trainer/TrainingArguments become CopilotTrainer/CopilotTrainingArguments
(which also parse --copilot_learning_rate, --freeze_pilot, --mistake_log_replay ...), and the script reports
the Copilot's loss.
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
)

from hf_copilot import CopilotConfig, CopilotTrainer, CopilotTrainingArguments, PilotCopilotForCausalLM

DEFAULT_TRAIN_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_corpus.jsonl")


@dataclass
class ScriptArguments:
    pilot: str = field(metadata={"help": "Path or Hub id of the causal LM to fine-tune."})
    train_file: str = field(default=DEFAULT_TRAIN_FILE, metadata={"help": "JSON lines with a `text` field."})
    block_size: int = field(default=64, metadata={"help": "Tokens per training sequence."})


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ScriptArguments, CopilotTrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses(argv)
    tokenizer = AutoTokenizer.from_pretrained(script_args.pilot)
    pilot = AutoModelForCausalLM.from_pretrained(script_args.pilot)
    # A 2-layer Copilot as wide as the Pilot.
    width, heads = pilot.config.hidden_size, pilot.config.num_attention_heads
    model = PilotCopilotForCausalLM.from_pilot(
        pilot, CopilotConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads)
    )

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

    trainer = CopilotTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model()
    copilot_loss = [entry["copilot_loss"] for entry in trainer.state.log_history if "copilot_loss" in entry]
    if trainer.is_world_process_zero() and copilot_loss:
        print(f"copilot_loss: {copilot_loss[0]:.4f} (first logging step) -> {copilot_loss[-1]:.4f} (last)")
    return trainer


if __name__ == "__main__":
    main()
