"""CHORD's math against docs/algorithms.md: the mu schedule, the phi-weighted expert NLL
(detached and not) and the mixed loss, on hand-made tensors and a toy policy."""

import math

import pytest
import torch
from test_losses import grad_of_logp, toy_policy

from algos.chord import chord_loss, grpo_loss, mu_schedule, sft_phi_loss


def test_mu_schedule_boundaries_and_midpoints():
    warmup, decay, peak, valley = 10, 20, 0.8, 0.1
    assert mu_schedule(0, warmup, decay, peak, valley) == 0.0
    assert mu_schedule(5, warmup, decay, peak, valley) == pytest.approx(0.4)
    assert mu_schedule(10, warmup, decay, peak, valley) == pytest.approx(peak)
    assert mu_schedule(20, warmup, decay, peak, valley) == pytest.approx((peak + valley) / 2)  # cos(pi/2) = 0
    assert mu_schedule(25, warmup, decay, peak, valley) == pytest.approx(valley + (peak - valley) * 0.5 * (1 + math.cos(0.75 * math.pi)))
    assert mu_schedule(30, warmup, decay, peak, valley) == pytest.approx(valley)
    assert mu_schedule(1000, warmup, decay, peak, valley) == valley
    # no warmup: starts at the peak; no decay: the valley right after the warmup
    assert mu_schedule(0, 0, 200, 0.9, 0.05) == pytest.approx(0.9)
    assert mu_schedule(0, 0, 0, 0.1, 0.1) == pytest.approx(0.1)
    assert mu_schedule(7, 0, 0, 0.3, 0.1) == pytest.approx(0.1)


def test_sft_phi_loss_value_and_plain_sft():
    logps = torch.tensor([[-0.1, -2.0, -0.7], [-1.2, -0.01, -5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    p = logps.exp()
    expected = -(p * (1 - p) * logps * mask).sum() / 5
    assert sft_phi_loss(logps, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sft_phi_loss(logps, mask, detach_phi=False).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sft_phi_loss(logps, mask, use_phi=False).item() == pytest.approx((-(logps * mask).sum() / 5).item(), rel=1e-6)
    assert sft_phi_loss(logps, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize("detach_phi", [True, False])
def test_sft_phi_gradient_closed_form(detach_phi):
    theta, targets, logps = toy_policy(seed=5)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]])
    sft_phi_loss(logps, mask, detach_phi=detach_phi).backward()
    lp = logps.detach()
    p = lp.exp()
    phi = p * (1 - p)
    # d(-phi * logp)/d logp: -phi with phi constant; -(phi + logp * dphi/dlogp), dphi/dlogp = p - 2p^2, otherwise
    d_logp = -phi if detach_phi else -(phi + lp * (p - 2 * p * p))
    expected = (d_logp * mask / mask.sum())[..., None] * grad_of_logp(theta, targets)
    assert torch.allclose(theta.grad, expected, atol=1e-12)


def test_detaching_phi_changes_the_gradient():
    grads = []
    for detach_phi in (True, False):
        theta, targets, logps = toy_policy(seed=6)
        sft_phi_loss(logps, torch.ones(3, 4), detach_phi=detach_phi).backward()
        grads.append(theta.grad)
    assert not torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sft_phi_matches_finite_differences():
    theta, targets, _ = toy_policy(seed=7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])

    def f(t):
        return sft_phi_loss(torch.log_softmax(t, -1).gather(-1, targets[..., None]).squeeze(-1), mask, detach_phi=False)

    assert torch.autograd.gradcheck(f, (theta,))


@pytest.mark.parametrize("mu", [0.0, 0.3, 1.0])
def test_chord_loss_mixes_both_terms(mu):
    theta, targets, logps = toy_policy(seed=8)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    expert_theta, expert_targets, expert_logps = toy_policy(seed=9, batch=2, length=5)
    expert_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    loss, metrics = chord_loss(logps, logps.detach(), None, adv, mask, expert_logps, expert_mask, mu)
    loss.backward()
    rl = grpo_loss(logps.detach(), logps.detach(), None, adv, mask)[0]
    expert = sft_phi_loss(expert_logps.detach(), expert_mask)
    assert loss.item() == pytest.approx(((1 - mu) * rl + mu * expert).item(), abs=1e-12)
    assert metrics["rl_loss"].item() == pytest.approx(rl.item()) and metrics["expert_loss"].item() == pytest.approx(expert.item())
    m = mask.double()
    expected_policy = ((1 - mu) * -adv[:, None] * m / m.sum())[..., None] * grad_of_logp(theta, targets)
    assert torch.allclose(theta.grad, expected_policy, atol=1e-12)
    p = expert_logps.detach().exp()
    expected_expert = (mu * -p * (1 - p) * expert_mask / expert_mask.sum())[..., None] * grad_of_logp(expert_theta, expert_targets)
    assert torch.allclose(expert_theta.grad, expected_expert, atol=1e-12)


def test_chord_micro_steps_add_up_to_the_full_batch():
    _, _, logps = toy_policy(seed=10, batch=4)
    _, _, expert_logps = toy_policy(seed=11, batch=4, length=3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])
    expert_mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 1, 1]])
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    full, _ = chord_loss(logps, logps, None, adv, mask, expert_logps, expert_mask, 0.4)
    parts = sum(chord_loss(logps[s], logps[s], None, adv[s], mask[s], expert_logps[e], expert_mask[e], 0.4,
                           num_expert_tokens=expert_mask.sum(), num_sequences=4, num_tokens=mask.sum())[0]
                for s, e in ((slice(0, 2), slice(0, 3)), (slice(2, 4), slice(3, 4))))
    assert parts.item() == pytest.approx(full.item(), rel=1e-9)


def test_extreme_expert_logps_stay_finite():
    expert_logps = torch.tensor([[-1e4, 0.0, -30.0]], requires_grad=True)
    for detach_phi in (True, False):
        loss = sft_phi_loss(expert_logps, torch.ones(1, 3), detach_phi=detach_phi)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(expert_logps.grad).all()


def test_compiled_chord_loss_equals_eager():
    _, _, logps = toy_policy(seed=12)
    _, _, expert_logps = toy_policy(seed=13, batch=2, length=5)
    logps, expert_logps = logps.float().detach(), expert_logps.float().detach()
    mask, expert_mask = torch.ones(3, 4), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    adv = torch.tensor([0.7, -1.3, 2.0])
    compiled = torch.compile(chord_loss, dynamic=True)
    for mu in (0.1, 0.7):
        eager, _ = chord_loss(logps, logps - 0.1, None, adv, mask, expert_logps, expert_mask, mu, detach_phi=False)
        comp, _ = compiled(logps, logps - 0.1, None, adv, mask, expert_logps, expert_mask, mu, detach_phi=False)
        assert torch.allclose(eager, comp, atol=1e-6)
