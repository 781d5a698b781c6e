"""ADPO's math against docs/algorithms.md: anchored listwise and pairwise losses, their
closed-form gradients, the DPO special case and the adaptive temperature."""

import pytest
import torch
import torch.nn.functional as F
from test_losses import grad_of_logp, toy_policy

from algos.adpo import adaptive_tau, adpo_listwise_loss, group_advantages, group_entropy, sequence_logps
from algos.adpo_pairwise import adpo_pairwise_loss


def listwise_batch(seed=0):
    theta, targets, logps = toy_policy(seed=seed, batch=6, length=4)  # 2 groups of G = 3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    anchor = logps.detach() + 0.1 * torch.randn(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.2, 0.9, 0.2], dtype=torch.float64), 3)
    tau = torch.tensor([0.7, 1.3], dtype=torch.float64)
    return theta, targets, logps, anchor, mask, advantages, tau


def test_listwise_loss_value_matches_formula():
    _, _, logps, anchor, mask, advantages, tau = listwise_batch()
    loss, _ = adpo_listwise_loss(logps, anchor, mask, advantages, tau, 3, beta_r=0.5)
    expected = 0.0
    for g in range(2):
        rows = range(3 * g, 3 * g + 3)
        u = torch.stack([((logps[i] - anchor[i]) * mask[i]).sum() / tau[g] for i in rows])
        q = torch.softmax(torch.stack([advantages[i] for i in rows]) / 0.5, 0)
        expected = expected - (q * torch.log_softmax(u, 0)).sum()
    assert loss.item() == pytest.approx(expected.item() / 2, rel=1e-10)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_listwise_gradient_closed_form(length_normalize):
    theta, targets, logps, anchor, mask, advantages, tau = listwise_batch(seed=1)
    loss, _ = adpo_listwise_loss(logps, anchor, mask, advantages, tau, 3, length_normalize=length_normalize)
    loss.backward()
    l = sequence_logps(logps.detach(), mask, length_normalize) - sequence_logps(anchor, mask, length_normalize)
    u = (l.view(2, 3) / tau[:, None])
    weights = ((torch.softmax(u, 1) - torch.softmax(advantages.view(2, 3) / 0.5, 1)) / tau[:, None] / 2).reshape(6)
    # d l_i / d logp[i, t] = m[i, t] (or m[i, t] / |y_i| with length normalisation)
    d_l = mask.double() / (mask.sum(1, keepdim=True) if length_normalize else 1)
    expected = (weights[:, None] * d_l)[..., None] * grad_of_logp(theta, targets)
    assert torch.allclose(theta.grad, expected, atol=1e-12)


def test_listwise_at_the_anchor_weights_are_uniform_minus_target():
    theta, targets, logps, _, mask, advantages, tau = listwise_batch(seed=2)
    loss, metrics = adpo_listwise_loss(logps, logps.detach(), mask, advantages, tau, 3)
    loss.backward()
    q = torch.softmax(advantages.view(2, 3) / 0.5, 1)
    weights = ((1 / 3 - q) / tau[:, None] / 2).reshape(6)
    expected = (weights[:, None] * mask.double())[..., None] * grad_of_logp(theta, targets)
    assert torch.allclose(theta.grad, expected, atol=1e-12)
    assert metrics["u_abs"].item() == 0.0


def test_listwise_with_kl_matches_finite_differences():
    theta, targets, _, anchor, mask, advantages, tau = listwise_batch(seed=3)

    def f(t):
        lp = torch.log_softmax(t, -1).gather(-1, targets[..., None]).squeeze(-1)
        return adpo_listwise_loss(lp, anchor, mask, advantages, tau, 3, beta=0.2)[0]

    assert torch.autograd.gradcheck(f, (theta,))


def test_listwise_micro_batches_add_up():
    _, _, logps, anchor, mask, advantages, tau = listwise_batch(seed=4)
    kwargs = dict(beta=0.1, num_groups=2, num_tokens=mask.sum())
    full, _ = adpo_listwise_loss(logps, anchor, mask, advantages, tau, 3, beta=0.1)
    parts = sum(adpo_listwise_loss(logps[s], anchor[s], mask[s], advantages[s], tau[g], 3, **kwargs)[0]
                for s, g in ((slice(0, 3), slice(0, 1)), (slice(3, 6), slice(1, 2))))
    assert parts.item() == pytest.approx(full.item(), rel=1e-10)


def test_pairwise_hard_labels_equal_dpo():
    g = torch.Generator().manual_seed(0)
    policy_c, policy_r, ref_c, ref_r = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    policy_c.requires_grad_(True)
    beta = 0.1
    loss, metrics = adpo_pairwise_loss(policy_c, policy_r, ref_c, ref_r, 1.0, 1 / beta)
    dpo = -F.logsigmoid(beta * ((policy_c - ref_c) - (policy_r - ref_r))).mean()
    assert loss.item() == pytest.approx(dpo.item(), rel=1e-12)
    loss.backward()
    grad_loss = policy_c.grad.clone()
    policy_c.grad = None
    dpo.backward()
    assert torch.allclose(grad_loss, policy_c.grad, atol=1e-14)
    assert metrics["accuracy"].item() == pytest.approx(((policy_c - ref_c) > (policy_r - ref_r)).double().mean().item())


