"""Training runs killed during their checkpoint saves, for tests/test_faults.py.

`python fault_train.py ROOT SEED TRIALS` imports once, then forks every run from this process (one thread,
so the runs are bit-for-bit comparable and forking is safe):

1. `ROOT/reference`: an uninterrupted run with a checkpoint every step. It counts the file-system operations
   its saves make (opening a file for writing, torch.save, safetensors writes, mkdir, rename, replace,
   remove, rmtree) and keeps its final weights.
2. For each trial, `ROOT/trial{i}`: the same run, which kills itself with SIGKILL right before or right after
   its k-th such operation (k and the side drawn from SEED). After every save that returned it appends the
   step to `progress.txt`: the newest checkpoint that must survive.
3. A fresh process resumes each trial with `resume_from_checkpoint=True`; it writes `result.json` (the step it
   resumed from, or the error) and its final weights.

Prints a JSON summary: the operation count and, per trial, the kill point, the signal, what the kill left in
the output folder and the resume's exit code.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import shutil
import signal
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import transformers.modeling_utils  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_trainer import make_model, make_trainer, resume_settings  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import hf_copilot.trainer  # noqa: E402


class FileSystemTrap:
    """Counts file-system operations made inside checkpoint saves; kills the process at the k-th one."""

    def __init__(self, kill_at: int | None = None, after: bool = False):
        self.kill_at, self.after, self.count, self.saving = kill_at, after, 0, False

    def wrap(self, owner, name: str, writes=lambda *args, **kwargs: True) -> None:
        original = getattr(owner, name)

        def trapped(*args, **kwargs):
            number = None
            if self.saving and writes(*args, **kwargs):
                self.count += 1
                number = self.count
                if number == self.kill_at and not self.after:
                    os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)  # may count operations of its own (makedirs, rmtree)
            if number is not None and number == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        setattr(owner, name, trapped)

    def install(self) -> None:
        self.wrap(builtins, "open", lambda file, mode="r", *a, **k: any(c in mode for c in "wax+"))
        for name in ("replace", "rename", "remove", "unlink", "mkdir", "makedirs", "rmdir"):
            self.wrap(os, name)
        self.wrap(shutil, "rmtree")
        self.wrap(torch, "save")
        self.wrap(transformers.modeling_utils, "safe_save_file")
        trainer_class = hf_copilot.trainer.CopilotTrainer
        save_checkpoint = trainer_class._save_checkpoint
        trap = self

        def trapped_save(trainer, *args, **kwargs):
            trap.saving = True
            try:
                save_checkpoint(trainer, *args, **kwargs)
            finally:
                trap.saving = False
            with open(os.path.join(trainer.args.output_dir, "progress.txt"), "a") as progress:
                progress.write(f"{trainer.state.global_step}\n")

        trainer_class._save_checkpoint = trapped_save


class RecordResumedStep(TrainerCallback):
    def __init__(self):
        self.step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def settings(root: str, name: str) -> dict:
    return {**resume_settings(root, name), "save_steps": 1, "save_total_limit": 2}


def in_child(run) -> int:
    """Run `run` in a forked process; its wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            run()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def train(root, name: str, trap: FileSystemTrap) -> None:
    trap.install()
    trainer = make_trainer(root, **settings(root, name))
    trainer.train()
    save_file(trainer.model.state_dict(), os.path.join(root, name, "final.safetensors"))
    with open(os.path.join(root, name, "operations.json"), "w") as handle:
        json.dump(trap.count, handle)


def resume(root, name: str) -> None:
    recorder = RecordResumedStep()
    trainer = make_trainer(root, model=make_model(seed=7), **settings(root, name))
    trainer.add_callback(recorder)
    try:
        trainer.train(resume_from_checkpoint=True)
    except ValueError as error:
        result = {"error": str(error)}
    else:
        result = {"resumed_from": recorder.step}
        save_file(trainer.model.state_dict(), os.path.join(root, name, "final.safetensors"))
    with open(os.path.join(root, name, "result.json"), "w") as handle:
        json.dump(result, handle)


def main(root: str, seed: int, trials: int) -> None:
    torch.set_num_threads(1)
    root_path = Path(root)
    in_child(lambda: train(root_path, "reference", FileSystemTrap()))
    operations = json.loads((root_path / "reference" / "operations.json").read_text())
    draw = random.Random(seed)
    summary = {"operations": operations, "trials": []}
    for index in range(trials):
        name = f"trial{index}"
        kill_at, after = draw.randint(1, operations), draw.random() < 0.5
        status = in_child(lambda: train(root_path, name, FileSystemTrap(kill_at, after)))  # noqa: B023
        left = sorted(p.name for p in (root_path / name).iterdir())
        resumed = in_child(lambda: resume(root_path, name))  # noqa: B023
        summary["trials"].append(
            {
                "name": name,
                "kill_at": kill_at,
                "after": after,
                "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "left": left,
                "resume_exit_code": os.WEXITSTATUS(resumed),
            }
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
