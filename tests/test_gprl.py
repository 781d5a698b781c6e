"""GPM and GPRL math: skew-symmetric scores, an intransitive cycle a Bradley-Terry
scalar cannot fit, per-dimension group advantages and the drift monitor."""

import pytest
import torch

from algos.gpm import gpm_loss, gpm_scores
from algos.gprl import drift_update, gprl_advantages, group_dim_scores, grpo_loss, probe_margin_stats
from shared.drift_probe import axis_agreement


def random_v(n, k, seed=0):
    return torch.nn.functional.normalize(torch.randn(n, 2 * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def test_scores_are_skew_symmetric_and_group_scores_sum_to_zero():
    v = random_v(12, 3)
    gate = torch.softmax(torch.randn(12, 3, dtype=torch.float64), -1)
    assert torch.allclose(gpm_scores(v, v.flip(0), gate), -gpm_scores(v.flip(0), v, gate), atol=1e-15)
    assert torch.allclose(gpm_scores(v, v, gate), torch.zeros(12, dtype=torch.float64))
    scores = group_dim_scores(v, 4)  # 3 groups of 4
    assert torch.allclose(scores.view(3, 4, 3).sum(1), torch.zeros(3, 3, dtype=torch.float64), atol=1e-15)
    # S_l(i) by hand for one entry
    i, l = 5, 1
    group = range(4, 8)
    by_hand = sum(float(v[i, 2 * l] * v[j, 2 * l + 1] - v[i, 2 * l + 1] * v[j, 2 * l]) for j in group if j != i) / 3
    assert scores[i, l].item() == pytest.approx(by_hand, abs=1e-15)


def test_gpm_represents_a_cycle_that_bradley_terry_cannot():
    """Preferences A > B, B > C, C > A. Fit k = 1 GPM embeddings and BT scalars by
    gradient descent on the same pairs: GPM gets all three right, BT at most two."""
    winners, losers = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    torch.manual_seed(0)
    raw = torch.randn(3, 2, requires_grad=True)
    rewards = torch.zeros(3, requires_grad=True)
    gpm_opt, bt_opt = torch.optim.Adam([raw], lr=0.05), torch.optim.Adam([rewards], lr=0.05)
    gate = torch.ones(3, 1)
    for _ in range(500):
        v = torch.nn.functional.normalize(raw, dim=-1)
        loss, _ = gpm_loss(v[winners], v[losers], gate, 1.0, tau=0.1)
        gpm_opt.zero_grad()
        loss.backward()
        gpm_opt.step()
        bt = -torch.nn.functional.logsigmoid(rewards[winners] - rewards[losers]).mean()
        bt_opt.zero_grad()
        bt.backward()
        bt_opt.step()
    v = torch.nn.functional.normalize(raw.detach(), dim=-1)
    gpm_correct = (gpm_scores(v[winners], v[losers], gate) > 0).sum().item()
    bt_correct = (rewards[winners] - rewards[losers] > 0).sum().item()
    assert gpm_correct == 3 and bt_correct <= 2
    assert loss.item() < 0.05  # and confidently: P > 0.95 for every edge of the cycle


def test_gpm_loss_gradient_closed_form_and_axis_term():
    v_w, v_l = random_v(4, 2, seed=1).requires_grad_(True), random_v(4, 2, seed=2)
    gate = torch.softmax(torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64), -1)
    q = torch.tensor([1.0, 0.8, 0.6, 0.9], dtype=torch.float64)
    loss, _ = gpm_loss(v_w, v_l, gate, q, tau=0.1)
    loss.backward()
    s = gpm_scores(v_w.detach(), v_l, gate) / 0.1
    # d loss / d s = (sigmoid(s) - q) / (tau N); d s / d v_w[2l] = gate_l v_l[2l+1], d s / d v_w[2l+1] = -gate_l v_l[2l]
    ds = (torch.sigmoid(s) - q) / 0.1 / 4
    expected = torch.zeros_like(v_w)
    expected[:, 0::2] = ds[:, None] * gate * v_l[:, 1::2]
    expected[:, 1::2] = -ds[:, None] * gate * v_l[:, 0::2]
    assert torch.allclose(v_w.grad, expected, atol=1e-12)
    axis_labels = torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: gpm_loss(a, v_l, gate, q, 0.1, axis_labels, 0.7)[0], (v_w.detach().requires_grad_(True),))


