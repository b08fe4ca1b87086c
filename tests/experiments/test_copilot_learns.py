"""End to end with the default arguments: the Copilot learns the Pilot's errors and rectifies generate()."""

from __future__ import annotations

import torch

from hf_copilot import CopilotConfig, CopilotTrainer, CopilotTrainingArguments, PilotCopilotForCausalLM
from hf_copilot.experiments.data import DataCollatorForCompletion, tokenize_examples
from hf_copilot.experiments.evaluation import evaluate_task
from hf_copilot.experiments.recipes import PilotShape, task_tokenizer
from hf_copilot.experiments.tasks import get_task


def test_default_training_makes_a_copilot_that_predicts_and_corrects_held_out_errors(tmp_path):
    torch.set_num_threads(1)
    task = get_task("sorting", length=6)
    tokenizer = task_tokenizer(task, sample_size=200)
    train, validation = task.examples("train", 1000, seed=0), task.examples("validation", 200, seed=0)
    pilot = PilotShape(32, 2, 4).build(tokenizer, seed=0)
    torch.manual_seed(1)
    model = PilotCopilotForCausalLM.from_pilot(
        pilot, CopilotConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    )
    args = CopilotTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        num_train_epochs=4,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    trainer = CopilotTrainer(
        model=model,
        args=args,
        train_dataset=tokenize_examples(train, tokenizer),
        eval_dataset=tokenize_examples(validation, tokenizer),
        data_collator=DataCollatorForCompletion(tokenizer),
    )
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    pilot_exact = evaluate_task(model, tokenizer, validation, task, progress=False, copilot_lambda=0.0)
    fused_exact = evaluate_task(model, tokenizer, validation, task, progress=False)  # the defaults
    assert metrics["eval_copilot_r2"] > 0.2
    assert fused_exact["accuracy"] > pilot_exact["accuracy"] + 0.05
