"""How fast could the diagnostic worlds' job be at best on this machine? A lower bound on
its time from the work it must do, to set against the 1,200 s target and the measured
`Whole job` lines.

The work is counted from the job's own commands (`scripts/reproduce.py --world W
--print-commands`, so it follows the code) and the worlds' own prompts:
- every RL step: the policy's forward over each prompt once per group and each completion
  (sampling, with a KV cache), then forward and backward over the same positions
  (3 forwards' worth) for each of --num-iterations optimizer passes;
- every SFT step: forward and backward over --batch-size demonstrations (32);
- every evaluation (step 0, every --eval-every steps, the end): one forward over
  --eval-prompts prompts and their answers.
A position costs one multiply-add per matrix parameter plus its attention over the mean
context, so 2 x that many floating-point operations per forward. Completions are the oracle's answers plus the end
token, the length the trained policies produce (5.8 tokens in the worlds' tables).
Left out, so the bound stays a bound: padding, sampling's softmax, every element-wise
op, the discriminators' and preference models' forwards (AAPA, UniAPL, GPRL scoring),
AAPA staged's first-stage steps, the GPM fits and the preference pairs, start-up.

That work divided by the machine's measured matrix-multiply rate (one thread, float32,
the shapes of this model's layers, the best of a few) on every core at once is the
bound. A second column counts each prompt as one token per word plus the template
(a tokenizer trained on the toy world's instructions; the answers' letters stay one
token each), the most the issue's "toy tokenizer" lever could take away.

Run: python scripts/bench_job_floor.py  (about 40 seconds)
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from shared import toyworld
from shared.modeling import chat_prompt, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from reproduce import WORLDS, command_flags  # noqa: E402  (scripts/ is not a package)

TARGET_SECONDS = 1200  # the goal for all five worlds at six seeds
SFT_BATCH = 32  # algos/sft.py's --batch-size default, which the job does not change


@dataclass
class Args:
    model: str = "data/tiny-qwen3"
    """the policy's config and tokenizer (every world's checkpoints share its shape)"""
    repeats: int = 20
    """timed matrix multiplies per shape (the median counts)"""


def matmul_rate(hidden: int, intermediate: int, repeats: int) -> float:
    """float32 multiply-adds x 2 per second on one thread: the best of this model's layer shapes
    at a batch of 4,096 positions."""
    torch.set_num_threads(1)
    rates = []
    for inner, outer in ((hidden, hidden), (hidden, intermediate), (intermediate, hidden)):
        a, b = torch.randn(4096, inner), torch.randn(inner, outer)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        rates.append(2 * 4096 * inner * outer / statistics.median(times))
    return max(rates)


def flops_per_position(config: dict, context: float) -> float:
    """One forward's floating-point operations for one position: every weight matrix once
    (the tied output head included) and attention's scores and mixing over `context` keys."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    per_layer = (hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
                 + 3 * hidden * config["intermediate_size"])
    matrices = layers * per_layer + hidden * config["vocab_size"]
    attention = layers * 2 * heads * head_dim * context
    return 2 * (matrices + attention)


def mean_lengths(tokenizer, path: Path, words: bool) -> tuple[float, float]:
    """Mean prompt tokens (chat template included) and answer tokens (the oracle's, plus the
    end token) over a world's file. words: a prompt's instructions one token per word."""
    template = len(tokenizer(chat_prompt(tokenizer, ""), add_special_tokens=False)["input_ids"])
    prompts, answers = [], []
    for line in open(path):
        row = json.loads(line)
        if words:
            *instruction_words, payload = re.findall(r"[^\s,]+|,", row["prompt"])
            prompts.append(template + len(instruction_words) + len(payload))  # the payload's letters stay letters
        else:
            prompts.append(len(tokenizer(chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]))
        answers.append(len(tokenizer(toyworld.oracle(row), add_special_tokens=False)["input_ids"]) + 1)
    return statistics.mean(prompts), statistics.mean(answers)


