"""Every algorithm at Qwen3-0.6B's real shape, on the CPU, offline: a randomly
initialised model with Qwen3-0.6B's exact configuration (hidden 1024, 28 layers, 16
heads, 8 KV heads, head dim 128, MLP 3072, vocabulary 151,936, tied embeddings; 0.6B
parameters) and a byte-level tokenizer padded to that vocabulary, saved and loaded
through `from_pretrained` like the hub checkpoint. Each algorithm runs 2 steps at a
tiny batch (2 prompts x G=2, 32 new tokens) with the GPU recipe's memory flags
(`--autocast-bf16 --gradient-checkpointing`, float32 weights), one at a time, and its
peak resident memory is measured: the process's own high-water mark (from wait4), and
per phase from the run's metrics.jsonl (shared/runlog.py:take_memory_peak): setup (loading,
and e.g. AAPA's discriminator fit, before the first step), the largest training step
and the largest evaluation.

    python scripts/real_shape.py                  # all 13 runs, about 50 minutes on 2 cores
    python scripts/real_shape.py --only grpo sft  # a subset

Prints a markdown table (also written to --table) of the peaks and wall time.
Needs about 16 GB of memory and 10 GB of disk (a run's folder is deleted after it).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
QWEN3_0_6B = {"hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
              "intermediate_size": 3072, "vocab_size": 151_936, "max_position_embeddings": 40_960}
# the same commands on a model of the toy world's size: every command checked in seconds (tests/test_real_shape.py)
SHAPES = {"qwen3-0.6b": QWEN3_0_6B, "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}}


@dataclass
class Args:
    work_dir: str = "/tmp/real_shape"
    """where the model, the data and each run's folder go (runs are deleted after measuring)"""
    only: list[str] = field(default_factory=list)
    """run only these (names as in the table: sft grpo chord aapa-grpo aapa-sft aapa-chord aapa-staged uniapl
    adpo adpo-pairwise gpm gprl)"""
    table: str = "results/real_shape.md"
    """markdown table of the measurements ('' for none)"""
    new_tokens: int = 32
    """--max-new-tokens of every run"""
    shape: str = "qwen3-0.6b"
    """qwen3-0.6b (the measurement) or tiny (the same commands on a toy-sized model: a check that each one runs)"""


def build_inputs(work: Path, shape: str = "qwen3-0.6b") -> dict:
    from shared.data import write_expert_cache
    from shared.modeling import build_tiny_model
    from shared.toyworld import make_split, oracle, write_jsonl

    model = work / f"{shape}-shape"
    if not (model / "config.json").exists():
        print(f"building a random model of shape {shape} ...", flush=True)
        build_tiny_model(model, **SHAPES[shape])
    rows = make_split(14, seed=0)
    write_jsonl(rows[:12], work / "train.jsonl")
    write_jsonl(rows[12:], work / "eval.jsonl")
    write_expert_cache(work / "expert_cache.jsonl", [r["prompt"] for r in rows], [oracle(r) for r in rows],
                       teacher="oracle", generation={})
    write_jsonl([{"prompt": r["prompt"], "chosen": oracle(r), "rejected": oracle(r)[::-1] + "x", "label": 1.0}
                 for r in rows[:8]], work / "pairs.jsonl")
    return {"model": str(model), "train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"),
            "cache": str(work / "expert_cache.jsonl"), "pairs": str(work / "pairs.jsonl")}


