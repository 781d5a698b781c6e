"""--lora-r: only the LoRA adapters train, the reference is the same model with its
adapters off (no second copy), the checkpoint loads with from_pretrained, and an
interrupted LoRA run resumes exactly."""

import types

import torch
from conftest import run_main
from peft import PeftModel
from test_scripts import grpo_flags, losses
from transformers import AutoModelForCausalLM

from shared.logprobs import completion_logps, old_and_ref_logps
from shared.modeling import adapters_off, load_model, load_policy, load_reference, load_tokenizer
from shared.rollout import generate_rollouts

LORA = ["--lora-r", "4", "--lora-alpha", "8", "--learning-rate", "3e-2"]


def lora_args(model, **changes):
    fields = dict(model=model, dtype="float32", device="cpu", gradient_checkpointing=False, lora_r=4, lora_alpha=8.0,
                  lora_target_modules=("q_proj", "v_proj", "down_proj"), beta=0.1, num_iterations=1,
                  autocast_bf16=False, temperature=1.0, logp_chunk_tokens=0, micro_batch_size=8)
    return types.SimpleNamespace(**{**fields, **changes})


def test_the_reference_is_the_policy_with_its_adapters_off(tiny_world):
    args = lora_args(tiny_world["model"])
    policy = load_policy(tiny_world["model"], args)
    assert load_reference(args, policy) is policy  # no second copy of the weights
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)  # adapters that change the model
    tokenizer, base = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    rollouts = generate_rollouts(policy, tokenizer, ["copy abc", "reverse abd"], group_size=2, max_new_tokens=6, seeds=[1, 2])
    _, ref = old_and_ref_logps(policy, policy, rollouts, args)
    ids, mask, start = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
    with torch.no_grad():
        assert torch.allclose(ref, completion_logps(base, ids, mask, start), atol=1e-5)
        adapted = completion_logps(policy, ids, mask, start)
        assert not torch.allclose(adapted, ref, atol=1e-3)  # the adapters are on outside the context
        with adapters_off(policy):
            assert torch.allclose(completion_logps(policy, ids, mask, start), ref, atol=1e-5)


def test_a_lora_run_trains_adapters_only_saves_a_loadable_checkpoint_and_resumes_exactly(tiny_world, tmp_path):
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"

    def flags(out):
        chosen = grpo_flags(tiny_world, out, tiny_world["model"]) + LORA
        chosen[chosen.index("--steps") + 1] = "3"
        return chosen

    assert run_main("algos/grpo.py", *flags(full)) is None  # in this process: no new interpreter per run
    assert run_main("algos/grpo.py", *flags(interrupted), "--stop-at-step", "2") == 0  # ends as an interruption would
    assert run_main("algos/grpo.py", *flags(interrupted), "--resume") is None
    assert losses(interrupted) == losses(full) and len(losses(full)) == 3

    checkpoint = full / "checkpoint"
    assert (checkpoint / "adapter_config.json").exists() and not (checkpoint / "model.safetensors").exists()
    base = load_model(tiny_world["model"])
    trained = PeftModel.from_pretrained(load_model(tiny_world["model"]), str(checkpoint))
    base_weights = dict(base.named_parameters())
    moved = []
    for name, weight in trained.named_parameters():
        if "lora_B" in name:
            moved.append(bool(weight.abs().sum() > 0))
        if "lora_" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(weight, base_weights[plain]), name  # the base never changes
    assert moved and all(moved)  # every B left zero, its starting value

    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)  # base + adapters, from the checkpoint folder alone
    ids = torch.tensor([[5, 40, 41, 42, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, trained(ids).logits, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, base(ids).logits, atol=1e-4)


def test_bad_lora_flags_are_one_line(tiny_world, tmp_path):
    flags = grpo_flags(tiny_world, tmp_path / "bad", tiny_world["model"])
    code = run_main("algos/grpo.py", *flags, "--lora-r", "4", "--lora-target-modules", "no_such_proj")
    assert isinstance(code, str) and code.startswith("error: --lora-target-modules") and "\n" not in code
    assert not (tmp_path / "bad" / "checkpoint").exists()
    assert run_main("algos/gpm.py", "--lora-r", "4") == "error: --lora-r: algos/gpm.py trains its backbone whole"
