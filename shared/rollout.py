"""Rollouts, per-token log-probs and held-out evaluation: the parts every
algorithm runs but none of them defines."""

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationConfig, StaticCache

from shared.distributed import all_sum, any_rank, gather_objects, local_share, world_size
from shared.ifeval import without_think
from shared.modeling import adapters_off, chat_prompt


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


def naive_completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference for completion_logps: full logits, log_softmax, gather. It
    holds a [B, L, vocab] tensor (1.2 GB in float32 for 2k tokens at Qwen3's vocabulary),
    which is why the training path uses ChunkedTokenLogps instead; the tests compare the
    two. Returns per-token log-probs and entropies, [B, L] each."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, completion_start - 1:-1, :vocab_limit(model)]
    logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    entropies = -(logprobs.exp() * logprobs).sum(-1)
    return logprobs.gather(-1, input_ids[:, completion_start:, None]).squeeze(-1), entropies


LOGITS_CHUNK_BYTES = 64 * 2**20  # ~110 tokens at Qwen3's vocabulary, the whole batch for the tiny model


class ChunkedTokenLogps(torch.autograd.Function):
    """Per-token log-probs (and entropies) from hidden states and the LM head, one
    chunk of rows at a time. Backward recomputes each chunk's logits and adds its
    weight gradient into one buffer, so no [tokens, vocab] tensor outlives a chunk.
    d logp_t / d logits_t = (onehot(target_t) - softmax_t) / temperature."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_tokens):
        logps = hidden.new_empty(hidden.size(0), dtype=torch.promote_types(hidden.dtype, torch.float32))
        entropies = torch.empty_like(logps)
        for s in range(0, hidden.size(0), chunk_tokens):
            logits = _chunk_logits(hidden[s:s + chunk_tokens], weight, bias, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            logps[s:s + chunk_tokens] = logits.gather(-1, targets[s:s + chunk_tokens, None]).squeeze(-1) - lse
            entropies[s:s + chunk_tokens] = lse - (logits.softmax(-1) * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
        # backward recomputes the logits: under the forward's autocast, so it differentiates
        # the same bf16 logits (autograd runs backward outside autocast)
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad_logps, grad_entropies):
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights: accumulate in fp32
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if bias is not None and ctx.needs_input_grad[2] else None
        device, autocast_dtype, autocast_on = ctx.autocast
        for s in range(0, hidden.size(0), ctx.chunk_tokens):
            h, g = hidden[s:s + ctx.chunk_tokens], grad_logps[s:s + ctx.chunk_tokens]
            with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
                logits = _chunk_logits(h, weight, bias, ctx.temperature)
            grad_logits = logits.softmax(-1).mul_(-g[:, None])
            grad_logits.scatter_add_(-1, targets[s:s + ctx.chunk_tokens, None], g[:, None])
            grad_logits = grad_logits.div_(ctx.temperature)
            if grad_hidden is not None:
                grad_hidden[s:s + ctx.chunk_tokens] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T.to(accumulate), h.to(accumulate))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(accumulate)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


def _chunk_logits(hidden, weight, bias, temperature):
    logits = F.linear(hidden, weight, bias)
    return logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32 for the softmax


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int):
    """Rows whose prompt (ids and mask of the first completion_start columns) equals the
    previous row's form a group. Returns the first row of each group [K] and each row's
    group [B]."""
    prompt = torch.cat([input_ids[:, :completion_start], attention_mask[:, :completion_start]], dim=1)
    starts_group = torch.ones(prompt.size(0), dtype=torch.bool, device=prompt.device)
    starts_group[1:] = (prompt[1:] != prompt[:-1]).any(dim=1)
    return starts_group.nonzero().squeeze(1), starts_group.cumsum(0) - 1


def completion_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int,
                      share_prompts: bool = True) -> torch.Tensor:
    """The last hidden states that predict each completion token: positions
    completion_start - 1 .. end - 1 of the sequence, [B, L, H].

    With share_prompts, each group of rows with one prompt runs the prompt once: its
    keys and values (the KV cache, which keeps its autograd graph) are indexed out to
    every row of the group, and only the completions run per row. This is exact: a
    row's attention sees the same keys and values either way, and the prompt's gradient
    is the sum of its rows' gradients, which the backward of the indexing computes.
    Gradient checkpointing recomputes layers and would write into the shared cache a
    second time, so with it on every row runs in full.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does under left padding
    first_rows, group_of_row = prompt_groups(input_ids, attention_mask, completion_start)
    decoder = model.get_decoder()  # the transformer without its LM head, also through a peft (LoRA) wrapper
    checkpointing = getattr(decoder, "gradient_checkpointing", False) and model.training
    # (under torchrun every rank takes the same path: sharded layers need every rank in each forward)
    if not share_prompts or checkpointing or (len(first_rows) == input_ids.size(0) and world_size() == 1):
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        return hidden[:, completion_start - 1:-1]  # position t predicts token t+1
    # the cache is the 4th positional argument and the 2nd output: transformers 5.x renamed it
    # (past_key_values -> cache), positions work with both names
    prompt_hidden, cache = decoder(
        input_ids[first_rows, :completion_start],
        attention_mask[first_rows, :completion_start],
        position_ids[first_rows, :completion_start],
        None,
        use_cache=True,
    )[:2]
    cache.batch_select_indices(group_of_row)  # [K, ...] -> [B, ...]; its backward sums each group's gradients
    completion_hidden_states = decoder(input_ids[:, completion_start:], attention_mask, position_ids[:, completion_start:],
                                       cache, use_cache=True)[0]
    return torch.cat([prompt_hidden[group_of_row, -1:], completion_hidden_states[:, :-1]], dim=1)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int,
                     temperature: float = 1.0, chunk_tokens: int = 0, with_entropy: bool = False,
                     share_prompts: bool = True):
    """Per-token log-probs of input_ids[:, completion_start:] under `model`.

    Rows that carry the same prompt (a group's samples) compute it once
    (completion_hidden); share_prompts=False runs every row in full, for comparison.

    Logits are computed only at completion positions and only `chunk_tokens` rows
    at a time (ChunkedTokenLogps), so no [tokens, vocab] tensor ever outlives its
    chunk, forward or backward.
    Returns logps [B, L] (and entropies [B, L], no grad, when with_entropy).
    """
    hidden = completion_hidden(model, input_ids, attention_mask, completion_start, share_prompts)
    logps, entropies = head_logps(model, hidden, input_ids[:, completion_start:], temperature, chunk_tokens)
    return (logps, entropies) if with_entropy else logps


