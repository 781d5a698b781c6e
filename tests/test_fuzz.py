"""Fuzz-style checks across every algorithm: random malformed dataset rows give a
clear one-line error naming the problem (or load), and random tensors with edge
values (huge log-ratios, -1e4 log-probs, empty masks, equal rewards) give finite
losses, advantages and metrics from every pure function."""

import json
import random

import pytest
import torch

import algos.aapa as aapa
import algos.adpo as adpo
import algos.adpo_pairwise as adpo_pairwise
import algos.chord as chord
import algos.gpm as gpm
import algos.gprl as gprl
import algos.grpo as grpo
import algos.sft as sft
import algos.uniapl as uniapl
from shared import discriminator
from shared.data import keep_short_prompts, load_expert_cache, load_rows
from shared.modeling import build_tiny_tokenizer, chat_prompt

BAD_VALUES = [None, "", 0, 3.5, [], ["x"], {"a": 1}, True]


def random_row(rng: random.Random) -> dict:
    row = {"prompt": "copy abc", "instruction_id_list": ["toy:task:copy"], "kwargs": [{"text": "abc"}]}
    field = rng.choice(["prompt", "instruction_id_list", "drop_prompt", "drop_ids", "extra"])
    if field == "drop_prompt":
        del row["prompt"]
    elif field == "drop_ids":
        del row["instruction_id_list"]
    elif field == "extra":
        row["unexpected"] = rng.choice(BAD_VALUES)
    else:
        row[field] = rng.choice(BAD_VALUES)
    return row


@pytest.mark.parametrize("seed", range(12))
def test_malformed_rows_give_a_clear_error_or_load(tmp_path, seed):
    rng = random.Random(seed)
    good = {"prompt": "copy abc", "instruction_id_list": ["toy:task:copy"], "kwargs": [{"text": "abc"}]}
    lines = [json.dumps(good) for _ in range(rng.randint(0, 3))]
    lines.insert(rng.randint(0, len(lines)), json.dumps(random_row(rng)))
    if rng.random() < 0.3:
        lines.insert(rng.randint(0, len(lines)), rng.choice(['{"prompt": ', "not json", '{"prompt": "a",}']))
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    try:
        rows = load_rows(str(path))
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message
        assert "row" in message or "could not be read" in message or "no rows" in message
    else:
        assert all(isinstance(r["prompt"], str) and r["prompt"] and r["instruction_id_list"] is not None for r in rows)


