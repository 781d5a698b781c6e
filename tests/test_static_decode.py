"""--static-cache: the decode loop with a KV cache allocated once and a fixed-shape
one-token step draws exactly the tokens of the growing cache, from the same per-prompt
generators (sampling, greedy, top-k, bf16 autocast)."""

import pytest
import torch

import shared.rollout as rollout
from shared.modeling import load_model, load_tokenizer

PROMPTS = ["copy abc", "reverse the words", "upper xy", "x"]


@pytest.fixture
def eager_step(monkeypatch):
    """The uncompiled step (the compiled one is checked in the slow test below)."""
    monkeypatch.setattr(rollout, "_decode_step", rollout.decode_step)


@pytest.mark.parametrize("options", [
    dict(temperature=1.0), dict(do_sample=False), dict(temperature=0.7, top_k=5), dict(temperature=1.0, autocast_bf16=True),
])
def test_static_decoding_draws_the_same_tokens(tiny_world, eager_step, options):
    tokenizer, model = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    growing = rollout.generate_rollouts(model, tokenizer, PROMPTS, 4, 12, seeds=[1, 2, 3, 4], output_scores=True, **options)
    static = rollout.generate_rollouts(model, tokenizer, PROMPTS, 4, 12, seeds=[1, 2, 3, 4], output_scores=True,
                                       static_cache=True, **options)
    assert torch.equal(static["completion_ids"], growing["completion_ids"])
    assert torch.equal(static["completion_mask"], growing["completion_mask"])
    finite = torch.isfinite(growing["scores"])
    tolerance = 3e-2 if options.get("autocast_bf16") else 1e-4  # bf16 attention sums over the longer cache differently
    assert torch.allclose(static["scores"][finite], growing["scores"][finite], atol=tolerance)


@pytest.mark.slow  # the first torch.compile takes ~25 s on 2 cores
def test_the_compiled_static_step_draws_the_same_tokens(tiny_world):
    tokenizer, model = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    growing = rollout.generate_rollouts(model, tokenizer, PROMPTS, 4, 12, seeds=[5, 6, 7, 8])
    static = rollout.generate_rollouts(model, tokenizer, PROMPTS, 4, 12, seeds=[5, 6, 7, 8], static_cache=True)
    assert torch.equal(static["completion_ids"], growing["completion_ids"])
