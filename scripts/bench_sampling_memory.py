"""Peak memory of sampling at a real vocabulary: how much more a rollout of 64 new
tokens needs than one of 8, for 4 prompts x G=8 on a 2-layer Qwen3-architecture model
with Qwen3's vocabulary (151,936). Each measurement runs in a fresh process (peak RSS
is a high-water mark), so the model's own memory cancels in the difference.

    python scripts/bench_sampling_memory.py

prints one line per setting: sampling as the algorithms call it (no per-step logits
kept), and with output_scores=True (every step's [rows, vocab] float32 logits kept, as
the sampler did for every call before), whose growth is what the first avoids.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

VOCAB = 151_936
SHAPE = {"prompts": 4, "group_size": 8}


def child(max_new_tokens: int, output_scores: bool, autocast_bf16: bool) -> dict:
    import tempfile

    import torch

    from shared.modeling import build_tiny_model, load_model, load_tokenizer
    from shared.rollout import generate_rollouts

    with tempfile.TemporaryDirectory() as folder:
        build_tiny_model(folder, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=VOCAB)
        tokenizer, model = load_tokenizer(folder), load_model(folder)
    with torch.no_grad():  # logit 0 among 151,936: p(eos) ~ 1e-5 a step, rows run to the limit
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    prompts = [f"copy the word number {i}" for i in range(SHAPE["prompts"])]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = generate_rollouts(model, tokenizer, prompts, SHAPE["group_size"], max_new_tokens, temperature=1.0,
                            output_scores=output_scores, seeds=list(range(len(prompts))), autocast_bf16=autocast_bf16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mb": peak / 1024, "before_mb": before / 1024, "tokens": int(out["completion_ids"].size(1))}


def measure(max_new_tokens: int, output_scores: bool = False, autocast_bf16: bool = False) -> dict:
    """The child's numbers, from a fresh Python process."""
    command = [sys.executable, __file__, "--child", "--max-new-tokens", str(max_new_tokens)]
    command += ["--output-scores"] * output_scores + ["--autocast-bf16"] * autocast_bf16
    result = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def growth_mb(output_scores: bool = False, short: int = 8, long: int = 64) -> tuple[float, dict, dict]:
    a, b = measure(short, output_scores), measure(long, output_scores)
    return b["peak_mb"] - a["peak_mb"], a, b


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-new-tokens", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--output-scores", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--autocast-bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.max_new_tokens, args.output_scores, args.autocast_bf16)))
        raise SystemExit(0)
    print(f"sampling {SHAPE['prompts']} prompts x G={SHAPE['group_size']}, vocabulary {VOCAB:,}, 2-layer model; "
          "peak RSS of a fresh process")
    for label, scores in (("as the algorithms sample (no logits kept)", False), ("with output_scores=True", True)):
        grown, short, long = growth_mb(scores)
        print(f"{label:<42} 8 tokens {short['peak_mb']:7.0f} MB   64 tokens {long['peak_mb']:7.0f} MB   "
              f"growth {grown:7.0f} MB")
