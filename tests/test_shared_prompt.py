"""Each prompt computed once per group, in every log-prob pass and in sampling, must be
the plain computation reorganised: same log-probs, same gradients, same distributions.

Tolerance: Qwen3's RMSNorm computes in float32 even in a float64 model, which alone
puts ~1e-7 relative differences into gradients whose summation order differs (the
shared path adds a group's prompt gradients before the matmul, the plain path inside
it). The exactness tests therefore patch the norm to stay in the input dtype; the model
is then float64 end to end and both paths agree to ~1e-15 (asserted: 1e-12). The
stock norm is checked at 1e-6 relative, bf16 autocast at 2e-2 absolute on log-probs."""

import pytest
import torch
import transformers.models.qwen3.modeling_qwen3 as qwen3
from transformers import Qwen3Config, Qwen3ForCausalLM

from shared.logprobs import completion_logps, prompt_groups
from shared.rollout import generate_rollouts


def float64_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def tiny_model(dtype=torch.float64):
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, eos_token_id=3, pad_token_id=0)
    return Qwen3ForCausalLM(config).to(dtype)


def grouped_batch(group_sizes=(4, 1, 3), prompt_len=7, completion_len=5):
    """Left-padded prompts of different lengths, each repeated for its group; some
    completions end early (mask 0 after their eos)."""
    g = torch.Generator().manual_seed(2)
    ids, mask = [], []
    for index, size in enumerate(group_sizes):
        prompt = torch.randint(4, 50, (prompt_len,), generator=g)
        prompt_mask = torch.ones(prompt_len, dtype=torch.long)
        prompt_mask[: index * 2] = 0  # padding 0, 2, 4 columns
        for _ in range(size):
            completion = torch.randint(4, 50, (completion_len,), generator=g)
            completion_mask = torch.ones(completion_len, dtype=torch.long)
            if torch.rand(1, generator=g) < 0.5:
                stop = int(torch.randint(1, completion_len, (1,), generator=g))
                completion[stop - 1], completion_mask[stop:] = 3, 0  # eos, then nothing
            ids.append(torch.cat([prompt, completion]))
            mask.append(torch.cat([prompt_mask, completion_mask]))
    return torch.stack(ids), torch.stack(mask), prompt_len


def logps_and_grads(model, ids, mask, start, share, weights, temperature=0.7):
    model.zero_grad()
    logps = completion_logps(model, ids, mask, start, temperature, share_prompts=share)
    (logps * weights).sum().backward()
    return logps.detach(), [p.grad.clone() for p in model.parameters()]


def assert_paths_agree(model, ids, mask, start, atol_logps, rtol_grads):
    weights = torch.randn(ids.size(0), ids.size(1) - start, generator=torch.Generator().manual_seed(3)).to(
        next(model.parameters()).dtype) * mask[:, start:]
    plain, plain_grads = logps_and_grads(model, ids, mask, start, False, weights)
    shared, shared_grads = logps_and_grads(model, ids, mask, start, True, weights)
    active = mask[:, start:].bool()
    assert (plain - shared)[active].abs().max() <= atol_logps
    for a, b in zip(plain_grads, shared_grads):
        assert (a - b).abs().max() <= rtol_grads * a.abs().max()


def test_prompt_groups_find_runs_of_equal_prompts():
    ids, mask, start = grouped_batch()
    first_rows, group_of_row = prompt_groups(ids, mask, start)
    assert first_rows.tolist() == [0, 4, 5] and group_of_row.tolist() == [0, 0, 0, 0, 1, 2, 2, 2]


def test_shared_prompts_give_the_plain_logps_and_gradients_in_float64(monkeypatch):
    monkeypatch.setattr(qwen3.Qwen3RMSNorm, "forward", float64_rms_norm)
    model = tiny_model()
    ids, mask, start = grouped_batch()
    assert_paths_agree(model, ids, mask, start, 1e-12, 1e-12)
    # a micro-batch that cuts through two groups
    assert_paths_agree(model, ids[2:7], mask[2:7], start, 1e-12, 1e-12)


def test_shared_prompts_with_the_stock_float32_norm():
    model = tiny_model()
    ids, mask, start = grouped_batch()
    assert_paths_agree(model, ids, mask, start, 1e-12, 1e-6)


def test_gradient_checkpointing_runs_every_row_in_full_and_agrees(monkeypatch):
    monkeypatch.setattr(qwen3.Qwen3RMSNorm, "forward", float64_rms_norm)
    model = tiny_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, mask, start = grouped_batch()
    assert_paths_agree(model, ids, mask, start, 1e-12, 1e-12)


def test_bf16_autocast_stays_close():
    model = tiny_model(torch.float32)
    ids, mask, start = grouped_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = completion_logps(model, ids, mask, start, share_prompts=False)
        shared = completion_logps(model, ids, mask, start, share_prompts=True)
    assert (plain.float() - shared.float())[mask[:, start:].bool()].abs().max() < 2e-2


class ByteTokenizer:
    """Just enough of a tokenizer for generate_rollouts on the test model."""
    eos_token_id, pad_token_id = 3, 0

    def __len__(self):
        return 50  # every id of tiny_model's vocabulary is a token

    def apply_chat_template(self, messages, **_):
        return messages[0]["content"]

    def __call__(self, texts, **_):
        rows = [[4 + (ord(c) % 46) for c in text] for text in texts]
        width = max(len(r) for r in rows)
        return {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}

    def batch_decode(self, ids, **_):
        return [" ".join(str(int(t)) for t in row if t != 0) for row in ids]


@pytest.mark.parametrize("do_sample", [False, True])
def test_the_shared_decode_loop_samples_the_plain_distribution(do_sample):
    model = tiny_model(torch.float32)
    tokenizer = ByteTokenizer()
    prompts = ["abc", "a longer prompt"]
    torch.manual_seed(0)
    ours = generate_rollouts(model, tokenizer, prompts, group_size=3, max_new_tokens=6, temperature=0.7,
                             do_sample=do_sample, output_scores=True, share_prompts=True)
    torch.manual_seed(0)
    plain = generate_rollouts(model, tokenizer, prompts, group_size=3, max_new_tokens=6, temperature=0.7,
                              do_sample=do_sample, output_scores=True, share_prompts=False)
    # the first decode step: the same distribution for every row
    assert torch.allclose(torch.log_softmax(ours["scores"][:, 0], -1), torch.log_softmax(plain["scores"][:, 0].float(), -1),
                          atol=1e-5)
    if not do_sample:  # greedy decoding is deterministic: the same completions
        assert torch.equal(ours["completion_ids"], plain["completion_ids"])
    # every sampled token's log-prob under the training path equals the sampling distribution's
    ids = torch.cat([ours["prompt_ids"], ours["completion_ids"]], 1)
    mask = torch.cat([ours["prompt_mask"], ours["completion_mask"]], 1)
    with torch.no_grad():
        logps = completion_logps(model, ids, mask, ours["prompt_ids"].size(1), 0.7 if do_sample else 1.0)
    drawn_from = torch.log_softmax(ours["scores"], -1).gather(-1, ours["completion_ids"][..., None]).squeeze(-1)
    active = ours["completion_mask"].bool()
    assert torch.allclose(drawn_from[active], logps[active], atol=1e-4)
