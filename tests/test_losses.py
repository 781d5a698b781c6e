"""Parity and gradient tests of the SFT and GRPO math against docs/algorithms.md,
on hand-made tensors and a toy differentiable 'policy'."""

import math

import pytest
import torch

from algos.grpo import group_advantages, grpo_loss
from algos.sft import sft_loss


def toy_policy(seed=0, batch=3, length=4, vocab=5):
    """logps[b, t] = log_softmax(theta[b, t])[target[b, t]]: a differentiable stand-in
    for a model, whose gradient we can also write by hand."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(vocab, (batch, length), generator=g)
    logps = torch.log_softmax(theta, -1).gather(-1, targets[..., None]).squeeze(-1)
    return theta, targets, logps


def grad_of_logp(theta, targets):
    """d logp[b,t] / d theta[b,t,:] = onehot(target) - softmax(theta)."""
    return torch.nn.functional.one_hot(targets, theta.size(-1)).double() - torch.softmax(theta.detach(), -1)


# ---------------------------------------------------------------- advantages
def test_group_advantages_match_formula():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.9])
    adv = group_advantages(rewards, 3)
    for g in range(2):
        r = rewards[3 * g:3 * g + 3].tolist()
        mean = sum(r) / 3
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2)  # Bessel
        for i in range(3):
            assert adv[3 * g + i].item() == pytest.approx((r[i] - mean) / (std + 1e-4), rel=1e-5)


def test_group_advantages_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    centred = torch.tensor([0.5, -0.5, 0.0, 0.0])
    assert torch.allclose(group_advantages(rewards, 2, "none"), centred)
    assert torch.allclose(group_advantages(rewards, 2, "batch"), centred / (rewards.std() + 1e-4))


def test_all_equal_rewards_give_zero_advantage_not_nan():
    adv = group_advantages(torch.full((8,), 0.7), 4)
    assert torch.equal(adv, torch.zeros(8))


# ---------------------------------------------------------------- aggregation
def per_token_loss_reference(logps, old, adv, eps_low, eps_high):
    rho = torch.exp(logps - old)
    a = adv[:, None]
    return -torch.minimum(rho * a, torch.clamp(rho, 1 - eps_low, 1 + eps_high) * a)


@pytest.fixture
def hand_batch():
    logps = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.2, -0.1, -4.0, -1.0], [-1.5, -1.5, -1.5, -1.5]])
    old = logps + torch.tensor([[0.1, -0.3, 0.0, 0.5], [0.0, 0.2, -0.1, 0.0], [0.4, -0.4, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -0.5, 2.0])
    return logps, old, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_aggregation_matches_definition(hand_batch, loss_type):
    logps, old, adv, mask = hand_batch
    per_token = per_token_loss_reference(logps, old, adv, 0.2, 0.28)
    m = mask.float()
    expected = {
        "grpo": sum((per_token[b] * m[b]).sum() / m[b].sum() for b in range(3)) / 3,
        "bnpo": (per_token * m).sum() / m.sum(),
        "dr_grpo": (per_token * m).sum() / (3 * 6),
        "dapo": (per_token * m).sum() / m.sum(),
    }[loss_type]
    loss, _ = grpo_loss(logps, old, None, adv, mask, eps_low=0.2, eps_high=0.28, loss_type=loss_type,
                        max_completion_length=6)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])  # bnpo normalises per micro-batch, as TRL does
def test_micro_batches_add_up_to_full_batch(hand_batch, loss_type):
    logps, old, adv, mask = hand_batch
    kwargs = dict(loss_type=loss_type, max_completion_length=4, beta=0.1)
    ref = logps - 0.3
    full, _ = grpo_loss(logps, old, ref, adv, mask, **kwargs)
    parts = sum(grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], num_sequences=3, num_tokens=mask.sum(), **kwargs)[0]
                for s in (slice(0, 1), slice(1, 3)))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_sequence_level_importance_sampling(hand_batch):
    logps, old, adv, mask = hand_batch
    m = mask.float()
    seq_log_ratio = ((logps - old) * m).sum(1) / m.sum(1)
    rho = torch.exp(seq_log_ratio)[:, None].expand_as(logps)
    a = adv[:, None]
    per_token = -torch.minimum(rho * a, torch.clamp(rho, 0.8, 1.2) * a)
    loss, _ = grpo_loss(logps, old, None, adv, mask, importance_sampling_level="sequence", loss_type="bnpo")
    assert loss.item() == pytest.approx(((per_token * m).sum() / m.sum()).item(), rel=1e-6)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_at_rho_one_is_minus_advantage_times_grad_logp(loss_type):
    theta, targets, logps = toy_policy()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    loss, _ = grpo_loss(logps, logps.detach(), None, adv, mask, loss_type=loss_type, max_completion_length=5)
    loss.backward()
    m = mask.double()
    weight = {  # d loss / d logp[b, t] = -A_b * w[b, t], by the aggregation
        "grpo": m / m.sum(1, keepdim=True) / 3, "bnpo": m / m.sum(), "dr_grpo": m / (3 * 5), "dapo": m / m.sum(),
    }[loss_type]
    expected = (-adv[:, None] * weight)[..., None] * grad_of_logp(theta, targets)
    assert torch.allclose(theta.grad, expected, atol=1e-12)


def test_clipped_region_has_zero_gradient():
    theta, targets, logps = toy_policy(seed=1, batch=2, length=3)
    mask = torch.ones(2, 3)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    # rho = e^0.5 > 1.2 with A > 0, and rho = e^-0.5 < 0.8 with A < 0: both clipped
    old = logps.detach() - torch.tensor([[0.5], [-0.5]], dtype=torch.float64)
    loss, metrics = grpo_loss(logps, old, None, adv, mask)
    loss.backward()
    assert torch.count_nonzero(theta.grad) == 0
    assert metrics["clip_ratio/high"].item() == pytest.approx(0.5)
    assert metrics["clip_ratio/low"].item() == pytest.approx(0.5)


def test_kl_term_gradient_closed_form():
    theta, targets, logps = toy_policy(seed=2)
    mask = torch.ones(3, 4)
    ref = logps.detach() + torch.linspace(-1, 1, 12, dtype=torch.float64).view(3, 4)
    beta = 0.3
    # advantages 0: only the KL term is left; d/dlogp [e^(ref-logp) - (ref-logp) - 1] = 1 - e^(ref-logp)
    loss, metrics = grpo_loss(logps, logps.detach(), ref, torch.zeros(3, dtype=torch.float64), mask, beta=beta)
    loss.backward()
    d_logp = beta * (1 - torch.exp(ref - logps.detach())) / 12
    assert torch.allclose(theta.grad, d_logp[..., None] * grad_of_logp(theta, targets), atol=1e-12)
    delta = ref - logps.detach()
    assert metrics["kl"].item() == pytest.approx((torch.exp(delta) - delta - 1).mean().item())


def test_grpo_loss_matches_finite_differences_off_policy():
    theta, targets, _ = toy_policy(seed=3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 1.5], dtype=torch.float64)
    old = torch.log_softmax(theta.detach() + 0.05 * torch.randn_like(theta), -1).gather(-1, targets[..., None]).squeeze(-1)
    ref = old - 0.1

    def f(t):
        lp = torch.log_softmax(t, -1).gather(-1, targets[..., None]).squeeze(-1)
        return grpo_loss(lp, old, ref, adv, mask, beta=0.05, loss_type="grpo")[0]

    assert torch.autograd.gradcheck(f, (theta,))


def test_empty_completions_and_extreme_ratios_stay_finite():
    logps = torch.tensor([[-1.0, -2.0], [-1e4, 0.0]])
    old = torch.tensor([[-1.0, -2.0], [0.0, -1e4]])
    for loss_type in ["grpo", "bnpo", "dr_grpo", "dapo"]:
        loss, metrics = grpo_loss(logps, old, old, torch.tensor([1.0, -1.0]), torch.zeros(2, 2), beta=0.1, loss_type=loss_type)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        loss, metrics = grpo_loss(logps, old, old, torch.tensor([1.0, -1.0]), torch.ones(2, 2), beta=0.1, loss_type=loss_type)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


# ---------------------------------------------------------------- SFT
def test_sft_loss_is_token_mean_nll_and_accumulates():
    theta, targets, logps = toy_policy(seed=4)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]])
    loss = sft_loss(logps, mask)
    assert loss.item() == pytest.approx((-(logps * mask).sum() / mask.sum()).item())
    loss.backward()
    expected = (-mask.double() / mask.sum())[..., None] * grad_of_logp(theta, targets)
    assert torch.allclose(theta.grad, expected, atol=1e-12)
    parts = sft_loss(logps[:1], mask[:1], mask.sum()) + sft_loss(logps[1:], mask[1:], mask.sum())
    assert parts.item() == pytest.approx(loss.item())
    assert sft_loss(logps, torch.zeros_like(mask)).item() == 0.0


# ---------------------------------------------------------------- compiled == eager
def test_compiled_and_eager_agree(hand_batch):
    logps, old, adv, mask = hand_batch
    compiled_loss = torch.compile(grpo_loss, dynamic=True)
    compiled_adv = torch.compile(group_advantages, dynamic=True)
    compiled_sft = torch.compile(sft_loss, dynamic=True)
    for loss_type in ["grpo", "dapo"]:
        eager, eager_metrics = grpo_loss(logps, old, logps - 0.2, adv, mask, beta=0.1, loss_type=loss_type)
        comp, comp_metrics = compiled_loss(logps, old, logps - 0.2, adv, mask, beta=0.1, loss_type=loss_type)
        assert torch.allclose(eager, comp, atol=1e-6)
        assert all(torch.allclose(eager_metrics[k], comp_metrics[k], atol=1e-6) for k in eager_metrics)
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.3, 0.3])
    assert torch.allclose(compiled_adv(rewards, 3), group_advantages(rewards, 3), atol=1e-6)
    assert torch.allclose(compiled_sft(logps, mask), sft_loss(logps, mask), atol=1e-6)
