"""--generation-batch-size: every generation outside the training step (evaluation,
AAPA's discriminator fit and anchor metrics) runs at most that many prompts at once,
and chunking does not change what a seeded draw gives."""

import json

import numpy as np
import torch
from conftest import run_main
from test_scripts import grpo_flags

import shared.evaluation
import shared.rollout
from shared.modeling import load_model, load_tokenizer
from shared.rollout import generate_rollouts, generate_texts


def test_chunked_generation_draws_what_one_call_draws(tiny_world):
    tokenizer, model = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    prompts = ["copy abc", "reverse abd", "upper xy", "copy q", "reverse long words", "x"]
    seeds = list(range(10, 16))
    whole = generate_rollouts(model, tokenizer, prompts, 1, 8, 1.0, seeds=seeds)["texts"]
    assert generate_texts(model, tokenizer, prompts, 4, 8, 1.0, seeds=seeds) == whole
    assert generate_texts(model, tokenizer, prompts, 1, 8, do_sample=False) == \
        generate_rollouts(model, tokenizer, prompts, 1, 8, do_sample=False)["texts"]


def test_aapa_generates_at_most_the_chunk_outside_its_steps(tiny_world, tmp_path, monkeypatch):
    sizes = []
    real = shared.rollout.generate_rollouts

    def counting(model, tokenizer, prompts, group_size=1, *args, **kwargs):
        sizes.append((len(prompts), group_size))
        return real(model, tokenizer, prompts, group_size, *args, **kwargs)

    monkeypatch.setattr(shared.rollout, "generate_rollouts", counting)  # training steps, the fit's and anchor texts
    monkeypatch.setattr(shared.evaluation, "generate_rollouts", counting)  # held-out evaluation
    monkeypatch.setenv("TQDM_DISABLE", "1")
    flags = grpo_flags(tiny_world, tmp_path / "aapa", tiny_world["model"]) + [
        "--expert-cache", tiny_world["expert_cache"], "--expert-pool", tiny_world["train"], "--disc-prompts", "32",
        "--steps", "2", "--generation-batch-size", "3", "--no-compile"]
    assert run_main("algos/aapa.py", *flags) is None
    outside = [count for count, group in sizes if group == 1]
    inside = [count for count, group in sizes if group > 1]
    assert inside == [2, 2]  # the two training steps' --prompts-per-step
    assert max(outside) == 3 and len(outside) >= 32 // 3  # the fit's rollouts alone take 11 calls
    assert torch.load(tmp_path / "aapa" / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] == 2
    # each phase's peak memory is logged (scripts/real_shape.py tabulates them)
    metrics = [json.loads(line) for line in (tmp_path / "aapa" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "perf/peak_setup_memory_gib" in m] == [1]
    assert [m["step"] for m in metrics if "perf/peak_memory_gib" in m] == [1, 2]
    assert [m["step"] for m in metrics if "perf/peak_eval_memory_gib" in m] == [0, 2]
    assert all(0 < m[k] < 64 for m in metrics for k in m if k.startswith("perf/peak"))


def test_memory_peaks_restart_at_every_take():
    from shared.runlog import take_memory_peak

    take_memory_peak()
    block = np.ones(2**26)  # 0.5 GiB, touched
    block.sum()
    del block
    during, after = take_memory_peak(), take_memory_peak()
    assert during - after > 0.4
