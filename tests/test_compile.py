"""Compiled hot paths must not recompile step after step: the loops call them with a
new batch size, completion length, token count and schedule value every step. A
counting backend (no code generation, so this runs in seconds) counts the graphs
torch.compile builds for each function over such a sequence of calls."""

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

SHAPES = [(8, 5), (16, 7), (24, 9), (8, 12), (32, 6)]  # (sequences, completion length), as steps produce them


def batch(b, length, step):
    g = torch.Generator().manual_seed(step)
    logps = -torch.rand(b, length, generator=g) * 3
    mask = (torch.rand(b, length, generator=g) < 0.8).float()
    mask[:, 0] = 1
    return logps, logps - 0.1 * torch.rand(b, length, generator=g), mask, torch.randn(b, generator=g)


def call_sequence(name):
    """(function, [(args, kwargs) per step]) in the way the training loop calls it."""
    calls = []
    for step, (b, length) in enumerate(SHAPES):
        logps, old, mask, adv = batch(b, length, step)
        expert, _, expert_mask, _ = batch(4, length + 2, step + 100)
        num_tokens, num_expert_tokens = mask.sum(), expert_mask.sum()
        common = dict(num_sequences=b, num_tokens=num_tokens, max_completion_length=16)
        calls.append({
            "sft_loss": ((logps, mask, num_tokens), {}),
            "group_advantages": ((torch.rand(b), 4, "group"), {}),
            "grpo_loss": ((logps, old, old - 0.05, adv, mask), dict(beta=0.04, **common)),
            "chord_loss": ((logps, old, None, adv, mask, expert, expert_mask, 0.9 - 0.1 * step),
                           dict(num_expert_tokens=num_expert_tokens, **common)),
            "aapa_advantages": ((torch.rand(b), -torch.rand(b), 4, 0.5), {}),
            "aapa_loss": ((logps, old, None, adv, mask, expert, expert_mask, 0.9, 0.1),
                          dict(use_phi=True, num_expert_tokens=num_expert_tokens, **common)),
            "uniapl_policy_loss": ((logps, old, None, adv, mask, expert, expert_mask, 1.0 + 0.05 * step),
                                   dict(num_expert_tokens=num_expert_tokens, **common)),
            "adpo_listwise_loss": ((logps, old, mask, adv, 0.5 + torch.rand(b // 4), 4),
                                   dict(beta=0.1, num_groups=b // 4, num_tokens=num_tokens)),
            "adpo_pairwise_loss": ((logps.sum(1)[: b // 2], logps.sum(1)[b // 2:], old.sum(1)[: b // 2], old.sum(1)[b // 2:],
                                    torch.rand(b // 2), 10.0), dict(num_pairs=b // 2)),
            "gpm_loss": ((torch.randn(b, 6), torch.randn(b, 6), torch.softmax(torch.randn(b, 3), -1), torch.rand(b), 0.1,
                          torch.rand(b, 3), 1.0), {}),
            "gprl_advantages": ((torch.randn(b, 6), torch.softmax(torch.randn(b, 3), -1), torch.rand(3), 4), {}),
        }[name])
    return calls


FUNCTIONS = {
    "sft_loss": sft.sft_loss, "group_advantages": grpo.group_advantages, "grpo_loss": grpo.grpo_loss,
    "chord_loss": chord.chord_loss, "aapa_advantages": aapa.aapa_advantages, "aapa_loss": aapa.aapa_loss,
    "uniapl_policy_loss": uniapl.uniapl_policy_loss, "adpo_listwise_loss": adpo.adpo_listwise_loss,
    "adpo_pairwise_loss": adpo_pairwise.adpo_pairwise_loss, "gpm_loss": gpm.gpm_loss, "gprl_advantages": gprl.gprl_advantages,
}


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_no_recompilation_across_steps(name):
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(FUNCTIONS[name], backend=counting_backend, dynamic=True)
    for args, kwargs in call_sequence(name):
        eager = FUNCTIONS[name](*args, **kwargs)
        result = compiled(*args, **kwargs)
        first = lambda r: r[0] if isinstance(r, tuple) else r
        assert torch.allclose(first(eager), first(result), atol=1e-5)
    # one graph for the whole sequence (a graph break would add one per piece, still constant in steps)
    assert 1 <= len(graphs) <= 2, f"{name}: {len(graphs)} graphs for {len(SHAPES)} steps"
