"""Per-token log-probs of completions under a policy: chunked over the vocabulary so
no [B, L, vocab] tensor is held, shared-prompt batches, packed rows, and the
no-grad old and reference log-probs of a generation batch."""

import torch
import torch.nn.functional as F

from shared.distributed import world_size
from shared.modeling import adapters_off
from shared.rollout import vocab_limit


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


def expert_row_logps(model, expert_batch, temperature: float, chunk_tokens: int, like: torch.Tensor):
    """Float log-probs [E, L] and response mask of one micro-step's expert rows (an item of
    shared/data.py:expert_micro_batches); empty [0, 1] tensors like `like` for a micro-step
    without any (base GRPO, or fewer expert rows than micro-steps)."""
    if expert_batch is None:
        return like.new_zeros(0, 1), like.new_zeros(0, 1)
    ids, mask, expert_mask, prompt_len = expert_batch
    return completion_logps(model, ids, mask, prompt_len, temperature, chunk_tokens).float(), expert_mask


@torch.no_grad()
def batch_logps(policy, rollouts: dict, args, with_entropy: bool = False):
    """No-grad log-probs of a generation batch under `policy` at the sampling temperature,
    --micro-batch-size rows at a time: [B, L] (and the token entropies [B, L], float32,
    when with_entropy: ADPO's anchor and its adaptive tau)."""
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)
    ids, mask, start = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
    with autocast:
        parts = [completion_logps(policy, ids[s:s + args.micro_batch_size], mask[s:s + args.micro_batch_size], start,
                                  args.temperature, args.logp_chunk_tokens, with_entropy=with_entropy)
                 for s in range(0, ids.size(0), args.micro_batch_size)]
    if with_entropy:
        return torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts]).float()
    return torch.cat(parts)


@torch.no_grad()
def old_and_ref_logps(model, ref_model, rollouts: dict, args) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The no-grad log-probs of a generation batch (batch_logps): the sampling (old)
    policy's when the batch is optimised more than once (--num-iterations > 1; otherwise
    old = current, detached), and the reference's when ref_model is given (else None)."""
    old = batch_logps(model, rollouts, args) if getattr(args, "num_iterations", 1) > 1 else None
    if ref_model is None:
        return old, None
    with adapters_off(ref_model):  # a LoRA policy is its own reference, with the adapters off
        return old, batch_logps(ref_model, rollouts, args)


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
