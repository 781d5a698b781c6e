"""Performance numbers, printed as one JSON line per measurement, ratios taken side by
side in the same run (never by timed tests):

1. compile: each pure loss/advantage function, eager vs torch.compile (forward +
   backward), at the toy world's shape (128 sequences x 16 tokens) and a long one
   (128 x 512); ratio = compiled / eager time.
2. grpo_step: one whole GRPO step (sampling prompts x G, scoring, reference log-probs
   in one no-grad pass, update) on the tiny model and on a ~25M-parameter toy-world
   model, split into generate / score / logps / update; ours with each prompt computed
   once per group (share_prompts, the default) and ours plain, at three shapes: the
   default (toy prompts of ~45 tokens, 32 new tokens), prompt-heavy (prompts ~4x the
   completion) and completion-heavy (128 new tokens).
3. trl: the same step with TRL's GRPOTrainer when `trl` is installed (it is not a
   requirement of this project), same model, prompts, G, lengths, beta and loss;
   otherwise a line saying it was skipped.
Run: python scripts/bench.py   (add --skip-compile for the step numbers alone)
"""

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

import algos.aapa as aapa
import algos.adpo as adpo
import algos.chord as chord
import algos.gpm as gpm
import algos.gprl as gprl
import algos.grpo as grpo
import algos.sft as sft
import algos.uniapl as uniapl
from shared import scoring, toyworld
from shared.logprobs import completion_logps
from shared.modeling import build_tiny_model, chat_prompt, load_model, load_tokenizer
from shared.rollout import generate_rollouts


