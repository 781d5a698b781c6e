"""GPM and GPRL math: skew-symmetric scores, an intransitive cycle a Bradley-Terry
scalar cannot fit, per-dimension group advantages and the drift monitor."""

import pytest
import torch

from algos.gpm import gpm_loss, gpm_scores
from algos.gprl import drift_update, grpo_loss, group_dim_scores, gprl_advantages


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
    adv, per_dim = gprl_advantages(v, gate, rho, 4)
    scaled = v.clone()
    scaled[:, 0:2] *= 100.0  # dimension 0's raw scores are now 100x larger
    adv_scaled, per_dim_scaled = gprl_advantages(scaled, gate, rho, 4)
    # equal up to the eps in std + eps (1e-4 against per-dimension stds of ~0.05 and ~5)
    assert torch.allclose(adv, adv_scaled, atol=5e-3) and torch.allclose(per_dim, per_dim_scaled, atol=5e-3)
    assert torch.allclose(per_dim.view(2, 4, 3).std(1), torch.ones(2, 3, dtype=torch.float64), atol=5e-3)
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


def test_a_near_tie_gives_near_zero_advantages():
    # two responses whose GPM embeddings differ by 1e-5: their score differences are
    # ~1e-6, far below eps, so the advantages stay ~0.02 (dividing by the std alone gives ~0.75)
    v = random_v(1, 2, seed=6).expand(4, -1).clone()
    v[0, 0] += 1e-5
    gate = torch.ones(4, 2, dtype=torch.float64)
    adv, per_dim = gprl_advantages(v, gate, torch.ones(2, dtype=torch.float64), 4)
    assert adv.abs().max() < 0.05 and per_dim.abs().max() < 0.05
    scores = group_dim_scores(v, 4)
    assert torch.allclose(per_dim, scores / (scores.view(1, 4, 2).std(1) + 1e-4).expand(4, 2), atol=1e-15)


def test_gpm_gate_is_the_reference_scaled_softmax(tiny_world):
    from algos.gprl import gpm_embed
    from shared.modeling import load_model, load_tokenizer

    backbone, tokenizer = load_model(tiny_world["model"]), load_tokenizer(tiny_world["model"])
    hidden = backbone.config.hidden_size
    torch.manual_seed(0)
    value_head, gate_head = torch.nn.Linear(hidden, 6, bias=False), torch.nn.Linear(hidden, 3, bias=False)
    torch.nn.init.normal_(gate_head.weight, std=3.0)
    prompts = ["copy abc", "reverse hello"]
    v, gate = gpm_embed(backbone, value_head, gate_head, tokenizer, prompts, ["abc", "olleh"], "cpu")
    assert torch.allclose(v.norm(dim=-1), torch.ones(2))
    assert torch.allclose(gate.sum(-1), torch.full((2,), 3.0))
    from shared.rollout import encode_prompts
    ids, mask = encode_prompts(tokenizer, prompts, "cpu")
    with torch.no_grad():
        h = backbone.base_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state[:, -1]
    assert torch.allclose(gate, 3 * torch.softmax(gate_head(h) / hidden ** 0.5, -1), atol=1e-5)


def test_drift_monitor_fires_on_single_axis_exploitation_and_stays_silent_on_balanced_gains():
    rho = torch.ones(3)
    config = dict(eps0=0.2, beta0=0.04, dominance=0.7, fall_tolerance=0.01)
    # dimension 0 rises, dimension 1 falls: exploitation of axis 0
    rho1, eps, beta, event = drift_update(torch.tensor([0.10, -0.05, 0.005]), torch.zeros(3), rho, 0.2, 0.04, **config)
    assert event["alarm"] and event["dominant"] == 0 and event["falling"] == [1]
    assert event["dominant_share"] == pytest.approx(0.10 / 0.105)
    assert rho1.tolist() == pytest.approx([0.5, 1.0, 1.0]) and eps == pytest.approx(0.1) and beta == pytest.approx(0.08)
    # a second exploiting check tightens further, within the bounds
    rho2, eps2, beta2, event = drift_update(torch.tensor([0.3, -0.2, 0.0]), torch.tensor([0.10, -0.05, 0.005]), rho1, eps, beta,
                                            **config, eps_min=0.08, beta_max=0.1)
    assert event["alarm"] and rho2[0] == pytest.approx(0.25) and eps2 == pytest.approx(0.08) and beta2 == pytest.approx(0.1)
    # balanced gains: silent, and everything relaxes halfway back
    rho3, eps3, beta3, event = drift_update(torch.tensor([0.4, -0.1, 0.1]), torch.tensor([0.3, -0.2, 0.0]), rho2, eps2, beta2, **config)
    assert not event["alarm"]
    assert rho3.tolist() == pytest.approx([0.625, 1.0, 1.0]) and eps3 == pytest.approx(0.14) and beta3 == pytest.approx(0.07)
    # one axis gains but nothing falls: not an alarm either
    _, _, _, event = drift_update(torch.tensor([0.5, 0.0, 0.0]), torch.zeros(3), rho, 0.2, 0.04, **config)
    assert not event["alarm"]
    # beta 0 is raised to beta_alarm on alarm
    _, _, beta, _ = drift_update(torch.tensor([0.10, -0.05, 0.0]), torch.zeros(3), rho, 0.2, 0.0, **config, beta_alarm=0.03)
    assert beta == pytest.approx(0.03)


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
