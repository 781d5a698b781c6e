"""Learning tests: a few optimizer steps of each algorithm's loss on a fixed batch move a
small real model the right way. Each prompt has G fixed candidate responses with fixed
rewards; after the steps, the candidates with positive advantage (or chosen, or the
expert's) are more likely, those with negative advantage less, and the expected reward
over the candidates under the policy, sum_i softmax(l)_i r_i per prompt, is higher.
They complement the gradient tests (which check the math exactly) and do not replace
the main job's table (which checks learning on held-out prompts)."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import algos.aapa as aapa
import algos.adpo as adpo
import algos.adpo_pairwise as adpo_pairwise
import algos.chord as chord
import algos.gpm as gpm
import algos.gprl as gprl
import algos.grpo as grpo
import algos.sft as sft
import algos.uniapl as uniapl
from shared.logprobs import completion_logps

PROMPTS, G, PROMPT_LEN, LENGTH, VOCAB = 4, 4, 5, 4, 32


def small_policy():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8)
    return Qwen3ForCausalLM(config)


def fixed_batch():
    """PROMPTS prompts x G candidates; candidate i of every prompt has reward i / (G - 1)."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(VOCAB, (PROMPTS, PROMPT_LEN), generator=g).repeat_interleave(G, 0)
    ids = torch.cat([prompts, torch.randint(VOCAB, (PROMPTS * G, LENGTH), generator=g)], 1)
    rewards = torch.arange(G, dtype=torch.float32).repeat(PROMPTS) / (G - 1)
    return ids, torch.ones_like(ids), torch.ones(PROMPTS * G, LENGTH), rewards


def sequence_logps(model, ids, mask):
    return completion_logps(model, ids, mask, PROMPT_LEN).sum(1)


def expected_reward(model, ids, mask, rewards):
    with torch.no_grad():
        weights = torch.softmax(sequence_logps(model, ids, mask).view(PROMPTS, G), dim=1)
    return float((weights * rewards.view(PROMPTS, G)).sum(1).mean())


def train(model, loss_of_batch, steps=8, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = loss_of_batch()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def grpo_family_losses(ids, mask, completion_mask, rewards):
    """The loss of each policy-gradient method on the fixed batch, as a function of the policy."""
    advantages = grpo.group_advantages(rewards, G)
    expert = ids[G - 1::G], mask[G - 1::G], completion_mask[G - 1::G]  # the best candidate plays the expert
    gate = torch.ones(PROMPTS * G, 2)

    def rollout_and_expert(model):
        logps = completion_logps(model, ids, mask, PROMPT_LEN)
        return logps, completion_logps(model, expert[0], expert[1], PROMPT_LEN)

    def gprl_like(model):
        # GPM embeddings that rank candidate i above j exactly when i > j, on both dimensions
        angle = torch.arange(G, dtype=torch.float32).repeat(PROMPTS) * 0.3
        v = torch.stack([torch.cos(angle), -torch.sin(angle), torch.cos(angle), -torch.sin(angle)], dim=1) / 2 ** 0.5
        adv, _ = gprl.gprl_advantages(v, gate, torch.ones(2), G)
        logps = completion_logps(model, ids, mask, PROMPT_LEN)
        return gprl.grpo_loss(logps, logps.detach(), None, adv, completion_mask)[0]

    def adpo_listwise(model):
        logps = completion_logps(model, ids, mask, PROMPT_LEN)
        return adpo.adpo_listwise_loss(logps, logps.detach() - 0.1, completion_mask, advantages, torch.full((PROMPTS,), 0.8), G)[0]

    return {
        "grpo": lambda m: grpo.grpo_loss(*(lambda l: (l, l.detach()))(completion_logps(m, ids, mask, PROMPT_LEN)), None,
                                         advantages, completion_mask)[0],
        "chord": lambda m: chord.chord_loss(*(lambda l, e: (l, l.detach(), None, advantages, completion_mask, e,
                                                            expert[2], 0.3))(*rollout_and_expert(m)))[0],
        "aapa": lambda m: aapa.aapa_loss(*(lambda l, e: (l, l.detach(), None, aapa.aapa_advantages(
            rewards, rewards * 2 - 1, G, 0.5), completion_mask, e, expert[2], 1.0, 0.0))(*rollout_and_expert(m)))[0],
        "uniapl": lambda m: uniapl.uniapl_policy_loss(*(lambda l, e: (l, l.detach(), None, uniapl.uniapl_advantages(
            rewards, rewards * 4 - 2, G, 0.1), completion_mask, e, expert[2], 0.5))(*rollout_and_expert(m)))[0],
        "adpo_listwise": adpo_listwise,
        "gprl": gprl_like,
    }


@pytest.mark.parametrize("algorithm", ["grpo", "chord", "aapa", "uniapl", "adpo_listwise", "gprl"])
def test_policy_gradient_methods_raise_good_responses_and_the_expected_reward(algorithm):
    ids, mask, completion_mask, rewards = fixed_batch()
    model = small_policy()
    before = sequence_logps(model, ids, mask).detach()
    reward_before = expected_reward(model, ids, mask, rewards)
    loss = grpo_family_losses(ids, mask, completion_mask, rewards)[algorithm]
    train(model, lambda: loss(model))
    change = (sequence_logps(model, ids, mask).detach() - before).view(PROMPTS, G)
    assert (change[:, -1] > 0).all() and (change[:, 0] < 0).all()  # best up, worst down, in every group
    assert (change[:, -1] - change[:, 0] > 0.5).all()
    assert expected_reward(model, ids, mask, rewards) > reward_before + 0.1


def test_sft_raises_the_expert_responses():
    ids, mask, completion_mask, _ = fixed_batch()
    model = small_policy()
    before = sequence_logps(model, ids, mask).detach()
    train(model, lambda: sft.sft_loss(completion_logps(model, ids, mask, PROMPT_LEN), completion_mask))
    assert (sequence_logps(model, ids, mask).detach() > before + 1.0).all()


def test_adpo_pairwise_raises_chosen_over_rejected():
    ids, mask, _, _ = fixed_batch()
    chosen, rejected = slice(G - 1, None, G), slice(0, None, G)  # best and worst candidate of each prompt
    model, reference = small_policy(), small_policy()
    with torch.no_grad():
        ref = sequence_logps(reference, ids, mask)
    before = sequence_logps(model, ids, mask).detach()

    def loss():
        l = sequence_logps(model, ids, mask)
        return adpo_pairwise.adpo_pairwise_loss(l[chosen], l[rejected], ref[chosen], ref[rejected], 1.0, 1.0)[0]

    train(model, loss)
    change = sequence_logps(model, ids, mask).detach() - before
    assert (change[chosen] - change[rejected] > 0.5).all()


def test_gpm_learns_to_score_chosen_above_rejected():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(16, 8), torch.randn(16, 8)
    head = torch.nn.Linear(8, 4, bias=False)
    gate = torch.ones(16, 2)

    def scores():
        v_c = torch.nn.functional.normalize(head(chosen), dim=-1)
        v_r = torch.nn.functional.normalize(head(rejected), dim=-1)
        return v_c, v_r

    before = gpm.gpm_scores(*scores(), gate).detach()
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-2)
    for _ in range(30):
        loss = gpm.gpm_loss(*scores(), gate, 1.0)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = gpm.gpm_scores(*scores(), gate).detach()
    assert after.mean() > before.mean() + 0.2 and (after > 0).float().mean() > (before > 0).float().mean()
