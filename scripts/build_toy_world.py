"""Build the offline default: a tiny Qwen3-architecture model + byte tokenizer saved
with save_pretrained, and the toy world's train/eval splits as JSONL."""

import json
from dataclasses import dataclass
from pathlib import Path

import tyro

from shared.modeling import build_tiny_model
from shared.toyworld import write_jsonl, write_splits


@dataclass
class Args:
    model_dir: str = "data/tiny-qwen3"
    """where the tiny model and tokenizer are saved"""
    data_dir: str = "data/toy"
    """where train.jsonl, val.jsonl and eval.jsonl are written"""
    num_train: int = 4000
    """training prompts"""
    num_eval: int = 256
    """held-out prompts (disjoint from training prompts)"""
    num_sft: int = 500
    """training prompts whose expert demonstrations the SFT stage sees (sft_prompts.jsonl, the first ones of train.jsonl)"""
    hidden_size: int = 128
    """width of the tiny model"""
    num_layers: int = 4
    """transformer blocks of the tiny model"""
    num_heads: int = 8
    """attention heads (small heads learn the copy circuit much faster than few wide ones)"""
    intermediate_size: int = 384
    """MLP width of the tiny model"""
    seed: int = 0
    """seed for the splits and the initial weights"""
    held_out_combinations: float = 0.0
    """the shift world: this fraction of instruction combinations (task x constraints) is kept out of train, val and
    eval and makes eval_shift.jsonl (0: none, the plain world)"""
    force: bool = False
    """rebuild even if the outputs exist"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    if not 0.0 <= args.held_out_combinations < 1.0:
        raise SystemExit(f"error: --held-out-combinations must be in [0, 1), got {args.held_out_combinations}")
    if args.force or not (Path(args.model_dir) / "config.json").exists():
        build_tiny_model(args.model_dir, hidden_size=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
                         intermediate_size=args.intermediate_size, seed=args.seed)
        print(f"saved tiny model to {args.model_dir}")
    if args.force or not (Path(args.data_dir) / "sft_prompts.jsonl").exists():
        paths = write_splits(args.data_dir, num_train=args.num_train, num_eval=args.num_eval, seed=args.seed,
                             held_out=args.held_out_combinations)
        # the SFT stage sees a few hundred demonstrations, RL all training prompts (with their rewards)
        train_rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
        write_jsonl(train_rows[: args.num_sft], Path(args.data_dir) / "sft_prompts.jsonl")
        print(f"wrote {paths} and sft_prompts.jsonl")
        stale_cache = Path(args.data_dir) / "expert_cache.jsonl"
        if stale_cache.exists():  # it answers the previous training prompts: scripts/build_expert_cache.py rebuilds it
            stale_cache.unlink()
            print(f"removed {stale_cache}, built for the previous training split")
