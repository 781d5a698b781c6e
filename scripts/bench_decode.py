"""The decode loop with a growing KV cache against --static-cache (a cache allocated
once and a torch.compile'd one-token step), side by side in one process, on the same
prompts and per-prompt generators: seconds per call after a warm-up call each, and
whether the tokens are identical.

    python scripts/bench_decode.py                      # the tiny toy-world model
    python scripts/bench_decode.py --model Qwen/Qwen3-0.6B --device cuda --new-tokens 1024
"""

import time
from dataclasses import dataclass

import torch
import tyro

from shared.modeling import default_device, load_model, load_tokenizer
from shared.rollout import generate_rollouts
from shared.toyworld import make_split


@dataclass
class Args:
    model: str = "data/tiny-qwen3"
    """model to decode with"""
    prompts: int = 16
    """prompts per call"""
    group_size: int = 8
    """samples per prompt"""
    new_tokens: int = 64
    """tokens decoded per sample (every row runs to the end: eos is never reached by a random model)"""
    repeats: int = 3
    """timed calls of each (after one warm-up call each)"""
    device: str = default_device()
    """cpu or cuda"""
    autocast_bf16: bool = False
    """decode under bfloat16 autocast, as the GPU recipe does"""


def main(args: Args) -> None:
    tokenizer, model = load_tokenizer(args.model), load_model(args.model, device=args.device)
    prompts = [row["prompt"] for row in make_split(args.prompts, seed=0)]
    seeds = list(range(args.prompts))
    results = {}
    for static in (False, True):
        run = lambda: generate_rollouts(model, tokenizer, prompts, args.group_size, args.new_tokens, 1.0, seeds=seeds,
                                        autocast_bf16=args.autocast_bf16, static_cache=static)
        start = time.perf_counter()
        results[static] = run()["completion_ids"]  # warm-up: the static path compiles here
        warm_up = time.perf_counter() - start
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            run()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.repeats
        results[f"seconds {static}"] = seconds
        print(f"{'static cache, compiled step' if static else 'growing cache'}: {seconds:.3f} s per call "
              f"(first call {warm_up:.1f} s), {args.prompts} x {args.group_size} rows x {args.new_tokens} tokens")
    print(f"speed-up (growing / static): {results['seconds False'] / results['seconds True']:.2f}x; "
          f"identical tokens: {torch.equal(results[False], results[True])}")


if __name__ == "__main__":
    main(tyro.cli(Args))