def commands(inputs: dict, work: Path, new_tokens: int) -> dict[str, list[str]]:
    memory = ["--autocast-bf16", "--gradient-checkpointing", "--device", "cpu"]
    base = ["--model", inputs["model"], "--steps", "2", "--eval-every", "2", "--save-every", "2"] + memory
    data = ["--train-data", inputs["train"], "--eval-data", inputs["eval"], "--eval-prompts", "2",
            "--max-new-tokens", str(new_tokens)]
    rl = base + data + ["--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "4"]
    expert = ["--expert-cache", inputs["cache"]]
    pool = [*expert, "--expert-pool", inputs["train"]]  # the demonstrations RL reads: every training prompt's
    discriminator = ["--disc-prompts", "12", "--disc-epochs", "5"]
    return {
        "sft": ["algos/sft.py", *base, *data, *expert, "--batch-size", "2", "--micro-batch-size", "2"],
        "grpo": ["algos/grpo.py", *rl],
        "chord": ["algos/chord.py", *rl, *pool],
        "aapa-grpo": ["algos/aapa.py", *rl, *pool, *discriminator, "--base", "grpo"],
        "aapa-sft": ["algos/aapa.py", *rl, *pool, *discriminator, "--base", "sft"],
        "aapa-chord": ["algos/aapa.py", *rl, *pool, *discriminator, "--base", "chord"],
        "aapa-staged": ["algos/aapa.py", *rl, *pool, *discriminator, "--staged", "--stage1-steps", "1"],
        "uniapl": ["algos/uniapl.py", *rl, *pool],
        "adpo": ["algos/adpo.py", *rl],
        "adpo-pairwise": ["algos/adpo_pairwise.py", *base, "--pairs-data", inputs["pairs"], "--eval-data", inputs["eval"],
                          "--eval-prompts", "2", "--max-new-tokens", str(new_tokens), "--batch-size", "2",
                          "--micro-batch-size", "2"],
        "gpm": ["algos/gpm.py", *base, "--pairs-data", inputs["pairs"], "--batch-size", "2", "--micro-batch-size", "2",
                "--dims", "4", "--axis-weight", "0"],
        "gprl": ["algos/gprl.py", *rl, "--gpm", str(work / "runs" / "gpm" / "checkpoint"), "--probe-prompts", "2"],
        # how memory grows with rows x tokens: 4x the rows and 2x the new tokens of the grpo row
        "grpo-16x64": ["algos/grpo.py", *base, *data[:-1], str(2 * new_tokens), "--prompts-per-step", "4",
                       "--group-size", "4", "--micro-batch-size", "16"],
    }


def run_measured(command: list[str], log: Path) -> tuple[int, float, float]:
    """Exit status, peak RSS in GiB (this child's own, from wait4) and wall seconds."""
    start = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 2**20, time.time() - start


def phase_peaks(out: Path) -> str:
    """'setup | step | eval' peaks in GiB from a run's metrics.jsonl ('-' where missing)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    peaks = []
    for key in ("perf/peak_setup_memory_gib", "perf/peak_memory_gib", "perf/peak_eval_memory_gib"):
        values = [line[key] for line in lines if key in line]
        peaks.append(f"{max(values):.1f}" if values else "-")
    return " | ".join(peaks)


def main(args: Args) -> None:
    work = Path(args.work_dir)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if args.shape not in SHAPES:
        raise SystemExit(f"error: --shape must be one of {', '.join(SHAPES)}, got {args.shape!r}")
    inputs = build_inputs(work, args.shape)
    runs = commands(inputs, work, args.new_tokens)
    unknown = [name for name in args.only if name not in runs]
    if unknown:
        raise SystemExit(f"error: --only {unknown[0]!r} is not one of {', '.join(runs)}")
    wanted = [name for name in runs if not args.only or name in args.only]
    if "gprl" in wanted and "gpm" not in wanted and not (work / "runs" / "gpm" / "checkpoint").exists():
        wanted.insert(wanted.index("gprl"), "gpm")  # GPRL reads the GPM's checkpoint
    table = Path(args.table) if args.table else None
    measured = {}  # name -> row; rows of runs not repeated now are kept from the table file
    columns = "| algorithm | setup peak (GiB) | step peak (GiB) | eval peak (GiB) | process peak (GiB) | wall (s) |"
    if table and table.exists():  # rows of an older layout (other columns) are not kept
        measured = {line.split(" | ")[0].strip("| ").split(" (")[0]: line for line in table.read_text().splitlines()
                    if line.startswith("| ") and not line.startswith("| algorithm") and line.count("|") == columns.count("|")}
    for name in wanted:
        out = work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        code, peak, wall = run_measured([*runs[name], "--output-dir", str(out)], work / f"{name}.log")
        status = "" if code == 0 else f" (failed, exit {code}: see {work / f'{name}.log'})"
        measured[name] = f"| {name}{status} | {phase_peaks(out)} | {peak:.1f} | {wall:.0f} |"
        print(measured[name], flush=True)
        if name != "gpm":
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / "runs" / "gpm", ignore_errors=True)
    shape = "Qwen3-0.6B" if args.shape == "qwen3-0.6b" else "Tiny"
    header = (f"{shape} shape (random weights), 2 steps, 2 prompts x G=2 (SFT/pairwise: 2 rows; grpo-16x64: 4 x G=4, "
              f"{2 * args.new_tokens} tokens), {args.new_tokens} "
              "new tokens, float32 weights, --autocast-bf16 --gradient-checkpointing, CPU; peak resident memory per "
              "phase (setup: loading and any fit before the first step; the largest step; the largest evaluation) "
              "and of the whole process.\n"
              "Printed by `python scripts/real_shape.py`.\n\n")
    lines = [columns, "|---|---:|---:|---:|---:|---:|"]
    lines += [measured[name] for name in runs if name in measured]
    print("\n" + header + "\n".join(lines))
    if table:
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(tyro.cli(Args))
