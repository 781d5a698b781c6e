import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from shared.logprobs import completion_logps, naive_completion_logps
from shared.rollout import completion_mask_from_ids, encode_prompt_response


def small_model(vocab):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).double()


def test_chunked_logps_match_naive_values_and_gradients_at_qwen_vocab():
    model = small_model(151_936)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(151_936, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    fast, fast_entropy = completion_logps(model, ids, mask, 7, temperature=0.7, chunk_tokens=4, with_entropy=True)
    fast.sum().backward()
    fast_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    slow, slow_entropy = naive_completion_logps(model, ids, mask, 7, temperature=0.7)
    slow.sum().backward()
    assert torch.allclose(fast, slow, atol=1e-10)
    assert torch.allclose(fast_entropy, slow_entropy, atol=1e-10)
    for a, p in zip(fast_grads, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-10)


def test_completion_mask_covers_up_to_and_including_eos():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 6, 7, 8, 8], [9, 1, 1, 1, 1]])
    mask, truncated = completion_mask_from_ids(ids, eos_token_id=9)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_bfloat16_weights_and_autocast_give_float32_logps_close_to_float32_and_gradients():
    """The GPU knobs on the CPU: bf16 weights, and fp32 weights under bf16 autocast, both give
    float32 log-probs within bf16 precision of the float32 model's, and a finite gradient."""
    reference = small_model(300).float()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(300, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        exact = completion_logps(reference, ids, mask, 6)
    bf16_model = small_model(300).to(torch.bfloat16)
    autocast_model = small_model(300).float()
    for model, autocast in ((bf16_model, False), (autocast_model, True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps = completion_logps(model, ids, mask, 6)
        assert logps.dtype == torch.float32
        assert torch.allclose(logps, exact, atol=0.1), (logps - exact).abs().max()
        logps.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(grad.float()).all() for grad in grads)


@pytest.mark.parametrize("share_prompts", [True, False])
def test_sampling_ignores_the_checkpoints_generation_config(tmp_path, share_prompts):
    # A checkpoint whose generation_config asks for a repetition penalty, top-k and min-p:
    # rollouts must still come from softmax(logits / T), the distribution every ratio,
    # KL and anchor is computed under.
    from shared.modeling import build_tiny_model, load_model, load_tokenizer
    from shared.rollout import generate_rollouts

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = load_model(str(path))
    model.generation_config.update(repetition_penalty=1.3, top_k=20, min_p=0.1, do_sample=True)
    model.save_pretrained(path)
    model, tokenizer = load_model(str(path)), load_tokenizer(str(path))
    assert model.generation_config.repetition_penalty == 1.3
    torch.manual_seed(0)
    out = generate_rollouts(model, tokenizer, ["abc", "hello there"], group_size=2, max_new_tokens=6,
                            temperature=0.7, output_scores=True, share_prompts=share_prompts)
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        ours = completion_logps(model, ids, mask, out["prompt_ids"].size(1), temperature=0.7)
    sampled_from = torch.log_softmax(out["scores"].float(), -1).gather(-1, out["completion_ids"][..., None]).squeeze(-1)
    active = out["completion_mask"].bool()
    assert torch.allclose(sampled_from[active], ours[active], atol=1e-4)
    # every token stays reachable: no top-k / min-p cut (the untrained model is near uniform)
    assert torch.isfinite(out["scores"][active]).all()
    assert model.generation_config.repetition_penalty == 1.3  # the model's own config is left as it was


def test_loaded_models_have_dropout_off(tmp_path):
    # a checkpoint saved with attention dropout 0.5: in train mode two forward passes
    # would differ; after load_model they are identical, so rho is exactly 1 at the old policy
    from shared.modeling import build_tiny_model, load_model

    path = build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    noisy = load_model(str(path))
    noisy.config.attention_dropout = 0.5
    noisy.save_pretrained(path)
    model = load_model(str(path)).train()
    assert model.config.attention_dropout == 0.0
    ids = torch.randint(200, (2, 9))
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    first = completion_logps(model, ids, mask, 4)
    second = completion_logps(model, ids, mask, 4)
    assert torch.equal(first, second)


def test_the_chunked_backward_recomputes_the_logits_in_the_forwards_autocast_dtype(monkeypatch):
    """Autograd runs a custom Function's backward outside autocast: without care the
    recomputed logits would be float32 while the forward's were bfloat16, so the gradient
    would belong to another function. Every logits matmul, forward and backward, must
    run in the same dtype (bf16 under autocast, float32 without)."""
    from shared.logprobs import token_logps_from_hidden

    seen, linear = [], torch.nn.functional.linear

    def recording_linear(*args, **kwargs):
        out = linear(*args, **kwargs)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", recording_linear)
    torch.manual_seed(0)
    for autocast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        seen.clear()
        hidden = torch.randn(2, 3, 16, requires_grad=True)
        weight = torch.randn(50, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logps, _ = token_logps_from_hidden(hidden, weight, None, torch.randint(50, (2, 3)), chunk_tokens=4)
        logps.sum().backward()
        assert len(seen) == 4 and set(seen) == {expected}, seen  # 2 chunks forward, 2 recomputed in backward
        assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


@pytest.mark.parametrize("layers", [(0, -1), (1, -1), (-1,)])
def test_discriminator_features_are_float32_under_an_enclosing_bf16_autocast(tiny_world, layers):
    """AAPA's and UniAPL's encoder features: the same numbers inside a bf16 autocast
    as outside (the encoder turns it off), and the kept-layers path equal to reading
    every hidden state."""
    from shared.embeddings import sentence_embeddings
    from shared.modeling import load_model, load_tokenizer

    tokenizer, encoder = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    prompts, responses = ["copy abc", "reverse abd", "upper xy"], ["abc", "dba", "XY and more"]
    plain = sentence_embeddings(encoder, tokenizer, prompts, responses, "cpu", layers)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = sentence_embeddings(encoder, tokenizer, prompts, responses, "cpu", layers)
        leaky = encoder.base_model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    exact = encoder.base_model(input_ids=torch.tensor([[5, 6, 7, 8]])).last_hidden_state
    assert not torch.equal(leaky, exact)  # autocast does change the encoder's numbers: the test can fail
    ids, mask, response_mask, prompt_len = encode_prompt_response(tokenizer, prompts, responses, "cpu")
    every = encoder.base_model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               output_hidden_states=True).hidden_states
    hidden = torch.cat([every[layer] for layer in layers], dim=-1)
    response_mean = (hidden[:, prompt_len:] * response_mask[:, :, None]).sum(1) / response_mask.sum(1, keepdim=True)
    assert torch.allclose(plain[:, hidden.size(-1):], response_mean, atol=1e-6)
