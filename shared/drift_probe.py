"""The probe set of GPRL's drift monitor: frozen probe prompts, greedy responses of the
reference (once) and of the policy (at every check), and, in the toy world, where the
true per-axis preference between two responses is known, how often the judge's sign
agrees with it on the policy's own responses, so an exploited judge shows in the logs
(elsewhere there is no such truth and nothing is logged); and what a check logs and prints."""

import contextlib

import torch

from shared import toyworld
from shared.modeling import adapters_off
from shared.rollout import generate_texts


def probe_set(train_rows: list[dict], num_prompts: int, seed: int) -> list[dict]:
    """num_prompts training rows in an order drawn from their own generator (no training draw is used)."""
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed))
    return [train_rows[i] for i in order[:num_prompts].tolist()]


def greedy_responses(model, tokenizer, prompts: list[str], args, base_weights: bool = False) -> list[str]:
    """Greedy responses; base_weights: with --lora-r's adapters off (the reference is the policy's base)."""
    with adapters_off(model) if base_weights else contextlib.nullcontext():
        return generate_texts(model, tokenizer, prompts, args.generation_batch_size, args.max_new_tokens, do_sample=False,
                              autocast_bf16=args.autocast_bf16)


def true_preferences(rows: list[dict], responses: list[str], references: list[str], dim_names) -> torch.Tensor | None:
    """[n, k] the toy world's preference of each response over its reference on each
    axis (1, 0, or 0.5 for a tie); None where the judge's dimensions or the rows are not
    the toy world's."""
    if not set(dim_names) <= set(toyworld.PREFERENCE_AXES) or not all(
            toyworld.is_toy_instruction(i) for row in rows for i in row["instruction_id_list"]):
        return None
    return torch.tensor([[toyworld.preference(row, response, reference, axis) for axis in dim_names]
                         for row, response, reference in zip(rows, responses, references)])


def axis_agreement(true_preference, scores):
    """Per dimension, the fraction of pairs on which the judge's sign agrees with the true
    preference (1: first response better, 0: second, 0.5: tie), ties excluded; nan where
    every pair ties. [n, k], [n, k] -> [k]."""
    decided = true_preference != 0.5
    right = ((scores > 0) == (true_preference == 1)) & decided
    return torch.where(
        decided.sum(0) > 0, right.sum(0) / decided.sum(0).clamp(min=1), torch.full_like(scores[0], float("nan"))
    )


def judge_accuracy_log(true_preference, scores, dim_names) -> dict:
    """drift/judge_* entries: per axis, the judge's agreement with the truth and how many
    probe pairs the truth decides; an axis the truth never decides logs no accuracy."""
    if true_preference is None:
        return {}
    accuracy, decided = axis_agreement(true_preference, scores), (true_preference != 0.5).sum(0)
    return {**{f"drift/judge_accuracy/{n}": float(a) for n, a, d in zip(dim_names, accuracy, decided) if d > 0},
            **{f"drift/judge_pairs/{n}": int(d) for n, d in zip(dim_names, decided)}}


def monitor_log(event: dict, monitor: dict, margins, per_prompt, true_preference, dim_names) -> dict:
    """drift/* entries of one check: the alarm and the numbers behind it (margins, noise
    band), the rho, eps and beta the next steps use (`monitor`, after the check), and, in
    the toy world, the judge's agreement with the true preference on the probe pairs."""
    return {"drift/alarm": float(event["alarm"]), "drift/dominant_share": event["dominant_share"],
            "drift/alarms_total": monitor["alarms"], "drift/eps": monitor["eps"], "drift/beta": monitor["beta"],
            **{f"drift/margin/{n}": float(margins[l]) for l, n in enumerate(dim_names)},
            **{f"drift/band/{n}": event["band"][l] for l, n in enumerate(dim_names)},
            **judge_accuracy_log(true_preference, per_prompt, dim_names),
            **{f"drift/rho/{n}": float(monitor["rho"][l]) for l, n in enumerate(dim_names)}}


def alarm_message(step: int, event: dict, monitor: dict, dim_names) -> str:
    """One line for an alarm: which axis holds the gain, which fell, the numbers, and what changed."""
    return (f"step {step}: drift alarm: {dim_names[event['dominant']]} holds {event['dominant_share']:.0%} "
            f"of the gain over the reference while {', '.join(dim_names[l] for l in event['falling'])} fell (margins "
            f"{', '.join(f'{m:+.4f}' for m in event['margins'])}, noise band "
            f"{', '.join(f'{b:.4f}' for b in event['band'])}); rho -> {[round(float(r), 3) for r in monitor['rho']]}, "
            f"eps -> {monitor['eps']:.3f}, beta -> {monitor['beta']:.3f}")
