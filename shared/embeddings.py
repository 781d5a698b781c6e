"""Sentence features of (prompt, response) pairs from a frozen encoder: what AAPA's and
UniAPL's discriminators see, and loading that encoder."""

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
