"""ADPO pairwise: Anchored Direct Preference Optimization on offline preference pairs
(arXiv 2510.18913; author code: wk222/TRL-ADPO). The on-policy listwise mode, the
paper's LLM result, is algos/adpo.py.

Each pair (chosen, rejected) gets anchored logits u = (l - l_ref) / tau, l = sequence
log-prob, anchor = the frozen initial model; the loss is the cross-entropy of
softmax(u_chosen, u_rejected) against (q, 1 - q), q the pair's (soft) label:
    -[q log sigmoid(u_c - u_r) + (1 - q) log sigmoid(u_r - u_c)].
With hard labels (q = 1) and tau = 1/beta it is exactly DPO's sigmoid loss, and the
loop below is a DPO loop. Ours: the fixed tau 10 (DPO's beta 0.1) and the soft labels
of scripts/build_preference_pairs.py. docs/algorithms.md#adpo.
"""

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from shared import checkpoint, distributed, evaluation, flags, runfolder, runlog, seeding
from shared.data import keep_short_prompts, load_eval_rows, load_pairs
from shared.logprobs import completion_logps
from shared.modeling import adapters_off, load_policy, load_reference, load_tokenizer
from shared.rewards import load_eval_fn
from shared.rollout import encode_prompt_response


@dataclass
class Args(flags.RunFlags):
    model: str = "runs/sft/checkpoint"
    """initial policy and frozen anchor: hub id or local folder, e.g. the SFT checkpoint"""
    pairs_data: str = "data/toy/pairs.jsonl"
    """prompt, chosen, rejected and optional soft `label` (scripts/build_preference_pairs.py, or a hub id)"""
    max_prompt_tokens: int = 512
    """pairs whose prompt is longer than this (chat-templated tokens) are dropped or stop the run, see --long-prompts
    (0: no limit)"""
    long_prompts: Literal["drop", "error"] = "drop"
    """what to do with prompts over --max-prompt-tokens: drop them with a printed count, or stop with an error"""
    eval_data: str = "data/toy/eval.jsonl"
    """held-out prompts with instruction ids, for gold accuracy"""
    eval_fn: str = "shared.scoring:instruction_scores"
    """'module:function' scoring held-out responses: (rows, texts) -> {name: value}, 'gold' and 'reward' among them"""
    output_dir: str = "runs/adpo-pairwise"
    """checkpoint, metrics.jsonl, eval.json and tensorboard logs go here"""
    seed: int = 1
    """seed for the order of the pairs"""
    steps: int = 60
    """optimizer steps"""
    batch_size: int = 64
    """pairs per optimizer step (64 pairs = 128 sequences, the rollout budget of 16 prompts x G=8)"""
    micro_batch_size: int = 32
    """pairs per forward/backward; gradients are accumulated over the batch"""
    tau: float = 10.0
    """fixed anchor temperature (1/beta of DPO: 10 = DPO's beta 0.1)"""
    hard_labels: bool = False
    """use q = 1 for chosen instead of the soft `label` column (then the loss is DPO's)"""
    length_normalize: bool = False
    """sequence log-prob as the token mean instead of the sum"""
    max_new_tokens: int = 16
    """maximum completion length at evaluation"""
    learning_rate: float = 5e-5
    """peak AdamW learning rate, linearly decayed to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 20
    """evaluate on the held-out split every this many steps (and at start and end)"""
    eval_prompts: int = 256
    """held-out prompts used per evaluation"""
    save_every: int = 20
    """checkpoint every this many steps (and at the end)"""
    logp_chunk_tokens: int = 0
    """tokens per chunk when computing log-probs from hidden states (0: 64 MiB of logits per chunk)"""


# each flag's valid range, (low, high, low inclusive, high inclusive), checked before anything is read
FLAG_RANGES = dict(
    max_prompt_tokens=flags.NON_NEGATIVE,
    steps=flags.AT_LEAST_1,
    batch_size=flags.AT_LEAST_1,
    micro_batch_size=flags.AT_LEAST_1,
    max_new_tokens=flags.AT_LEAST_1,
    learning_rate=flags.POSITIVE,
    weight_decay=flags.NON_NEGATIVE,
    max_grad_norm=flags.POSITIVE,
    eval_every=flags.AT_LEAST_1,
    eval_prompts=flags.AT_LEAST_1,
    save_every=flags.AT_LEAST_1,
    logp_chunk_tokens=flags.NON_NEGATIVE,
    tau=flags.POSITIVE,
)


def sequence_logps(logps, mask, length_normalize=False):
    """l = sum of token log-probs over the response (token mean with length_normalize). [B, L] -> [B]."""
    mask = mask.to(logps.dtype)
    total = (logps * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0) if length_normalize else total


def adpo_pairwise_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, label, tau, num_pairs=None):
    """-[q log sigmoid(u_c - u_r) + (1 - q) log sigmoid(u_r - u_c)], u = (l - l_ref) / tau, mean over pairs.

    All inputs [N] sequence log-probs except label q [N] (or a float) in [0, 1] and tau.
    q = 1 and tau = 1/beta is the DPO sigmoid loss. num_pairs: the normaliser (pairs of
    the whole step, for gradient accumulation; default N). Returns (loss, metrics).
    """
    margin = ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)) / tau
    label = torch.as_tensor(label, dtype=margin.dtype, device=margin.device)
    loss = -(label * torch.nn.functional.logsigmoid(margin) + (1 - label) * torch.nn.functional.logsigmoid(-margin)).sum()
    loss = loss / (margin.size(0) if num_pairs is None else num_pairs)
    with torch.no_grad():
        metrics = {"margin": margin.mean(), "accuracy": (margin > 0).to(margin.dtype).mean()}
    return loss, metrics


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    output_dir = Path(args.output_dir)
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every batch of pairs
    distributed.check_divisible(args.batch_size, "--batch-size")
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)

    # ---- data: preference pairs (validated row by row), held-out prompts
    model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
    eval_fn = load_eval_fn(args.eval_fn)
    try:
        pairs = load_pairs(args.pairs_data, args.hard_labels)
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        pairs = keep_short_prompts(pairs, tokenizer, args.max_prompt_tokens, args.long_prompts, args.pairs_data)
    except ValueError as error:
        raise SystemExit(f"error: {error}")

    # ---- policy, frozen anchor (the initial model), optimizer, schedule
    try:
        model = distributed.shard(load_policy(model_path, args))
        ref_model = load_reference(args, model)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    model.train()
    optimizer = torch.optim.AdamW(distributed.optimizer_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / args.steps))
    if state:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {output_dir / runfolder.CHECKPOINT} at step {start_step}")
    loss_fn = torch.compile(adpo_pairwise_loss, dynamic=True) if args.compile else adpo_pairwise_loss
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args)

    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="adpo-pairwise",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        # ---- a batch of pairs (depends only on seed and step: resumable); each pair's chosen and rejected
        # are neighbouring rows of one forward, so their shared prompt is computed once
        indices = torch.randint(len(pairs), (args.batch_size,), generator=seeding.step_generator(args.seed, step)).tolist()
        indices = distributed.local_share(indices)
        micro_batches = []
        for s in range(0, len(indices), args.micro_batch_size):
            part = [pairs[i] for i in indices[s:s + args.micro_batch_size]]
            micro_batches.append((encode_prompt_response(tokenizer, [p["prompt"] for p in part for _ in range(2)],
                                                         [p[side] for p in part for side in ("chosen", "rejected")],
                                                         args.device),
                                  torch.tensor([p["label"] for p in part], device=args.device)))

        # ---- anchor (reference) sequence log-probs, no grad
        with torch.no_grad(), autocast, adapters_off(ref_model):  # --lora-r: the anchor is the policy's base
            ref_sequence_logps = [sequence_logps(completion_logps(ref_model, ids, mask, prompt_len,
                                                                  chunk_tokens=args.logp_chunk_tokens).float(),
                                                 response_mask, args.length_normalize)
                                  for (ids, mask, response_mask, prompt_len), _ in micro_batches]

        # ---- optimise: one step over the pairs, accumulated over micro-batches
        total_loss, metric_sums = 0.0, {}
        for ((ids, mask, response_mask, prompt_len), label), ref in zip(micro_batches, ref_sequence_logps):
            with autocast:
                logps = completion_logps(model, ids, mask, prompt_len, chunk_tokens=args.logp_chunk_tokens).float()
            sequence = sequence_logps(logps, response_mask, args.length_normalize)
            n = label.size(0)
            loss, metrics = loss_fn(sequence[0::2], sequence[1::2], ref[0::2], ref[1::2], label, args.tau,
                                    num_pairs=args.batch_size)
            loss.backward()
            total_loss += loss.detach()
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value * n / args.batch_size
        total_loss = distributed.all_sum(float(total_loss))
        metric_sums = {key: distributed.all_sum(value) for key, value in metric_sums.items()}
        grad_norm = distributed.sum_gradients_and_clip(model.parameters(), args.max_grad_norm)
        checkpoint.stop_if_not_finite(total_loss, step + 1, output_dir, grad_norm)
        optimizer.step()
        checkpoint.stop_if_weights_not_finite(model, step + 1, output_dir)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        clock.lap("step")

        # ---- log, evaluate, checkpoint
        logger.log(
            step + 1,
            {
                "train/loss": total_loss,
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                **{f"train/{k}": float(v) for k, v in metric_sums.items()},
                **clock.metrics(),
            },
        )
        progress.set_postfix(loss=f"{total_loss:.3f}")
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args)) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval)
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
