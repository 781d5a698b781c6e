"""Run plumbing shared by every script: one run per output folder (a lock, no silent
overwrite, resume only with the same flags), seeding, logging (tensorboard, a JSONL
file, optional wandb) and atomic, resumable checkpoints."""

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from shared import distributed
from shared.modeling import DEFAULT_CHAT_TEMPLATE_KWARGS, DTYPES, default_device
from shared.rollout import evaluate

CHECKPOINT = "checkpoint"  # <output_dir>/checkpoint: model + tokenizer + trainer_state.pt
TRAINER_STATE = "trainer_state.pt"
COMPLETE = "complete"  # written last into a checkpoint folder: its absence means the save was cut short
RUN_RECORD = "run.json"  # the flags the run was started with
# what a run writes into its folder: --overwrite deletes these and nothing else
RUN_OUTPUTS = {".lock", RUN_RECORD, "metrics.jsonl", "tb", "eval.json", "initial_eval.json", CHECKPOINT,
               CHECKPOINT + ".tmp", CHECKPOINT + ".old", "stage1", "discriminator.pt"}
# flags naming files or folders a run reads (the run folder may not overlap any of them)
INPUT_FLAGS = ("model", "train_data", "eval_data", "expert_cache", "expert_pool", "pairs_data", "disc_path", "disc_encoder",
               "gpm")
# flags that change how a run is computed or reported, never what it computes: free to differ on --resume
RUN_NEUTRAL_FLAGS = {"resume", "overwrite", "allow_flag_changes", "stop_at_step", "track", "wandb_project", "device",
                     "compile", "micro_batch_size", "gradient_checkpointing", "logp_chunk_tokens", "output_dir"}
_held_locks = []  # open lock files: the lock lasts as long as the process


