"""UniAPL's math: the unified policy loss, the online discriminator's loss (label
smoothing, gradient penalty) and the dual update of the Lagrange multiplier."""

import math

import pytest
import torch
from test_losses import grad_of_logp, toy_policy

from algos.uniapl import dual_update, group_advantages, online_discriminator_loss, uniapl_advantages, uniapl_policy_loss


def test_policy_loss_gradient_closed_form():
    theta, targets, logps = toy_policy(seed=0, batch=4)
    expert_theta, expert_targets, expert_logps = toy_policy(seed=1, batch=2, length=3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    expert_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    loss, metrics = uniapl_policy_loss(logps, logps.detach(), None, adv, mask, expert_logps, expert_mask, 1.7)
    loss.backward()
    m = mask.double()
    assert torch.allclose(theta.grad, (-adv[:, None] * m / m.sum())[..., None] * grad_of_logp(theta, targets), atol=1e-12)
    expected = (-1.7 * expert_mask.double() / 5)[..., None] * grad_of_logp(expert_theta, expert_targets)
    assert torch.allclose(expert_theta.grad, expected, atol=1e-12)
    assert metrics["expert_nll"].item() == pytest.approx((-(expert_logps * expert_mask).sum() / 5).item())


def test_advantages_normalise_task_and_adversarial_terms_separately():
    rewards = torch.tensor([1.0, 0.5, 0.0, 1.0])
    logits = torch.tensor([0.0, 3.0, -3.0, 1.0])
    log_d = torch.log(torch.sigmoid(logits))

    def z(x):  # group z-score with Bessel's std, written out
        return (x - x.mean()) / (x.std() + 1e-4)

    assert torch.allclose(uniapl_advantages(rewards, logits, 4, 0.2), z(rewards) + 0.2 * z(log_d), atol=1e-5)


def test_advantages_respond_to_lambda_when_task_rewards_tie():
    # every sample of the group has the same task reward: only the adversarial term is left,
    # and it must scale with lambda (a joint normalisation would give the same unit-scale
    # advantages for lambda 0.1 and 0.01)
    tied = torch.full((4,), 0.5)
    logits = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    small, large = uniapl_advantages(tied, logits, 4, 0.01), uniapl_advantages(tied, logits, 4, 0.1)
    assert torch.allclose(large, 10 * small, atol=1e-6)
    assert large.abs().max() < 0.2  # lambda * a z-score of 4 values: |A| <= 0.1 * 1.5
    assert torch.equal(torch.sign(large), torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert torch.allclose(uniapl_advantages(tied, logits, 4, 0.0), group_advantages(tied, 4))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_discriminator_loss_and_gradient_of_a_linear_head(smoothing):
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0)).double()
    expert, policy = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    loss, metrics = online_discriminator_loss(head, expert, policy, label_smoothing=smoothing)
    w, b = head[0].weight[0].detach(), head[0].bias.detach()
    ze, zp = expert @ w + b, policy @ w + b
    ye, yp = 1 - smoothing, smoothing
    bce = lambda z, y: -(y * torch.log(torch.sigmoid(z)) + (1 - y) * torch.log(1 - torch.sigmoid(z))).mean()
    assert loss.item() == pytest.approx(0.5 * (bce(ze, ye) + bce(zp, yp)).item(), rel=1e-9)
    loss.backward()
    grad_w = 0.5 * (((torch.sigmoid(ze) - ye)[:, None] * expert).mean(0) + ((torch.sigmoid(zp) - yp)[:, None] * policy).mean(0))
    assert torch.allclose(head[0].weight.grad[0], grad_w, atol=1e-12)
    assert metrics["accuracy"].item() == pytest.approx(0.5 * ((ze > 0).double().mean() + (zp <= 0).double().mean()).item())


def test_gradient_penalty_of_a_linear_head_is_its_squared_weight_norm():
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0)).double()
    expert, policy = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    plain, _ = online_discriminator_loss(head, expert, policy)
    plain.backward()
    plain_grad = head[0].weight.grad.clone()
    head.zero_grad()
    loss, metrics = online_discriminator_loss(head, expert, policy, gradient_penalty=0.5)
    w = head[0].weight.detach()
    assert metrics["penalty"].item() == pytest.approx(w.pow(2).sum().item())  # d logit / d f = w
    assert loss.item() == pytest.approx(plain.item() + 0.5 * w.pow(2).sum().item())
    loss.backward()
    assert torch.allclose(head[0].weight.grad, plain_grad + 2 * 0.5 * w, atol=1e-12)