def test_empty_dataset_and_bad_expert_cache_lines(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="could not be read|no rows"):
        load_rows(str(empty))
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": 5}\n')
    with pytest.raises(ValueError, match="line 2: needs string fields 'prompt' and 'response'"):
        load_expert_cache(cache)
    cache.write_text('{"prompt": "a", "response": "b"}\n{broken\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_expert_cache(cache)


def test_long_prompts_are_dropped_with_a_count_or_named_in_an_error(capsys):
    tokenizer = build_tiny_tokenizer()
    rows = [{"prompt": "copy " + "ab " * n} for n in (1, 40, 2, 60)]
    lengths = [len(tokenizer(chat_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) for r in rows]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit and lengths[3] > limit
    kept = keep_short_prompts(rows, tokenizer, limit, "drop", "d.jsonl")
    assert kept == [rows[0], rows[2]] and "dropped 2 of 4 prompts" in capsys.readouterr().out
    with pytest.raises(ValueError, match=rf"row 1: prompt has {lengths[1]} tokens, more than --max-prompt-tokens {limit} \(2 such"):
        keep_short_prompts(rows, tokenizer, limit, "error", "d.jsonl")
    with pytest.raises(ValueError, match="all 4 prompts are longer"):
        keep_short_prompts(rows, tokenizer, 1, "drop", "d.jsonl")
    assert keep_short_prompts(rows, tokenizer, 0, "error", "d.jsonl") == rows


def edge_tensors(seed: int, batch: int = 4, length: int = 5):
    """Log-probs in [-1e4, 0] (including exact 0 and -1e4), random masks (sometimes all
    zero), advantages and rewards with huge, zero and equal values."""
    g = torch.Generator().manual_seed(seed)
    choice = lambda values, shape: torch.tensor(values)[torch.randint(len(values), shape, generator=g)]
    logps = choice([0.0, -1e-8, -0.5, -30.0, -1e4], (batch, length))
    other = choice([0.0, -1e-8, -0.5, -30.0, -1e4], (batch, length))
    mask = (torch.rand(batch, length, generator=g) < torch.rand(1, generator=g)).long()
    rewards = choice([0.0, 1.0, -1e3, 1e3, 0.5], (batch,))
    if seed % 3 == 0:
        rewards = torch.full((batch,), 0.7)  # all equal
    return logps, other, mask, rewards


def assert_finite(name, *values):
    for value in values:
        if isinstance(value, dict):
            assert_finite(name, *value.values())
        elif isinstance(value, tuple):
            assert_finite(name, *value)
        elif isinstance(value, torch.Tensor):
            assert torch.isfinite(value).all(), f"{name}: {value}"
        elif isinstance(value, float):
            assert value == value and abs(value) != float("inf"), f"{name}: {value}"


@pytest.mark.parametrize("seed", range(20))
def test_every_pure_function_stays_finite_on_edge_values(seed):
    logps, other, mask, rewards = edge_tensors(seed)
    logps.requires_grad_(True)
    adv = grpo.group_advantages(rewards, 2)
    assert_finite("group_advantages", adv)
    checks = {
        "sft_loss": lambda: sft.sft_loss(logps, mask),
        "grpo_loss": lambda: grpo.grpo_loss(logps, other, other, adv, mask, beta=0.1, loss_type=["grpo", "bnpo", "dr_grpo", "dapo"][seed % 4],
                                            importance_sampling_level=["token", "sequence"][seed % 2]),
        "sft_phi_loss": lambda: chord.sft_phi_loss(logps, mask, detach_phi=seed % 2 == 0),
        "chord_loss": lambda: chord.chord_loss(logps, other, other, adv, mask, other, mask, 0.5, beta=0.1),
        "adpo_listwise": lambda: adpo.adpo_listwise_loss(logps, other, mask, adv, torch.tensor([0.1, 5.0]), 2, beta=0.1,
                                                         length_normalize=seed % 2 == 0),
        "adpo_pairwise": lambda: adpo_pairwise.adpo_pairwise_loss(logps.sum(1)[:2], logps.sum(1)[2:], other.sum(1)[:2], other.sum(1)[2:],
                                                         torch.tensor([1.0, 0.3]), 0.05),
        "adaptive_tau": lambda: adpo.adaptive_tau(torch.rand(2) * 3 - 1, rewards[:2]),
        "aapa_advantages": lambda: aapa.aapa_advantages(rewards, other.sum(1), 2, 0.5),
        "aapa_loss": lambda: aapa.aapa_loss(logps, other, other, adv, mask, logps, mask, 0.5, 0.5, use_phi=True, beta=0.1),
        "aapa_scores": lambda: aapa.anchor_scores(rewards * 100),
        "uniapl_policy_loss": lambda: uniapl.uniapl_policy_loss(logps, other, other, adv, mask, logps, mask, 3.0, beta=0.1),
        "uniapl_advantages": lambda: uniapl.uniapl_advantages(rewards, rewards * 1e3, 2, 0.1),
        "dual_update": lambda: uniapl.dual_update(0.5, float(rewards[0]), 0.3, 1.0),
    }
    for name, make in checks.items():
        result = make()
        assert_finite(name, result)
        loss = result[0] if isinstance(result, tuple) else result
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            (grad,) = torch.autograd.grad(loss, logps, allow_unused=True)
            assert grad is None or torch.isfinite(grad).all(), name


@pytest.mark.parametrize("seed", range(10))
def test_preference_model_functions_stay_finite_on_edge_values(seed):
    g = torch.Generator().manual_seed(seed)
    scale = [0.0, 1e-12, 1.0, 1e6][seed % 4]
    v = torch.randn(8, 6, generator=g) * scale  # includes all-zero and identical embeddings
    gate = torch.softmax(torch.randn(8, 3, generator=g) * 50, -1)
    assert_finite("gprl_advantages", gprl.gprl_advantages(v, gate, torch.rand(3, generator=g), 4))
    assert_finite("gpm_loss", gpm.gpm_loss(v[:4], v[4:], gate[:4], torch.rand(4, generator=g), 0.1, torch.rand(4, 3, generator=g), 1.0))
    margins = torch.randn(3, generator=g) * scale
    assert_finite("drift_update", *gprl.drift_update(margins, torch.zeros(3), torch.ones(3), 0.2, 0.0)[:3])
    head = discriminator.make_discriminator(6, 4)
    assert_finite("aapa discriminator", aapa.discriminator_loss(head(v), torch.randint(2, (8,), generator=g)))
    assert_finite("uniapl discriminator", uniapl.online_discriminator_loss(head, v[:4], v[4:], 0.1, 0.5))
