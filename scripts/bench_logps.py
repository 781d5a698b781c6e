"""Peak extra memory (beyond weights, inputs and their gradients) of per-token log-probs at Qwen3-0.6B's head shape (vocab
151,936, hidden 1024): naive (materialised float32 logits + log_softmax) vs the
chunked path in shared/logprobs.py, forward + backward, each in its own process so
that peak RSS measures it alone (Linux: reads /proc/self/statm). Prints one JSON line per measurement and the ratio."""

import json
import resource
import subprocess
import sys
from dataclasses import dataclass

import torch
import tyro

from shared.logprobs import token_logps_from_hidden


@dataclass
class Args:
    tokens: int = 2048
    """completion tokens (the issue's 8k needs ~12 GB for the naive path: pass --tokens 8192 on a big machine)"""
    vocab: int = 151_936
    """vocabulary size"""
    hidden: int = 1024
    """hidden size"""
    chunk_tokens: int = 0
    """chunk size of the lean path (0: automatic, 64 MiB of logits)"""
    only: str = ""
    """internal: measure just 'naive' or 'chunked' in this process"""


def inputs(args):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g, requires_grad=True)
    weight = torch.empty(args.vocab, args.hidden).normal_(0, 0.02, generator=g).requires_grad_()  # one allocation
    targets = torch.randint(args.vocab, (1, args.tokens), generator=g)
    return hidden, weight, targets


def measure(args) -> dict:
    hidden, weight, targets = inputs(args)
    # Any path must store the gradients of the weight and the hidden states: not counted as extra.
    gradient_kib = (weight.numel() + hidden.numel()) * 4 / 1024
    with open("/proc/self/statm") as f:
        current_kib = int(f.read().split()[1]) * resource.getpagesize() / 1024
    before = max(current_kib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) + gradient_kib
    if args.only == "naive":
        logps = torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    else:
        logps, _ = token_logps_from_hidden(hidden, weight, None, targets, chunk_tokens=args.chunk_tokens)
    logps.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"path": args.only, "tokens": args.tokens, "vocab": args.vocab, "peak_extra_mib": (peak - before) / 1024,
            "logps_sum": logps.sum().item(), "grad_hidden_sum": hidden.grad.sum().item(),
            "grad_weight_abs_sum": weight.grad.abs().sum().item()}


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.only:
        print(json.dumps(measure(args)))
        sys.exit(0)
    results = {}
    for path in ("naive", "chunked"):
        flags = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
                 "--chunk-tokens", str(args.chunk_tokens), "--only", path]
        line = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True).stdout.strip()
        print(line)
        results[path] = json.loads(line)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    summary = {
        "float32_logits_mib": logits_mib,
        "chunked_over_naive": results["chunked"]["peak_extra_mib"] / results["naive"]["peak_extra_mib"],
        "chunked_over_logits": results["chunked"]["peak_extra_mib"] / logits_mib,
        "max_rel_diff_grad_weight": abs(results["chunked"]["grad_weight_abs_sum"] - results["naive"]["grad_weight_abs_sum"])
        / results["naive"]["grad_weight_abs_sum"],
    }
    print(json.dumps({"summary": summary}))