def test_discriminator_head_gradcheck_with_penalty():
    torch.manual_seed(2)
    head = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1), torch.nn.Flatten(0)).double()
    policy = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    expert = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: online_discriminator_loss(head, expert, f, 0.1, 0.3)[0], (policy,))


def test_multiplier_rises_when_violated_and_falls_to_zero_when_slack():
    nu, history = 0.0, []
    for divergence in [0.5, 0.5, 0.5]:  # epsilon 0.3: violated by 0.2 each step
        nu = dual_update(nu, divergence, 0.3, 1.0)
        history.append(nu)
    assert history == pytest.approx([0.2, 0.4, 0.6])
    for _ in range(10):  # slack by 0.25 each step: falls, then stays at 0
        nu = dual_update(nu, 0.05, 0.3, 1.0)
        history.append(nu)
    assert history[3] == pytest.approx(0.35) and history[4] == pytest.approx(0.1) and history[5:] == [0.0] * 8
    assert dual_update(0.0, 0.0, 0.3, 1.0) == 0.0


def test_extreme_logits_and_empty_masks_stay_finite():
    head = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0))
    with torch.no_grad():
        head[0].weight.fill_(1e3)
    loss, metrics = online_discriminator_loss(head, torch.full((2, 2), 10.0), torch.full((2, 2), -10.0), 0.1, 0.1)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert torch.isfinite(uniapl_advantages(torch.zeros(2), torch.tensor([-1e4, 1e4]), 2, 1.0)).all()
    logps = torch.tensor([[-1e4, 0.0]])
    loss, _ = uniapl_policy_loss(logps, logps, logps, torch.ones(1), torch.zeros(1, 2), logps, torch.zeros(1, 2), 1.0, beta=0.1)
    assert torch.isfinite(loss)


def test_compiled_policy_loss_equals_eager():
    _, _, logps = toy_policy(seed=3, batch=4)
    _, _, expert = toy_policy(seed=4, batch=2, length=3)
    logps, expert = logps.float().detach(), expert.float().detach()
    args = (logps, logps - 0.1, None, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, 4), expert, torch.ones(2, 3), 1.3)
    eager, _ = uniapl_policy_loss(*args)
    compiled, _ = torch.compile(uniapl_policy_loss, dynamic=True)(*args)
    assert torch.allclose(eager, compiled, atol=1e-6)


def test_a_prompt_only_discriminator_gains_nothing_on_same_prompt_batches():
    """UniAPL's D sees the expert's and the policy's responses for the same prompts. A head
    that looks only at the prompt half of the features then scores both sides alike: its
    balanced accuracy stays 0.5 and its loss stays at log 2, however long it trains, while
    on batches with different prompts for the two sides it would learn the prompts."""
    g = torch.Generator().manual_seed(0)
    prompt_part = torch.randn(32, 4, generator=g)
    expert = torch.cat([prompt_part, torch.randn(32, 4, generator=g) + 1.0], 1)
    policy = torch.cat([prompt_part, torch.randn(32, 4, generator=g) - 1.0], 1)
    other_prompts = torch.cat([torch.randn(32, 4, generator=g) + 2.0, policy[:, 4:]], 1)
    prompt_only = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Flatten(0))
    with torch.no_grad():
        prompt_only[0].weight[:, 4:] = 0.0  # blind to the response half

    def train(policy_side):
        torch.manual_seed(0)
        head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1), torch.nn.Flatten(0))
        head.load_state_dict(prompt_only.state_dict())
        optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(200):
            loss, metrics = online_discriminator_loss(head, expert, policy_side)
            optimizer.zero_grad()
            loss.backward()
            head[0].weight.grad[:, 4:] = 0.0
            optimizer.step()
        return loss.item(), float(metrics["accuracy"])

    same_loss, same_accuracy = train(policy)
    assert same_accuracy == 0.5 and same_loss == pytest.approx(math.log(2), abs=1e-6)
    _, other_accuracy = train(other_prompts)
    assert other_accuracy > 0.9
