"""Rollouts, per-token log-probs and held-out evaluation: the parts every
algorithm runs but none of them defines."""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from shared import toyworld
from shared.modeling import chat_prompt


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-templated, left-padded prompt ids and mask, [B, P]."""
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, L] that is 1 up to and including the first eos, and a truncation flag
    [B] that is True where no eos was produced."""
    is_eos = completion_ids == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), completion_ids.size(1))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
    return (positions[None, :] <= first_eos[:, None]).long(), ~has_eos


@torch.no_grad()
def generate_rollouts(model, tokenizer, prompts: list[str], group_size: int = 1, max_new_tokens: int = 32,
                      temperature: float = 1.0, do_sample: bool = True) -> dict:
    """One batched `generate` (KV cache) for every prompt x group_size sample.

    Samples of the same prompt are contiguous: rows [i*G, (i+1)*G) belong to prompt i.
    Returns prompt_ids/prompt_mask [B*G, P], completion_ids/completion_mask [B*G, L]
    (mask covers tokens up to and including eos), truncated [B*G] and the decoded texts.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         use_cache=True, **sampling)
    model.train(was_training)
    completion_ids = out[:, prompt_ids.size(1):]
    completion_mask, truncated = completion_mask_from_ids(completion_ids, tokenizer.eos_token_id)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "truncated": truncated, "texts": texts}


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, temperature: float,
                 with_entropy: bool):
    logits = F.linear(hidden, weight, bias)  # [chunk, V], freed after the chunk
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 -> fp32 for the softmax
    lse = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets[:, None]).squeeze(-1) - lse
    if not with_entropy:
        return logps, logps.new_zeros(())
    with torch.no_grad():
        entropy = lse - (logits.softmax(-1) * logits).sum(-1)
    return logps, entropy


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_start: int,
                     temperature: float = 1.0, chunk_tokens: int = 1024, with_entropy: bool = False):
    """Per-token log-probs of input_ids[:, completion_start:] under `model`.

    Logits are computed only at completion positions and only `chunk_tokens` rows
    at a time; each chunk is recomputed in backward (activation checkpointing), so
    no [tokens, vocab] tensor ever outlives its chunk, forward or backward.
    Returns logps [B, L] (and entropies [B, L], no grad, when with_entropy).
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does under left padding
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    hidden = hidden[:, completion_start - 1:-1]  # position t predicts token t+1
    batch, length, width = hidden.shape
    flat_hidden, flat_targets = hidden.reshape(-1, width), input_ids[:, completion_start:].reshape(-1)
    head = model.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, flat_hidden.size(0), chunk_tokens):
        args = (flat_hidden[start:start + chunk_tokens], head.weight, head.bias,
                flat_targets[start:start + chunk_tokens], temperature, with_entropy)
        chunk_logps, chunk_entropy = (checkpoint(_chunk_logps, *args, use_reentrant=False)
                                      if torch.is_grad_enabled() else _chunk_logps(*args))
        logps.append(chunk_logps)
        entropies.append(chunk_entropy.expand(chunk_logps.shape))
    logps = torch.cat(logps).view(batch, length)
    return (logps, torch.cat(entropies).view(batch, length)) if with_entropy else logps


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], batch_size: int = 64, max_new_tokens: int = 32) -> dict:
    """Greedy decoding on held-out rows: gold (prompt-level strict accuracy), reward
    (instruction-level), mean response length in tokens, truncation rate."""
    gold, reward, length, truncated, texts = [], [], [], [], []
    for i in range(0, len(rows), batch_size):
        batch = rows[i:i + batch_size]
        out = generate_rollouts(model, tokenizer, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens,
                                do_sample=False)
        for row, text in zip(batch, out["texts"]):
            gold.append(toyworld.gold(row, text))
            reward.append(toyworld.reward(row, text))
        length += out["completion_mask"].sum(1).tolist()
        truncated += out["truncated"].tolist()
        texts += out["texts"]
    n = max(1, len(rows))
    return {"gold": sum(gold) / n, "reward": sum(reward) / n, "length": sum(length) / n,
            "truncated": sum(truncated) / n, "texts": texts}
