"""Logging: scalars to tensorboard, metrics.jsonl and optional wandb, and the
per-phase seconds and peak memory of every step."""

import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from shared import distributed
from shared.runfolder import RUN_RECORD, _jsonable, atomic_write_text, input_fingerprints, write_json


def take_memory_peak() -> float:
    """The peak memory (GiB) since the previous call, or since the process started, and
    a fresh start for the next: CUDA's peak allocated memory on a GPU, else the peak
    resident memory (Linux's VmHWM, which writing 5 to /proc/self/clear_refs resets).
    Where neither can be read, 0."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return peak
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return peak
    except (OSError, StopIteration, ValueError):
        return 0.0


class PhaseTimer:
    """Wall seconds of each phase of a step, logged as perf/<phase>_sec: lap(phase) ends
    the phase that began at the previous lap (or when the timer was made). Also the
    step's peak memory (perf/peak_memory_gib), and once, from the first timer of the
    process, the peak of everything before its first step (perf/peak_setup_memory_gib:
    loading, and e.g. AAPA's discriminator fit); scripts/real_shape.py reads both."""

    peak_before_steps: float | None = 0.0  # None once the first step of the process has begun

    def __init__(self):
        before = take_memory_peak()
        self._setup = None if PhaseTimer.peak_before_steps is None else max(PhaseTimer.peak_before_steps, before)
        PhaseTimer.peak_before_steps = None
        self.seconds, self._last = {}, time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict:
        total = sum(self.seconds.values())
        setup = {} if self._setup is None else {"perf/peak_setup_memory_gib": self._setup}
        return {**{f"perf/{k}_sec": v for k, v in self.seconds.items()}, "perf/steps_per_sec": 1 / max(total, 1e-9),
                "perf/peak_memory_gib": take_memory_peak(), **setup}


class RunLogger:
    """Scalars to tensorboard (<output_dir>/tb), to <output_dir>/metrics.jsonl and,
    with track=True, to wandb. Hyperparameters go in as a markdown table."""

    def __init__(self, output_dir: Path, args, track: bool = False, wandb_project: str = "posttrain",
                 resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.enabled = distributed.is_main()  # under torchrun, rank 0 logs
        if not self.enabled:
            return
        self.metrics_path = output_dir / "metrics.jsonl"
        self._drop_lines_after(resume_step)
        config = dataclasses.asdict(args)
        if not (output_dir / RUN_RECORD).exists() or getattr(args, "allow_flag_changes", False):
            write_json(output_dir / RUN_RECORD, {"args": {k: _jsonable(v) for k, v in config.items()},
                                                 "inputs": input_fingerprints(args)})
        if track:
            import wandb

            wandb.init(project=wandb_project, name=output_dir.name, config=config, sync_tensorboard=True)
        self.writer = SummaryWriter(str(output_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
        self.start_time = time.time()

    def _drop_lines_after(self, step: int) -> None:
        """On resume, forget what the killed run logged after its last checkpoint (all
        of it when there was none: the run starts again at step 0, initial evaluation included)."""
        if not self.metrics_path.exists():
            return
        text = self.metrics_path.read_text()
        lines = text.splitlines()
        steps = [_step_of(line) for line in lines] if step > 0 else []
        kept = [line for line, logged in zip(lines, steps) if logged is not None and logged <= step]
        if len(kept) < len(lines) or not text.endswith("\n") and lines:
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))  # a long run's resume skips this

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        for key, value in clean.items():
            self.writer.add_scalar(key, value, step)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time() - self.start_time, **clean}) + "\n")

    def close(self) -> None:
        """The end of a run's normal path (under torchrun: this rank then waits for its peers at exit)."""
        distributed.finish()
        if self.enabled:
            self.writer.close()


_LOGGED_LINE = re.compile(r'\{"step": (\d+), "time": -?[0-9.e+-]+, "[^"]+": ')


def _step_of(line: str) -> int | None:
    """The step a metrics line records; None for a line cut short by a crash or edited
    into something else (it is dropped on resume)."""
    ours = _LOGGED_LINE.match(line)  # the lines RunLogger.log writes, read without a JSON parse (a long run's resume)
    if ours and line.endswith("}"):
        return int(ours.group(1))
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None