@dataclasses.dataclass
class RunFlags:
    """How a run is carried out, the same for every algorithm; each algorithm's Args adds
    its own flags to these (they come first in --help)."""
    resume: bool = False
    """continue the run in --output-dir from its newest complete checkpoint (from step 0 if it has none)"""
    overwrite: bool = False
    """delete the run already in --output-dir and start again (without it, such a folder is refused)"""
    allow_flag_changes: bool = False
    """with --resume, accept flags that differ from the run's (they are recorded in run.json)"""
    stop_at_step: int = 0
    """end this invocation after this step, as an interruption would (0: run to the end)"""
    dtype: str = "float32"
    """weights dtype: float32 or bfloat16 (float16 is refused: AdamW's moments underflow in it)"""
    autocast_bf16: bool = False
    """run forward passes, sampling included, under bfloat16 autocast (GPU memory/speed knob)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    device: str = dataclasses.field(default_factory=default_device)
    """cuda or cpu"""
    compile: bool = dataclasses.field(default_factory=torch.cuda.is_available)
    """torch.compile the algorithm's pure functions: losses, advantages (default on with CUDA)"""
    track: bool = False
    """log to Weights & Biases as well as tensorboard"""
    wandb_project: str = "posttrain"
    """wandb project name"""
    lora_r: int = 0
    """LoRA rank (peft): train adapters only, the reference being the base with them off (0: train every weight)"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapters add (lora_alpha / lora_r) * B A to each target weight"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """names of the linear layers that get adapters (Qwen3's attention and MLP projections)"""
    static_cache: bool = False
    """decode training rollouts into a KV cache allocated once, with a torch.compile'd step (the first compiles)"""
    generation_batch_size: int = 64
    """prompts per generate call outside the training step (evaluation, AAPA's discriminator fit and anchor metrics,
    GPRL's drift probes): lower it for long answers on a GPU"""
    deterministic: bool = False
    """deterministic CUDA kernels (torch.use_deterministic_algorithms), for bit-exact resume on a GPU; slower"""
    system_prompt: str = ""
    """a system turn before every prompt, in training, sampling and evaluation ("" for none)"""
    chat_template_kwargs: str = DEFAULT_CHAT_TEMPLATE_KWARGS
    """JSON object of options for the tokenizer's chat template (Qwen3: enable_thinking; the tiny template ignores them)"""
    strip_think: bool = True
    """reward and evaluation functions see the answer after a reasoning model's </think> (an unclosed <think>: empty)"""


# SIGTERM is what SLURM, Kubernetes and spot instances send before they kill; SIGUSR1 is
# SLURM's requeue signal. Either one ends the run after the step in progress, with a saved
# checkpoint (evaluate_save_or_stop), so the work done is kept.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_preempted_by: list[int] = []


def _note_preemption(number, frame) -> None:
    _preempted_by.append(number)


def claim_output_dir(args) -> dict | None:
    """Under torchrun rank 0 claims the folder (as below) and the other ranks follow its
    outcome: they stop when it stops, and read the same trainer state. From here on a
    preemption signal saves a checkpoint after the current step instead of killing."""
    for number in PREEMPTION_SIGNALS:
        signal.signal(number, _note_preemption)
    if distributed.world_size() == 1:
        return _claim_output_dir(args)
    outcome = None
    if distributed.is_main():
        try:
            outcome = "state" if _claim_output_dir(args) is not None else "fresh"
        except SystemExit:
            distributed.broadcast_object("stop")
            raise
    outcome = distributed.broadcast_object(outcome)
    if outcome == "stop":
        raise SystemExit(1)
    return load_trainer_state(Path(args.output_dir)) if outcome == "state" else None


def _claim_output_dir(args) -> dict | None:
    """Make args.output_dir this process's run folder and return the trainer state to
    resume from (None: start at step 0). Stops with one error line when the folder is
    a file or not writable, when another process holds it, when it holds a run and
    neither --resume nor --overwrite was given, or when --resume would change flags of
    the run (unless --allow-flag-changes). A checkpoint save cut short at any instant
    is repaired first, so --resume always finds the newest complete checkpoint."""
    check_output_dir_is_safe(args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SystemExit(f"error: --output-dir {str(output_dir)!r} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = open(output_dir / ".lock", "a")
    except OSError as error:
        raise SystemExit(f"error: --output-dir {str(output_dir)!r} cannot be written ({error.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS when the process ends, however it ends
    except BlockingIOError:
        raise SystemExit(f"error: --output-dir {str(output_dir)!r} is in use by another running process") from None
    _held_locks.append(lock)
    recover_checkpoint(output_dir)
    holds_run = any((output_dir / name).exists() for name in (RUN_RECORD, "metrics.jsonl", CHECKPOINT))
    if holds_run and not args.resume:
        if not getattr(args, "overwrite", False):
            raise SystemExit(f"error: --output-dir {str(output_dir)!r} already holds a run; pass --resume to continue it, "
                             "--overwrite to delete it and start again, or choose another folder")
        foreign = sorted(entry.name for entry in output_dir.iterdir()
                         if entry.name not in RUN_OUTPUTS and not entry.name.endswith(".tmp"))
        if foreign:
            raise SystemExit(f"error: --output-dir {str(output_dir)!r} holds files no run writes ({', '.join(foreign[:5])}"
                             f"{', ...' if len(foreign) > 5 else ''}); --overwrite deletes only a run's own files: "
                             "move them or choose another folder")
        for entry in output_dir.iterdir():
            if entry.name != ".lock":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if args.resume and (output_dir / RUN_RECORD).exists():
        try:
            record = json.loads((output_dir / RUN_RECORD).read_text())
            recorded = record["args"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SystemExit(f"error: {output_dir / RUN_RECORD} is damaged (not the JSON a run writes); "
                             "restore it, or start again with --overwrite") from None
        replaced = [f"--{flag.replace('_', '-')} {getattr(args, flag)!r}" for flag, print_ in input_fingerprints(args).items()
                    if flag in record.get("inputs", {}) and record["inputs"][flag] != print_]
        if replaced and not getattr(args, "allow_flag_changes", False):
            raise SystemExit(f"error: --resume with input data that changed since the run started ({', '.join(replaced)}); "
                             "restore it, or pass --allow-flag-changes to continue on the new data")
        changed = [
            f"--{key.replace('_', '-')} {recorded[key]!r} -> {value!r}"
            for key, value in dataclasses.asdict(args).items()
            if key not in RUN_NEUTRAL_FLAGS and key in recorded and _jsonable(value) != recorded[key]
        ]
        if changed and not getattr(args, "allow_flag_changes", False):
            raise SystemExit(f"error: --resume with flags that differ from the run in {str(output_dir)!r}: "
                             f"{', '.join(changed)}; rerun with the run's flags or pass --allow-flag-changes")
    return load_trainer_state(output_dir) if args.resume else None


def input_fingerprints(args) -> dict[str, str]:
    """A fingerprint of every local input the run reads (--train-data, --expert-cache,
    ...): a file's SHA-256, a folder's file names and sizes. Recorded in run.json, so
    that --resume notices data replaced since the run started."""
    prints = {}
    for flag in INPUT_FLAGS:
        value = getattr(args, flag, "")
        path = Path(value).expanduser() if value else None
        if path is None or not path.exists():
            continue
        digest = hashlib.sha256()
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(2**20), b""):
                    digest.update(block)
        else:
            for entry in sorted(path.iterdir()):
                digest.update(f"{entry.name}:{entry.stat().st_size if entry.is_file() else 'dir'};".encode())
        prints[flag] = digest.hexdigest()[:16]
    return prints


def check_output_dir_is_safe(args) -> None:
    """Refuse, before anything is created or deleted, a run folder whose --overwrite or
    checkpoint saves could destroy something else: an empty path (an unset shell
    variable), the current folder or one above it, home, root, a git repository or a
    folder holding this project; a folder equal to, inside or around an input the run
    reads (--model, data, expert cache, pairs, discriminator, GPM); and a folder inside
    another run's folder (that run's next save or --overwrite would delete it)."""
    if not str(args.output_dir).strip():
        raise SystemExit("error: --output-dir is empty (an unset shell variable?); give the run its own folder")
    output_dir = Path(args.output_dir).expanduser().resolve()
    project = Path(__file__).resolve().parents[1]
    protected = {Path.cwd().resolve(): "the current folder", Path.home().resolve(): "the home folder",
                 Path(output_dir.anchor): "the root folder", project: "this project's folder"}
    for path, name in protected.items():
        if output_dir == path or output_dir in path.parents:
            raise SystemExit(f"error: --output-dir {args.output_dir!r} is {name}"
                             f"{'' if output_dir == path else ' or a folder above it'}; give the run its own folder")
    if (output_dir / ".git").exists():
        raise SystemExit(f"error: --output-dir {args.output_dir!r} is a git repository; give the run its own folder")
    for flag in INPUT_FLAGS:
        value = getattr(args, flag, "")
        if not value or not Path(value).expanduser().exists():
            continue  # unset, or a hub id
        source = Path(value).expanduser().resolve()
        if source == output_dir or output_dir in source.parents or source in output_dir.parents:
            raise SystemExit(f"error: --output-dir {args.output_dir!r} overlaps --{flag.replace('_', '-')} {value!r}, "
                             "which the run reads (its saves would overwrite it); choose another folder")
    for parent in output_dir.parents:
        if (parent / RUN_RECORD).exists() or (parent / CHECKPOINT / TRAINER_STATE).exists():
            raise SystemExit(f"error: --output-dir {args.output_dir!r} is inside the run folder {str(parent)!r}, whose "
                             "saves and --overwrite delete what they do not own; choose a folder outside it")


def recover_checkpoint(output_dir: Path) -> None:
    """save_checkpoint writes checkpoint.tmp, renames checkpoint to checkpoint.old,
    renames checkpoint.tmp to checkpoint, then deletes checkpoint.old. Whatever instant
    it was stopped at, keep the newest complete one as `checkpoint` and drop the rest."""
    final, tmp, old = output_dir / CHECKPOINT, output_dir / (CHECKPOINT + ".tmp"), output_dir / (CHECKPOINT + ".old")
    if (tmp / COMPLETE).exists():  # the save being made was complete: it is the newest
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
    elif not final.exists() and old.exists():
        os.replace(old, final)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def check_range(args, **rules) -> None:
    """One error line for the first flag outside its range. rules: field=(low, high,
    low_inclusive, high_inclusive); None means unbounded on that side."""
    for field, (low, high, low_inclusive, high_inclusive) in rules.items():
        value = getattr(args, field)
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
            opening, closing = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
            interval = f"{opening}{'-inf' if low is None else low}, {'inf' if high is None else high}{closing}"
            raise SystemExit(f"error: --{field.replace('_', '-')} must be in {interval}, got {value}")


# the usual ranges of check_range's rules
POSITIVE, NON_NEGATIVE, FRACTION = (0, None, False, False), (0, None, True, False), (0, 1, True, False)
AT_LEAST_1, AT_LEAST_2 = (1, None, True, False), (2, None, True, False)  # a group needs 2 samples to compare
TEMPERATURE = (1e-3, None, True, False)  # logits / T overflow below 1e-3
TOP_P = (0, 1, False, True)  # 0 would keep no token


def _same_file(a: str, b: str) -> bool:
    """The same path, or two names (a link, ../) of one existing file."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or a.exists() and b.exists() and os.path.samefile(a, b)


def check_output_file(path: str, flag: str, inputs: dict[str, str] | None = None) -> None:
    """An output file path must not be a folder, its folder must be writable, and it must
    not be one of the command's inputs (`inputs`: flag -> path, outputs written before it
    included), which writing it would replace."""
    for input_flag, input_path in (inputs or {}).items():
        if input_path and _same_file(input_path, path):
            raise SystemExit(f"error: {flag} {str(path)!r} is the same file as {input_flag}; writing it would "
                             f"replace that {'input' if input_flag not in ('--out', '--summary') else 'output'}: "
                             "choose another path")
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {flag} {str(path)!r} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: {flag} {str(path)!r}: its folder cannot be created ({error.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise SystemExit(f"error: {flag} {str(path)!r}: its folder is not writable")


def check_flags(args, flag_ranges: dict) -> None:
    """Before any data or model is read: the script's own flags against the ranges
    declared beside its Args, then the run flags every script shares."""
    check_range(args, **flag_ranges, stop_at_step=(0, args.steps, True, True))
    if not 0 <= args.seed < 2**63:
        raise SystemExit(f"error: --seed must be in [0, 2^63), got {args.seed}")
    if args.dtype not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.dtype == "float16":
        raise SystemExit("error: --dtype float16 cannot be trained with AdamW here (its eps 1e-8 and squared "
                         "gradients underflow in float16, and the weights turn NaN); use --dtype bfloat16, or "
                         "float32 with --autocast-bf16")
    check_chat_template_kwargs(args.chat_template_kwargs)
    check_range(args, generation_batch_size=AT_LEAST_1, lora_r=NON_NEGATIVE, lora_alpha=POSITIVE)
    if args.lora_r and not args.lora_target_modules:
        raise SystemExit("error: --lora-target-modules must name at least one module when --lora-r > 0")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but this machine has no CUDA device (use --device cpu)")
    if device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise SystemExit(f"error: --device must be cpu or cuda[:N], got {device!r}")


def check_chat_template_kwargs(value: str, flag: str = "--chat-template-kwargs") -> None:
    """A JSON object whose names are not ones the call itself sets."""
    try:
        options = json.loads(value)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {flag} must be a JSON object such as '{{\"enable_thinking\": false}}', got {value!r} "
                         f"({error.msg})") from None
    if not isinstance(options, dict):
        raise SystemExit(f"error: {flag} must be a JSON object (name: value), got {value!r}")
    taken = sorted(set(options) & {"conversation", "messages", "tokenize", "add_generation_prompt", "chat_template"})
    if taken:
        raise SystemExit(f"error: {flag} may not set {', '.join(taken)}: the scripts set it themselves")


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


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, numpy and torch. deterministic (--deterministic): deterministic
    kernels, so a resumed CUDA run equals the uninterrupted one bit for bit (on CPU it
    does already). cuBLAS needs its workspace setting before its first call, which is
    why this runs before any model loads; an op with no deterministic kernel warns once
    and runs as usual rather than stopping the run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds, torch 64-bit ones
    torch.manual_seed(seed % 2**64)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def step_seed(seed: int, step: int) -> int:
    """The seed of one step. Every random draw of a step (data order, sampling) comes
    from it, so a resumed run draws exactly what the uninterrupted run would have drawn:
    checkpoints need no RNG state."""
    return (seed * 1_000_003 + step) % 2**64  # any seed: torch generators take 64 bits


def prompt_seeds(seed: int, step: int, count: int) -> list[int]:
    """One seed per prompt of a step, for sampling its completions: what a prompt's
    completions are does not depend on how the batch is split (micro-batches, ranks)."""
    return [(step_seed(seed, step) * 1_000_003 + index) % 2**64 for index in range(count)]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A generator seeded with step_seed, for the step's data order."""
    return torch.Generator().manual_seed(step_seed(seed, step))


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


def _jsonable(value):
    """Flags as JSON stores them (tuples become lists), for comparing with run.json."""
    return json.loads(json.dumps(value, default=str))


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    """Strict JSON: a NaN or infinity is written as null (JSON has no such numbers).
    Under torchrun, rank 0 writes."""
    if not distributed.is_main():
        return
    atomic_write_text(Path(path), json.dumps(_finite(obj), indent=2, allow_nan=False))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _kept_checkpoint(output_dir: Path) -> str:
    state = output_dir / CHECKPOINT / TRAINER_STATE
    if not state.exists():
        return "no checkpoint had been saved yet"
    try:
        step = torch.load(state, weights_only=True, mmap=True)["step"]
    except Exception:  # a damaged or foreign file: still say where it is, never unpickle code
        step = "unknown"
    return f"the last checkpoint (step {step}) is kept in {output_dir / CHECKPOINT}"


def evaluate_and_log(model, tokenizer, rows: list[dict], score, logger, args, step: int, log: bool = True,
                     extra=None) -> dict:
    """Greedy evaluation on the held-out rows (shared/rollout.py:evaluate, scored by
    --eval-fn), plus the metrics extra(step) returns (an algorithm's own), logged as eval/*
    at `step` and printed in one line."""
    before = take_memory_peak()  # what came before is the step's, or the setup's before the first step
    if PhaseTimer.peak_before_steps is not None:
        PhaseTimer.peak_before_steps = max(PhaseTimer.peak_before_steps, before)
    result = evaluate(model, tokenizer, rows, score, args.generation_batch_size, args.max_new_tokens, args.autocast_bf16,
                      args.strip_think)
    peak = take_memory_peak()  # logged, not returned: eval.json holds what the policy did, equal after a resume
    own = extra(step) if extra else {}
    result.update(own)
    if log:
        logger.log(step, {**{f"eval/{k}": v for k, v in result.items() if k != "texts"}, "perf/peak_eval_memory_gib": peak})
    tqdm.write(f"step {step}: eval gold {result['gold']:.3f} reward {result['reward']:.3f} length {result['length']:.1f}"
               + "".join(f", {k} {v:.3f}" for k, v in own.items()))
    return result


def evaluate_save_or_stop(step: int, args, run_eval, save) -> dict | None:
    """The bookkeeping after every step: evaluate every --eval-every steps and at the
    last; save (save()) every --save-every steps, at the last and at --stop-at-step;
    end the invocation at --stop-at-step as an interruption would. After SIGTERM or
    SIGUSR1 (on any rank: every rank agrees on the step) save and exit with 128 + the
    signal's number, so --resume continues exactly. Returns the evaluation when one was made."""
    result = run_eval(step) if step % args.eval_every == 0 or step == args.steps else None
    preempted = distributed.any_rank(bool(_preempted_by)) and step < args.steps
    if step % args.save_every == 0 or step == args.steps or step == args.stop_at_step or preempted:
        save()
    if preempted:
        number = max(distributed.gather_objects(_preempted_by[:1]))  # the signal some rank received
        if distributed.is_main():
            print(f"stopped at step {step} by {signal.Signals(number).name}: checkpoint saved in "
                  f"{Path(args.output_dir) / CHECKPOINT}; continue with --resume", file=sys.stderr, flush=True)
        raise SystemExit(128 + number)
    if step == args.stop_at_step:
        print(f"stopped at step {step} (--stop-at-step); continue with --resume")
        raise SystemExit(0)
    return result


EVAL_KEYS = ("gold", "gold_loose", "instruction_strict", "instruction_loose", "reward", "length", "truncated", "prompts")


def write_final_eval(output_dir: Path, steps: int, final_eval: dict | None, run_eval, keys: tuple = (), **extra) -> None:
    """<output_dir>/eval.json: the evaluation at the run's last step, the initial gold and
    8 sample responses. Written when it is missing (also when the last process stopped
    between its last checkpoint and here) or when it describes another step count (a
    finished run extended with --resume --allow-flag-changes --steps N): it always
    describes the checkpoint beside it. final_eval: the loop's evaluation at `steps`, if
    it made one; run_eval(step, log=False) makes one otherwise."""
    path = output_dir / "eval.json"
    if path.exists() and json.loads(path.read_text()).get("step") == steps:
        return
    final_eval = final_eval or run_eval(steps, log=False)
    initial = json.loads((output_dir / "initial_eval.json").read_text())
    write_json(path, {"step": steps, **{k: final_eval[k] for k in EVAL_KEYS + tuple(keys) if k in final_eval},
                      "initial_gold": initial["gold"], **extra, "samples": final_eval["texts"][:8]})


def stop_if_not_finite(loss: float, step: int, output_dir: Path, grad_norm=None) -> None:
    """Called between the backward passes and the optimizer step: a NaN/inf loss or
    gradient norm ends the run before the update touches the weights, so the checkpoint
    on disk (if any) is the last good state. (A finite loss can have a non-finite
    gradient, e.g. at a huge learning rate once the weights have grown.)"""
    if not math.isfinite(loss):
        raise SystemExit(f"error: non-finite loss {loss} at step {step}; the weights were not updated; "
                         f"{_kept_checkpoint(output_dir)}")
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        raise SystemExit(f"error: non-finite gradient norm {float(grad_norm)} at step {step} (loss {loss:.4g}); "
                         f"the weights were not updated; {_kept_checkpoint(output_dir)}")


def weights_are_finite(model) -> bool:
    """True when every weight of the model is finite, on every rank (a collective under torchrun)."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach() for p in model.parameters()]
    finite = bool(torch.stack([t.isfinite().all() for t in local]).all()) if local else True
    return not distributed.any_rank(not finite)


def stop_if_weights_not_finite(model, step: int, output_dir: Path) -> None:
    """Called after every optimizer step: an update that made a weight NaN/inf (an
    overflowing learning rate, float16 moments) ends the run; nothing of it is saved."""
    if not weights_are_finite(model):
        raise SystemExit(f"error: the optimizer step of step {step} made weights non-finite (learning rate too "
                         f"high, or a dtype too narrow for AdamW?); nothing of it was saved; {_kept_checkpoint(output_dir)}")


def save_model(path: Path, model, tokenizer) -> None:
    """The model and tokenizer as `from_pretrained` reads them. Under torchrun every rank
    calls it (the sharded weights are gathered whole) and rank 0 writes."""
    if distributed.world_size() == 1:
        model.save_pretrained(path)
    else:
        state = distributed.full_state_dict(model)
        if distributed.is_main():
            model.save_pretrained(path, state_dict=state)
    if distributed.is_main():
        tokenizer.save_pretrained(path)


def save_checkpoint(output_dir: Path, model, tokenizer, optimizer, scheduler, step: int, args, extra: dict | None = None,
                    extra_files: dict | None = None) -> Path:
    """Write <output_dir>/checkpoint atomically: a temporary folder, then a rename,
    so a crash mid-save leaves the previous checkpoint intact. `extra` goes into the
    trainer state; each `extra_files` entry (name -> object) is torch-saved beside the model.
    Under torchrun every rank calls it (sharded tensors are gathered) and rank 0 writes
    the same files a single process writes."""
    if not weights_are_finite(model):  # never written, so never resumed from or called good
        raise SystemExit(f"error: refusing to save non-finite weights at step {step}; {_kept_checkpoint(output_dir)}")
    final, tmp, old = output_dir / CHECKPOINT, output_dir / (CHECKPOINT + ".tmp"), output_dir / (CHECKPOINT + ".old")
    optimizer_state = (optimizer.state_dict() if distributed.world_size() == 1
                       else distributed.whole_optimizer_state(optimizer))
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model(tmp, model, tokenizer)
        if not distributed.is_main():
            torch.distributed.barrier()  # returns once rank 0 has written the checkpoint
            return final
        # no RNG state: every random draw of a step comes from generators seeded by (seed, step).
        # Only tensors, numbers, strings, lists and dicts (flags as JSON stores them), so the
        # file loads with weights_only=True: resuming never runs code from the file.
        torch.save({
            "step": step, "args": _jsonable(dataclasses.asdict(args)), "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "extra": extra or {},
        }, tmp / TRAINER_STATE)
        for name, obj in (extra_files or {}).items():
            torch.save(obj, tmp / name)
        (tmp / COMPLETE).touch()
    except (OSError, RuntimeError, SafetensorError) as error:
        # disk full, quota, a file-size limit, a folder gone: torch.save's writer reports them as
        # RuntimeError ("unexpected pos", "file write failed"), safetensors as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0][:120]
        raise SystemExit(f"error: saving the checkpoint of step {step} failed ({reason}); "
                         f"{_kept_checkpoint(output_dir)}, untouched") from None
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    if distributed.world_size() > 1:
        torch.distributed.barrier()
    return final


def load_trainer_state(output_dir: Path) -> dict | None:
    """The trainer state of <output_dir>/checkpoint, or None when there is none."""
    path = output_dir / CHECKPOINT / TRAINER_STATE
    if not path.exists():
        return None
    try:
        # weights_only: a run folder copied from elsewhere may hold a crafted pickle, and
        # torch's restricted unpickler refuses anything but tensors and plain containers
        # before it can run code. Mapped, so N ranks share one copy in memory.
        return torch.load(path, weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise SystemExit(
            f"error: {path} holds objects other than tensors, numbers, strings, lists and dicts; "
            "refusing to unpickle it (a trainer state never does; the file was not written by this project)"
        ) from None
    except Exception as error:
        raise SystemExit(f"error: {path} cannot be read ({type(error).__name__}); the checkpoint is damaged") from None
