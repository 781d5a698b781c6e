"""Rollouts: prompts encoded through the chat template, sampled completions (top-k/p,
shared-prompt groups, a growing or static KV cache) and their masks."""

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, StaticCache

from shared.distributed import any_rank
from shared.modeling import chat_prompt


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated, left-padded prompt ids and mask, [B, P]."""
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def encode_prompt_response(tokenizer, prompts: list[str], responses: list[str], device):
    """Left-padded chat prompt + right-padded response + eos, so every response starts
    at column P (the layout generate_rollouts returns). Used for expert demonstrations
    and preference pairs. Returns input_ids, attention_mask [B, P+L], response_mask [B, L], P."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    encoded = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]
    length = max(len(e) for e in encoded)
    response_ids = torch.full((len(encoded), length), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, ids in enumerate(encoded):
        response_ids[i, :len(ids)] = torch.tensor(ids)
        response_mask[i, :len(ids)] = 1
    response_ids, response_mask = response_ids.to(device), response_mask.to(device)
    return (torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1),
            response_mask, prompt_ids.size(1))


def stop_ids(tokenizer) -> list[int]:
    """The tokens that end a response (shared/modeling.py:stop_token_ids, set by
    load_tokenizer); a tokenizer made elsewhere stops on its eos."""
    return getattr(tokenizer, "stop_token_ids", None) or [tokenizer.eos_token_id]


def _as_stop_tensor(eos_token_id: int | list[int], device) -> torch.Tensor:
    return torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=device)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, L] that is 1 up to and including the first eos (any of a list of stop
    tokens), and a truncation flag [B] that is True where none was produced."""
    is_eos = torch.isin(completion_ids, _as_stop_tensor(eos_token_id, completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.size(1))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), ~has_eos


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: list[str], group_size: int = 1, max_new_tokens: int = 32,
                      temperature: float = 1.0, do_sample: bool = True, output_scores: bool = False,
                      share_prompts: bool = True, seeds: list[int] | None = None, autocast_bf16: bool = False,
                      top_k: int = 0, top_p: float = 1.0, static_cache: bool = False) -> dict:
    """group_size samples of every prompt, all in one batch with a KV cache.

    Samples of the same prompt are contiguous: rows [i*G, (i+1)*G) belong to prompt i.
    share_prompts: our decode loop (sample_with_shared_prompts), which runs each prompt
    once; otherwise Hugging Face `generate` on every row, the plain reference.
    seeds: one per prompt; each prompt's samples are drawn from its own generator, so
    they do not depend on which other prompts share the batch (or the process, under
    torchrun). Without seeds, the global RNG.
    autocast_bf16: run the model under bfloat16 autocast, as training does with the same
    flag, so the KV cache is bfloat16 (half the memory of float32); tokens are still
    drawn from float32 probabilities.
    top_k, top_p: sample only among the k likeliest tokens / the smallest set holding p
    of the probability (0 and 1.0: off, the papers' GRPO). With either on, tokens are
    not drawn from the policy the log-probs describe (TRL with vLLM does the same).
    Returns prompt_ids/prompt_mask [B*G, P], completion_ids/completion_mask [B*G, L]
    (mask covers tokens up to and including eos), both concatenated (input_ids,
    attention_mask [B*G, P+L], prompt_len P), truncated [B*G] and the decoded texts;
    with output_scores, also the logits / T each token was drawn from, [B*G, L, V].
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    filters = {"top_k": top_k, "top_p": top_p, "vocab": min(vocab_limit(model), len(tokenizer))}
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16)
    try:
        if share_prompts:
            generators = None if seeds is None else [torch.Generator(device).manual_seed(seed) for seed in seeds]
            with autocast:
                completion_ids, scores = sample_with_shared_prompts(model, prompt_ids, prompt_mask, group_size, max_new_tokens,
                                                                    temperature, do_sample, stop_ids(tokenizer),
                                                                    tokenizer.pad_token_id, generators, output_scores,
                                                                    **filters, static_cache=static_cache)
        else:
            if seeds is not None:
                torch.manual_seed(seeds[0])
            with autocast:
                completion_ids, scores = _generate(model, tokenizer, prompt_ids.repeat_interleave(group_size, dim=0),
                                                   prompt_mask.repeat_interleave(group_size, dim=0), max_new_tokens,
                                                   temperature, do_sample, output_scores, **filters)
    finally:
        model.train(was_training)
    completion_mask, truncated = completion_mask_from_ids(completion_ids, stop_ids(tokenizer))
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(group_size, dim=0), prompt_mask.repeat_interleave(group_size, dim=0)
    result = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "truncated": truncated, "texts": texts,
              # the sequences training scores: prompt then completion, completions starting at prompt_len
              "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
              "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1), "prompt_len": prompt_ids.size(1)}
    if output_scores:
        result["scores"] = scores
    return result