def head_logps(model, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 0):
    """token_logps_from_hidden with the model's LM head, over the head rows that are
    tokens (vocab_limit)."""
    head, vocab = model.get_output_embeddings(), vocab_limit(model)
    return token_logps_from_hidden(hidden, head.weight[:vocab], None if head.bias is None else head.bias[:vocab], targets,
                                   temperature, chunk_tokens)


def packed_token_logps(model, ids: torch.Tensor, doc: torch.Tensor, chunk_tokens: int = 0):
    """Per-token log-probs of rows that hold several documents (packed conversations):
    log p(ids[:, t] | the earlier tokens of its own document) for t = 1..L-1, [B, L-1],
    and the mask of the targets that have such context ([B, L-1]: not a document's first
    token, not padding, doc -1). Each document sees only itself: a block-diagonal causal
    mask (4-D, which the sdpa and eager attentions take) and positions restarting at 0,
    so a packed row computes what its documents would one by one."""
    length, device = ids.size(1), ids.device
    columns = torch.arange(length, device=device)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    positions = columns - torch.where(starts, columns, 0).cummax(dim=1).values
    same_document = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    attend = (same_document & causal) | torch.eye(length, dtype=torch.bool, device=device)  # padding sees itself
    hidden = model.get_decoder()(input_ids=ids, attention_mask=attend[:, None], position_ids=positions).last_hidden_state
    logps, _ = head_logps(model, hidden[:, :-1], ids[:, 1:], 1.0, chunk_tokens)
    return logps, (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)


@torch.no_grad()
def old_and_ref_logps(model, ref_model, rollouts: dict, args) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The no-grad log-probs of a generation batch, [B, L] each, --micro-batch-size rows
    at a time at the sampling temperature: the sampling (old) policy's when the batch
    is optimised more than once (--num-iterations > 1; otherwise old = current, detached),
    and the reference's when ref_model is given (else None)."""
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)
    ids, mask, start = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]

    def logps_of(policy):
        with autocast:
            return torch.cat([completion_logps(policy, ids[s:s + args.micro_batch_size], mask[s:s + args.micro_batch_size],
                                               start, args.temperature, args.logp_chunk_tokens)
                              for s in range(0, ids.size(0), args.micro_batch_size)])

    old = logps_of(model) if getattr(args, "num_iterations", 1) > 1 else None
    if ref_model is None:
        return old, None
    with adapters_off(ref_model):  # a LoRA policy is its own reference, with the adapters off
        return old, logps_of(ref_model)


