"""Where the main job's time goes: every script that the main job runs after SFT, at the
main job's shape (16 prompts x G=8, the toy world, one CPU thread per run as the job
gives it), one run at a time, from the same SFT checkpoint. Each run's per-step phases
come from its own perf/*_sec log (generate, score, old/reference log-probs, update);
the table gives the median over the timed steps (the first two are warm-up) and the
run's whole wall time, start-up and evaluations included. Then the levers tried on the
GRPO step, side by side in the same run: bfloat16 autocast, half the prompts per step.

Run: python scripts/bench_phases.py  (about 5 minutes; --model to reuse an SFT checkpoint; --prompts-per-step 64
for the diagnostic worlds' shape, about 4 times as long)
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    model: str = ""
    """SFT checkpoint to start from ('' = train one: algos/sft.py, 200 steps on data/toy/sft_prompts.jsonl)"""
    steps: int = 12
    """steps per run (the first two are not timed)"""
    prompts_per_step: int = 16
    """prompts per step of every run (the main job: 16; the diagnostic worlds: 64)"""
    threads: int = 1
    """CPU threads per run (the main job gives each of its 2 side-by-side runs 1 of the 2 cores)"""


def run(script: str, flags: list[str], out: Path, threads: int) -> float:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    start = time.time()
    result = subprocess.run([sys.executable, script, *flags, "--output-dir", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {script} failed:\n{result.stderr[-2000:]}")
    return time.time() - start


def phases(out: Path) -> dict[str, float]:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "perf/steps_per_sec" in line]
    timed = steps[2:] or steps
    keys = sorted({k for s in timed for k in s if k.startswith("perf/") and k.endswith("_sec") and k != "perf/steps_per_sec"})
    return {k[5:-4]: statistics.median(s.get(k, 0.0) for s in timed) for k in keys}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.steps < 3:
        raise SystemExit("error: --steps must be >= 3 (two warm-up steps, then at least one timed)")
    if args.prompts_per_step < 2:
        raise SystemExit(f"error: --prompts-per-step must be >= 2 (one run halves it), got {args.prompts_per_step}")
    work = Path(tempfile.mkdtemp(prefix="bench_phases_"))
    model = args.model
    if not model:
        print("training the SFT checkpoint (200 steps)", flush=True)
        run("algos/sft.py", ["--train-data", "data/toy/sft_prompts.jsonl", "--eval-prompts", "16"], work / "sft", 2)
        model = str(work / "sft" / "checkpoint")
    pairs, gpm = work / "pairs.jsonl", work / "gpm"
    subprocess.run([sys.executable, "scripts/build_preference_pairs.py", "--model", model, "--data",
                    "data/toy/sft_prompts.jsonl", "--out", str(pairs), "--num-prompts", "200"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
    run("algos/gpm.py", ["--model", model, "--pairs-data", str(pairs), "--steps", "20"], gpm, 2)
    common = ["--model", model, "--steps", str(args.steps), "--eval-every", str(args.steps), "--eval-prompts", "256",
              "--prompts-per-step", str(args.prompts_per_step)]
    half = args.prompts_per_step // 2
    cases = [
        ("GRPO", "algos/grpo.py", []),
        ("GRPO, 2 passes", "algos/grpo.py", ["--num-iterations", "2"]),
        ("CHORD-mu", "algos/chord.py", ["--preset", "chord-mu"]),
        ("AAPA-GRPO", "algos/aapa.py", ["--disc-prompts", "500"]),
        ("UniAPL", "algos/uniapl.py", []),
        ("ADPO listwise", "algos/adpo.py", []),
        ("GPRL", "algos/gprl.py", ["--gpm", str(gpm / "checkpoint")]),
        ("GRPO, --autocast-bf16", "algos/grpo.py", ["--autocast-bf16"]),
        (f"GRPO, {half} prompts per step", "algos/grpo.py", ["--prompts-per-step", str(half)]),  # the last flag wins
    ]
    rows = []
    for name, script, flags in cases:
        out = work / name.replace(" ", "_").replace(",", "")
        wall = run(script, common + flags, out, args.threads)
        measured = phases(out)
        step = sum(measured.values())
        record = {"bench": "phases", "row": name, "step_sec": round(step, 4), "run_wall_sec": round(wall, 1),
                  **{f"{k}_sec": round(v, 4) for k, v in measured.items()}}
        print(json.dumps(record), flush=True)
        rows.append(record)
    print(f"\n{args.steps} steps per run ({args.steps - 2} timed), {args.threads} thread(s), {args.prompts_per_step} "
          "prompts x G=8 unless stated; phases in seconds per step (median):\n")
    print("| run | step | generate | score | old/ref log-probs | update | run wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['step_sec']:.3f} | {r.get('generate_sec', 0):.3f} | {r.get('score_sec', 0):.3f} | "
              f"{r.get('logps_sec', 0):.3f} | {r.get('update_sec', 0):.3f} | {r['run_wall_sec']:.0f} |")
