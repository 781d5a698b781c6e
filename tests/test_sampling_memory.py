"""Sampling at Qwen3's vocabulary keeps no per-step logits unless asked, and with
--autocast-bf16 its KV cache is bfloat16. Memory is counted as the bytes of every live
tensor other than the model's weights, at each decode step (a forward hook), so the test
is exact and independent of the allocator; scripts/bench_sampling_memory.py measures
the same as peak RSS of fresh processes."""

import gc

import pytest
import torch

from shared.modeling import build_tiny_model, load_model, load_tokenizer
from shared.rollout import generate_rollouts

VOCAB = 151_936


@pytest.fixture(scope="module")
def wide_model_and_tokenizer(tmp_path_factory):
    """A 2-layer Qwen3-architecture model with Qwen3's vocabulary, saved and loaded as
    any checkpoint is, whose eos logit is 0 (p(eos) ~ 1e-5 a step: rows run to the limit)."""
    folder = build_tiny_model(tmp_path_factory.mktemp("wide") / "model", hidden_size=16, num_layers=2, num_heads=2,
                              intermediate_size=32, vocab_size=VOCAB)
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    return model, tokenizer


def live_tensor_bytes(exclude: set[int]) -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or isinstance(obj, torch.nn.Parameter):
                continue
            storage = obj.untyped_storage()
            pointer = storage.data_ptr()
        except (ReferenceError, RuntimeError, NotImplementedError):  # dead weak proxies, fake tensors of torch.compile
            continue
        if pointer not in seen and pointer not in exclude:
            seen.add(pointer)
            total += storage.nbytes()
    return total


def peak_live_bytes(model, tokenizer, max_new_tokens, output_scores=False, autocast_bf16=False):
    """The most bytes of live tensors over the decode steps (counted every 8th step: what
    a sampler keeps only grows), and the dtypes of the KV cache seen."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    peak, cache_dtypes, calls = [0], set(), [0]

    def hook(module, args, kwargs, output):
        calls[0] += 1
        if calls[0] % 8 == 0:
            peak[0] = max(peak[0], live_tensor_bytes(weights))
        cache = output[1] if isinstance(output, tuple) else output.past_key_values
        cache_dtypes.update(tensor.dtype for layer in cache.layers for tensor in (getattr(layer, "keys", None),
                                                                                   getattr(layer, "values", None))
                            if tensor is not None)

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        out = generate_rollouts(model, tokenizer, ["copy ab", "copy cd"], 4, max_new_tokens, temperature=1.0,
                                output_scores=output_scores, seeds=[0, 1], autocast_bf16=autocast_bf16)
    finally:
        handle.remove()
    assert out["completion_ids"].size(1) == max_new_tokens
    return peak[0], cache_dtypes


def test_sampling_keeps_no_per_step_logits_at_qwen3_vocabulary(wide_model_and_tokenizer):
    """8 rows (2 prompts x G=4; sampling 151,936 categories is slow on a CPU): one step's
    float32 logits are 4.9 MB, 32 more steps kept would be 156 MB."""
    model, tokenizer = wide_model_and_tokenizer
    step_logits = 8 * VOCAB * 4
    short, _ = peak_live_bytes(model, tokenizer, 8)
    long, _ = peak_live_bytes(model, tokenizer, 40)
    assert long - short < 2 * step_logits, (short, long)
    # the count does see kept logits
    kept, _ = peak_live_bytes(model, tokenizer, 40, output_scores=True)
    assert kept - long > 0.9 * 32 * step_logits, (long, kept)


def test_the_kv_cache_follows_the_compute_dtype_under_autocast(wide_model_and_tokenizer):
    model, tokenizer = wide_model_and_tokenizer
    _, plain = peak_live_bytes(model, tokenizer, 4)
    _, autocast = peak_live_bytes(model, tokenizer, 4, autocast_bf16=True)
    assert plain == {torch.float32} and autocast == {torch.bfloat16}
