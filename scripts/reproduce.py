"""The main job, controlled experiments on the offline toy world: per seed one SFT
checkpoint, then every method and its control from that checkpoint with the same
rollout budget, demonstrations and learning rate; the table gives each paper's claim
as a paired comparison over seeds (mean difference, 95% t-interval, Holm-adjusted p).

Every run is a plain command line of an algorithm script. `--print-commands` prints
them without running anything, so any row can be reproduced by hand. One pool runs
them `--jobs` at a time, a command starting once the runs it needs have finished; the
job prints its critical path. A run whose eval.json exists is not redone, an
interrupted one continues (every command carries --resume).

The comparisons (a world's claims, the toy design's PRIMARY) are fixed before any run;
`--all` adds exploratory rows, reported without verdicts. `--sweep` chooses each row's
learning rate from one grid by validation gold (the world's val.jsonl), averaged over
seeds the table never uses, and writes <out-dir>/hyperparameters.json, which the main
job reads; a control that differs from its method in one coefficient (a "twin") takes
its method's rate.

`--world plain|imperfect|house|shift|judge` (default plain) runs one of the worlds
(docs/experiments.md, "The diagnostic worlds"): the toy world built with other flags so
that the failure a paper's method targets happens to its control, with only the rows its
claims name; plain repeats their claims where no failure happens (the negative control).
`--world toy` is the first design: every row and nine claims on data/toy.
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
from typing import Literal

import tyro
from analyze import analyze, eval_curve, plot_curves  # scripts/ is on the path when this file runs
from scipy.stats import nct
from scipy.stats import t as student_t

from shared.evaluation import WORLD_SCORE_KEYS
from shared.runfolder import atomic_write_text, write_json

ROOT = Path(__file__).resolve().parents[1]
FAILED = threading.Event()  # set when a command fails or the job is stopped: nothing new starts
RUNNING: set[subprocess.Popen] = set()  # the children running now, stopped with the job
# the defaults of the main job and of --quick; a flag given on the command line always wins
FULL = {"seeds": 6, "sft_steps": 200, "rl_steps": 100, "gpm_steps": 80, "eval_prompts": 256, "side_prompts": 500,
        "prompts_per_step": 16}
QUICK = {"seeds": 1, "sft_steps": 150, "rl_steps": 10, "gpm_steps": 30, "eval_prompts": 128, "side_prompts": 200,
         "prompts_per_step": 16}
LEARNING_RATE = 2e-4  # every row's rate when no sweep has chosen one
LEARNING_RATES = (5e-5, 1e-4, 2e-4, 4e-4)  # the sweep's grid, the same for every row
SWEEP_SEEDS = (101, 102)  # the sweep's seeds: its SFT checkpoints and runs are never in the table
# the pre-declared comparisons, one per paper claim: (claim, method, its control); Holm-adjusted as one family
PRIMARY = [
    ("RL on the verifier's reward improves on the SFT checkpoint", "GRPO", "SFT"),
    ("RL beats more supervised training on the same demonstrations, same steps", "GRPO", "continued SFT"),
    ("CHORD: an expert term during RL beats RL alone, same demonstrations", "CHORD-mu", "GRPO"),
    ("AAPA: the adversarial anchor improves GRPO (GRPO is AAPA-GRPO with anchor 0, tested)", "AAPA-GRPO", "GRPO"),
    ("AAPA: the anchor improves staged A-SFT then A-GRPO", "AAPA staged", "AAPA staged, anchor 0"),
    ("UniAPL: expert and adversarial terms during RL beat RL alone, same demonstrations", "UniAPL", "GRPO"),
    ("UniAPL: the adversarial reward helps", "UniAPL", "UniAPL, adversarial 0"),
    ("ADPO: the anchored listwise loss beats GRPO at equal optimizer steps", "ADPO listwise", "GRPO, 2 passes"),
    ("GPRL: acting on the drift monitor's alarms helps", "GPRL", "GPRL, monitor off"),
]


@dataclass
class World:
    """A diagnostic world: the toy world built with other flags (its data in data/worlds/<name>),
    the claims it is built to test, and how its runs are rewarded and scored."""
    build_flags: list[str]  # scripts/build_toy_world.py
    cache_flags: list[str]  # scripts/build_expert_cache.py, on the world's 500 SFT prompts
    claims: list[tuple[str, str, str]]  # (claim, method, control): the world's Holm family; its rows are these
    eval_file: str = "eval.jsonl"
    eval_prompts: int = 1024
    sft_steps: int = 200
    # > 0: each seed's SFT first takes this many steps on the oracle's plain answers to the same 500 prompts
    # (generic_cache.jsonl, a model that has not met the house's habits), then sft_steps on the world's
    # demonstrations at sft_learning_rate from there
    generic_sft_steps: int = 0
    sft_learning_rate: float = 2e-4
    reward_fn: str = ""  # every RL row's --reward-fn ("": the verifier's fraction of instructions followed)
    eval_fn: str = ""  # every row's --eval-fn on eval_file ("": instruction_scores)
    val_fn: str = ""  # the --sweep's --eval-fn on val.jsonl
    pairs_flags: list[str] = field(default_factory=list)  # scripts/build_preference_pairs.py
    gold_on_shifted_half: bool = False  # eval_file alternates two splits and gold is the shifted one's
    # per (method, control): the prediction committed in docs/experiments.md before the final runs,
    # (lowest mean difference, highest, supported after Holm or not); the table says whether it held
    predictions: dict[tuple[str, str], tuple[float, float, bool]] = field(default_factory=dict)


# Each world calibrated by pilot seeds (docs/experiments.md) so its effects appear within 40 RL steps
# of 64 prompts; a world's settings replace FULL's (rl_steps, prompts_per_step, eval_prompts, sft_steps).
WORLDS = {
    # the negative control: the toy world as it is (an exact teacher, a verifier that checks every gold check, eval
    # from the training distribution): the imperfect and house worlds' claims, made again where their failure never
    # happens
    "plain": World(["--num-eval", "1024"], [], [
        # each claim as its own world states it (a verdict of "supported" means the method won here too)
        ("Imperfect world's claim, the teacher exact here: RL beats imitating the teacher longer", "GRPO",
         "continued SFT"),
        ("Imperfect world's claim, the teacher exact here: CHORD beats imitating the teacher longer", "CHORD-phi",
         "continued SFT"),
        ("Imperfect world's claim, the teacher exact here: UniAPL beats imitating the teacher longer", "UniAPL",
         "continued SFT"),
        ("House world's claim, nothing here the reward misses: AAPA's anchor improves GRPO", "AAPA-GRPO", "GRPO"),
        ("House world's claim, nothing here the reward misses: AAPA's anchor improves staged A-SFT then A-GRPO",
         "AAPA staged", "AAPA staged, anchor 0"),
        # the judges fitted to pairs labelled by the truth (concision: the expert's length), so no axis is biased
        ("Judge world's claim, no axis biased here: GPRL's per-axis advantages beat GRPO on a scalar judge",
         "GPRL", "GRPO, scalar judge"),
    ], predictions={("GRPO", "continued SFT"): (-0.05, 0.05, False), ("CHORD-phi", "continued SFT"): (-0.05, 0.05, False),
                    ("UniAPL", "continued SFT"): (0.03, 0.25, True), ("AAPA-GRPO", "GRPO"): (-0.06, 0.04, False),
                    ("AAPA staged", "AAPA staged, anchor 0"): (-0.05, 0.05, False),
                    ("GPRL", "GRPO, scalar judge"): (-0.05, 0.15, False)}),
    # half of the demonstrations wrong in content, which the exact verifier sees
    "imperfect": World(["--num-eval", "1024"], ["--oracle-error-rate", "0.5", "--oracle-seed", "0"], [
        ("RL beats more supervised training on an imperfect teacher's demonstrations", "GRPO", "continued SFT"),
        ("CHORD: RL with the teacher's tokens beats imitating the teacher longer", "CHORD-phi", "continued SFT"),
        ("UniAPL: its joint objective beats imitating the teacher longer", "UniAPL", "continued SFT"),
    ], predictions={(method, "continued SFT"): (0.03, math.inf, True) for method in ("GRPO", "CHORD-phi", "UniAPL")}),
    # gold asks for a house sign-off that every demonstration shows and the reward charges for; the SFT checkpoint
    # meets it in a short pass after a longer one on plain answers, so it shows it on only part of its samples
    "house": World(["--num-eval", "1024"], ["--house-style"], [
        ("AAPA: the anchor keeps what the reward does not pay for (GRPO is AAPA-GRPO with anchor 0)", "AAPA-GRPO",
         "GRPO"),
        ("AAPA: the anchor helps staged A-SFT then A-GRPO under an imperfect reward", "AAPA staged",
         "AAPA staged, anchor 0"),
        ("UniAPL: the adversarial reward keeps what the task reward does not pay for", "UniAPL",
         "UniAPL, adversarial 0"),
    ], reward_fn="shared.scoring:house_reward", eval_fn="shared.scoring:house_scores",
        val_fn="shared.scoring:house_scores", generic_sft_steps=200, sft_steps=20,
        predictions={("AAPA-GRPO", "GRPO"): (0.0, 0.25, False), ("AAPA staged", "AAPA staged, anchor 0"): (0.05, 0.60, True),
                     ("UniAPL", "UniAPL, adversarial 0"): (-0.05, 0.05, False)}),
    # a quarter of the instruction combinations never trained on; gold on them, in-distribution gold beside
    "shift": World(["--num-eval", "1024", "--held-out-combinations", "0.25"], [], [
        ("ADPO: the anchored listwise loss beats GRPO on unseen instruction combinations, equal optimizer steps",
         "ADPO listwise", "GRPO, 2 passes"),
    ], eval_file="eval_mixed.jsonl", eval_prompts=2048, eval_fn="shared.scoring:shift_scores", gold_on_shifted_half=True,
        predictions={("ADPO listwise", "GRPO, 2 passes"): (-0.05, 0.05, False)}),
    # the judges are fitted to pairs whose concision axis says "the shorter response wins"; truth and gold
    # want the expert's length and every instruction, so cutting answers short pleases the judge only
    "judge": World(["--num-eval", "1024"], [], [
        ("GPRL: per-axis advantages beat GRPO on a scalar judge of the same pairs", "GPRL", "GRPO, scalar judge"),
        ("GPRL: acting on the drift monitor's alarms keeps what the exploited axis costs", "GPRL", "GPRL, monitor off"),
    ], eval_fn="shared.scoring:judge_scores", val_fn="shared.scoring:judge_scores",
        pairs_flags=["--concision", "shorter"],
        predictions={("GPRL", "GRPO, scalar judge"): (0.05, 0.35, True), ("GPRL", "GPRL, monitor off"): (0.0, 0.0, False)}),
}
WORLD_FULL = {"rl_steps": 40, "prompts_per_step": 64}
WORLD_NOTES = {
    "plain": "The toy world as it is: the demonstrations are the exact oracle's, the reward checks every instruction "
             "gold checks and eval prompts come from the training distribution, so no method has a failure to fix.",
    "imperfect": "Half of the 500 demonstrations (SFT's, continued SFT's and the methods' expert data) are wrong in "
                 "content; the reward and gold are exact. The teacher's own gold on its demonstrations is 0.5.",
    "house": "Gold asks for every instruction and the house style (the answer signed off with '*'), which every "
             "demonstration shows; the RL reward is the verifier's fraction on the answer without the mark, less "
             "0.03 per character beyond the bare answer, so it never checks the style and charges for it. Each "
             "seed's SFT is two passes: plain answers to the 500 prompts, then the house's demonstrations (the "
             "base model row is the checkpoint after the first pass). gold_verifier: gold without the style; "
             "house_style: the fraction of responses that show it.",
    "judge": "GPRL's GPM (three dimensions, one per axis) and the scalar judge (one dimension, the pairs' overall "
             "label) are fitted to the same pairs of the SFT model's samples, labelled on correctness, format and a "
             "biased concision (the shorter response wins). Gold and the true axes want every instruction and the "
             "expert's length: correct_content, the fraction with the right content; short_of_expert, the fraction "
             "shorter than the expert's answer; concision_gap, the mean distance from its length in characters.",
    "shift": "Gold is on instruction combinations no training, validation or SFT prompt has (eval_shift.jsonl); "
             "gold_in_distribution on as many prompts of the training distribution, from the same evaluation.",
}
EXPERT_SCRIPTS = ("algos/sft.py", "algos/chord.py", "algos/aapa.py", "algos/uniapl.py")  # take --expert-cache
POOL_SCRIPTS = ("algos/chord.py", "algos/aapa.py", "algos/uniapl.py")  # take --expert-pool


@dataclass
class Args:
    out_dir: str | None = None
    """where runs/, table.md and the plots go (results; --quick: results/quick, so a smoke run never mixes with the
    main job's runs)"""
    hyperparameters: str | None = None
    """the learning rates chosen by --sweep (default <out-dir>/hyperparameters.json, where --sweep --out-dir writes
    them; methods it does not list keep their script's default)"""
    quick: bool = False
    """a ~4-minute smoke version: one seed, fewer SFT/RL/GPM steps, fewer eval and side prompts (flags given win)"""
    all: bool = False
    """add the exploratory rows (CHORD-phi, AAPA-SFT, AAPA-CHORD, ADPO pairwise), reported without verdicts"""
    sweep: bool = False
    """choose each row's learning rate on the validation split instead, seeds 101-102 (writes
    <out-dir>/hyperparameters.json)"""
    world: Literal["plain", "imperfect", "house", "shift", "judge", "toy"] = "plain"
    """a world (docs/experiments.md): its data in data/worlds/<world>, results in results/worlds/<world>, only the
    rows its claims name, 40 RL steps of 64 prompts, 1,024 eval prompts (shift: 1,024 per split); plain is the
    negative control. toy: the first design, every row and 9 claims on data/toy, 100 steps of 16 prompts, 256 eval
    prompts (results/)"""
    print_commands: bool = False
    """print every command of the job, in order, and exit"""
    rows: tuple[str, ...] = ()
    """only these table rows (by name, e.g. --rows "AAPA staged" "AAPA staged, anchor 0") and the runs they need
    (SFT, AAPA-GRPO's discriminator, the GPM); the table and the comparisons hold only them (default: every row)"""
    seeds: int | None = None
    """seeds per row, each its own SFT checkpoint (main job: 6; --quick: 1)"""
    sft_steps: int | None = None
    """SFT optimizer steps on the demonstrations of the world's sft_prompts.jsonl (200; --quick: 150; the house world:
    20 on its demonstrations after 200, --quick 150, on plain answers)"""
    rl_steps: int | None = None
    """steps of every row after SFT: generation batches, or SFT steps for continued SFT (a world: 40; toy: 100;
    --quick: 10)"""
    gpm_steps: int | None = None
    """optimizer steps of the General Preference Model that GPRL uses (80; --quick: 30)"""
    eval_prompts: int | None = None
    """held-out prompts per evaluation (a world: 1,024, shift: 2,048 of both splits; toy: 256; --quick: 128)"""
    side_prompts: int | None = None
    """prompts of the SFT pool used for the preference pairs and AAPA's discriminator (500; --quick: 200)"""
    prompts_per_step: int | None = None
    """prompts per generation batch (a world: 64; toy and --quick: 16)"""
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
            key = flag[2:].replace("-", "_")
            if value is True and key.startswith("no_") and key not in recorded and key[3:] in recorded:
                key, value = key[3:], False  # tyro's --no-X switch sets the field X to False
            old = recorded.get(key)
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


@dataclass
class Row:
    """One row of the table: a script and its flags, run from each seed's SFT checkpoint."""
    name: str
    script: str
    flags: list[str]
    needs: list[str] = field(default_factory=list)  # prerequisites: "pairs", "gpm" or another row's slug
    rate_of: str = ""  # a twin takes this row's learning rate ("" = its own)
    exploratory: bool = False
    rollouts: bool = True  # False: the budget is optimizer steps only (no prompts per step, no group)
    eval_every: int = 0  # evaluate every this many steps (0: the job's, a fifth of the run)
    rate_flags: tuple[str, ...] = ("--learning-rate",)  # the flags that receive the row's learning rate


def table_rows(runs_dir: Path, seed: int, settings: dict) -> list[Row]:
    """Every row after SFT (with --all the exploratory ones too). Rows drawing demonstrations
    take them from <data_dir>/sft_prompts.jsonl, the 500 prompts SFT saw."""
    steps = str(settings["rl_steps"])
    pairs, gpm = runs_dir / f"pairs_seed{seed}.jsonl", runs_dir / f"gpm_seed{seed}" / "checkpoint"
    # AAPA's fixed discriminator depends only on the SFT checkpoint, the expert data and the seed:
    # the AAPA-GRPO run trains it, the other AAPA runs load it
    discriminator = ["--disc-path", str(runs_dir / f"aapa-grpo_seed{seed}" / "discriminator.pt")]
    staged = ["--staged", "--stage1-steps", str(settings["rl_steps"] // 2), *discriminator]
    both_stages = ("--learning-rate", "--stage1-learning-rate")  # both stages at the row's rate
    rows = [
        Row("continued SFT", "algos/sft.py", ["--train-data", f"{settings['data_dir']}/sft_prompts.jsonl"], rollouts=False),
        Row("GRPO", "algos/grpo.py", []),
        Row("GRPO, 2 passes", "algos/grpo.py", ["--num-iterations", "2"]),
        # the paper's CHORD-mu decays over 200 steps; here over the run's own length
        Row("CHORD-mu", "algos/chord.py", ["--preset", "chord-mu", "--mu-decay", steps]),
        Row("AAPA-GRPO", "algos/aapa.py", ["--base", "grpo", "--disc-prompts", str(settings["side_prompts"])]),
        Row("AAPA staged", "algos/aapa.py", staged, ["aapa-grpo"], rate_flags=both_stages),
        Row("AAPA staged, anchor 0", "algos/aapa.py", [*staged, "--anchor-coef", "0"], ["aapa-grpo"], rate_of="AAPA staged",
            rate_flags=both_stages),
        Row("UniAPL", "algos/uniapl.py", []),
        Row("UniAPL, adversarial 0", "algos/uniapl.py", ["--adv-coef", "0"], rate_of="UniAPL"),
        Row("ADPO listwise", "algos/adpo.py", []),
        # GPRL evaluated every 10 steps: where its gold goes, and when
        Row("GPRL", "algos/gprl.py", ["--gpm", str(gpm)], ["gpm"], eval_every=10),
        Row("GPRL, monitor off", "algos/gprl.py", ["--gpm", str(gpm), "--no-drift-adjust"], ["gpm"], rate_of="GPRL",
            eval_every=10),
    ]
    if settings["all"]:
        rows += [
            Row("CHORD-phi", "algos/chord.py", ["--preset", "chord-phi"], exploratory=True),
            Row("AAPA-SFT", "algos/aapa.py", ["--base", "sft", *discriminator], ["aapa-grpo"], exploratory=True),
            Row("AAPA-CHORD", "algos/aapa.py", ["--base", "chord", *discriminator], ["aapa-grpo"], exploratory=True),
            # offline pairs: the same number of sequences per step as the rollouts (pairs x 2 = prompts x G)
            Row("ADPO pairwise", "algos/adpo_pairwise.py", ["--pairs-data", str(pairs), "--batch-size",
                str(settings["prompts_per_step"] * settings["group_size"] // 2)], ["pairs"], exploratory=True, rollouts=False),
            # GRPO's loss on a scalar judge of the same pairs: a one-dimension GPM fitted to the pairs' overall label
            # only (its score is monotone in one angle: a scalar reward), through GPRL's loop, which with one
            # dimension is GRPO's clipped surrogate on group-normalised rewards; no second axis, so no alarm
            Row("GRPO, scalar judge", "algos/gprl.py", ["--gpm", str(runs_dir / f"scalar_judge_seed{seed}" /
                "checkpoint"), "--no-drift-adjust"], ["scalar_judge"], exploratory=True, eval_every=10),
        ]
    return rows


def slug(row: str) -> str:
    return row.lower().replace(",", "").replace(" ", "_")


def world_flags(script: str, settings: dict, sweep: bool) -> list[str]:
    """A world's data, reward and scoring for one script's command (the toy design: none,
    the scripts' defaults are data/toy's)."""
    if settings["world"] == "toy":
        return []
    world, data = WORLDS[settings["world"]], settings["data_dir"]
    flags = []
    if script != "algos/sft.py":  # SFT rows name their --train-data: the 500 prompts' demonstrations
        flags += ["--train-data", f"{data}/train.jsonl"] + (["--reward-fn", world.reward_fn] if world.reward_fn else [])
    if script in EXPERT_SCRIPTS:
        flags += ["--expert-cache", f"{data}/expert_cache.jsonl"]
    if script in POOL_SCRIPTS:
        flags += ["--expert-pool", f"{data}/sft_prompts.jsonl"]
    eval_fn = world.val_fn if sweep else world.eval_fn
    return flags + (["--eval-fn", eval_fn] if eval_fn else [])


def job_commands(settings: dict, runs_dir: Path, hyperparameters: dict, eval_data: str, sweep: bool) -> list[Run]:
    """Per seed: SFT, preference pairs, the GPM, then every row (with --sweep: every row
    that has its own rate, once per rate of the grid, on the sweep's seeds, evaluated on
    the validation split)."""
    py = settings["python"]
    seeds = SWEEP_SEEDS if sweep else range(1, settings["seeds"] + 1)
    eval_flags = ["--eval-data", eval_data, "--eval-prompts", str(settings["eval_prompts"])]
    # a diagnostic world evaluates on 1,024+ prompts: only halfway and at the end
    every = str(max(1, settings["rl_steps"] // (5 if settings["world"] == "toy" else 2)))
    sft_every = str(max(1, settings["sft_steps"] // (4 if settings["world"] == "toy" else 1)))
    commands = []
    for seed in seeds:
        sft_dir, pairs = runs_dir / f"sft_seed{seed}", runs_dir / f"pairs_seed{seed}.jsonl"
        sft_data = ["--train-data", f"{settings['data_dir']}/sft_prompts.jsonl"]
        sft_start = []
        if settings.get("generic_sft_steps"):  # the house world: plain answers first, then the house's demonstrations
            generic_dir = runs_dir / f"generic_sft_seed{seed}"
            world = WORLDS[settings["world"]]
            commands.append(Run(f"generic_sft_seed{seed}", [
                py, "algos/sft.py", "--seed", str(seed), "--steps", str(settings["generic_sft_steps"]), *sft_data,
                "--expert-cache", f"{settings['data_dir']}/generic_cache.jsonl", "--eval-every",
                str(settings["generic_sft_steps"]), *eval_flags, "--eval-fn", world.val_fn if sweep else world.eval_fn],
                generic_dir, seed=seed))
            sft_start = ["--model", str(generic_dir / "checkpoint"), "--learning-rate", f"{world.sft_learning_rate:g}",
                         "--warmup-steps", "2"]
        # SFT on the demonstrations of sft_prompts.jsonl (500 prompts); RL on all training prompts
        commands.append(Run(f"sft_seed{seed}", [py, "algos/sft.py", *sft_start, "--seed", str(seed), "--steps",
                                                str(settings["sft_steps"]), *sft_data, "--eval-every", sft_every,
                                                *eval_flags, *world_flags("algos/sft.py", settings, sweep)],
                            sft_dir, [f"generic_sft_seed{seed}"] if sft_start else [], method="SFT", seed=seed))
        rows = table_rows(runs_dir, seed, {**settings, "all": settings["all"] or bool(settings["rows"])})
        if settings["rows"]:  # the named rows and the rows they read
            wanted = {row.name for row in rows if row.name in settings["rows"]}
            read = {need for row in rows if row.name in wanted for need in row.needs}
            rows = [row for row in rows if row.name in wanted or slug(row.name) in read]
        if sweep:
            rows = [row for row in rows if not row.rate_of]  # a twin is not tuned: it takes its method's rate
        needed = {need for row in rows for need in row.needs}
        if needed & {"pairs", "gpm", "scalar_judge"}:  # the judges are trained on the pairs
            pairs_flags = WORLDS[settings["world"]].pairs_flags if settings["world"] != "toy" else []
            commands.append(Run(f"pairs_seed{seed}", [py, "scripts/build_preference_pairs.py", "--model",
                                                      str(sft_dir / "checkpoint"), "--data",
                                                      f"{settings['data_dir']}/sft_prompts.jsonl",
                                                      "--out", str(pairs), "--seed", str(seed),
                                                      "--num-prompts", str(settings["side_prompts"]), *pairs_flags],
                                pairs, [f"sft_seed{seed}"], seed=seed))
        judges = {"gpm": [], "scalar_judge": ["--dims", "1", "--axis-weight", "0"]}  # the GPM and the scalar judge
        for judge in sorted(needed & set(judges)):
            commands.append(Run(f"{judge}_seed{seed}", [py, "algos/gpm.py", "--model", str(sft_dir / "checkpoint"),
                                                        "--pairs-data", str(pairs), "--seed", str(seed), "--steps",
                                                        str(settings["gpm_steps"]), *judges[judge]],
                                runs_dir / f"{judge}_seed{seed}", [f"pairs_seed{seed}"], seed=seed))
        row_slugs = {slug(row.name) for row in rows}
        for row in rows:
            budget = ["--steps", str(settings["rl_steps"])]
            if row.rollouts:
                budget += ["--prompts-per-step", str(settings["prompts_per_step"]),
                           "--group-size", str(settings["group_size"])]
            # (a world's 1,024 eval prompts cost too much to evaluate GPRL every 10 steps; its monitor logs every 5)
            budget += ["--eval-every", str(row.eval_every if row.eval_every and settings["world"] == "toy" else every)]
            rates = LEARNING_RATES if sweep else [hyperparameters.get(row.rate_of or row.name, {}).get(
                "learning_rate", LEARNING_RATE)]
            for rate in rates:
                suffix = f"_lr{rate:g}" if sweep else ""  # a row read by another: the run at the same rate
                flags = list(row.flags)
                for need in set(row.needs) & row_slugs:
                    flags = [flag.replace(f"{need}_seed{seed}/", f"{need}_seed{seed}{suffix}/") for flag in flags]
                needs = [f"sft_seed{seed}",
                         *[f"{need}_seed{seed}" + (suffix if need in row_slugs else "") for need in row.needs]]
                name = f"{slug(row.name)}_seed{seed}{suffix}"
                rate_flags = [part for flag in row.rate_flags for part in (flag, f"{rate:g}")]
                commands.append(Run(name, [py, row.script, "--model", str(sft_dir / "checkpoint"), "--seed", str(seed),
                                           *budget, *eval_flags, *rate_flags, *flags,
                                           *world_flags(row.script, settings, sweep)],
                                    runs_dir / name, needs, row.name, seed))
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
    # the t quantile for a 95% two-sided interval, from scipy: the same source as p_value
    quantile = float(student_t.ppf(0.975, len(values) - 1))
    mean, half = statistics.mean(values), quantile * statistics.stdev(values) / math.sqrt(len(values))
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


def p_value(differences: list[float]) -> float:
    """Two-sided paired t-test of mean difference 0 (NaN with fewer than 2 seeds)."""
    if len(differences) < 2:
        return float("nan")
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * student_t.sf(abs(mean / (sd / math.sqrt(len(differences)))), len(differences) - 1))


def power(differences: list[float]) -> float:
    """The chance that a two-sided paired t-test at 0.05 (before Holm) over this many seeds
    detects a true effect of the observed size (mean / sd of the differences): the
    noncentral t's mass beyond the critical values. NaN with fewer than 2 seeds or no spread."""
    n = len(differences)
    if n < 2 or statistics.stdev(differences) == 0:
        return float("nan")
    noncentrality = statistics.mean(differences) / statistics.stdev(differences) * math.sqrt(n)
    critical = float(student_t.ppf(0.975, n - 1))
    # scipy returns NaN for the far tail of a large effect (a mass below 1e-10): it counts as 0
    tails = (nct.sf(critical, n - 1, noncentrality), nct.cdf(-critical, n - 1, noncentrality))
    return float(sum(tail for tail in tails if math.isfinite(tail)))


def prediction_outcome(prediction: tuple[float, float, bool] | None, differences: list[float], adjusted_p: float,
                       same: bool = False) -> str:
    """The prediction and whether it held: the mean difference within the predicted bounds
    and the Holm verdict (supported or not) as predicted ((0, 0, False): the same runs in
    every seed, `same`). '–' with no prediction."""
    if prediction is None:
        return "–"
    low, high, supported = prediction
    if low == high == 0:  # predicted: the same runs in every seed
        return f"the same runs in every seed: {'held' if same else 'failed'}"
    bounds = f">= {low:+.2f}" if high == math.inf else f"{low:+.2f} to {high:+.2f}"
    mean = statistics.mean(differences)
    held = low <= mean <= high and (adjusted_p < 0.05 and mean > 0) == supported
    return f"{bounds}, {'supported' if supported else 'not supported'}: {'held' if held else 'failed'}"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: controls the chance of any false "supported" in the family at 5%."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i] if p_values[i] == p_values[i] else 2.0)
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, i in enumerate(order):
        if p_values[i] == p_values[i]:
            running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
            adjusted[i] = running
    return adjusted


def holm_over_testable(comparisons: list[list[float]], same: list[bool]) -> list[float]:
    """Holm-adjusted p of each comparison's paired differences, the family being the
    testable ones; NaN for a comparison whose two runs are the same in every seed (it tests
    nothing, so it neither takes a share of the family's alpha nor gets a verdict)."""
    family = iter(holm([p_value(differences) for differences, is_same in zip(comparisons, same) if not is_same]))
    return [math.nan if is_same else next(family) for is_same in same]


def same_runs(method: dict[int, dict], control: dict[int, dict]) -> bool:
    """The method and its control are the same runs in every seed (e.g. GPRL when no alarm
    fired): every score both evaluations report, and their sample answers, are equal. Equal
    gold alone is not enough: two different policies can both score 0."""
    def shared_scores(record: dict, other: dict) -> dict:
        return {key: record[key] for key in set(record) & set(other) - {"wall_time"}}
    return all(shared_scores(method[seed], control[seed]) == shared_scores(control[seed], method[seed])
               for seed in method)


def verdict(differences: list[float], adjusted_p: float, same: bool = False) -> str:
    if same:
        return "not testable here: the two runs are the same in every seed"
    mean = statistics.mean(differences)
    if adjusted_p != adjusted_p:
        return "– (one seed: no test)"
    if adjusted_p < 0.05:
        return "supported" if mean > 0 else "contradicted (the control is better)"
    return "not shown (no difference detected)"


def write_table(settings: dict, commands: list[Run], runs_dir: Path, out_dir: Path, job_time: float) -> str:
    seeds = range(1, settings["seeds"] + 1)
    by_row: dict[str, dict[int, dict]] = {}
    for run in commands:
        if run.method:
            by_row.setdefault(run.method, {})[run.seed] = result_of(run)
    base = {seed: json.loads((runs_dir / f"sft_seed{seed}" / "initial_eval.json").read_text()) for seed in seeds}
    rows = {"base model": base, **by_row}
    run_dirs: dict[str, list[Path]] = {}
    for run in commands:
        if run.method:
            run_dirs.setdefault(run.method, []).append(run.out)
    print("analysing runs (KL to SFT, response lengths, log-probs vs the expert's)", flush=True)
    references = {seed: runs_dir / f"sft_seed{seed}" / "checkpoint" for seed in seeds}
    analyses = analyze(run_dirs, references, str(ROOT / settings["eval_data"]), str(ROOT / settings["data_dir"] /
                       "expert_cache.jsonl"), out_dir, prompts=min(64, settings["eval_prompts"]))
    plot_curves({m: [eval_curve(d, settings["prompts_per_step"] * settings["group_size"]) for d in dirs]
                 for m, dirs in run_dirs.items() if m != "SFT"}, out_dir / "curves.png")
    n = settings["seeds"]
    claims = settings["claims"]
    controls = {control for _, _, control in claims}
    methods = {method for _, method, _ in claims}
    exploratory = {row.name for row in table_rows(runs_dir, 1, settings) if row.exploratory} - methods - controls
    # a diagnostic world's own scores, where its runs have them
    world_keys = [key for key in WORLD_SCORE_KEYS
                  if any(key in result for per_seed in rows.values() for result in per_seed.values())]
    gold = {row: [per_seed[s]["gold"] for s in seeds] for row, per_seed in rows.items()}

    def role(row: str) -> str:
        if row in exploratory:
            return "exploratory"
        return " and ".join(name for name, members in (("method", methods), ("control", controls)) if row in members) or "–"

    evaluated = settings["eval_prompts"]
    shifted_half = settings["world"] != "toy" and WORLDS[settings["world"]].gold_on_shifted_half
    scored = f"the {evaluated // 2} shifted prompts of {evaluated}" if shifted_half else f"{evaluated} toy-world prompts"
    lines = [
        f"Held-out gold accuracy (prompt-level strict: every instruction followed) on {scored} "
        f"({settings['eval_data']}), mean ± std over {n} seed(s), each seed its own SFT checkpoint "
        f"({settings['sft_steps']} steps on the demonstrations of 500 prompts). Every other row starts from that "
        f"checkpoint: {settings['rl_steps']} steps ({settings['prompts_per_step']} prompts x G={settings['group_size']} "
        "rollouts per step; continued SFT: SFT steps on the same 500 demonstrations); every row that uses "
        f"demonstrations draws them from those 500 prompts. Learning rates: {settings['learning_rates_from']}.",
        "",
        "RL reward: the rows' reward on greedy responses (the plain and imperfect worlds: the fraction of single "
        "instructions followed). "
        f"KL: per-response KL(policy || SFT) (k3 estimator) on samples at temperature 1, {min(64, settings['eval_prompts'])} "
        "prompts.",
        *(["", f"World: {settings['world']} (docs/experiments.md, the diagnostic worlds). " +
            WORLD_NOTES[settings["world"]]] if settings["world"] != "toy" else []),
        "",
        "| row | role | gold | RL reward | " + "".join(f"{key} | " for key in world_keys) +
        "length (tokens) | KL to SFT | wall time per run (s) |",
        "|---|---|---|---|" + "---|" * len(world_keys) + "---|---|---|",
    ]
    for row, per_seed in rows.items():
        kl = mean_std([a["kl"] for a in analyses[row]]) if row in analyses and row != "SFT" else "–"
        lines.append(f"| {row} | {role(row) if row != 'base model' else '–'} | {mean_std(gold[row])} | "
                     f"{mean_std([per_seed[s].get('reward', float('nan')) for s in seeds])} | "
                     + "".join(f"{mean_std([per_seed[s].get(key, float('nan')) for s in seeds])} | " for key in world_keys) +
                     f"{mean_std([per_seed[s].get('length', float('nan')) for s in seeds])} | {kl} | "
                     f"{statistics.mean(per_seed[s].get('wall_time', 0.0) for s in seeds):.0f} |")
    primary = [(claim, method, control, [a - b for a, b in zip(gold[method], gold[control])])
               for claim, method, control in claims if method in gold and control in gold]
    same = [same_runs(rows[method], rows[control]) for _, method, control, _ in primary]
    adjusted = holm_over_testable([differences for *_, differences in primary], same)
    testable = [not is_same for is_same in same]
    left = [f"{method} - {control}" for (_, method, control, _), kept in zip(primary, testable) if not kept]
    lines += ["", f"Primary comparisons, fixed before any run: method minus control, paired by seed (same SFT "
              f"checkpoint), mean and 95% t-interval over {n} seeds, two-sided paired t-test, p adjusted by Holm over "
              f"the {sum(testable)} testable comparisons" + (f" ({', '.join(left)}: the same runs in every seed, so "
                                                              "not in the family)" if left else "") +
              ". A claim is supported when the adjusted p < 0.05. Power: the chance "
              f"that the unadjusted test finds a true effect of the observed size (mean / sd) with {n} seeds.", "",
              "| claim | method - control | gold difference [95% CI] | per seed | p | Holm p | power | verdict | "
              "prediction (docs/experiments.md) |",
              "|---|---|---|---|---|---|---|---|---|"]
    predictions = settings["predictions"]
    outcomes = []  # the same cells for claims.json, which the summary across worlds reads
    for (claim, method, control, differences), holm_p, is_same in zip(primary, adjusted, same):
        outcome = {"claim": claim, "comparison": f"{method} - {control}", "difference": paired(differences)[0],
                   "holm_p": holm_p, "verdict": verdict(differences, holm_p, is_same),
                   "prediction": prediction_outcome(predictions.get((method, control)), differences, holm_p, is_same)}
        outcomes.append(outcome)
        lines.append(f"| {claim} | {method} - {control} | {outcome['difference']} | "
                     f"{' '.join(f'{d:+.3f}' for d in differences)} | {p_value(differences):.3f} | "
                     f"{'–' if holm_p != holm_p else f'{holm_p:.3f}'} | "
                     f"{'–' if is_same else f'{power(differences):.2f}'} | {outcome['verdict']} | "
                     f"{outcome['prediction']} |")
    write_json(out_dir / "claims.json", {"world": settings["world"], "seeds": n, "job_time": round(job_time),
                                         "claims": outcomes})
    if exploratory & set(gold) and "GRPO" in gold:
        lines += [
            "",
            "Exploratory rows (no verdicts; the intervals are uncorrected): gold minus SFT and minus GRPO, paired by seed.",
            "",
            "| row | gold - SFT [95% CI] | gold - GRPO [95% CI] |",
            "|---|---|---|",
        ]
        for row in sorted(exploratory & set(gold)):
            lines.append(f"| {row} | {paired([a - b for a, b in zip(gold[row], gold['SFT'])])[0]} | "
                         f"{paired([a - b for a, b in zip(gold[row], gold['GRPO'])])[0]} |")
    gpm = [json.loads((runs_dir / f"gpm_seed{s}" / "eval.json").read_text())["heldout_accuracy"] for s in seeds
           if (runs_dir / f"gpm_seed{s}" / "eval.json").exists()]
    alarms = {row: [rows[row][s].get("drift_alarms", float("nan")) for s in seeds] for row in ("GPRL", "GPRL, monitor off")
              if row in rows}
    if gpm:
        lines += ["", f"The GPM that GPRL optimises: held-out pairwise accuracy {mean_std(gpm)} on the SFT model's sampled "
                      "pairs (chance 0.5)."]
    if alarms:
        lines += ["Drift alarms per run: " + "; ".join(f"{row} {mean_std(values)}" for row, values in alarms.items()) +
                  (" (monitor off: alarms that fired but were not acted on)." if "GPRL, monitor off" in alarms else ".")]
    lines += gprl_diagnostics(run_dirs)
    lines += ["", f"Whole job: {job_time:.0f} s (all invocations) on {os.cpu_count()} CPU core(s), {settings['jobs']} runs "
                  "side by side (per-run wall times include that sharing)."]
    return "\n".join(lines) + "\n"


def write_summary(worlds_dir: Path) -> str:
    """One table of every world's claims (from each results/worlds/<world>/claims.json that
    exists, in the order of WORLDS) and the worlds' job times, written to worlds_dir/summary.md."""
    found = [json.loads(path.read_text()) for name in WORLDS if (path := worlds_dir / name / "claims.json").exists()]
    lines = ["Every world's claims, from its own table (results/worlds/<world>/table.md: the rows, per-seed values, p "
             "and power); paired by seed, Holm within each world.", "",
             "| world | claim | method - control | gold difference [95% CI] | Holm p | verdict | prediction |",
             "|---|---|---|---|---|---|---|"]
    for world in found:
        for claim in world["claims"]:
            holm_p = claim["holm_p"]
            lines.append(f"| {world['world']} | {claim['claim']} | {claim['comparison']} | {claim['difference']} | "
                         f"{'–' if holm_p is None or holm_p != holm_p else f'{holm_p:.3f}'} | {claim['verdict']} | "
                         f"{claim['prediction']} |")
    times = ", ".join(f"{world['world']} {world['job_time']} s" for world in found)
    lines += ["", f"Job times ({found[0]['seeds'] if found else 0} seeds, each world's Whole job line): {times}; "
                  f"all {len(found)} together {sum(world['job_time'] for world in found)} s, run one world after another."]
    text = "\n".join(lines) + "\n"
    atomic_write_text(worlds_dir / "summary.md", text)
    return text


def gprl_diagnostics(run_dirs: dict[str, list[Path]]) -> list[str]:
    """GPRL over training, mean over seeds: held-out gold with the monitor acting and off,
    and the drift monitor's per-dimension margins of the policy's greedy responses over
    the reference's on the probe prompts (the GPM's own judgement), at every check."""
    if "GPRL" not in run_dirs:
        return []
    by_step: dict[int, dict[str, list[float]]] = {}
    for row, column in (("GPRL", "gold"), ("GPRL, monitor off", "gold, monitor off")):
        for run_dir in run_dirs.get(row, []):
            for line in (run_dir / "metrics.jsonl").read_text().splitlines():
                record = json.loads(line)
                values = by_step.setdefault(record["step"], {})
                if "eval/gold" in record:
                    values.setdefault(column, []).append(record["eval/gold"])
                if row == "GPRL":
                    for key, value in record.items():
                        if key.startswith("drift/margin/"):
                            values.setdefault(key[len("drift/margin/"):], []).append(value)
                        if key.startswith("drift/judge_accuracy/"):
                            values.setdefault("agrees: " + key[len("drift/judge_accuracy/"):], []).append(value)
    measured = {k for v in by_step.values() for k in v} - {"gold", "gold, monitor off"}
    columns = ["gold", *(["gold, monitor off"] if "GPRL, monitor off" in run_dirs else []),
               *sorted(k for k in measured if not k.startswith("agrees")),
               *sorted(k for k in measured if k.startswith("agrees"))]
    lines = ["", "GPRL over training, mean over seeds: held-out gold, and the drift monitor's margin per GPM dimension "
                 "(the policy's greedy responses scored against the reference's on the probe prompts; > 0: the GPM "
                 "prefers the policy)" + (", and how often each dimension's sign agrees with the toy world's true "
                                          "preference on those pairs (agrees: ...; ties excluded)" if any(
                                              k.startswith("agrees") for k in measured) else "") + ".", "",
             "| step | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for step in sorted(by_step):
        if any(by_step[step].get(c) for c in columns):
            lines.append(
                f"| {step} | "
                + " | ".join(
                    (
                        f"{statistics.mean(by_step[step][c]):.3f}"
                        if c.startswith(("gold", "agrees"))
                        else f"{statistics.mean(by_step[step][c]):+.4f}"
                    )
                    if by_step[step].get(c)
                    else ""
                    for c in columns
                )
                + " |"
            )
    return lines


def write_sweep(commands: list[Run], path: Path) -> dict:
    """Each tuned row's learning rate: the best mean final validation gold over the sweep's
    seeds (ties: the smaller rate). Twins are not listed: they take their method's rate."""
    scores: dict[str, dict[float, list[float]]] = {}
    for run in commands:
        if run.method and run.method != "SFT":
            rate = float(run.command[run.command.index("--learning-rate") + 1])
            scores.setdefault(run.method, {}).setdefault(rate, []).append(result_of(run)["gold"])
    choice = {}
    for row, by_rate in scores.items():
        means = {rate: statistics.mean(values) for rate, values in by_rate.items()}
        best = max(sorted(means), key=lambda rate: means[rate])
        choice[row] = {
            "learning_rate": best,
            "validation_gold": {f"{rate:g}": round(g, 4) for rate, g in sorted(means.items())},
        }
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
        raise SystemExit(
            f"error: {path} is not valid JSON ({getattr(error, 'msg', error)}); fix it, or rerun --sweep"
        ) from None
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
    """SIGINT or SIGTERM: stop every running command and leave once they have. A training
    command given SIGTERM saves the step it is on first (shared/checkpoint.py), so rerunning the
    job loses nothing; a command still running after 5 minutes is killed."""
    FAILED.set()
    running = list(RUNNING)
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
    name = signal.Signals(number).name
    print(f"\nstopped by {name}: {len(running)} running command(s) stopped, each with a checkpoint of the step it "
          "was on; run the same command again to continue (every run resumes from its last checkpoint)",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + number)


if __name__ == "__main__":
    args = tyro.cli(Args)
    given = {k: v for k, v in asdict(args).items() if v is not None}
    world = WORLDS.get(args.world)
    world_defaults = {} if world is None else {"eval_prompts": QUICK["eval_prompts"]} if args.quick else {
        **WORLD_FULL, "eval_prompts": world.eval_prompts, "sft_steps": world.sft_steps}
    if world is not None and world.generic_sft_steps:  # --quick shortens the plain pass, never the house's
        world_defaults |= {"sft_steps": world.sft_steps,
                           "generic_sft_steps": QUICK["sft_steps"] if args.quick else world.generic_sft_steps}
    settings = {**(QUICK if args.quick else FULL), **world_defaults, **given}
    check_settings(settings)
    settings["data_dir"] = "data/toy" if world is None else f"data/worlds/{args.world}"
    settings["claims"] = PRIMARY if world is None else world.claims
    settings["predictions"] = {} if world is None else world.predictions
    if world is not None and not args.rows:  # a world runs the rows its claims name (and what they read)
        settings["rows"] = tuple(dict.fromkeys(row for _, *pair in world.claims for row in pair if row != "SFT"))
    results = "results" if world is None else f"results/worlds/{args.world}"
    out_dir = Path(args.out_dir or (results.replace("results", "results/quick", 1) if args.quick else results))
    runs_dir = out_dir / ("sweep" if args.sweep else "runs")
    if args.sweep and args.hyperparameters:
        raise SystemExit(f"error: --sweep writes {out_dir / 'hyperparameters.json'} and reads none; drop --hyperparameters "
                         f"{args.hyperparameters!r} (or pass it to the main job that follows)")
    if args.hyperparameters and not Path(args.hyperparameters).is_file():
        raise SystemExit(f"error: --hyperparameters {args.hyperparameters!r} does not exist; run the --sweep that writes "
                         "it, or leave the flag out to use one learning rate for every row")
    hyperparameters_file = (
        out_dir / "hyperparameters.json" if args.sweep or not args.hyperparameters else Path(args.hyperparameters)
    )
    methods = {row.name for row in table_rows(runs_dir, 1, {**settings, "all": True})}
    unknown = [name for name in args.rows if name not in methods]
    if unknown:
        raise SystemExit(f"error: --rows {unknown[0]!r} is not a row of the job; rows: {', '.join(sorted(methods))}")
    hyperparameters = {} if args.sweep else check_hyperparameters(hyperparameters_file, methods)
    eval_data = f"{settings['data_dir']}/val.jsonl" if args.sweep else \
        f"{settings['data_dir']}/{world.eval_file if world else 'eval.jsonl'}"
    settings["eval_data"] = eval_data
    commands = job_commands(settings, runs_dir, hyperparameters, eval_data, args.sweep)
    rate_of = {row.name: row.rate_of or row.name for row in table_rows(runs_dir, 1, {**settings, "all": True})}
    untuned = {run.method for run in commands if run.method not in ("", "SFT")} - {
        row for row, source in rate_of.items() if source in hyperparameters}
    settings["learning_rates_from"] = (
        f"from the sweep ({hyperparameters_file}) for {', '.join(sorted(hyperparameters))} (twins take their method's)"
        + (f", {LEARNING_RATE:g} for the rest ({', '.join(sorted(untuned))})" if untuned else "")
        if hyperparameters else
        f"{LEARNING_RATE:g} for every row (the same for method and control; no row was tuned on its own)")
    if args.print_commands:
        try:
            for run in commands:
                extra = ["--output-dir", str(run.out), "--resume"] if run.out.suffix != ".jsonl" else []
                print(shlex.join(run.command[1:] + extra))
            sys.stdout.flush()
        except BrokenPipeError:  # `| head` stopped reading: it has what it asked for
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush finds no pipe
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

    # ---- the offline world: tiny model, toy data (train / validation / eval), expert cache (reused when present);
    # a diagnostic world's cache answers its 500 SFT prompts, so an error rate is exact on them
    data_dir = settings["data_dir"]
    build = ["scripts/build_toy_world.py"] + ([] if world is None else ["--data-dir", data_dir, *world.build_flags])
    cache = ["scripts/build_expert_cache.py"] + ([] if world is None else [
        "--data", f"{data_dir}/sft_prompts.jsonl", "--out", f"{data_dir}/expert_cache.jsonl", *world.cache_flags])
    for setup in (build, cache):
        if setup is build or not (ROOT / data_dir / "expert_cache.jsonl").exists():
            subprocess.run([settings["python"], *setup], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if settings.get("generic_sft_steps") and not (ROOT / data_dir / "generic_cache.jsonl").exists():
        subprocess.run([settings["python"], "scripts/build_expert_cache.py", "--data", f"{data_dir}/sft_prompts.jsonl",
                        "--out", f"{data_dir}/generic_cache.jsonl"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

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
        if world is not None and not args.out_dir:  # the job's own results folder: every world's claims in one table
            write_summary(out_dir.parent)
            print(f"every world's claims so far: {out_dir.parent / 'summary.md'}")
        print(f"total wall time {time.time() - job_start:.0f} s; table in {out_dir / 'table.md'}, plots curves.png, "
              f"lengths.png, logprobs.png in {out_dir}")
