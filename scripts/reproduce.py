"""The main job: build the offline toy world, run SFT, then every RL method from the
same SFT checkpoint with the same rollout budget, over seeds, and write a table with
paired differences and their 95% confidence intervals.

Every run is a plain command line of an algorithm script, listed flat in two phases:
per seed the prerequisites (SFT, preference pairs, the GPM), then every RL run.
`--print-commands` prints them without running anything, so any row of the table can
be reproduced by hand. One pool runs them `--jobs` at a time, a command starting once
the runs it needs have finished; the job prints its critical path. A run whose
eval.json exists is not redone, an interrupted one continues (every command carries
--resume).

`--sweep` is the fairness step: each RL method's learning rate is chosen from the same
small grid by held-out gold on the toy world's validation split (disjoint from the
evaluation split), seed 1; the choice goes to results/hyperparameters.json, which the
main job reads.
"""

import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tyro

from analyze import analyze, eval_curve, plot_curves  # scripts/ is on the path when this file runs
from shared.run import atomic_write_text, write_json

ROOT = Path(__file__).resolve().parents[1]
FAILED = threading.Event()  # set when a command fails or the job is stopped: nothing new starts
RUNNING: set[subprocess.Popen] = set()  # the children running now, stopped with the job
# the defaults of the main job and of --quick; a flag given on the command line always wins
FULL = {"seeds": 3, "sft_steps": 200, "rl_steps": 200, "gpm_steps": 80, "eval_prompts": 256, "side_prompts": 2000}
QUICK = {"seeds": 1, "sft_steps": 150, "rl_steps": 10, "gpm_steps": 30, "eval_prompts": 128, "side_prompts": 500}
LEARNING_RATES = (5e-5, 1e-4, 2e-4)  # the sweep's grid, the same for every RL method
# t quantiles for 95% two-sided intervals, by degrees of freedom
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Args:
    out_dir: str | None = None
    """where runs/, table.md and the plots go (results; --quick: results/quick, so a smoke run never mixes with the main job's runs)"""
    hyperparameters: str | None = None
    """the learning rates chosen by --sweep (default <out-dir>/hyperparameters.json, where --sweep --out-dir writes
    them; methods it does not list keep their script's default)"""
    quick: bool = False
    """a ~4-minute smoke version: one seed, fewer SFT/RL/GPM steps, fewer eval and side prompts (flags given win)"""
    sweep: bool = False
    """choose each RL method's learning rate on the validation split instead (writes <out-dir>/hyperparameters.json)"""
    print_commands: bool = False
    """print every command of the job, in order, and exit"""
    seeds: int | None = None
    """seeds per method (main job: 3; --quick: 1)"""
    sft_steps: int | None = None
    """SFT optimizer steps (200; --quick: 150)"""
    rl_steps: int | None = None
    """generation batches per RL method, the same rollout budget for every method (200; --quick: 10)"""
    gpm_steps: int | None = None
    """optimizer steps of the General Preference Model that GPRL uses (80; --quick: 30)"""
    eval_prompts: int | None = None
    """held-out prompts per evaluation (256; --quick: 128)"""
    side_prompts: int | None = None
    """training prompts sampled for the preference pairs and for AAPA's discriminator (2000; --quick: 500)"""
    prompts_per_step: int = 16
    """prompts per generation batch"""
    group_size: int = 8
    """completions per prompt"""
    jobs: int = 2
    """runs side by side, each with cpu_count / jobs threads"""
    python: str = sys.executable
    """interpreter used for the algorithm scripts"""


