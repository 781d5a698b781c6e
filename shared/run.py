"""Run plumbing shared by every script: seeding, logging (tensorboard, a JSONL
file, optional wandb) and atomic, resumable checkpoints."""

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint"  # <output_dir>/checkpoint: model + tokenizer + trainer_state.pt
TRAINER_STATE = "trainer_state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Data order and sampling depend only on (seed, step), so a resumed run draws
    exactly what the uninterrupted run would have drawn."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class RunLogger:
    """Scalars to tensorboard (<output_dir>/tb), to <output_dir>/metrics.jsonl and,
    with track=True, to wandb. Hyperparameters go in as a markdown table."""

    def __init__(self, output_dir: Path, args, track: bool = False, wandb_project: str = "posttrain",
                 resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.metrics_path = output_dir / "metrics.jsonl"
        self._drop_lines_after(resume_step)
        config = dataclasses.asdict(args)
        if track:
            import wandb

            wandb.init(project=wandb_project, name=output_dir.name, config=config, sync_tensorboard=True)
        self.writer = SummaryWriter(str(output_dir / "tb"))
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        self.start_time = time.time()

    def _drop_lines_after(self, step: int) -> None:
        """On resume, forget what the killed run logged after its last checkpoint."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and _parse(line) is not None and _parse(line)["step"] <= step]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        for key, value in clean.items():
            self.writer.add_scalar(key, value, step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time() - self.start_time, **clean}) + "\n")

    def close(self) -> None:
        self.writer.close()


def _parse(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut short by a crash


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(Path(path), json.dumps(obj, indent=2))


def save_checkpoint(output_dir: Path, model, tokenizer, optimizer, scheduler, step: int, args, extra: dict | None = None,
                    extra_files: dict | None = None) -> Path:
    """Write <output_dir>/checkpoint atomically: a temporary folder, then a rename,
    so a crash mid-save leaves the previous checkpoint intact. `extra` goes into the
    trainer state; each `extra_files` entry (name -> object) is torch-saved beside the model."""
    final, tmp, old = output_dir / CHECKPOINT, output_dir / (CHECKPOINT + ".tmp"), output_dir / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({
        "step": step, "args": dataclasses.asdict(args), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "extra": extra or {},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, tmp / TRAINER_STATE)
    for name, obj in (extra_files or {}).items():
        torch.save(obj, tmp / name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(output_dir: Path) -> dict | None:
    """The trainer state of <output_dir>/checkpoint, or None when there is none."""
    path = output_dir / CHECKPOINT / TRAINER_STATE
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
