"""AAPA's math: the anchored advantages, the plug-in loss on each base, the
discriminator's loss and score, and the lambda schedules."""

import pytest
import torch
from test_losses import grad_of_logp, toy_policy

import algos.grpo as grpo
from algos.aapa import (
    ANCHOR_SCALE_MIN,
    aapa_advantages,
    aapa_loss,
    anchor_coefficient,
    anchor_scores,
    discriminator_loss,
    fit_discriminator,
    group_advantages,
)
from shared.discriminator import binary_auc, make_discriminator


def batch(seed=0):
    theta, targets, logps = toy_policy(seed=seed, batch=4, length=4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5], dtype=torch.float64)
    scores = torch.tensor([-0.1, -2.0, -0.7, -3.0], dtype=torch.float64)
    return theta, targets, logps, mask, rewards, scores


def test_lambda_zero_equals_grpo_loss_and_gradient():
    theta, targets, logps, mask, rewards, scores = batch()
    old = logps.detach() + 0.1
    ref = logps.detach() - 0.2
    kwargs = dict(beta=0.1, loss_type="grpo", eps_low=0.2, eps_high=0.28)
    adv = aapa_advantages(rewards, scores, 2, 0.0)
    assert torch.equal(adv, grpo.group_advantages(rewards, 2))
    loss, _ = aapa_loss(logps, old, ref, adv, mask, logps.new_zeros(0, 1), logps.new_zeros(0, 1), 1.0, 0.0, **kwargs)
    loss.backward()
    grad = theta.grad.clone()
    theta_b, _, logps_b = toy_policy(seed=0, batch=4, length=4)
    expected, _ = grpo.grpo_loss(logps_b, old, ref, grpo.group_advantages(rewards, 2), mask, **kwargs)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.allclose(grad, theta_b.grad, atol=1e-14)


def test_anchor_advantage_is_centred_and_divided_by_the_fixed_scale_only():
    _, _, _, _, rewards, scores = batch()
    adv = aapa_advantages(rewards, scores, 2, 0.5, anchor_scale=2.0)
    centred = (scores.view(-1, 2) - scores.view(-1, 2).mean(1, keepdim=True)).reshape(-1)
    assert torch.allclose(adv, group_advantages(rewards, 2) + 0.5 * centred / 2.0, atol=1e-12)
    only_anchor = aapa_advantages(rewards, scores, 2, 0.5, anchor_scale=2.0, use_task_reward=False)
    assert torch.allclose(only_anchor, 0.5 * centred / 2.0, atol=1e-12)


def test_noise_level_anchor_stays_small_and_a_real_gap_acts():
    """Tied task rewards (all right): the anchor is the whole advantage. Scores that differ
    by 1e-3 nats must give a ~1e-3 push, not a unit-scale one; a 2-nat gap between the
    group's responses must act at the scale of the expert/policy gap."""
    tied = torch.ones(8, dtype=torch.float64)
    noise = -0.7 + 1e-3 * torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert aapa_advantages(tied, noise, 8, 1.0, anchor_scale=1.0).abs().max() < 5e-3
    gap = torch.tensor([0.0, 0.0, 0.0, 0.0, -2.0, -2.0, -2.0, -2.0], dtype=torch.float64)
    adv = aapa_advantages(tied, gap, 8, 1.0, anchor_scale=1.0)
    assert torch.allclose(adv, torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=torch.float64))


def test_sft_base_gradient_is_nll_plus_anchor_policy_gradient():
    theta, targets, logps, mask, rewards, scores = batch(seed=1)
    expert_theta, expert_targets, expert_logps = toy_policy(seed=2, batch=2, length=3)
    expert_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = aapa_advantages(rewards, scores, 2, 0.7, anchor_scale=1.3, use_task_reward=False)
    loss, _ = aapa_loss(logps, logps.detach(), None, adv, mask, expert_logps, expert_mask, 1.0, 1.0)
    loss.backward()
    m = mask.double()
    # dapo aggregation at rho = 1: d/dlogp = -A_b / N; plain NLL: d/dlogp = -1 / N_expert
    assert torch.allclose(theta.grad, (-adv[:, None] * m / m.sum())[..., None] * grad_of_logp(theta, targets), atol=1e-12)
    expected_expert = (-expert_mask.double() / expert_mask.sum())[..., None] * grad_of_logp(expert_theta, expert_targets)
    assert torch.allclose(expert_theta.grad, expected_expert, atol=1e-12)


def test_chord_base_weights_and_phi():
    _, _, logps, mask, rewards, scores = batch(seed=3)
    _, _, expert_logps = toy_policy(seed=4, batch=2, length=3)
    expert_mask = torch.ones(2, 3)
    adv = aapa_advantages(rewards, scores, 2, 0.3)
    loss, metrics = aapa_loss(logps, logps.detach(), None, adv, mask, expert_logps, expert_mask, 0.9, 0.1, use_phi=True)
    p = expert_logps.exp()
    expert = -(p * (1 - p) * expert_logps).sum() / 6
    assert metrics["expert_loss"].item() == pytest.approx(expert.item(), rel=1e-12)
    assert loss.item() == pytest.approx(0.9 * metrics["rl_loss"].item() + 0.1 * expert.item(), rel=1e-12)