def vocab_limit(model) -> int:
    """The ids a policy's distribution covers: the rows of its head that are tokens
    (shared/modeling.py:tokenizer_vocab_size, recorded by load_model; a model made
    elsewhere: every row)."""
    return getattr(model, "tokenizer_vocab_size", None) or model.get_output_embeddings().weight.size(0)


def sampling_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                    vocab: int | None = None) -> torch.Tensor:
    """The float32 logits / T a token is drawn from, [N, V]: -inf past `vocab` (ids no
    token has), then outside the top_k likeliest (0: off), then outside the smallest
    set of likeliest tokens whose probability reaches top_p (1.0: off; the likeliest
    token always stays), in the order Hugging Face's generate applies them."""
    scaled = logits.float() / temperature
    if vocab is not None and vocab < scaled.size(-1):
        scaled[..., vocab:] = float("-inf")
    if 0 < top_k < scaled.size(-1):
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass of the likelier tokens already reaches top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scaled


def generate_texts(model, tokenizer, prompts: list[str], chunk_size: int, max_new_tokens: int, temperature: float = 1.0,
                   do_sample: bool = True, seeds: list[int] | None = None, **options) -> list[str]:
    """One response per prompt, chunk_size prompts per generate_rollouts call: the
    generations outside a training step (evaluation, a discriminator's fit and anchor
    metrics, drift probes) run over hundreds of prompts, and their KV cache grows with
    the chunk (Qwen3-0.6B: ~0.1 MB per token in bfloat16, so 400 prompts x 1k tokens
    is ~45 GB at once). `seeds` (one per prompt) keeps each draw independent of the
    chunking. Under torchrun every rank must pass the same number of prompts."""
    texts = []
    for s in range(0, len(prompts), chunk_size):
        texts += generate_rollouts(model, tokenizer, prompts[s:s + chunk_size], 1, max_new_tokens, temperature, do_sample,
                                   seeds=None if seeds is None else seeds[s:s + chunk_size], **options)["texts"]
    return texts


def sample_with_shared_prompts(model, prompt_ids, prompt_mask, group_size, max_new_tokens, temperature, do_sample,
                               eos_token_id, pad_token_id, generators=None, output_scores=False, top_k=0, top_p=1.0,
                               vocab=None, static_cache=False):
    """The decode loop: run each of the B prompts once (prefill), copy its KV cache to
    its G rows, then add one token to all B*G rows per step until every row has ended
    (on every process, under torchrun: sharded layers need every process in each
    forward) or max_new_tokens. Tokens are drawn from softmax(logits / T) over the
    tokenizer's ids (argmax when not do_sample), nothing else unless top_k / top_p
    (sampling_logits): the distribution every log-prob, ratio and KL assumes; with
    `generators` (one per prompt) each group draws from its own.
    eos_token_id: one stop token or a list (Qwen3: <|im_end|> and <|endoftext|>).
    Returns completion ids [B*G, L] (pad after a row's eos) and, with output_scores, the
    logits / T [B*G, L, V] (else None: at Qwen3's vocabulary they would be 0.6 MB per
    row and token, 40 GB for 64 rows x 1,024 tokens).
    static_cache: after the prefill, decode into a KV cache allocated once for all
    max_new_tokens (StaticCache) with a torch.compile'd one-token step, whose shapes
    never change, so it compiles once (CUDA graphs on a GPU); the same tokens as the
    growing cache (tests/test_static_decode.py), faster where per-step overhead
    dominates (scripts/bench_decode.py)."""
    # a peft (LoRA) wrapper takes no positional cache; the model inside it holds the adapters
    model = model.get_base_model() if hasattr(model, "peft_config") else model
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding, as completion_logps
    compute_dtype = torch.get_autocast_dtype(prompt_ids.device.type) \
        if torch.is_autocast_enabled(prompt_ids.device.type) else next(model.parameters()).dtype
    cache = CacheInDtype(compute_dtype, config=model.config)
    # the cache is the 4th positional argument and the 2nd output (see completion_hidden)
    logits, cache = model(prompt_ids, prompt_mask, position_ids, cache, use_cache=True, logits_to_keep=1)[:2]
    cache.batch_repeat_interleave(group_size)
    logits = logits[:, -1].repeat_interleave(group_size, dim=0)
    attention_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    next_position = attention_mask.sum(1, keepdim=True)
    prompt_len = prompt_ids.size(1)
    if static_cache:
        cache = _static_copy(cache, model.config, prompt_len + max_new_tokens, compute_dtype)
        attention_mask = F.pad(attention_mask, (0, max_new_tokens))  # a column turns 1 when its token is drawn
    finished = torch.zeros(attention_mask.size(0), dtype=torch.bool, device=prompt_ids.device)
    stop = _as_stop_tensor(eos_token_id, prompt_ids.device)
    tokens, scores = [], []
    for t in range(max_new_tokens):
        scaled = sampling_logits(logits, temperature, top_k, top_p, vocab) if do_sample \
            else sampling_logits(logits, 1.0, vocab=vocab)
        if not do_sample:
            token = scaled.argmax(-1)
        elif generators is None:
            token = torch.multinomial(scaled.softmax(-1), 1).squeeze(1)
        else:
            probs = scaled.softmax(-1).split(group_size)
            token = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)]).squeeze(1)
        token = token.masked_fill(finished, pad_token_id)
        tokens.append(token)
        if output_scores:
            scores.append(scaled)
        finished |= torch.isin(token, stop)
        if not any_rank(not finished.all()):
            break
        if static_cache:
            attention_mask[:, prompt_len + t] = 1
            logits = _decode_step(model, token[:, None], attention_mask, next_position, cache,
                                  torch.tensor([prompt_len + t], device=token.device))
        else:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            logits, cache = model(token[:, None], attention_mask, next_position, cache, use_cache=True)[:2]
            logits = logits[:, -1]
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(scores, dim=1) if output_scores else None