def test_per_dimension_normalisation_stops_a_large_scale_axis_from_dominating():
    v = random_v(8, 3, seed=4)
    gate = torch.full((8, 3), 1 / 3, dtype=torch.float64)
    rho = torch.ones(3, dtype=torch.float64)
    floor = 1e-3  # below every per-dimension std here (~0.05 and ~5): each is divided by its own std
    adv, per_dim = gprl_advantages(v, gate, rho, 4, std_floor=floor)
    scaled = v.clone()
    scaled[:, 0:2] *= 100.0  # dimension 0's raw scores are now 100x larger
    adv_scaled, per_dim_scaled = gprl_advantages(scaled, gate, rho, 4, std_floor=floor)
    assert torch.allclose(adv, adv_scaled, atol=1e-12) and torch.allclose(per_dim, per_dim_scaled, atol=1e-12)
    assert torch.allclose(per_dim.view(2, 4, 3).std(1), torch.ones(2, 3, dtype=torch.float64), atol=1e-12)
    # the scalar judge normalises after summing: there the large axis decides the ranking alone
    scalar, _ = gprl_advantages(scaled, gate, rho, 4, std_floor=floor, judge="scalar")
    large_axis = group_dim_scores(scaled, 4)[:, 0]
    for group in (slice(0, 4), slice(4, 8)):  # within each group
        assert torch.corrcoef(torch.stack([scalar[group], large_axis[group]]))[0, 1] > 0.9999
        assert torch.corrcoef(torch.stack([adv_scaled[group], large_axis[group]]))[0, 1] < 0.9
    # without per-dimension normalisation the large axis would decide the ranking alone
    raw = (gate * group_dim_scores(scaled, 4)).sum(-1)
    assert torch.corrcoef(torch.stack([raw, group_dim_scores(scaled, 4)[:, 0]]))[0, 1] > 0.999


def test_advantage_weights_follow_gate_times_rho_and_flat_dimensions_give_zero():
    v = random_v(4, 2, seed=5)
    gate = torch.tensor([[0.7, 0.3]], dtype=torch.float64).expand(4, 2)
    rho = torch.tensor([0.5, 1.0], dtype=torch.float64)
    adv, per_dim = gprl_advantages(v, gate, rho, 4)
    w = torch.tensor([0.35, 0.3], dtype=torch.float64) / 0.65
    assert torch.allclose(adv, (per_dim * w).sum(-1), atol=1e-12)
    same = v[:1].expand(4, -1)  # identical responses: every score 0, so advantage 0, not NaN
    adv, _ = gprl_advantages(same, gate, rho, 4)
    assert torch.equal(adv, torch.zeros(4, dtype=torch.float64))


def test_an_axis_tied_within_noise_contributes_near_zero_while_distinct_responses_act():
    """Dimension 0: the four responses differ by noise (~1e-4 in score); dimension 1: they
    really differ. Dividing each by its own std would give both unit scale; the floor
    keeps the noise axis at ~1e-4 / floor, and the real axis at unit scale."""
    g = torch.Generator().manual_seed(6)
    v = random_v(1, 2, seed=6).expand(4, -1).clone()
    v[:, 0:2] += 1e-4 * torch.randn(4, 2, generator=g, dtype=torch.float64)  # noise on dimension 0's block
    v[:, 2:4] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]], dtype=torch.float64)  # distinct on 1
    gate = torch.ones(4, 2, dtype=torch.float64)
    adv, per_dim = gprl_advantages(v, gate, torch.ones(2, dtype=torch.float64), 4, std_floor=0.05)
    assert per_dim[:, 0].abs().max() < 0.02
    assert per_dim[:, 1].std() == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(adv, 0.5 * (per_dim[:, 0] + per_dim[:, 1]), atol=1e-12)
    scores = group_dim_scores(v, 4)
    assert torch.allclose(per_dim[:, 0], scores[:, 0] / 0.05, atol=1e-15)


def test_drift_monitor_acts_on_an_alarm_and_relaxes_when_clear():
    rho = torch.ones(3)
    config = dict(eps0=0.2, beta0=0.04, dominance=0.7, noise_z=3.0)
    se = torch.full((3,), 0.001)
    # dimension 0 up, dimension 1 down beyond the noise band (0.003): exploitation of axis 0
    rho1, eps, beta, event = drift_update(torch.tensor([0.10, -0.05, 0.005]), se, rho, 0.2, 0.04, **config)
    assert event["alarm"] and event["dominant"] == 0 and event["falling"] == [1]
    assert event["dominant_share"] == pytest.approx(0.10 / 0.105)
    assert rho1.tolist() == pytest.approx([0.5, 1.0, 1.0]) and eps == pytest.approx(0.1) and beta == pytest.approx(0.08)
    rho2, eps2, beta2, event = drift_update(torch.tensor([0.3, -0.2, 0.0]), se, rho1, eps, beta, **config, eps_min=0.08, beta_max=0.1)
    assert event["alarm"] and rho2[0] == pytest.approx(0.25) and eps2 == pytest.approx(0.08) and beta2 == pytest.approx(0.1)
    # balanced: nothing has fallen: silent, and everything relaxes halfway back
    rho3, eps3, beta3, event = drift_update(torch.tensor([0.4, 0.3, 0.1]), se, rho2, eps2, beta2, **config)
    assert not event["alarm"]
    assert rho3.tolist() == pytest.approx([0.625, 1.0, 1.0]) and eps3 == pytest.approx(0.14) and beta3 == pytest.approx(0.07)
    # a fall within the noise band is no fall
    _, _, _, event = drift_update(torch.tensor([0.5, -0.002, 0.0]), se, rho, 0.2, 0.04, **config)
    assert not event["alarm"]
    _, _, beta, _ = drift_update(torch.tensor([0.10, -0.05, 0.0]), se, rho, 0.2, 0.0, **config, beta_alarm=0.03)
    assert beta == pytest.approx(0.03)


