"""Build an offline preference dataset from the toy world: for each prompt, two
responses sampled from a policy (by default the SFT checkpoint), labelled along the
toy world's preference axes (correctness, format, concision).

Each row: prompt, chosen, rejected, label (soft probability that chosen is better:
the mean of the per-axis labels), and the per-axis labels. Ties on every axis are
dropped; trade-off pairs (label 0.5, per-axis labels apart) are kept. The columns
match the usual chosen/rejected datasets, so the preference scripts (adpo.py
pairwise, gpm.py) read this file or a hub dataset alike.
"""

from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from shared import toyworld
from shared.data import load_rows
from shared.flags import TEMPERATURE, check_output_file, check_range
from shared.modeling import default_device, load_model, load_tokenizer
from shared.rollout import generate_rollouts
from shared.toyworld import write_jsonl


@dataclass
class Args:
    model: str = "runs/sft/checkpoint"
    """policy whose samples are labelled"""
    data: str = "data/toy/train.jsonl"
    """toy-world prompts (they carry the instruction ids the labels need)"""
    out: str = "data/toy/pairs.jsonl"
    """where the pairs are written"""
    num_prompts: int = 2000
    """prompts to sample pairs for (the first ones of the dataset)"""
    temperature: float = 1.0
    """sampling temperature: high enough that the two samples differ"""
    max_new_tokens: int = 16
    """response length limit"""
    batch_size: int = 64
    """prompts per generate call"""
    seed: int = 1
    """sampling seed"""
    concision: Literal["expert_length", "shorter"] = "expert_length"
    """how the concision axis is labelled: expert_length, the truth (the response closer to the expert's length
    wins); shorter, the exploitable-judge world's biased annotators (the shorter response wins)"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_range(args, num_prompts=(1, None, True, False), temperature=TEMPERATURE, max_new_tokens=(1, None, True, False),
                batch_size=(1, None, True, False))
    check_output_file(args.out, "--out", {"--data": args.data, "--model": args.model})
    torch.manual_seed(args.seed)
    try:
        rows = load_rows(args.data)[: args.num_prompts]
        for number, row in enumerate(rows, 1):  # the labels come from the toy world's own checkers
            other = [i for i in row["instruction_id_list"] if not toyworld.is_toy_instruction(i)]
            if other:
                raise ValueError(f"--data {args.data!r} row {number}: instruction {other[0]!r} is not a toy-world id; "
                                 "the pairs are labelled by the toy world's checkers (toy ids only)")
        tokenizer, model = load_tokenizer(args.model), load_model(args.model, "float32", default_device())
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    pairs = []
    for i in tqdm(range(0, len(rows), args.batch_size), desc="sample pairs"):
        batch = rows[i:i + args.batch_size]
        texts = generate_rollouts(model, tokenizer, [r["prompt"] for r in batch], group_size=2,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature)["texts"]
        for row, a, b in zip(batch, texts[0::2], texts[1::2]):
            pair = toyworld.preference_pair(row, a, b, args.concision)
            if pair is not None:
                pairs.append(pair)
    if not pairs:
        raise SystemExit(f"error: every one of the {len(rows)} pairs tied on every axis, so there is nothing to learn "
                         f"from; nothing was written to {args.out} (raise --temperature or --num-prompts)")
    write_jsonl(pairs, args.out)
    trade_offs = sum(pair["label"] == 0.5 for pair in pairs)
    print(f"wrote {len(pairs)} pairs ({trade_offs} of them trade-offs: better on one axis, worse on another, label 0.5; "
          f"{len(rows) - len(pairs)} ties on every axis dropped) to {args.out}")