@dataclass
class Args:
    skip_compile: bool = False
    """leave out the compiled/eager measurements (their first compiles take minutes on CPU)"""
    repeats: int = 20
    """timed repetitions per compile measurement (median reported)"""
    steps: int = 3
    """timed GRPO steps per model (after one warm-up step)"""
    prompts: int = 4
    """prompts per GRPO step (4, the shape of the TRL reference timings)"""
    group_size: int = 8
    """G (reference: 8)"""
    max_new_tokens: int = 32
    """completion length of the default shape (reference: 32)"""
    shapes: tuple[str, ...] = ("default", "prompt-heavy", "completion-heavy")
    """which step shapes to measure"""
    skip_trl: bool = False
    """leave out TRL even when it is installed"""


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_cases(b: int, length: int):
    g = torch.Generator().manual_seed(0)
    lp = lambda *shape: (-torch.rand(*shape, generator=g) * 3).requires_grad_(True)
    logps, expert = lp(b, length), lp(b // 4, length)
    old, mask, expert_mask = logps.detach() - 0.05, torch.ones(b, length), torch.ones(b // 4, length)
    adv = torch.randn(b, generator=g)
    v = torch.randn(b, 6, generator=g, requires_grad=True)
    gate = torch.softmax(torch.randn(b, 3, generator=g), -1)
    return {
        "sft_loss": (sft.sft_loss, (logps, mask), {}),
        "grpo_loss": (grpo.grpo_loss, (logps, old, old - 0.05, adv, mask), {"beta": 0.04}),
        "chord_loss": (chord.chord_loss, (logps, old, None, adv, mask, expert, expert_mask, 0.5), {}),
        "aapa_loss": (aapa.aapa_loss, (logps, old, None, adv, mask, expert, expert_mask, 0.9, 0.1), {"use_phi": True}),
        "uniapl_policy_loss": (uniapl.uniapl_policy_loss, (logps, old, None, adv, mask, expert, expert_mask, 1.2), {}),
        "adpo_listwise_loss": (adpo.adpo_listwise_loss, (logps, old, mask, adv, torch.ones(b // 8), 8), {"beta": 0.1}),
        "gpm_loss": (gpm.gpm_loss, (v[: b // 2], v[b // 2:], gate[: b // 2], torch.rand(b // 2), 0.1), {}),
        "gprl_advantages": (gprl.gprl_advantages, (v.detach(), gate, torch.ones(3), 8), {}),
    }


def bench_compile(args) -> None:
    for b, length in [(128, 16), (128, 512)]:
        for name, (fn, fn_args, kwargs) in compile_cases(b, length).items():
            compiled = torch.compile(fn, dynamic=True)

            def step(f):
                out = f(*fn_args, **kwargs)
                loss = out[0] if isinstance(out, tuple) else out
                if loss.requires_grad:
                    loss.backward()

            start = time.perf_counter()
            step(compiled)  # first call compiles
            compile_seconds = time.perf_counter() - start
            eager = timed(lambda: step(fn), args.repeats)
            fast = timed(lambda: step(compiled), args.repeats)
            emit({"bench": "compile", "function": name, "shape": [b, length], "eager_ms": round(eager * 1e3, 3),
                  "compiled_ms": round(fast * 1e3, 3), "ratio": round(fast / eager, 3),
                  "first_compile_s": round(compile_seconds, 1)})


def grpo_step(model, ref_model, tokenizer, optimizer, rows, args, max_new_tokens: int, share_prompts: bool) -> dict:
    """One GRPO step as algos/grpo.py runs it (beta > 0, so the reference pass is included)."""
    timer = {}
    t = time.perf_counter()
    rollouts = generate_rollouts(model, tokenizer, [r["prompt"] for r in rows], args.group_size, max_new_tokens, 1.0,
                                 share_prompts=share_prompts)
    timer["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    group_rows = [row for row in rows for _ in range(args.group_size)]
    rewards = torch.tensor([scoring.reward(row, text) for row, text in zip(group_rows, rollouts["texts"])])
    advantages = grpo.group_advantages(rewards, args.group_size)
    ids = torch.cat([rollouts["prompt_ids"], rollouts["completion_ids"]], 1)
    mask = torch.cat([rollouts["prompt_mask"], rollouts["completion_mask"]], 1)
    start, completion_mask = rollouts["prompt_ids"].size(1), rollouts["completion_mask"]
    timer["score"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        ref_logps = completion_logps(ref_model, ids, mask, start, share_prompts=share_prompts)
    timer["logps"] = time.perf_counter() - t
    t = time.perf_counter()
    logps = completion_logps(model, ids, mask, start, share_prompts=share_prompts)
    loss, _ = grpo.grpo_loss(logps, logps.detach(), ref_logps, advantages, completion_mask, beta=0.04)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    timer["update"] = time.perf_counter() - t
    timer["tokens"] = int(completion_mask.sum())
    return timer


def shape_rows(shape: str, args) -> tuple[list[dict], int]:
    """The prompts and completion length of a step shape. Prompt-heavy prompts carry a
    filler paragraph, as instruction-following prompts with short answers do."""
    rows = toyworld.make_split(args.prompts, seed=0)
    if shape == "prompt-heavy":
        filler = "Read the task below carefully and answer with the result only, nothing else. " * 2
        return [{**r, "prompt": filler + r["prompt"]} for r in rows], args.max_new_tokens
    return rows, args.max_new_tokens * (4 if shape == "completion-heavy" else 1)


def bench_grpo_steps(args, models: dict[str, Path]) -> None:
    for label, path in models.items():
        tokenizer = load_tokenizer(str(path))
        params = sum(p.numel() for p in load_model(str(path)).parameters())
        for shape in args.shapes:
            rows, max_new_tokens = shape_rows(shape, args)
            prompt_tokens = statistics.mean(
                len(tokenizer(chat_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) for r in rows
            )
            results = {}
            for share_prompts in (True, False):
                torch.manual_seed(0)  # the same untrained weights and samples for both
                model, ref_model = load_model(str(path)), load_model(str(path)).eval()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
                grpo_step(model, ref_model, tokenizer, optimizer, rows, args, max_new_tokens, share_prompts)  # warm-up
                timers = [grpo_step(model, ref_model, tokenizer, optimizer, rows, args, max_new_tokens, share_prompts)
                          for _ in range(args.steps)]
                split = {
                    k: round(statistics.median(t[k] for t in timers), 4) for k in ("generate", "score", "logps", "update")
                }
                results[share_prompts] = {"step_s": round(sum(split.values()), 4), **{f"{k}_s": v for k, v in split.items()},
                                          "completion_tokens": timers[-1]["tokens"]}
            ours = {"bench": "grpo_step", "model": label, "params_m": round(params / 1e6, 2), "shape": shape,
                    "prompts": args.prompts, "group_size": args.group_size, "prompt_tokens": round(prompt_tokens, 1),
                    "max_new_tokens": max_new_tokens, "shared": results[True], "plain": results[False],
                    "shared_over_plain": round(results[True]["step_s"] / results[False]["step_s"], 3)}
            emit(ours)
            if not args.skip_trl:
                bench_trl(args, label, path, rows, ours, max_new_tokens)


def bench_trl(args, label: str, path: Path, rows: list[dict], ours: dict, max_new_tokens: int) -> None:
    """TRL's GRPOTrainer on the same model, prompts, G, completion length, beta and
    loss_type; step time from a callback, median over args.steps after one warm-up step."""
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        emit({"bench": "trl", "model": label, "skipped": "trl is not installed (it is not a requirement: pip install trl "
              "to measure it side by side); a reference measured on another machine: 0.66 s per step at 0.8M, 7.8 s at 25M"})
        return

    def toy_reward(completions, row_id, **_):
        return [scoring.reward(rows[i], c[0]["content"] if isinstance(c, list) else c) for c, i in zip(completions, row_id)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "row_id": i} for i, r in enumerate(rows)] * 50
    )
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=args.prompts * args.group_size,
                            num_generations=args.group_size, max_completion_length=max_new_tokens, beta=0.04,
                            loss_type="dapo", learning_rate=1e-6, max_steps=args.steps + 1, temperature=1.0,
                            logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                            shuffle_dataset=False,
                            # TRL's GRPOConfig turns both on by default; ours runs float32 without checkpointing
                            bf16=False, gradient_checkpointing=False)
        trainer = GRPOTrainer(model=str(path), reward_funcs=[toy_reward], args=config, train_dataset=dataset,
                              processing_class=load_tokenizer(str(path)), callbacks=[timer])
        trainer.train()
    trl_step = statistics.median(timer.times[1:])
    import trl

    emit({"bench": "trl", "model": label, "shape": ours["shape"], "trl_version": trl.__version__,
          "trl_step_s": round(trl_step, 4), "ours_shared_step_s": ours["shared"]["step_s"],
          "ours_plain_step_s": ours["plain"]["step_s"], "shared_over_trl": round(ours["shared"]["step_s"] / trl_step, 3),
          "plain_over_trl": round(ours["plain"]["step_s"] / trl_step, 3)})


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.manual_seed(0)
    if not args.skip_compile:
        bench_compile(args)
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny (0.8M)": build_tiny_model(Path(tmp) / "tiny"),
                  "toy-25M": build_tiny_model(Path(tmp) / "medium", hidden_size=512, num_layers=8, num_heads=8,
                                              intermediate_size=1536)}
        bench_grpo_steps(args, models)