def margin_trace(drift_per_check, checks=12, prompts=64, noise=0.05, seed=0):
    """Synthetic probe readings: per check, per-prompt margins = the drift so far + noise."""
    g = torch.Generator().manual_seed(seed)
    drift = torch.tensor(drift_per_check)
    return [probe_margin_stats(drift * (c + 1) + noise * torch.randn(prompts, drift.numel(), generator=g))
            for c in range(checks)]


def run_monitor(trace):
    rho, eps, beta, alarms = torch.ones(3), 0.2, 0.04, []
    for margins, se in trace:
        rho, eps, beta, event = drift_update(margins, se, rho, eps, beta, eps0=0.2, beta0=0.04, dominance=0.7, noise_z=3.0)
        alarms.append(event["alarm"])
    return alarms


def test_drift_monitor_on_synthetic_traces():
    """Slow, steady exploitation of one axis (+0.01 a check on axis 0, -0.003 on axis 1, a
    fall smaller per check than the probe noise) fires once it has added up; every axis
    improving never fires; pure noise never fires."""
    exploit = run_monitor(margin_trace([0.01, -0.003, 0.0]))
    assert any(exploit) and not any(exploit[:2])  # it takes a few checks to be sure, then fires
    assert not any(run_monitor(margin_trace([0.01, 0.004, 0.006])))
    for seed in range(5):
        assert not any(run_monitor(margin_trace([0.0, 0.0, 0.0], seed=seed)))


def test_probe_margin_stats_and_axis_agreement():
    per_prompt = torch.tensor([[0.1, -0.2], [0.3, 0.0], [0.2, 0.2]])
    mean, se = probe_margin_stats(per_prompt)
    assert mean.tolist() == pytest.approx([0.2, 0.0]) and se.tolist() == pytest.approx([0.1 / 3 ** 0.5, 0.2 / 3 ** 0.5])
    truth = torch.tensor([[1.0, 0.5], [1.0, 0.5], [0.0, 0.5]])
    agreement = axis_agreement(truth, per_prompt)
    assert agreement[0].item() == pytest.approx(2 / 3) and torch.isnan(agreement[1])


def test_policy_loss_matches_finite_differences():
    g = torch.Generator().manual_seed(6)
    theta = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(5, (4, 3), generator=g)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    old = torch.log_softmax(theta.detach() + 0.05, -1).gather(-1, targets[..., None]).squeeze(-1) - 0.03
    adv, _ = gprl_advantages(random_v(4, 2, seed=7), torch.full((4, 2), 0.5, dtype=torch.float64), torch.ones(2, dtype=torch.float64), 4)

    def f(t):
        lp = torch.log_softmax(t, -1).gather(-1, targets[..., None]).squeeze(-1)
        return grpo_loss(lp, old, old - 0.1, adv, mask, eps_low=0.1, eps_high=0.1, beta=0.08)[0]

    assert torch.autograd.gradcheck(f, (theta,))


def test_compiled_advantages_equal_eager():
    v, gate = random_v(8, 3, seed=8).float(), torch.full((8, 3), 1 / 3)
    rho = torch.tensor([1.0, 0.5, 0.25])
    eager, _ = gprl_advantages(v, gate, rho, 4)
    compiled, _ = torch.compile(gprl_advantages, dynamic=True)(v, gate, rho, 4)
    assert torch.allclose(eager, compiled, atol=1e-5)


def test_a_one_dimension_gpm_is_a_scalar_judge_and_gprl_on_it_is_grpo_normalisation():
    # the judge world's scalar judge: with k = 1, v = (cos t, sin t) and s(i, j) = sin(t_j - t_i), so
    # within a half-turn the group score S_i falls with t_i alone, a scalar reward's total order
    group_size = 6
    angles = torch.tensor([0.3, -0.5, 0.1, 0.7, -0.2, 0.05, 0.4, -0.7, 0.6, 0.0, -0.1, 0.2], dtype=torch.float64)
    v = torch.stack([angles.cos(), angles.sin()], dim=-1)
    scores = group_dim_scores(v, group_size)[:, 0]
    for group in range(2):
        rows = slice(group * group_size, (group + 1) * group_size)
        by_angle = torch.argsort(angles[rows])
        assert torch.all(scores[rows][by_angle][1:] < scores[rows][by_angle][:-1])
        pairwise = torch.sin(angles[rows][None, :] - angles[rows][:, None]).sum(1) / (group_size - 1)
        assert torch.allclose(scores[rows], pairwise)
    gate, rho = torch.ones(12, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    advantages, _ = gprl_advantages(v, gate, rho, group_size, std_floor=1e-6)
    grouped = scores.view(2, group_size)
    grpo = ((grouped - grouped.mean(1, keepdim=True)) / grouped.std(1, keepdim=True)).reshape(-1)
    assert torch.allclose(advantages, grpo)  # GRPO's group normalisation of the scalar score (S is centred)
    # and the monitor has no second dimension to see fall: it never alarms
    assert not drift_update(torch.tensor([0.5]), torch.tensor([0.01]), rho, 0.2, 0.04)[3]["alarm"]