def test_discriminator_loss_gradient_and_scores():
    logits = torch.tensor([2.0, -1.0, 0.5, -30.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1])
    loss = discriminator_loss(logits, labels)
    z, y = logits.detach(), labels.double()
    expected = -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    loss.backward()
    assert torch.allclose(logits.grad, (torch.sigmoid(z) - y) / 4, atol=1e-12)
    s = anchor_scores(torch.tensor([0.0, 100.0, -100.0]))
    assert s.tolist() == pytest.approx([-0.693147, 0.0, -100.0], abs=1e-5) and torch.isfinite(s).all()


def test_discriminator_loss_is_class_balanced():
    logits = torch.tensor([1.0, -2.0, 0.3, 0.7, -0.4], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0, 0, 0])
    bce = lambda z, y: -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z)))  # noqa: E731
    expected = 0.5 * (bce(logits[:1], 1.0).mean() + bce(logits[1:], 0.0).mean())
    assert discriminator_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-12)


def test_auc_equals_the_pairwise_count():
    expert, policy = torch.tensor([0.9, 0.2, 0.2, -1.0]), torch.tensor([0.2, -0.5, 1.5])
    wins = sum((e > p) + 0.5 * (e == p) for e in expert.tolist() for p in policy.tolist())
    assert binary_auc(expert, policy) == pytest.approx(float(wins) / 12)


def test_fit_drops_negatives_equal_to_the_expert_and_reports_held_out_numbers():
    """Half the initial rollouts are the expert's own text (an SFT policy copies its
    teacher). Labelled as negatives they contradict the positives: D could not call the
    expert text expert. Dropped, D separates the classes and judges the copies expert."""
    g = torch.Generator().manual_seed(0)
    prompts, width = 200, 6
    expert = torch.randn(prompts, width, generator=g) + 1.0
    policy = torch.randn(prompts, width, generator=g) - 1.0
    is_copy = torch.arange(prompts) % 2 == 0
    policy[is_copy] = expert[is_copy]
    torch.manual_seed(0)
    head, record = fit_discriminator(expert, policy, is_copy, 50, hidden=8, epochs=300, learning_rate=1e-2)
    assert record["dropped_copies"] == 100 and record["heldout_prompts"] == 50
    assert record["heldout_accuracy"] > 0.9 and record["heldout_auc"] > 0.95
    with torch.no_grad():
        copy_logits = head((expert[is_copy] - record["feature_mean"]) / record["feature_std"])
    assert (copy_logits > 0).float().mean() > 0.9  # the expert's text is judged expert, also where the policy said it
    assert record["anchor_scale"] >= ANCHOR_SCALE_MIN
    with pytest.raises(ValueError, match="too few negatives"):
        fit_discriminator(expert, expert.clone(), torch.ones(prompts, dtype=torch.bool), 50, 8, 10, 1e-2)


def test_discriminator_head_gradcheck():
    torch.manual_seed(0)
    head = make_discriminator(6, 5).double()
    features, labels = torch.randn(8, 6, dtype=torch.float64, requires_grad=True), torch.randint(2, (8,))
    assert torch.autograd.gradcheck(lambda f: discriminator_loss(head(f), labels), (features,))


def test_anchor_coefficient_schedules():
    assert anchor_coefficient(5, 10, 0.4, "constant") == 0.4
    assert anchor_coefficient(0, 10, 0.4, "linear_decay") == pytest.approx(0.4)
    assert anchor_coefficient(5, 10, 0.4, "linear_decay") == pytest.approx(0.2)
    assert anchor_coefficient(0, 10, 0.4, "linear_warmup") == 0.0
    assert anchor_coefficient(5, 10, 0.4, "linear_warmup") == pytest.approx(0.2)
    assert anchor_coefficient(20, 10, 0.4, "linear_warmup") == pytest.approx(0.4)


def test_all_equal_scores_and_extremes_stay_finite():
    adv = aapa_advantages(torch.full((4,), 0.5), torch.full((4,), -0.69), 2, 1.0, anchor_scale=ANCHOR_SCALE_MIN)
    assert torch.equal(adv, torch.zeros(4))
    logps = torch.tensor([[-1e4, 0.0], [-1.0, -2.0]])
    loss, metrics = aapa_loss(logps, logps.flip(1), logps, torch.tensor([5.0, -5.0]), torch.zeros(2, 2),
                              logps, torch.ones(2, 2), 0.5, 0.5, use_phi=True, beta=0.1)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


def test_compiled_aapa_equals_eager():
    _, _, logps, mask, rewards, scores = batch(seed=5)
    logps, rewards, scores = logps.float().detach(), rewards.float(), scores.float()
    expert = logps[:2, :3]
    eager_adv = aapa_advantages(rewards, scores, 2, 0.5)
    compiled_adv = torch.compile(aapa_advantages, dynamic=True)(rewards, scores, 2, 0.5)
    assert torch.allclose(eager_adv, compiled_adv, atol=1e-6)
    args = (logps, logps - 0.1, None, eager_adv, mask, expert, torch.ones(2, 3), 0.9, 0.1)
    eager, _ = aapa_loss(*args, use_phi=True)
    compiled, _ = torch.compile(aapa_loss, dynamic=True)(*args, use_phi=True)
    assert torch.allclose(eager, compiled, atol=1e-6)
