"""Features of (prompt, response) pairs: the sentence embeddings AAPA's and UniAPL's
discriminators see (from a frozen encoder), and the General Preference Model's embedding
and gate (algos/gpm.py trains it, algos/gprl.py is judged by it)."""

import math

import torch

from shared import distributed
from shared.modeling import adapters_off, load_model, load_tokenizer
from shared.rollout import encode_prompt_response


def load_encoder(args, reference, tokenizer):
    """The frozen encoder of the discriminator's features and its tokenizer: --disc-encoder
    when given, else the frozen reference policy already loaded (and the policy's tokenizer)."""
    if not args.disc_encoder:
        return reference, tokenizer
    encoder_tokenizer = load_tokenizer(args.disc_encoder, args.system_prompt, args.chat_template_kwargs)
    encoder = distributed.shard(load_model(args.disc_encoder, args.dtype, args.device).eval().requires_grad_(False))
    return encoder, encoder_tokenizer


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


def gpm_embed(backbone, value_head, gate_head, tokenizer, prompts, responses, device):
    """v(x, y) [N, 2k] from the hidden state at the response's last token (eos), L2-normalised,
    and the gate lambda(x) [N, k], summing to k, from the hidden state at the prompt's last token."""
    ids, mask, response_mask, prompt_len = encode_prompt_response(tokenizer, prompts, responses, device)
    response_lengths = response_mask.sum(1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state.float()
    rows = torch.arange(ids.size(0), device=ids.device)
    v = torch.nn.functional.normalize(value_head(hidden[rows, prompt_len + response_lengths - 1]), dim=-1)
    # the reference model's eigenvalue gate: k * softmax(head(h) / sqrt(H)), so the gates sum
    # to k and start near 1 each, instead of sharing one unit of score between k dimensions
    k = gate_head.out_features
    gate = k * torch.softmax(gate_head(hidden[:, prompt_len - 1]) / math.sqrt(hidden.size(-1)), dim=-1)
    return v, gate