def printed_commands(world: str) -> list[str]:
    return subprocess.run([sys.executable, "scripts/reproduce.py", "--world", world, "--print-commands"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()


def job_work(printed: list[str], train: Path, evaluation: Path, config: dict, tokenizer, words: bool) -> dict:
    """A job's counted work from its printed commands, with the prompts of its training and
    evaluation files: RL steps, SFT steps, evaluated prompts, and their floating-point operations."""
    prompt, answer = mean_lengths(tokenizer, train, words)
    eval_prompt, eval_answer = mean_lengths(tokenizer, evaluation, words)
    per_sequence = flops_per_position(config, (prompt + answer) / 2)
    per_eval = flops_per_position(config, (eval_prompt + eval_answer) / 2) * (eval_prompt + eval_answer)
    counts = {"rl_steps": 0, "sft_steps": 0, "eval_prompts": 0, "rl_flops": 0.0, "sft_flops": 0.0, "eval_flops": 0.0}
    for line in printed:
        if not line.startswith("algos/") or line.startswith("algos/gpm.py"):
            continue  # the GPM fits and the data steps are left out
        flags = command_flags(["python", *line.split()])
        steps = int(flags["--steps"])
        evaluations = steps // int(flags.get("--eval-every", steps)) + 1
        counts["eval_prompts"] += evaluations * int(flags["--eval-prompts"])
        counts["eval_flops"] += evaluations * int(flags["--eval-prompts"]) * per_eval
        if "--prompts-per-step" not in flags:  # SFT and continued SFT: demonstrations, no rollouts
            counts["sft_steps"] += steps
            counts["sft_flops"] += steps * SFT_BATCH * (prompt + answer) * per_sequence * 3
            continue
        rl_steps = steps - (int(flags["--stage1-steps"]) if "--staged" in flags else 0)
        group = int(flags["--group-size"])
        positions = int(flags["--prompts-per-step"]) * (prompt + group * answer)  # a group's prompt once
        counts["rl_steps"] += rl_steps
        counts["rl_flops"] += rl_steps * positions * per_sequence * (1 + 3 * int(flags.get("--num-iterations", 1)))
    counts["prompt_tokens"], counts["answer_tokens"] = prompt, answer
    counts["flops"] = counts["rl_flops"] + counts["sft_flops"] + counts["eval_flops"]
    return counts


def measured_job_seconds(world: str) -> float | None:
    """The world's `Whole job` line in its table, when it has one."""
    table = ROOT / "results" / "worlds" / world / "table.md"
    found = re.search(r"Whole job: (\d+) s", table.read_text()) if table.exists() else None
    return float(found.group(1)) if found else None


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be >= 1")
    missing = [str(ROOT / "data" / "worlds" / world) for world in WORLDS if not (ROOT / "data" / "worlds" / world).is_dir()]
    if not (ROOT / args.model / "config.json").is_file():
        raise SystemExit(f"error: --model {args.model!r} is not a saved model folder")
    if missing:
        raise SystemExit(f"error: world data missing: {missing[0]} (python scripts/reproduce.py --world W builds it)")
    config = json.loads((ROOT / args.model / "config.json").read_text())
    tokenizer = load_tokenizer(str(ROOT / args.model))
    cores = os.cpu_count() or 1
    rate = matmul_rate(config["hidden_size"], config["intermediate_size"], args.repeats)
    print(f"matrix-multiply rate: {rate / 1e9:.1f} GFLOP/s on one thread (float32, the best of this model's layer "
          f"shapes); {cores} core(s) at that rate each")
    print("| world | RL steps | SFT steps | evaluated prompts | prompt / answer tokens | TFLOP | floor (s) "
          "| floor, prompts one token per word (s) | measured Whole job (s) | floor / measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    totals, measured_total, shares = [0.0, 0.0], 0.0, {"rl_flops": 0.0, "sft_flops": 0.0, "eval_flops": 0.0}
    for world in WORLDS:
        printed, data = printed_commands(world), ROOT / "data" / "worlds" / world
        files = (data / "train.jsonl", data / WORLDS[world].eval_file)
        work = job_work(printed, *files, config, tokenizer, words=False)
        worded = job_work(printed, *files, config, tokenizer, words=True)
        floor, worded_floor = work["flops"] / (rate * cores), worded["flops"] / (rate * cores)
        totals[0] += floor
        totals[1] += worded_floor
        shares = {part: shares[part] + work[part] for part in shares}
        measured = measured_job_seconds(world)
        measured_total = measured_total + measured if measured is not None and measured_total is not None else None
        print(f"| {world} | {work['rl_steps']} | {work['sft_steps']} | {work['eval_prompts']} | "
              f"{work['prompt_tokens']:.1f} / {work['answer_tokens']:.1f} | {work['flops'] / 1e12:.0f} | {floor:.0f} | "
              f"{worded_floor:.0f} | {'–' if measured is None else f'{measured:.0f}'} | "
              f"{'–' if measured is None else f'{floor / measured:.3f}'} |")
    print(f"all worlds: floor {totals[0]:.0f} s, with one token per word {totals[1]:.0f} s; target {TARGET_SECONDS} s, "
          f"which the job meets only at {totals[0] / TARGET_SECONDS:.0%} of the matrix-multiply rate on every core"
          + ("" if measured_total is None else f"; measured {measured_total:.0f} s, "
             f"{totals[0] / measured_total:.1%} of that rate"))
    total_flops = sum(shares.values())
    print(f"the counted work: RL steps {shares['rl_flops'] / total_flops:.0%}, SFT steps "
          f"{shares['sft_flops'] / total_flops:.0%}, evaluations {shares['eval_flops'] / total_flops:.0%}")