def test_pairwise_soft_labels_and_gradient():
    chosen = torch.tensor([-3.0, -1.0, -6.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.0, -4.0, -5.0], dtype=torch.float64)
    ref_c, ref_r = torch.tensor([-2.5, -2.0, -6.0], dtype=torch.float64), torch.tensor([-2.0, -3.0, -4.0], dtype=torch.float64)
    q, tau = torch.tensor([0.9, 0.6, 0.5], dtype=torch.float64), 2.0
    loss, _ = adpo_pairwise_loss(chosen, rejected, ref_c, ref_r, q, tau)
    d = ((chosen.detach() - ref_c) - (rejected - ref_r)) / tau
    expected = -(q * F.logsigmoid(d) + (1 - q) * F.logsigmoid(-d)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()  # d/d l_c = (sigmoid(d) - q) / tau / N
    assert torch.allclose(chosen.grad, (torch.sigmoid(d) - q) / tau / 3, atol=1e-14)
    halves = adpo_pairwise_loss(chosen[:1], rejected[:1], ref_c[:1], ref_r[:1], q[:1], tau, num_pairs=3)[0] + \
        adpo_pairwise_loss(chosen[1:], rejected[1:], ref_c[1:], ref_r[1:], q[1:], tau, num_pairs=3)[0]
    assert halves.item() == pytest.approx(loss.item(), rel=1e-12)


def test_adaptive_tau_formula_and_bounds():
    entropy = torch.tensor([0.1, 0.5, 0.0])
    reward = torch.tensor([0.2, 1.0, 0.6])  # normalised to 0, 1, 0.5
    tau = adaptive_tau(entropy, reward, tau0=0.8, alpha=1.0, reward_coef=0.5, tau_min=0.1, tau_max=5.0)
    expected = [0.8 * (1 + 0.1 + 0.5 * 0.9 * 1.0), 0.8 * (1 + 0.5 + 0.0), 0.8 * (1 + 0.0 + 0.5 * 1.0 * 0.5)]
    assert tau.tolist() == pytest.approx(expected, rel=1e-6)
    equal = adaptive_tau(torch.zeros(2), torch.tensor([0.3, 0.3]), tau0=1.0, alpha=1.0, reward_coef=1.0)
    assert equal.tolist() == pytest.approx([1.5, 1.5])  # R = 0.5 when every group has the same mean reward
    # H outside [0, 1] is clamped to it before the formula: 1e6 -> 1, -3 -> 0 (R = 0, 1, 0.5)
    extreme = adaptive_tau(torch.tensor([0.0, 1e6, -3.0]), torch.tensor([0.0, 1.0, 0.5]), tau0=1.0, tau_max=100.0)
    assert extreme.tolist() == pytest.approx([1 + 1.0, 1 + 1.0, 1 + 0.5])
    assert adaptive_tau(torch.zeros(1), torch.zeros(1), tau0=10.0, tau_max=2.0).item() == pytest.approx(2.0)
    assert adaptive_tau(torch.zeros(1), torch.ones(1), tau0=0.01, tau_min=0.1).item() == pytest.approx(0.1)


def test_all_equal_rewards_and_extremes_stay_finite():
    logps = torch.tensor([[-1e4, 0.0], [-1.0, -2.0], [0.0, 0.0], [-3.0, -1e4]])
    anchor = torch.tensor([[0.0, -1e4], [-1.0, -2.0], [-1e4, 0.0], [0.0, 0.0]])
    adv = group_advantages(torch.tensor([0.5, 0.5, 0.0, 1.0]), 2)
    assert torch.equal(adv[:2], torch.zeros(2))
    for mask in (torch.ones(4, 2), torch.zeros(4, 2)):
        loss, metrics = adpo_listwise_loss(logps, anchor, mask, adv, torch.tensor([0.1, 5.0]), 2, beta=0.1)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    loss, metrics = adpo_pairwise_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-1e4]), 0.7, 0.01)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


def test_compiled_adpo_losses_equal_eager():
    _, _, logps, anchor, mask, advantages, tau = listwise_batch(seed=5)
    logps, anchor, advantages, tau = logps.float().detach(), anchor.float(), advantages.float(), tau.float()
    eager, _ = adpo_listwise_loss(logps, anchor, mask, advantages, tau, 3, beta=0.1)
    compiled, _ = torch.compile(adpo_listwise_loss, dynamic=True)(logps, anchor, mask, advantages, tau, 3, beta=0.1)
    assert torch.allclose(eager, compiled, atol=1e-6)
    seq = sequence_logps(logps, mask)
    eager, _ = adpo_pairwise_loss(seq[:3], seq[3:], anchor[:3, 0], anchor[3:, 0], torch.tensor([1.0, 0.7, 0.5]), 2.0)
    compiled, _ = torch.compile(adpo_pairwise_loss, dynamic=True)(seq[:3], seq[3:], anchor[:3, 0], anchor[3:, 0],
                                                                   torch.tensor([1.0, 0.7, 0.5]), 2.0)
    assert torch.allclose(eager, compiled, atol=1e-6)


def test_group_entropy_averages_per_sequence_first():
    # group of 2: a 1-token sequence with entropy 3 and a 3-token one with entropy 1 each;
    # per sequence first gives (3 + 1) / 2 = 2, token-weighted would give 6 / 4 = 1.5
    entropies = torch.tensor([[3.0, 9.0, 9.0], [1.0, 1.0, 1.0], [2.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert torch.allclose(group_entropy(entropies, mask, 2), torch.tensor([2.0, 3.0]))