def token_logps_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                            temperature: float = 1.0, chunk_tokens: int = 0):
    """log softmax(hidden @ weight.T + bias)[target] for hidden [B, L, H], targets [B, L],
    `chunk_tokens` rows at a time (0: as many as fit in LOGITS_CHUNK_BYTES of float32
    logits). Returns float32 logps and entropies (no grad), both [B, L]."""
    batch, length, width = hidden.shape
    if chunk_tokens <= 0:
        chunk_tokens = max(16, LOGITS_CHUNK_BYTES // (4 * weight.size(0)))
    logps, entropies = ChunkedTokenLogps.apply(hidden.reshape(-1, width), weight, bias, targets.reshape(-1),
                                               temperature, chunk_tokens)
    return logps.view(batch, length), entropies.view(batch, length)


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], score, batch_size: int = 64, max_new_tokens: int = 32,
             autocast_bf16: bool = False, strip_think: bool = False) -> dict:
    """Greedy decoding on held-out rows, the responses scored together by the task's
    `score(rows, texts) -> {name: value}` (together, because IFEval's instruction-level
    accuracy pools instructions over prompts; for instruction following
    shared/scoring.py:instruction_scores). Under torchrun each rank decodes its share
    and every rank gets every text. strip_think: `score` sees the answers after a
    reasoning model's </think> (the texts returned stay whole). Returns the scores, the mean response length in
    tokens, the truncation rate and the texts."""
    length, truncated, texts = [], [], []
    padded = rows + rows[-1:] * ((-len(rows)) % world_size())  # equal shares; the copies are dropped below
    mine = local_share(padded)
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        out = generate_rollouts(model, tokenizer, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens,
                                do_sample=False, autocast_bf16=autocast_bf16)
        length += out["completion_mask"].sum(1).tolist()
        truncated += out["truncated"].tolist()
        texts += out["texts"]
    length, truncated, texts = (gather_objects(values)[:len(rows)] for values in (length, truncated, texts))
    n = max(1, len(rows))
    answers = [without_think(text) for text in texts] if strip_think else texts
    return {**score(rows, answers), "length": sum(length) / n, "truncated": sum(truncated) / n, "prompts": len(rows),
            "texts": texts}


@torch.no_grad()
def sentence_embeddings(encoder, tokenizer, prompts: list[str], responses: list[str], device, layers=(0, -1),
                        batch_size: int = 64):
    """[N, 2 * len(layers) * H]: hidden states of a frozen encoder (the given hidden-state
    layers, 0 = token embeddings), mean-pooled over the prompt tokens and over the
    response tokens separately, so a discriminator sees x and y apart
    (AAPA's and UniAPL's features).
    Always in the encoder's own dtype, never under an enclosing bfloat16 autocast: the
    discriminator separates policy from expert by small differences of these means.
    Only the layers asked for are kept: all of them (output_hidden_states) would be 29
    activations of the batch at Qwen3-0.6B, and the default (0, -1) needs none of them."""
    features = []
    for s in range(0, len(prompts), batch_size):
        ids, mask, response_mask, prompt_len = encode_prompt_response(
            tokenizer, prompts[s : s + batch_size], responses[s : s + batch_size], device
        )
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.autocast(device_type=ids.device.type, enabled=False), adapters_off(encoder):
            if set(layers) <= {0, -1}:
                chosen = {0: encoder.get_input_embeddings()(ids)}
                if -1 in layers:
                    out = encoder.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids)
                    chosen[-1] = out.last_hidden_state
            else:
                chosen = encoder.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                               output_hidden_states=True).hidden_states
        hidden = torch.cat([chosen[layer] for layer in layers], dim=-1).float()
        prompt_mask = mask[:, :prompt_len, None].float()
        response_mask = response_mask[:, :, None].float()
        prompt_mean = (hidden[:, :prompt_len] * prompt_mask).sum(1) / prompt_mask.sum(1).clamp(min=1)
        response_mean = (hidden[:, prompt_len:] * response_mask).sum(1) / response_mask.sum(1).clamp(min=1)
        features.append(torch.cat([prompt_mean, response_mean], dim=1))
    return torch.cat(features)


def expert_micro_batches(tokenizer, prompts: list[str], cache: dict, parts: int, device):
    """The expert demonstrations of `prompts` (this rank's), encoded and split into
    `parts` contiguous micro-batches (None for an empty one), and the whole batch's
    expert token count over every rank: a tensor, not a float, so that a compiled loss
    does not recompile for every new count."""
    chunks = [part.tolist() for part in torch.tensor_split(torch.arange(len(prompts)), parts)]
    batches = [encode_prompt_response(tokenizer, [prompts[i] for i in chunk], [cache[prompts[i]] for i in chunk], device)
               if chunk else None for chunk in chunks]
    count = all_sum(sum((batch[2].sum() for batch in batches if batch is not None), torch.zeros((), device=device)))
    return batches, count
