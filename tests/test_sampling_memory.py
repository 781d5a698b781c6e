"""Sampling at Qwen3's vocabulary keeps no per-step logits unless asked, and with
--autocast-bf16 its KV cache is bfloat16. Memory is counted as the bytes of every live
tensor other than the model's weights, at each decode step (a forward hook), so the test
is exact and independent of the allocator; scripts/bench_sampling_memory.py measures
the same as peak RSS of fresh processes."""

import gc

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from shared.modeling import build_tiny_tokenizer
from shared.rollout import generate_rollouts

VOCAB = 151_936


def wide_model_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(VOCAB)
    tokenizer.padding_side = "left"
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():  # eos never drawn: every row runs to max_new_tokens
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0  # logit 0 among 151,936: p(eos) ~ 1e-5 a step
    return model, tokenizer


def live_tensor_bytes(exclude: set[int]) -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen and storage.data_ptr() not in exclude:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def peak_live_bytes(model, tokenizer, max_new_tokens, output_scores=False, autocast_bf16=False):
    """The most bytes of live tensors at any decode step, and the dtypes of the KV cache seen."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    peak, cache_dtypes = [0], set()

    def hook(module, args, kwargs, output):
        peak[0] = max(peak[0], live_tensor_bytes(weights))
        cache = output[1] if isinstance(output, tuple) else output.past_key_values
        cache_dtypes.update(tensor.dtype for layer in cache.layers for tensor in (getattr(layer, "keys", None),
                                                                                   getattr(layer, "values", None))
                            if tensor is not None)

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        out = generate_rollouts(model, tokenizer, ["copy ab", "copy cd", "copy ef", "copy gh"], 8, max_new_tokens,
                                temperature=1.0, output_scores=output_scores, seeds=[0, 1, 2, 3],
                                autocast_bf16=autocast_bf16)
    finally:
        handle.remove()
    assert out["completion_ids"].size(1) == max_new_tokens
    return peak[0], cache_dtypes


def test_sampling_keeps_no_per_step_logits_at_qwen3_vocabulary():
    model, tokenizer = wide_model_and_tokenizer()
    short, _ = peak_live_bytes(model, tokenizer, 8)
    long, _ = peak_live_bytes(model, tokenizer, 64)
    assert long - short < 300 * 2**20, (short, long)
    # the count does see kept logits: [32 rows, 64 steps, 151,936] float32 is 1.2 GB
    kept, _ = peak_live_bytes(model, tokenizer, 64, output_scores=True)
    assert kept - long > 1.0 * 2**30, (long, kept)


def test_the_kv_cache_follows_the_compute_dtype_under_autocast():
    model, tokenizer = wide_model_and_tokenizer()
    _, plain = peak_live_bytes(model, tokenizer, 4)
    _, autocast = peak_live_bytes(model, tokenizer, 4, autocast_bf16=True)
    assert plain == {torch.float32} and autocast == {torch.bfloat16}