@dataclass
class Run:
    """One command of the job. A training run writes <out>/eval.json; a data step writes `out`."""
    name: str
    command: list[str]
    out: Path
    needs: list[str] = field(default_factory=list)
    method: str = ""  # the table row it belongs to ("" for prerequisites)
    seed: int = 0

    def done(self) -> bool:
        return (self.out / "eval.json").exists() if self.out.suffix != ".jsonl" else self.out.exists()

    def record(self) -> Path:
        """Where the flags of a finished data step are kept (a training run keeps them in run.json)."""
        return self.out.with_suffix(".command.json")

    def differences(self) -> list[str]:
        """How the flags of what is already in self.out differ from this command's ('--flag old -> new')."""
        flags = command_flags(self.command)
        if self.out.suffix == ".jsonl":
            if not self.out.exists():
                return []
            if not self.record().exists():
                return [f"no record of the flags {self.out.name} was made with"]
            recorded = json.loads(self.record().read_text())
            return [f"{flag} {recorded.get(flag)} -> {value}" for flag, value in flags.items() if recorded.get(flag) != value]
        run_record = self.out / "run.json"
        if not run_record.exists():
            return []
        try:
            recorded = json.loads(run_record.read_text())["args"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return [f"{run_record} is damaged"]
        changed = []
        for flag, value in flags.items():
            old = recorded.get(flag[2:].replace("-", "_"))
            same = old == value if isinstance(value, bool) else (
                str(old) == value or (isinstance(old, (int, float)) and _number(value) == old))
            if not same:
                changed.append(f"{flag} {old} -> {value}")
        return changed


def command_flags(command: list[str]) -> dict:
    """{'--flag': 'value'} of [python, script, --flag, value, --switch, ...] (a switch: True)."""
    flags, tokens = {}, command[2:]
    for index, token in enumerate(tokens):
        if token.startswith("--"):
            following = tokens[index + 1] if index + 1 < len(tokens) else "--"
            flags[token] = True if following.startswith("--") else following
    return flags


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def rl_methods(runs_dir: Path, seed: int, settings: dict) -> list[tuple[str, str, list[str], list[str]]]:
    """(method, script, flags, runs it needs) for every RL row, all from this seed's SFT checkpoint."""
    pairs, gpm = runs_dir / f"pairs_seed{seed}.jsonl", runs_dir / f"gpm_seed{seed}" / "checkpoint"
    # AAPA's fixed discriminator depends only on the SFT checkpoint, the expert data and the seed:
    # AAPA-GRPO trains it, the other AAPA runs load it
    discriminator = ["--disc-path", str(runs_dir / f"aapa-grpo_seed{seed}" / "discriminator.pt")]
    aapa_grpo = [f"aapa-grpo_seed{seed}"]
    return [
        ("GRPO", "algos/grpo.py", [], []),
        ("CHORD-phi", "algos/chord.py", ["--preset", "chord-phi"], []),
        # the paper's CHORD-mu decays over 200 steps; here over the run's own length
        ("CHORD-mu", "algos/chord.py", ["--preset", "chord-mu", "--mu-decay", str(settings["rl_steps"])], []),
        ("AAPA-GRPO", "algos/aapa.py", ["--base", "grpo", "--disc-prompts", str(settings["side_prompts"])], []),
        ("AAPA-SFT", "algos/aapa.py", ["--base", "sft", *discriminator], aapa_grpo),
        ("AAPA-CHORD", "algos/aapa.py", ["--base", "chord", *discriminator], aapa_grpo),
        ("AAPA staged", "algos/aapa.py", ["--staged", "--stage1-steps", str(settings["rl_steps"] // 2), *discriminator],
         aapa_grpo),
        ("UniAPL", "algos/uniapl.py", [], []),
        ("ADPO listwise", "algos/adpo.py", [], []),
        # offline pairs: the same number of sequences per step as the rollouts (pairs x 2 = prompts x G)
        ("ADPO pairwise", "algos/adpo_pairwise.py", ["--pairs-data", str(pairs), "--batch-size",
                                                     str(settings["prompts_per_step"] * settings["group_size"] // 2)],
         [f"pairs_seed{seed}"]),
        ("GPRL", "algos/gprl.py", ["--gpm", str(gpm)], [f"gpm_seed{seed}"]),
    ]


def job_commands(settings: dict, runs_dir: Path, hyperparameters: dict, eval_data: str, sweep: bool) -> list[Run]:
    """Phase 1, per seed: SFT, preference pairs, the GPM. Phase 2: every RL run (with --sweep,
    one per learning rate of the grid, seed 1, evaluated on the validation split)."""
    py, seeds = settings["python"], range(1, settings["seeds"] + 1)
    eval_flags = ["--eval-data", eval_data, "--eval-prompts", str(settings["eval_prompts"])]
    commands = []
    for seed in seeds:
        sft_dir, pairs = runs_dir / f"sft_seed{seed}", runs_dir / f"pairs_seed{seed}.jsonl"
        # SFT on the demonstrations of sft_prompts.jsonl (500 prompts); RL on all training prompts
        commands.append(Run(f"sft_seed{seed}", [py, "algos/sft.py", "--seed", str(seed), "--steps", str(settings["sft_steps"]),
                                                "--train-data", "data/toy/sft_prompts.jsonl",
                                                "--eval-every", str(max(1, settings["sft_steps"] // 4)), *eval_flags],
                            sft_dir, method="SFT", seed=seed))
        commands.append(Run(f"pairs_seed{seed}", [py, "scripts/build_preference_pairs.py", "--model", str(sft_dir / "checkpoint"),
                                                  "--out", str(pairs), "--seed", str(seed), "--num-prompts",
                                                  str(settings["side_prompts"])], pairs, [f"sft_seed{seed}"], seed=seed))
        commands.append(Run(f"gpm_seed{seed}", [py, "algos/gpm.py", "--model", str(sft_dir / "checkpoint"), "--pairs-data",
                                                str(pairs), "--seed", str(seed), "--steps", str(settings["gpm_steps"])],
                            runs_dir / f"gpm_seed{seed}", [f"pairs_seed{seed}"], seed=seed))
    rl_budget = ["--steps", str(settings["rl_steps"]), "--prompts-per-step", str(settings["prompts_per_step"]),
                 "--group-size", str(settings["group_size"]), "--eval-every", str(max(1, settings["rl_steps"] // 5))]
    for seed in seeds:
        for method, script, flags, needs in rl_methods(runs_dir, seed, settings):
            if script == "algos/adpo_pairwise.py":  # no rollouts: steps and batch only
                budget = ["--steps", str(settings["rl_steps"]), "--eval-every", str(max(1, settings["rl_steps"] // 5))]
            else:
                budget = rl_budget
            name = f"{method.lower().replace(' ', '_')}_seed{seed}"
            learning_rates = LEARNING_RATES if sweep else [hyperparameters.get(method, {}).get("learning_rate")]
            for lr in learning_rates:
                lr_flags = ["--learning-rate", str(lr)] if lr is not None else []
                suffix = f"_lr{lr:g}" if sweep else ""
                commands.append(Run(name + suffix, [py, script, "--model", str(runs_dir / f"sft_seed{seed}" / "checkpoint"),
                                                    "--seed", str(seed), *budget, *eval_flags, *lr_flags, *flags],
                                    runs_dir / (name + suffix), [f"sft_seed{seed}", *[n + suffix for n in needs]],
                                    method, seed))
    return commands


def execute(run: Run, threads: int) -> None:
    """Run one command (skipped when done), its output going to a log; stop the job on failure."""
    if run.done():
        return
    if FAILED.is_set():
        raise SystemExit("stopped: another command failed")
    is_training = run.out.suffix != ".jsonl"
    command = run.command + (["--output-dir", str(run.out), "--resume"] if is_training else [])
    log = run.out / "log.txt" if is_training else run.out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.time()
    env = {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads), **os.environ}
    with open(log, "a") as f:
        process = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
        RUNNING.add(process)
        try:
            returncode = process.wait()
        finally:
            RUNNING.discard(process)
    if returncode != 0:
        if not FAILED.is_set():
            FAILED.set()
            raise SystemExit(f"error: command failed (exit {returncode}); see {log}")
        raise SystemExit("stopped")
    if is_training:
        atomic_write_text(run.out / "wall_time.txt", f"{time.time() - start:.1f}")
    else:
        write_json(run.record(), command_flags(run.command))


def run_all(commands: list[Run], jobs: int) -> None:
    """Run the commands `jobs` at a time, starting a command only once every run it
    needs has finished (in list order among those ready), so no worker sits waiting
    for a prerequisite. The first failure stops anything new from starting."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending, finished, running = list(commands), set(), {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for run in [run for run in pending if all(need in finished for need in run.needs)]:
                if len(running) == jobs or FAILED.is_set():
                    break
                pending.remove(run)
                running[pool.submit(execute, run, threads)] = run
            if not running:
                break  # nothing can start: a prerequisite failed
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finished.add(running.pop(future).name)
                future.result()  # a failed command ends the job here, with its error line


def critical_path(commands: list[Run]) -> tuple[float, list[str]]:
    """The chain of prerequisites with the longest summed wall time (wall_time.txt of
    each training run; data steps count 0): no schedule finishes sooner than it."""
    by_name = {run.name: run for run in commands}
    memo: dict[str, tuple[float, list[str]]] = {}

    def longest(name: str) -> tuple[float, list[str]]:
        if name not in memo:
            run = by_name[name]
            wall_file = run.out / "wall_time.txt"
            own = float(wall_file.read_text()) if run.out.suffix != ".jsonl" and wall_file.exists() else 0.0
            before = max((longest(need) for need in run.needs), default=(0.0, []))
            memo[name] = (before[0] + own, before[1] + [f"{name} ({own:.0f} s)"])
        return memo[name]

    return max((longest(run.name) for run in commands), default=(0.0, []))


def paired(values: list[float]) -> tuple[str, str]:
    """Mean of paired differences with a 95% t-interval over seeds, and whether it excludes 0."""
    if len(values) < 2:
        return (f"{values[0]:+.3f}" if values else "–"), "– (1 seed)"
    mean, half = statistics.mean(values), T_975[min(len(values) - 1, 10)] * statistics.stdev(values) / math.sqrt(len(values))
    excludes = "yes, above" if mean - half > 0 else "yes, below" if mean + half < 0 else "no"
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]", excludes


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN: a quantity a run did not record
    if not values:
        return "–"
    return f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def result_of(run: Run) -> dict:
    result = json.loads((run.out / "eval.json").read_text())
    wall = run.out / "wall_time.txt"
    return {**result, "wall_time": float(wall.read_text()) if wall.exists() else float("nan")}


def write_table(settings: dict, commands: list[Run], runs_dir: Path, out_dir: Path, job_time: float) -> str:
    seeds = range(1, settings["seeds"] + 1)
    by_method: dict[str, dict[int, dict]] = {}
    for run in commands:
        if run.method:
            by_method.setdefault(run.method, {})[run.seed] = result_of(run)
    sft = by_method["SFT"]
    base = {seed: json.loads((runs_dir / f"sft_seed{seed}" / "initial_eval.json").read_text()) for seed in seeds}
    rows = {"base model": base, **by_method}
    run_dirs = {run.method: [] for run in commands if run.method}
    for run in commands:
        if run.method:
            run_dirs[run.method].append(run.out)
    print("analysing runs (KL to SFT, response lengths, log-probs vs the expert's)", flush=True)
    references = {seed: runs_dir / f"sft_seed{seed}" / "checkpoint" for seed in seeds}
    analyses = analyze(run_dirs, references, str(ROOT / "data/toy/eval.jsonl"), str(ROOT / "data/toy/expert_cache.jsonl"),
                       out_dir, prompts=min(128, settings["eval_prompts"]))
    plot_curves({m: [eval_curve(d, settings["prompts_per_step"] * settings["group_size"]) for d in dirs]
                 for m, dirs in run_dirs.items() if m != "SFT"}, out_dir / "curves.png")
    n = settings["seeds"]
    lines = [f"Held-out gold accuracy (prompt-level strict: every instruction followed) on {settings['eval_prompts']} "
             f"toy-world prompts, mean ± std over {n} seed(s). RL methods: {settings['rl_steps']} steps x "
             f"{settings['prompts_per_step']} prompts x G={settings['group_size']} from the same SFT checkpoint, learning "
             f"rates: {settings['learning_rates_from']}.", "",
             "Paired differences: within each seed (same SFT checkpoint), method minus SFT and method minus GRPO; mean "
             f"and 95% t-interval over the {n} seeds (t with {n - 1} degrees of freedom). Reward - gold: the instruction-level "
             "reward (partial credit) minus prompt-level gold, >= 0 by construction: partial success, not reward hacking. KL: per-response "
             "KL(policy || SFT) (k3 estimator) on samples at temperature 1.", "",
             "| method | gold | gold - SFT [95% CI] | CI excludes 0 | gold - GRPO [95% CI] | CI excludes 0 | reward "
             "| reward - gold | length (tokens) | KL to SFT | wall time per run (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, per_seed in rows.items():
        gold = [per_seed[s]["gold"] for s in seeds]
        minus_sft, sft_excludes = paired([per_seed[s]["gold"] - sft[s]["gold"] for s in seeds])
        if "GRPO" in by_method:
            minus_grpo, grpo_excludes = paired([per_seed[s]["gold"] - by_method["GRPO"][s]["gold"] for s in seeds])
        else:
            minus_grpo, grpo_excludes = "–", "–"
        reward = [per_seed[s].get("reward", float("nan")) for s in seeds]
        kl = mean_std([a["kl"] for a in analyses[method]]) if method in analyses else "–"
        wall = [per_seed[s].get("wall_time", 0.0) for s in seeds]
        lines.append(f"| {method} | {mean_std(gold)} | {minus_sft} | {sft_excludes} | {minus_grpo} | {grpo_excludes} | "
                     f"{mean_std(reward)} | {mean_std([r - g for r, g in zip(reward, gold)])} | "
                     f"{mean_std([per_seed[s].get('length', float('nan')) for s in seeds])} | {kl} | "
                     f"{statistics.mean(wall):.0f} |")
    gpm = [json.loads((runs_dir / f"gpm_seed{s}" / "eval.json").read_text())["heldout_accuracy"] for s in seeds]
    lines += ["", f"The GPM that GPRL optimises: held-out pairwise accuracy {mean_std(gpm)} on the SFT model's sampled "
                  "pairs (chance 0.5).", "",
              f"Whole job: {job_time:.0f} s (all invocations) on {os.cpu_count()} CPU core(s), {settings['jobs']} runs "
              "side by side (per-run wall times include that sharing)."]
    return "\n".join(lines) + "\n"


def write_sweep(commands: list[Run], path: Path) -> dict:
    """Each RL method's learning rate with the best final validation gold (ties: the smaller)."""
    choice, table = {}, {}
    for run in commands:
        if run.method and run.method != "SFT":
            lr = float(run.command[run.command.index("--learning-rate") + 1])
            table.setdefault(run.method, {})[lr] = result_of(run)["gold"]
    for method, scores in table.items():
        best = max(sorted(scores), key=lambda lr: scores[lr])
        choice[method] = {"learning_rate": best, "validation_gold": {f"{lr:g}": g for lr, g in sorted(scores.items())}}
    write_json(path, choice)
    return choice


def check_hyperparameters(path: Path, methods: set[str]) -> dict:
    """The sweep's choices, validated before anything runs: one error line for a damaged
    file, an unknown method or key, or a learning rate that is not a positive number."""
    if not path.exists():
        return {}
    try:
        choices = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"error: {path} is not valid JSON ({getattr(error, 'msg', error)}); fix it, or rerun --sweep") from None
    if not isinstance(choices, dict):
        raise SystemExit(f"error: {path} must map method names to {{\"learning_rate\": ...}}")
    for method, record in choices.items():
        if method not in methods:
            raise SystemExit(f"error: {path} names method {method!r}, which the job does not have "
                             f"(methods: {', '.join(sorted(methods))})")
        if not isinstance(record, dict) or set(record) - {"learning_rate", "validation_gold", "note"}:
            raise SystemExit(f"error: {path}: the entry of {method!r} must hold 'learning_rate' (and optionally "
                             f"'validation_gold', 'note'), got {record!r}"[:300])
        rate = record.get("learning_rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
            raise SystemExit(f"error: {path}: the learning rate of {method!r} must be a positive number, got {rate!r}")
    return choices


def check_settings(settings: dict) -> None:
    """The job's numbers, checked as the scripts would check them, before anything runs or is printed."""
    for key, low in (("seeds", 1), ("jobs", 1), ("rl_steps", 2), ("sft_steps", 1), ("gpm_steps", 1),
                     ("eval_prompts", 1), ("side_prompts", 1), ("prompts_per_step", 1), ("group_size", 2)):
        if settings[key] < low:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be >= {low}, got {settings[key]}")
    if shutil.which(settings["python"]) is None:
        raise SystemExit(f"error: --python {settings['python']!r} is not an executable")


def stop_on_signal(number, frame) -> None:
    """SIGINT or SIGTERM: stop every running command (each keeps its last checkpoint) and leave."""
    FAILED.set()
    for process in list(RUNNING):
        process.terminate()
    name = signal.Signals(number).name
    print(f"\nstopped by {name}: {len(RUNNING)} running command(s) stopped; run the same command again to "
          "continue (every run resumes from its last checkpoint)", file=sys.stderr, flush=True)
    raise SystemExit(128 + number)


if __name__ == "__main__":
    args = tyro.cli(Args)
    given = {k: v for k, v in asdict(args).items() if v is not None}
    settings = {**(QUICK if args.quick else FULL), **given}
    if args.sweep:
        settings["seeds"] = 1
    check_settings(settings)
    out_dir = Path(args.out_dir or ("results/quick" if args.quick else "results"))
    runs_dir = out_dir / ("sweep" if args.sweep else "runs")
    hyperparameters_file = out_dir / "hyperparameters.json" if args.sweep or not args.hyperparameters else Path(args.hyperparameters)
    methods = {method for method, *_ in rl_methods(runs_dir, 1, settings)}
    hyperparameters = {} if args.sweep else check_hyperparameters(hyperparameters_file, methods)
    eval_data = "data/toy/val.jsonl" if args.sweep else "data/toy/eval.jsonl"
    commands = job_commands(settings, runs_dir, hyperparameters, eval_data, args.sweep)
    settings["learning_rates_from"] = (f"from the sweep ({hyperparameters_file}) for {', '.join(sorted(hyperparameters))}, "
                                       "each script's default for the rest" if hyperparameters else "each script's default")
    if args.print_commands:
        for run in commands:
            extra = ["--output-dir", str(run.out), "--resume"] if run.out.suffix != ".jsonl" else []
            print(shlex.join(run.command[1:] + extra))
        raise SystemExit(0)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        (runs_dir / ".writable").touch()
    except OSError as error:
        raise SystemExit(f"error: --out-dir {str(out_dir)!r} cannot be written ({error.strerror})") from None
    for run in commands:  # the table must describe the runs in it: never mix settings
        changed = run.differences()
        if changed:
            raise SystemExit(f"error: {run.out} holds a run made with other settings ({', '.join(changed[:3])}); "
                             "give this job its own --out-dir, or delete that folder to redo it")
    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    job_start = time.time()

    # ---- the offline world: tiny model, toy data (train / validation / eval), expert cache (reused when present)
    for setup in (["scripts/build_toy_world.py"], ["scripts/build_expert_cache.py"]):
        if setup[0] == "scripts/build_toy_world.py" or not (ROOT / "data/toy/expert_cache.jsonl").exists():
            subprocess.run([settings["python"], *setup], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

    # ---- every command, phase 1 then phase 2, jobs at a time
    print(f"{len(commands)} commands, {settings['jobs']} at a time", flush=True)
    run_all(commands, settings["jobs"])

    length, chain = critical_path(commands)
    print(f"critical path: {' -> '.join(chain)} = {length:.0f} s", flush=True)
    job_time_file = runs_dir / "job_time.txt"  # summed over invocations: a rerun that only redraws is not the job
    job_time = (float(job_time_file.read_text()) if job_time_file.exists() else 0.0) + time.time() - job_start
    atomic_write_text(job_time_file, f"{job_time:.1f}")
    if args.sweep:
        choice = write_sweep(commands, hyperparameters_file)
        for method, record in choice.items():
            print(f"{method}: learning rate {record['learning_rate']:g} (validation gold {record['validation_gold']})")
        print(f"sweep: {job_time:.0f} s; choices in {hyperparameters_file}")
    else:
        table = write_table(settings, commands, runs_dir, out_dir, job_time)
        atomic_write_text(out_dir / "table.md", table)
        print("\n" + table)
        print(f"total wall time {time.time() - job_start:.0f} s; table in {out_dir / 'table.md'}, plots curves.png, "
              f"lengths.png, logprobs.png in {out_dir}")
