"""What a token may be drawn from: never an id past the tokenizer (Qwen3's embedding
has 267 rows that are no token), and with --top-k / --top-p only the likeliest ones,
filtered as Hugging Face's generate filters them."""

import pytest
import torch
from transformers import AutoConfig, Qwen3ForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from shared.logprobs import completion_logps, naive_completion_logps
from shared.modeling import build_tiny_model, load_model, load_tokenizer
from shared.rollout import generate_rollouts, sampling_logits

PADDING_ROWS = 24


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (5, 1.0), (7, 0.5), (0, 0.05), (3, 0.999)])
def test_sampling_logits_filter_as_hugging_face_does(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 3
    expected = logits / 0.8
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = sampling_logits(logits, 0.8, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
    assert (~torch.isinf(ours)).sum(1).min() >= 1  # the likeliest token always stays


def test_ids_past_the_vocabulary_are_masked_before_the_filters():
    logits = torch.zeros(2, 10)
    logits[:, 8:] = 100.0  # the padded rows would win every draw
    filtered = sampling_logits(logits, 1.0, top_k=3, vocab=8)
    assert torch.isinf(filtered[:, 8:]).all() and (~torch.isinf(filtered[:, :8])).sum(1).tolist() == [8, 8]


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory):
    """A tiny model whose head has PADDING_ROWS rows more than its tokenizer has tokens,
    as Qwen3-0.6B's does (151,936 rows, 151,669 tokens), saved and loaded as usual."""
    folder = build_tiny_model(tmp_path_factory.mktemp("padded"), hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64)
    config = AutoConfig.from_pretrained(folder)
    tokens = config.vocab_size
    config.vocab_size = tokens + PADDING_ROWS
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(folder)
    return str(folder), tokens


def test_load_model_records_how_many_head_rows_are_tokens(padded_model):
    folder, tokens = padded_model
    model = load_model(folder)
    assert model.get_output_embeddings().weight.size(0) == tokens + PADDING_ROWS
    assert model.tokenizer_vocab_size == tokens == len(load_tokenizer(folder))


@pytest.mark.parametrize("share_prompts", [True, False])
def test_sampling_never_draws_an_id_past_the_tokenizer(padded_model, share_prompts):
    """At temperature 20 the distribution is nearly flat over all rows, so an unmasked
    sampler draws one of the 24 padded ids (of ~290) with probability ~0.08 per token:
    over 16 rows x 24 tokens it would almost surely draw some."""
    folder, tokens = padded_model
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    out = generate_rollouts(model, tokenizer, ["copy abc", "reverse abd"], group_size=8, max_new_tokens=24,
                            temperature=20.0, seeds=[1, 2], share_prompts=share_prompts)
    drawn = out["completion_ids"][out["completion_mask"].bool()]
    assert drawn.numel() > 100 and drawn.max() < tokens


def test_log_probs_normalise_over_the_tokenizers_ids(padded_model):
    folder, tokens = padded_model
    tokenizer, model = load_tokenizer(folder), load_model(folder)
    out = generate_rollouts(model, tokenizer, ["copy abc"], group_size=4, max_new_tokens=8, seeds=[3])
    ids, mask, start = out["input_ids"], out["attention_mask"], out["prompt_len"]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    expected = torch.log_softmax(logits[:, start - 1:-1, :tokens], -1).gather(-1, ids[:, start:, None]).squeeze(-1)
    assert torch.allclose(completion_logps(model, ids, mask, start), expected, atol=1e-5)
    assert torch.allclose(naive_completion_logps(model, ids, mask, start)[0], expected, atol=1e-5)
    over_every_row = torch.log_softmax(logits[:, start - 1:-1], -1).gather(-1, ids[:, start:, None]).squeeze(-1)
    assert not torch.allclose(over_every_row, expected, atol=1e-5)  # the padded rows carry mass: the test can fail


def test_top_k_1_samples_the_greedy_tokens(tiny_world):
    tokenizer, model = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    prompts = ["copy abc", "reverse abd"]
    greedy = generate_rollouts(model, tokenizer, prompts, max_new_tokens=8, do_sample=False)
    sampled = generate_rollouts(model, tokenizer, prompts, max_new_tokens=8, temperature=5.0, seeds=[1, 2], top_k=1)
    assert torch.equal(sampled["completion_ids"], greedy["completion_ids"])
    free = generate_rollouts(model, tokenizer, prompts, group_size=4, max_new_tokens=8, temperature=5.0, seeds=[1, 2])
    assert not torch.equal(free["completion_ids"][::4], greedy["completion_ids"])
