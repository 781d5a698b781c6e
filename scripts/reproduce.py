"""The main job: build the offline toy world, run SFT, then every RL method from the
same SFT checkpoint with the same rollout budget, over seeds, and write a table.

Each run is a plain command line of an algorithm script (printed before it runs),
so any row of the table can be reproduced by hand. A run whose eval.json exists is
not redone; an interrupted run continues with --resume. Runs go side by side
(--jobs: seeds first; with fewer seeds than jobs, a seed's RL methods) with the CPU
threads split between them: on the tiny model two one-thread processes get through
about 1.3x the work of one two-thread process.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tyro

from analyze import analyze, eval_curve, plot_curves
from shared.run import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
FAILED = threading.Event()  # set when any seed's command fails: the other seeds start nothing new


@dataclass
class Args:
    out_dir: str = "results"
    """where runs/, table.md and the plots go"""
    seeds: int = 2
    """seeds per method (the table reports mean +- std)"""
    quick: bool = False
    """a ~3.5-minute smoke version: one seed, fewer SFT/RL/GPM steps, fewer eval and side prompts"""
    sft_steps: int = 200
    """SFT optimizer steps"""
    rl_steps: int = 20
    """generation batches per RL method (same rollout budget for every method)"""
    gpm_steps: int = 80
    """optimizer steps of the General Preference Model that GPRL uses"""
    prompts_per_step: int = 16
    """prompts per generation batch"""
    group_size: int = 8
    """completions per prompt"""
    eval_prompts: int = 256
    """held-out prompts per evaluation"""
    side_prompts: int = 2000
    """training prompts sampled for the preference pairs and for AAPA's discriminator"""
    jobs: int = 2
    """runs side by side, each with cpu_count / jobs threads: seeds first, then a seed's RL methods"""
    python: str = sys.executable
    """interpreter used for the algorithm scripts"""


def run(command: list[str], log_path: Path, threads: int) -> None:
    """Run one script, its output going to a log file; stop the job on failure."""
    if FAILED.is_set():
        raise SystemExit("stopped: a command of another seed failed")
    print("$ " + " ".join(command[1:]), flush=True)
    env = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads), **os.environ}
    with open(log_path, "a") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        FAILED.set()
        raise SystemExit(f"error: command failed (exit {result.returncode}); see {log_path}")