class _StoredInDtype:
    """A KV cache stored in the compute dtype. Under autocast the keys leave Qwen3's
    k_norm in float32 (its float32 weight promotes them) while the values are bfloat16:
    stored as they come, the cache would be float32 for keys, the largest tensor of
    sampling long completions at real scale (28 layers x 8 KV heads x 128 x 2 per token
    for Qwen3-0.6B). Attention under autocast computes in bfloat16 either way."""

    def __init__(self, dtype: torch.dtype, **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states.to(self.dtype), value_states.to(self.dtype), layer_idx, *args, **kwargs)


class CacheInDtype(_StoredInDtype, DynamicCache):
    """The growing cache of the decode loop, in the compute dtype."""


class StaticCacheInDtype(_StoredInDtype, StaticCache):
    """The cache allocated once (--static-cache), in the compute dtype."""


def _static_copy(cache, config, length: int, dtype: torch.dtype) -> StaticCacheInDtype:
    """A static cache of `length` positions holding the (already repeated) prefill cache."""
    static = StaticCacheInDtype(dtype, config=config, max_cache_len=length)
    for index, layer in enumerate(cache.layers):
        positions = torch.arange(layer.keys.size(2), device=layer.keys.device)
        static.update(layer.keys, layer.values, index, {"cache_position": positions})
    return static


def decode_step(model, token, attention_mask, position_ids, cache, cache_position):
    """The logits of one new token for every row, with a static cache: fixed shapes."""
    return model(token, attention_mask, position_ids, cache, use_cache=True, cache_position=cache_position)[0][:, -1]


_decode_step = torch.compile(decode_step, dynamic=False)  # compiled at its first call, once per shape


def _generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens, temperature, do_sample, output_scores=False,
              top_k=0, top_p=1.0, vocab=None):
    """Hugging Face `generate` with the configuration built from our flags alone: a
    checkpoint's own generation_config (Qwen2.5-Instruct ships repetition_penalty 1.05)
    would otherwise change what is sampled. generate() fills every field left unset from
    model.generation_config, so an empty one stands in for it during the call."""
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample \
        else {"do_sample": False}
    rows = model.get_output_embeddings().weight.size(0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids(tokenizer),
                              pad_token_id=tokenizer.pad_token_id, use_cache=True,
                              suppress_tokens=list(range(vocab, rows)) if vocab and vocab < rows else None, **sampling)
    saved_config, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                             output_scores=output_scores, return_dict_in_generate=True)
    finally:
        model.generation_config = saved_config
    return out.sequences[:, prompt_ids.size(1):], torch.stack(out.scores, dim=1) if output_scores else None
