"""Build the expert cache: one expert response per training prompt, from the toy
world's oracle (offline default) or from any teacher model with batched generate."""

import json
from dataclasses import dataclass

import torch
import tyro
from tqdm import tqdm

from shared import toyworld
from shared.data import load_rows, write_expert_cache
from shared.flags import NON_NEGATIVE, check_chat_template_kwargs, check_output_file, check_range
from shared.modeling import DEFAULT_CHAT_TEMPLATE_KWARGS, default_device, load_model, load_tokenizer
from shared.rollout import generate_rollouts


@dataclass
class Args:
    data: str = "data/toy/train.jsonl"
    """prompts to cover (.jsonl path or hub dataset id)"""
    split: str = "train"
    """split, for a hub dataset"""
    out: str = "data/toy/expert_cache.jsonl"
    """where the cache is written"""
    teacher: str = "oracle"
    """'oracle' (the toy world's exact expert) or a model id / folder to generate with"""
    max_new_tokens: int = 512
    """teacher generation length"""
    temperature: float = 0.0
    """teacher sampling temperature; 0 means greedy"""
    batch_size: int = 16
    """prompts per teacher generate call"""
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"
    """teacher weights dtype"""
    system_prompt: str = ""
    """a system turn before every prompt the teacher answers ("" for none)"""
    chat_template_kwargs: str = DEFAULT_CHAT_TEMPLATE_KWARGS
    """JSON object of options for the teacher's chat template (Qwen3: enable_thinking)"""
    oracle_error_rate: float = 0.0
    """the imperfect-teacher world (--teacher oracle only): this fraction of the oracle's answers, a seeded choice, gets
    its content wrong (format kept), so a verifier sees every error"""
    house_style: bool = False
    """the house-style world (--teacher oracle only): every answer is signed off with the house mark, as
    shared/toyworld.py:oracle(row, house_style=True) writes it"""
    oracle_seed: int = 0
    """which answers --oracle-error-rate makes wrong"""
    keep_truncated: bool = False
    """keep answers the teacher was cut off at --max-new-tokens (default: dropped, since imitating them teaches the
    policy to stop mid-answer; the training scripts then skip those prompts)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_range(args, max_new_tokens=(1, None, True, False), temperature=NON_NEGATIVE, batch_size=(1, None, True, False))
    check_chat_template_kwargs(args.chat_template_kwargs)
    check_range(args, oracle_error_rate=(0.0, 1.0, True, True))
    if args.oracle_error_rate and args.teacher != "oracle":
        raise SystemExit("error: --oracle-error-rate makes the toy world's oracle imperfect; it needs --teacher oracle")
    if args.house_style and args.teacher != "oracle":
        raise SystemExit("error: --house-style is the toy world's oracle's style; it needs --teacher oracle")
    check_output_file(args.out, "--out", {"--data": args.data, "--teacher": args.teacher})
    try:
        rows = load_rows(args.data, args.split,
                         required=("prompt", "instruction_id_list") if args.teacher == "oracle" else ("prompt",))
        prompts = [r["prompt"] for r in rows]
        if args.teacher == "oracle":
            responses, wrong = toyworld.imperfect_demonstrations(rows, args.oracle_error_rate, args.oracle_seed,
                                                                 args.house_style)
            generation = {"method": "toy world oracle"} if not args.oracle_error_rate else {
                "method": "toy world oracle, imperfect", "error_rate": args.oracle_error_rate, "seed": args.oracle_seed,
                "wrong": sum(wrong)}
            if args.house_style:
                generation["house_style"] = True
        else:
            tokenizer = load_tokenizer(args.teacher, args.system_prompt, args.chat_template_kwargs)
            model = load_model(args.teacher, args.dtype, default_device())
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    finish_reasons, dropped = None, []
    if args.teacher != "oracle":
        responses, finish_reasons = [], []
        for i in tqdm(range(0, len(prompts), args.batch_size), desc="teacher generate"):
            out = generate_rollouts(model, tokenizer, prompts[i:i + args.batch_size], max_new_tokens=args.max_new_tokens,
                                    temperature=max(args.temperature, 1e-5), do_sample=args.temperature > 0)
            responses += out["texts"]
            finish_reasons += ["length" if cut else "stop" for cut in out["truncated"].tolist()]
        generation = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                      "system_prompt": args.system_prompt, "chat_template_kwargs": json.loads(args.chat_template_kwargs)}
        truncated = sum(reason == "length" for reason in finish_reasons)
        empty = {k for k, text in enumerate(responses) if not text.strip()}
        if empty:  # nothing to imitate: the training scripts would refuse the cache
            print(f"{len(empty)} teacher answers were empty (only whitespace or special tokens): dropped")
            dropped += [prompts[k] for k in sorted(empty)]
            prompts, responses, finish_reasons = ([v for k, v in enumerate(values) if k not in empty]
                                                  for values in (prompts, responses, finish_reasons))
        if not args.keep_truncated:
            dropped += [p for p, reason in zip(prompts, finish_reasons) if reason == "length"]
            kept = [k for k, reason in enumerate(finish_reasons) if reason == "stop"]
            prompts, responses, finish_reasons = ([values[k] for k in kept] for values in (prompts, responses, finish_reasons))
        print(f"{truncated} of {len(prompts) + len(dropped)} teacher answers reached --max-new-tokens "
              f"{args.max_new_tokens} without ending: " + ("kept (--keep-truncated)" if args.keep_truncated else "dropped"))
        if not responses:
            raise SystemExit(
                f"error: every teacher answer was cut at --max-new-tokens {args.max_new_tokens} or empty; nothing "
                "was written (raise --max-new-tokens, or pass --keep-truncated)"
            )
    write_expert_cache(args.out, prompts, responses, teacher=args.teacher, generation=generation,
                       finish_reasons=finish_reasons, dropped_prompts=dropped)
    print(f"wrote {len(responses)} expert responses from {args.teacher!r} to {args.out}")