def train(args, name: str, script: str, flags: list[str], runs_dir: Path, threads: int) -> dict:
    """One training run, skipped if finished, resumed if interrupted."""
    out = runs_dir / name
    if not (out / "eval.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        resume = ["--resume"]  # continues an interrupted run, starts a new one in an empty folder
        start = time.time()
        run([args.python, script, *flags, "--output-dir", str(out), *resume], out / "log.txt", threads)
        atomic_write_text(out / "wall_time.txt", f"{time.time() - start:.1f}")
    result = json.loads((out / "eval.json").read_text())
    result["wall_time"] = float((out / "wall_time.txt").read_text()) if (out / "wall_time.txt").exists() else float("nan")
    print(f"  {name}: " + (f"gold {result['gold']:.3f} reward {result['reward']:.3f}" if "gold" in result
                           else f"held-out pairwise accuracy {result['heldout_accuracy']:.3f}"), flush=True)
    return result


def run_seed(args, seed: int, runs_dir: Path) -> dict:
    """SFT, preference pairs, the GPM, then every RL method from the SFT checkpoint, for one seed.
    Returns {method: eval result}, {method: run folder} and the GPM's held-out accuracy."""
    eval_flags = ["--eval-prompts", str(args.eval_prompts)]
    rl_budget = ["--steps", str(args.rl_steps), "--prompts-per-step", str(args.prompts_per_step),
                 "--group-size", str(args.group_size), "--eval-every", str(max(1, args.rl_steps // 4)), *eval_flags]
    sft = train(args, f"sft_seed{seed}", "algos/sft.py",
                ["--seed", str(seed), "--steps", str(args.sft_steps), "--eval-every", str(max(1, args.sft_steps // 4)),
                 *eval_flags], runs_dir, args.threads)
    initial = runs_dir / f"sft_seed{seed}" / "initial_eval.json"  # the model before SFT
    base = json.loads(initial.read_text()) if initial.exists() else {"gold": sft["initial_gold"]}
    results = {"base model": {"reward": float("nan"), "length": float("nan"), **base, "wall_time": 0.0}, "SFT": sft}
    run_dirs = {"SFT": runs_dir / f"sft_seed{seed}"}
    sft_checkpoint = str(runs_dir / f"sft_seed{seed}" / "checkpoint")
    # Offline preference pairs for the pairwise methods: two samples of this seed's SFT model per prompt.
    pairs = runs_dir / f"pairs_seed{seed}.jsonl"
    if not pairs.exists():
        run([args.python, "scripts/build_preference_pairs.py", "--model", sft_checkpoint, "--out", str(pairs),
             "--seed", str(seed), "--num-prompts", str(args.side_prompts)], runs_dir / f"pairs_seed{seed}.log", args.threads)
    # The General Preference Model GPRL optimises, trained on those pairs from the same SFT backbone.
    gpm = train(args, f"gpm_seed{seed}", "algos/gpm.py", ["--model", sft_checkpoint, "--pairs-data", str(pairs),
                                                          "--seed", str(seed), "--steps", str(args.gpm_steps)], runs_dir,
                args.threads)
    # AAPA's fixed discriminator depends only on the SFT checkpoint, the expert data and the seed:
    # the first AAPA run trains it and the other three load it.
    discriminator = ["--disc-path", str(runs_dir / f"aapa-grpo_seed{seed}" / "discriminator.pt")]
    # Every RL method: same SFT start, same prompts x G x steps.
    rl_methods = [
        ("GRPO", "algos/grpo.py", []),
        ("CHORD-phi", "algos/chord.py", ["--preset", "chord-phi"]),
        # the paper's CHORD-mu decays over 200 steps; here over the run's own length
        ("CHORD-mu", "algos/chord.py", ["--preset", "chord-mu", "--mu-decay", str(args.rl_steps)]),
        ("AAPA-GRPO", "algos/aapa.py", ["--base", "grpo", "--disc-prompts", str(args.side_prompts)]),
        ("AAPA-SFT", "algos/aapa.py", ["--base", "sft", *discriminator]),
        ("AAPA-CHORD", "algos/aapa.py", ["--base", "chord", *discriminator]),
        ("AAPA staged", "algos/aapa.py", ["--staged", "--stage1-steps", str(args.rl_steps // 2), *discriminator]),
        ("UniAPL", "algos/uniapl.py", []),
        ("ADPO listwise", "algos/adpo.py", []),
        ("ADPO pairwise", "algos/adpo.py", ["--mode", "pairwise", "--pairs-data", str(pairs)]),
        ("GPRL", "algos/gprl.py", ["--gpm", str(runs_dir / f"gpm_seed{seed}" / "checkpoint")]),
    ]

    def train_method(name, script, extra, needs):
        if needs is not None:
            needs.result()  # AAPA's shared discriminator must exist before the runs that load it
        return train(args, name, script, ["--model", sft_checkpoint, "--seed", str(seed), *rl_budget, *extra], runs_dir,
                     max(1, args.threads // args.methods_at_once))

    # With fewer seeds than jobs the spare jobs run this seed's methods side by side. Futures start in
    # submission order, so a run that waits on AAPA-GRPO never holds the only worker before it.
    with ThreadPoolExecutor(max_workers=args.methods_at_once) as pool:
        futures = {}
        for method, script, extra in rl_methods:
            name = f"{method.lower().replace(' ', '_')}_seed{seed}"
            needs = futures["AAPA-GRPO"] if "--disc-path" in extra else None
            futures[method] = pool.submit(train_method, name, script, extra, needs)
            run_dirs[method] = runs_dir / name
        for method, future in futures.items():
            results[method] = future.result()
    return {"results": results, "run_dirs": run_dirs, "gpm_accuracy": gpm["heldout_accuracy"]}


def mean_std(values: list[float], signed: bool = False) -> str:
    values = [v for v in values if v == v]  # drop NaN: a quantity a run did not record
    if not values:
        return "–"
    number = "{:+.3f}" if signed else "{:.3f}"
    if len(values) == 1:
        return number.format(values[0])
    return f"{number.format(statistics.mean(values))} ± {statistics.stdev(values):.3f}"


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.quick:
        args.seeds, args.sft_steps, args.rl_steps, args.gpm_steps, args.eval_prompts, args.side_prompts = 1, 150, 4, 30, 128, 500
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("error: --seeds and --jobs must be >= 1")
    args.methods_at_once = max(1, args.jobs // args.seeds)  # the RL runs of one seed side by side
    args.jobs = min(args.jobs, args.seeds)
    args.threads = max(1, (os.cpu_count() or 1) // args.jobs)  # per seed; its RL runs share them
    out_dir = Path(args.out_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    job_start = time.time()

    # ---- the offline world: tiny model, toy data, expert cache (reused when present)
    run([args.python, "scripts/build_toy_world.py"], out_dir / "build.log", os.cpu_count() or 1)
    if not Path(ROOT / "data/toy/expert_cache.jsonl").exists():
        run([args.python, "scripts/build_expert_cache.py"], out_dir / "build.log", os.cpu_count() or 1)

    # ---- every seed's pipeline, side by side
    print(f"{args.seeds} seed(s), {args.jobs} at a time with {args.threads} CPU thread(s) each; a seed's RL runs "
          f"{args.methods_at_once} at a time", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        per_seed = list(pool.map(lambda seed: run_seed(args, seed, runs_dir), range(1, args.seeds + 1)))
    results = {method: [s["results"][method] for s in per_seed] for method in per_seed[0]["results"]}
    run_dirs = {method: [s["run_dirs"][method] for s in per_seed] for method in per_seed[0]["run_dirs"]}
    gpm_accuracies = [s["gpm_accuracy"] for s in per_seed]

    # ---- analyses: accuracy vs rollouts seen, KL to the SFT reference, length and log-prob distributions
    print("analysing runs (KL to SFT, response lengths, log-probs vs the expert's)", flush=True)
    references = {seed: runs_dir / f"sft_seed{seed}" / "checkpoint" for seed in range(1, args.seeds + 1)}
    analyses = analyze(run_dirs, references, str(ROOT / "data/toy/eval.jsonl"), str(ROOT / "data/toy/expert_cache.jsonl"),
                       out_dir, prompts=min(128, args.eval_prompts))
    plot_curves({m: [eval_curve(d, args.prompts_per_step * args.group_size) for d in dirs]
                 for m, dirs in run_dirs.items() if m != "SFT"}, out_dir / "curves.png")

    # ---- the table
    lines = [f"Held-out gold accuracy (prompt-level strict) on {args.eval_prompts} toy-world prompts, "
             f"mean ± std over {args.seeds} seed(s). RL methods: {args.rl_steps} steps x {args.prompts_per_step} prompts x "
             f"G={args.group_size} from the same SFT checkpoint. KL: per-response KL(policy || SFT checkpoint) (k3 estimator), "
             f"estimated on samples at temperature 1 for {min(128, args.eval_prompts)} held-out prompts.", "",
             f"Gold - GRPO: the difference to GRPO's gold accuracy within each seed (same SFT checkpoint), "
             f"which removes the spread that comes from the SFT checkpoints.", "",
             "| method | gold accuracy | gold - GRPO (paired by seed) | reward (instruction-level) | response length (tokens) "
             "| KL to SFT | wall time per run (s) |",
             "|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        kl = mean_std([a["kl"] for a in analyses[method]]) if method in analyses else "–"
        paired = mean_std([r["gold"] - g["gold"] for r, g in zip(runs, results["GRPO"])], signed=True)
        lines.append(f"| {method} | {mean_std([r['gold'] for r in runs])} | {paired} | {mean_std([r['reward'] for r in runs])} | "
                     f"{mean_std([r['length'] for r in runs])} | {kl} | {statistics.mean(r['wall_time'] for r in runs):.0f} |")
    # the job's time summed over invocations, so a rerun that only redraws does not report itself as the job
    job_time_file = runs_dir / "job_time.txt"
    job_time = (float(job_time_file.read_text()) if job_time_file.exists() else 0.0) + time.time() - job_start
    atomic_write_text(job_time_file, f"{job_time:.1f}")
    lines += ["", f"The GPM that GPRL optimises: held-out pairwise accuracy {mean_std(gpm_accuracies)} "
                  "on the SFT model's sampled pairs (chance 0.5).", "",
              f"Whole job: {job_time:.0f} s (all invocations) on {os.cpu_count()} CPU core(s): {args.jobs} seed(s) side by "
              f"side with {args.threads} thread(s) each, a seed's RL runs {args.methods_at_once} at a time sharing them "
              f"(per-run wall times include that sharing)."]
    table = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "table.md", table)
    print("\n" + table)
    print(f"total wall time {time.time() - job_start:.0f} s; table in {out_dir / 'table.md'}, plots curves.png, "
          f"lengths.png, logprobs.png in {out_dir}")
