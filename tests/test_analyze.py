"""The main job's KL column: k3 summed over tokens is exactly 0 for a model against itself, and
agrees with the exact per-context KL (computed from full softmaxes) for two different models."""

import sys

import pytest
import torch
from conftest import ROOT

from shared.logprobs import naive_completion_logps
from shared.modeling import build_tiny_model, load_model, load_tokenizer
from shared.rollout import generate_rollouts
from shared.toyworld import make_split, oracle

sys.path.insert(0, str(ROOT / "scripts"))
from analyze import analyze_run  # noqa: E402


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    small = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    return build_tiny_model(root / "a", seed=0, **small), build_tiny_model(root / "b", seed=1, **small)


def exact_kl(policy_dir, reference_dir, prompts, max_new_tokens) -> float:
    """Mean over the same samples analyze_run draws of sum_t KL(pi(.|context_t) || ref(.|context_t))."""
    tokenizer, policy, reference = load_tokenizer(str(policy_dir)), load_model(str(policy_dir)), load_model(str(reference_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        sampled = generate_rollouts(policy, tokenizer, prompts, 1, max_new_tokens, temperature=1.0)
        ids = torch.cat([sampled["prompt_ids"], sampled["completion_ids"]], 1)
        mask = torch.cat([sampled["prompt_mask"], sampled["completion_mask"]], 1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        start = sampled["prompt_ids"].size(1)
        log_p, log_q = (torch.log_softmax(m(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, start - 1:-1], -1)
                        for m in (policy, reference))
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1) * sampled["completion_mask"]
    return float(per_token.sum(1).mean())


def test_k3_kl_is_zero_against_itself_and_matches_the_exact_kl(two_models):
    first, second = two_models
    rows = make_split(64, seed=3)
    prompts, expert = [r["prompt"] for r in rows], [oracle(r) for r in rows]
    same = analyze_run(first, first, prompts, expert, max_new_tokens=8)
    assert same["kl"] == 0.0 and same["kl_estimator"] == "k3"
    assert len(same["lengths"]) == len(same["own_logprob"]) == len(same["expert_logprob"]) == 64
    different = analyze_run(second, first, prompts, expert, max_new_tokens=8)
    exact = exact_kl(second, first, prompts, max_new_tokens=8)
    assert exact > 0.01
    assert different["kl"] == pytest.approx(exact, rel=0.25)


def test_own_logprob_scores_the_tokens_the_policy_emitted_and_no_eos_it_did_not(two_models):
    first, _ = two_models
    prompts = [r["prompt"] for r in make_split(8, seed=4)]
    result = analyze_run(first, first, prompts, [oracle(r) for r in make_split(8, seed=4)], max_new_tokens=6)
    tokenizer, policy = load_tokenizer(str(first)), load_model(str(first))
    with torch.no_grad():
        greedy = generate_rollouts(policy, tokenizer, prompts, 1, 6, do_sample=False)
        ids = torch.cat([greedy["prompt_ids"], greedy["completion_ids"]], 1)
        mask = torch.cat([greedy["prompt_mask"], greedy["completion_mask"]], 1)
        logps, _ = naive_completion_logps(policy, ids, mask, greedy["prompt_ids"].size(1))
    emitted = greedy["completion_mask"].float()
    assert greedy["truncated"].any()  # an untrained model: some responses end without an eos
    expected = (logps * emitted).sum(1) / emitted.sum(1)
    assert result["own_logprob"] == pytest.approx(expected.tolist(), abs=1e-5)
