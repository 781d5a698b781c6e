"""How a run starts under load: loading and validating a 100,000-row training file and a
10,000-row eval file (the same code every training script runs before its model loads),
and a resume whose metrics.jsonl already holds 100,000 logged steps against one with
100. Prints one JSON line per measurement (seconds, peak resident memory) and the
resume ratio, both sizes measured side by side in this one run.

    python scripts/bench_load.py
"""

import json
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from shared.data import load_eval_rows, load_rows
from shared.runlog import RunLogger
from shared.toyworld import make_row, write_jsonl


@dataclass
class Args:
    train_rows: int = 100_000
    """rows of the training file"""
    eval_rows: int = 10_000
    """rows of the eval file"""
    logged_steps: int = 100_000
    """metrics lines a long run's resume reads back (compared with 100)"""


@dataclass
class LoggerFlags:  # what RunLogger records of a run's flags
    output_dir: str
    seed: int = 1


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def toy_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng, key=key) for key in range(count)]


def time_resume(folder: Path, steps: int) -> float:
    """A run folder whose metrics.jsonl holds `steps` lines, resumed at its last step."""
    folder.mkdir(parents=True)
    lines = "".join(json.dumps({"step": step, "time": 0.1 * step, "train/loss": 0.5, "train/reward_mean": 0.25}) + "\n"
                    for step in range(1, steps + 1))
    (folder / "metrics.jsonl").write_text(lines)
    start = time.perf_counter()
    RunLogger(folder, LoggerFlags(str(folder)), resume_step=steps).close()
    return time.perf_counter() - start


if __name__ == "__main__":
    args = tyro.cli(Args)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_jsonl(toy_rows(args.train_rows, seed=0), work / "train.jsonl")
        write_jsonl(toy_rows(args.eval_rows, seed=1), work / "eval.jsonl")
        before = peak_mib()
        start = time.perf_counter()
        train = load_rows(str(work / "train.jsonl"))
        eval_rows = load_eval_rows(str(work / "eval.jsonl"), args.eval_rows)
        print(json.dumps({"measure": "load and validate", "train_rows": len(train), "eval_rows": len(eval_rows),
                          "seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": round(peak_mib(), 1),
                          "peak_rss_before_mib": round(before, 1)}))
        short, long = time_resume(work / "short", 100), time_resume(work / "long", args.logged_steps)
        print(json.dumps({"measure": "resume", "steps_100_seconds": round(short, 3),
                          f"steps_{args.logged_steps}_seconds": round(long, 3), "ratio": round(long / short, 2)}))
