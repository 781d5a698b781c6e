"""Checkpoints: atomic saves that `from_pretrained` loads, the save/evaluate/stop
cadence after every step (preemption signals included), and the guards that keep
non-finite weights out of them."""

import dataclasses
import math
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from shared import distributed
from shared.runfolder import CHECKPOINT, COMPLETE, TRAINER_STATE, _jsonable, _preempted_by


def _kept_checkpoint(output_dir: Path) -> str:
    state = output_dir / CHECKPOINT / TRAINER_STATE
    if not state.exists():
        return "no checkpoint had been saved yet"
    try:
        step = torch.load(state, weights_only=True, mmap=True)["step"]
    except Exception:  # a damaged or foreign file: still say where it is, never unpickle code
        step = "unknown"
    return f"the last checkpoint (step {step}) is kept in {output_dir / CHECKPOINT}"


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
