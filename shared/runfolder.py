"""One run per output folder: the folder is claimed under a lock, never silently
overwritten, resumed only with the flags it was started with, and repaired when a
checkpoint save was cut short. Also the atomic JSON writes every script uses."""

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import pickle
import shutil
import signal
from pathlib import Path

import torch

from shared import distributed

CHECKPOINT = "checkpoint"  # <output_dir>/checkpoint: model + tokenizer + trainer_state.pt
TRAINER_STATE = "trainer_state.pt"
COMPLETE = "complete"  # written last into a checkpoint folder: its absence means the save was cut short
RUN_RECORD = "run.json"  # the flags the run was started with
# what a run writes into its folder: --overwrite deletes these and nothing else
# (an algorithm that writes more names them: claim_output_dir's own_outputs)
RUN_OUTPUTS = {".lock", RUN_RECORD, "metrics.jsonl", "tb", "eval.json", "initial_eval.json", CHECKPOINT,
               CHECKPOINT + ".tmp", CHECKPOINT + ".old"}
# flags naming files or folders a run reads (the run folder may not overlap any of them)
INPUT_FLAGS = ("model", "train_data", "eval_data", "expert_cache", "expert_pool", "pairs_data", "disc_path", "disc_encoder",
               "gpm")
# flags that change how a run is computed or reported, never what it computes: free to differ on --resume
RUN_NEUTRAL_FLAGS = {"resume", "overwrite", "allow_flag_changes", "stop_at_step", "track", "wandb_project", "device",
                     "compile", "micro_batch_size", "gradient_checkpointing", "logp_chunk_tokens", "output_dir"}
_held_locks = []  # open lock files: the lock lasts as long as the process


# SIGTERM is what SLURM, Kubernetes and spot instances send before they kill; SIGUSR1 is
# SLURM's requeue signal. Either one ends the run after the step in progress, with a saved
# checkpoint (evaluate_save_or_stop), so the work done is kept.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_preempted_by: list[int] = []


def _note_preemption(number, frame) -> None:
    _preempted_by.append(number)


def claim_output_dir(args, own_outputs: tuple[str, ...] = ()) -> dict | None:
    """Under torchrun rank 0 claims the folder (as below) and the other ranks follow its
    outcome: they stop when it stops, and read the same trainer state. From here on a
    preemption signal saves a checkpoint after the current step instead of killing."""
    for number in PREEMPTION_SIGNALS:
        signal.signal(number, _note_preemption)
    if distributed.world_size() == 1:
        return _claim_output_dir(args, own_outputs)
    outcome = None
    if distributed.is_main():
        try:
            outcome = "state" if _claim_output_dir(args, own_outputs) is not None else "fresh"
        except SystemExit:
            distributed.broadcast_object("stop")
            raise
    outcome = distributed.broadcast_object(outcome)
    if outcome == "stop":
        raise SystemExit(1)
    return load_trainer_state(Path(args.output_dir)) if outcome == "state" else None


def _claim_output_dir(args, own_outputs: tuple[str, ...]) -> dict | None:
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
                         if entry.name not in RUN_OUTPUTS | set(own_outputs) and not entry.name.endswith(".tmp"))
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


def _jsonable(value):
    """Flags as JSON stores them (tuples become lists), for comparing with run.json."""
    return json.loads(json.dumps(value, default=str))


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
