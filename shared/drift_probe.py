"""The probe set of GPRL's drift monitor: frozen probe prompts, greedy responses of the
reference (once) and of the policy (at every check), and, in the toy world, where the
true per-axis preference between two responses is known, how often the judge's sign
agrees with it on the policy's own responses, so an exploited judge shows in the logs
(elsewhere there is no such truth and nothing is logged)."""

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
