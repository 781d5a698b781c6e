"""Seeds: every random draw of a step comes from a seed of (run seed, step), so a
resumed run draws what the uninterrupted one would have, with no RNG state saved."""

import os
import random

import numpy as np
import torch


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
