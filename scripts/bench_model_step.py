"""Is a compiled model step a lever on CPU? The forward and backward of the policy on one
update's batch at the worlds' shape (64 prompts x G=8 toy-world prompts with their
oracle answers, one CPU thread as the job gives each run), eager against
`torch.compile(model)`, side by side in one process: the median of the timed repeats,
their ratio, and what the first compiled call costs. The model is the only thing
compiled; the algorithms compile only their loss functions (`--compile`), so this
measures a lever they do not use yet.

Run: python scripts/bench_model_step.py  (about 2 minutes; --model to time another checkpoint)
"""

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import tyro

from shared import toyworld
from shared.modeling import chat_prompt, load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    model: str = "data/tiny-qwen3"
    """a local model folder to time (the tiny model the toy world builds; an SFT checkpoint has the same shape)"""
    data: str = "data/toy/train.jsonl"
    """prompts to build the batch from (their oracle answers are the completions)"""
    prompts: int = 64
    group_size: int = 8
    threads: int = 1
    repeats: int = 10


def batch(args: Args, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prompts x group_size sequences (chat-templated prompt, then its oracle answer), right-padded,
    and the mask of the answer tokens the loss reads."""
    rows = [json.loads(line) for line in open(ROOT / args.data)][:args.prompts]
    sequences, answer_starts = [], []
    for row in rows:
        prompt_ids = tokenizer(chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(toyworld.oracle(row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences += [prompt_ids + answer_ids] * args.group_size
        answer_starts += [len(prompt_ids)] * args.group_size
    width = max(map(len, sequences))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    positions = torch.arange(width)
    answer_mask = (positions >= torch.tensor(answer_starts)[:, None]) & attention_mask.bool()
    return input_ids, attention_mask, answer_mask


def step(model, input_ids, attention_mask, answer_mask) -> None:
    """One forward and backward: the answer tokens' mean negative log-likelihood."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets, mask = input_ids[:, 1:], answer_mask[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    (nll * mask.reshape(-1)).sum().div(mask.sum()).backward()


def timed(model, tensors, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the repeats after one more warm-up call)."""
    start = time.perf_counter()
    step(model, *tensors)
    first = time.perf_counter() - start
    step(model, *tensors)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(model, *tensors)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.prompts < 1 or args.group_size < 1 or args.threads < 1 or args.repeats < 1:
        raise SystemExit("error: --prompts, --group-size, --threads and --repeats must be >= 1")
    for flag, path in (("--data", ROOT / args.data), ("--model", ROOT / args.model / "config.json")):
        if not path.is_file():
            raise SystemExit(f"error: {flag} {str(path.parent if flag == '--model' else path)!r} is not a "
                             f"{'saved model folder' if flag == '--model' else 'file'}")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(ROOT / args.model))
    tensors = batch(args, tokenizer)
    print(f"batch: {tensors[0].shape[0]} sequences x {tensors[0].shape[1]} positions "
          f"({int(tensors[1].sum())} tokens, {int(tensors[2].sum())} of them answers), {args.threads} thread(s)")
    torch.manual_seed(0)
    model = load_model(str(ROOT / args.model))
    model.train()
    _, eager = timed(model, tensors, args.repeats)
    compiled_model = torch.compile(model)
    first, compiled = timed(compiled_model, tensors, args.repeats)
    print("| model step | forward + backward (ms, median of %d) |" % args.repeats)
    print("|---|---|")
    print(f"| eager | {eager * 1000:.0f} |")
    print(f"| torch.compile(model) | {compiled * 1000:.0f} |")
    print(f"compiled / eager: {compiled / eager:.2f}; the first compiled call took {first:.1f} s (compilation)")
