"""Held-out evaluation: greedy answers scored by --eval-fn, logged every
--eval-every steps, and the run's eval.json."""

import json
from pathlib import Path

import torch
from tqdm import tqdm

from shared.distributed import gather_objects, local_share, world_size
from shared.ifeval import without_think
from shared.rollout import generate_rollouts
from shared.runfolder import write_json
from shared.runlog import PhaseTimer, take_memory_peak


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], score, batch_size: int = 64, max_new_tokens: int = 32,
             autocast_bf16: bool = False, strip_think: bool = False) -> dict:
    """Greedy decoding on held-out rows, the responses scored together by the task's
    `score(rows, texts) -> {name: value}` (together, because IFEval's instruction-level
    accuracy pools instructions over prompts; for instruction following
    shared/scoring.py:instruction_scores). Under torchrun each rank decodes its share
    and every rank gets every text. strip_think: `score` sees the answers after a
    reasoning model's </think> (the texts returned stay whole). Returns the scores, the mean response length in
    tokens, the truncation rate and the texts."""
    length, truncated, texts = [], [], []
    padded = rows + rows[-1:] * ((-len(rows)) % world_size())  # equal shares; the copies are dropped below
    mine = local_share(padded)
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        out = generate_rollouts(model, tokenizer, [r["prompt"] for r in batch], max_new_tokens=max_new_tokens,
                                do_sample=False, autocast_bf16=autocast_bf16)
        length += out["completion_mask"].sum(1).tolist()
        truncated += out["truncated"].tolist()
        texts += out["texts"]
    length, truncated, texts = (gather_objects(values)[:len(rows)] for values in (length, truncated, texts))
    n = max(1, len(rows))
    answers = [without_think(text) for text in texts] if strip_think else texts
    return {**score(rows, answers), "length": sum(length) / n, "truncated": sum(truncated) / n, "prompts": len(rows),
            "texts": texts}


def evaluate_and_log(model, tokenizer, rows: list[dict], score, logger, args, step: int, log: bool = True,
                     extra=None) -> dict:
    """Greedy evaluation on the held-out rows (evaluate above, scored by
    --eval-fn), plus the metrics extra(step) returns (an algorithm's own), logged as eval/*
    at `step` and printed in one line."""
    before = take_memory_peak()  # what came before is the step's, or the setup's before the first step
    if PhaseTimer.peak_before_steps is not None:
        PhaseTimer.peak_before_steps = max(PhaseTimer.peak_before_steps, before)
    result = evaluate(model, tokenizer, rows, score, args.generation_batch_size, args.max_new_tokens, args.autocast_bf16,
                      args.strip_think)
    peak = take_memory_peak()  # logged, not returned: eval.json holds what the policy did, equal after a resume
    own = extra(step) if extra else {}
    result.update(own)
    if log:
        logger.log(step, {**{f"eval/{k}": v for k, v in result.items() if k != "texts"}, "perf/peak_eval_memory_gib": peak})
    tqdm.write(f"step {step}: eval gold {result['gold']:.3f} reward {result['reward']:.3f} length {result['length']:.1f}"
               + "".join(f", {k} {v:.3f}" for k, v in own.items()))
    return result


# the diagnostic worlds' own scores (shared/scoring.py:house_scores, shift_scores and judge_scores)
WORLD_SCORE_KEYS = ("gold_verifier", "house_style", "gold_in_distribution", "correct_content", "short_of_expert",
                    "concision_gap")
# eval.json keeps these when the eval fn returned them
EVAL_KEYS = ("gold", "gold_loose", "instruction_strict", "instruction_loose", "reward", "length", "truncated", "prompts",
             *WORLD_SCORE_KEYS)


def write_final_eval(output_dir: Path, steps: int, final_eval: dict | None, run_eval, keys: tuple = (), **extra) -> None:
    """<output_dir>/eval.json: the evaluation at the run's last step, the initial gold and
    8 sample responses. Written when it is missing (also when the last process stopped
    between its last checkpoint and here) or when it describes another step count (a
    finished run extended with --resume --allow-flag-changes --steps N): it always
    describes the checkpoint beside it. final_eval: the loop's evaluation at `steps`, if
    it made one; run_eval(step, log=False) makes one otherwise."""
    path = output_dir / "eval.json"
    if path.exists() and json.loads(path.read_text()).get("step") == steps:
        return
    final_eval = final_eval or run_eval(steps, log=False)
    initial = json.loads((output_dir / "initial_eval.json").read_text())
    write_json(path, {"step": steps, **{k: final_eval[k] for k in EVAL_KEYS + tuple(keys) if k in final_eval},
                      "initial_gold": initial["gold"], **extra, "samples": final_eval["texts"][:8]})
