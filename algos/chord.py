"""CHORD: GRPO with an off-policy expert term (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts").

Per step: sample G completions for each prompt, score them, normalise rewards
within each group into advantages, then minimise the clipped surrogate
-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*KL_k3 per token,
aggregated by loss_type. With num_iterations == 1 the old policy is the current
one (old_logps = logps.detach()), so rho == 1 and only its gradient matters.
CHORD adds expert demonstrations (the expert cache) to every step: the loss is
(1 - mu) * L_GRPO + mu * L_SFT, mu on a warmup / cosine-decay schedule (CHORD-mu),
each expert token's NLL optionally weighted by phi = p * (1 - p) (CHORD-phi).
Formulas, Trinity-RFT's reference and our interpretations: docs/algorithms.md#chord.
"""

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from shared import checkpoint, distributed, evaluation, flags, runfolder, runlog, seeding
from shared.data import expert_micro_batches, keep_short_prompts, load_eval_rows, load_expert_pool, load_rows
from shared.logprobs import completion_logps, expert_row_logps, old_and_ref_logps
from shared.modeling import load_policy, load_reference, load_tokenizer
from shared.rewards import load_eval_fn, load_reward_fn, required_fields, reward_scores
from shared.rollout import generate_rollouts

# (mu_warmup, mu_decay, mu_peak, mu_valley, phi) of the paper's configurations
PRESETS = {
    "chord-mu": (0, 200, 0.9, 0.05, False),
    "chord-phi": (0, 0, 0.1, 0.1, True),
    "example": (200, 400, 0.5, 0.02, True),
}


@dataclass
class Args(flags.ExpertFlags, flags.RunFlags):
    model: str = "runs/sft/checkpoint"
    """initial policy (and reference): hub id or local folder, e.g. the SFT checkpoint"""
    train_data: str = "data/toy/train.jsonl"
    """training prompts: .jsonl path or hub dataset id"""
    max_prompt_tokens: int = 512
    """prompts longer than this (chat-templated tokens) are dropped or stop the run, see --long-prompts (0: no limit)"""
    long_prompts: Literal["drop", "error"] = "drop"
    """what to do with prompts over --max-prompt-tokens: drop them with a printed count, or stop with an error"""
    eval_data: str = "data/toy/eval.jsonl"
    """held-out prompts with instruction ids, for gold accuracy"""
    eval_fn: str = "shared.scoring:instruction_scores"
    """'module:function' scoring held-out responses: (rows, texts) -> {name: value}, 'gold' and 'reward' among them"""
    reward_fn: str = "shared.scoring:reward"
    """'module:function' taking (row, completion_text) and returning a float"""
    output_dir: str = "runs/chord"
    """checkpoint, metrics.jsonl, eval.json and tensorboard logs go here"""
    seed: int = 1
    """seed for prompt order and sampling"""
    steps: int = 60
    """generation batches; each gives num_iterations optimizer steps"""
    prompts_per_step: int = 16
    """prompts per generation batch"""
    group_size: int = 8
    """completions per prompt (G)"""
    expert_data_ratio: float = 0.2
    """fraction of each batch's sequences that are expert demonstrations (Trinity's default is 0.5)"""
    preset: Literal["chord-phi", "chord-mu", "example"] = "chord-phi"
    """mu schedule and phi setting of a paper configuration; the mu_* and phi flags below override it"""
    mu_warmup: int | None = None
    """steps of linear mu warmup from 0 to mu_peak (preset value when unset)"""
    mu_decay: int | None = None
    """steps of cosine decay from mu_peak to mu_valley after the warmup (preset value when unset)"""
    mu_peak: float | None = None
    """mu at the end of the warmup (preset value when unset)"""
    mu_valley: float | None = None
    """mu after the decay (preset value when unset)"""
    phi: bool | None = None
    """weight expert-token NLL by p * (1 - p) (preset value when unset)"""
    detach_phi: bool = True
    """treat phi as a constant weight (Trinity); --no-detach-phi differentiates through it (ms-swift)"""
    micro_batch_size: int = 64
    """sequences per forward/backward; gradients are accumulated over the generation batch"""
    max_new_tokens: int = 16
    """maximum completion length"""
    temperature: float = 0.7
    """sampling temperature, log-probs use the same (TRL's default is 1.0; 0.7 suits the tiny model)"""
    top_k: int = 0
    """sample among the k likeliest tokens only (0: off, as the papers' GRPO)"""
    top_p: float = 1.0
    """sample among the likeliest tokens holding this much probability only (1.0: off)"""
    learning_rate: float = 5e-5
    """peak AdamW learning rate, linearly decayed to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    beta: float = 0.0
    """k3 KL coefficient; a reference model is loaded only when beta > 0"""
    eps_low: float = 0.2
    """lower clip range: rho >= 1 - eps_low"""
    eps_high: float = 0.2
    """upper clip range: rho <= 1 + eps_high"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """how per-token losses are aggregated (see grpo_loss); bnpo normalises each micro-batch by its own
    tokens (TRL), so its result depends on --micro-batch-size and the number of processes"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """advantage std: per group, over the batch, or no scaling"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """per-token ratio, or one ratio per sequence (GSPO)"""
    num_iterations: int = 1
    """optimizer steps per generation batch; > 1 stores old log-probs at generation"""
    eval_every: int = 20
    """evaluate on the held-out split every this many steps (and at start and end)"""
    eval_prompts: int = 256
    """held-out prompts used per evaluation"""
    save_every: int = 20
    """checkpoint every this many steps (and at the end)"""
    logp_chunk_tokens: int = 0
    """tokens per chunk when computing log-probs from hidden states (0: 64 MiB of logits per chunk)"""


# each flag's valid range, (low, high, low inclusive, high inclusive), checked before anything is read:
# those every RL script shares (shared/flags.py), then this script's own
FLAG_RANGES = dict(
    **flags.RL_RANGES,
    eps_low=flags.FRACTION,
    eps_high=flags.NON_NEGATIVE,
    expert_data_ratio=(0, 1, False, False),
)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean_group r) / (std r + 1e-4), std unbiased.

    rewards: [B*G], the G samples of each prompt contiguous. scale: "group" (std per
    group), "batch" (std over all rewards, mean still per group) or "none" (no
    division). A group whose rewards are all equal gets A = 0. Returns [B*G].
    """
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (rewards.std() + 1e-4)
    return centred.reshape(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, eps_low=0.2, eps_high=0.2, beta=0.0,
              loss_type="dapo", importance_sampling_level="token", max_completion_length=None,
              num_sequences=None, num_tokens=None):
    """Clipped surrogate + beta * k3 KL, aggregated by loss_type.

    logps, old_logps, ref_logps (None when beta == 0), mask: [B, L]; advantages: [B].
    Aggregation (B sequences here, N active tokens, L_max = max_completion_length or L):
      grpo: mean over sequences of each sequence's token mean; bnpo: sum(m*l)/max(1, sum m);
      dr_grpo: sum(m*l)/(B*L_max); dapo: sum(m*l)/max(1, N).
    For gradient accumulation pass num_sequences / num_tokens of the whole generation
    batch: micro-batch losses then add up to the full-batch loss.
    Log-ratios are clamped to [-20, 20] so that no ratio or KL overflows.
    Returns (loss, metrics) with metrics a dict of detached scalar tensors.
    """
    mask = mask.to(logps.dtype)
    token_count = mask.sum(dim=1).clamp(min=1.0)
    num_sequences = logps.size(0) if num_sequences is None else num_sequences
    num_tokens = mask.sum() if num_tokens is None else num_tokens

    log_ratio = (logps - old_logps).clamp(-20.0, 20.0)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(dim=1) / token_count)[:, None].expand_as(logps)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(logps.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        delta = (ref_logps - logps).clamp(-20.0, 20.0)
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / token_count).sum() / num_sequences
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) * (logps.size(0) / num_sequences)
    elif loss_type == "dr_grpo":
        max_len = logps.size(1) if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (num_sequences * max_len)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / torch.clamp(torch.as_tensor(num_tokens, dtype=logps.dtype), min=1.0)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")

    active = mask.sum().clamp(min=1.0)
    with torch.no_grad():
        metrics = {
            "clip_ratio/low": (((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype) * mask).sum() / active,
            "clip_ratio/high": (((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype) * mask).sum() / active,
            "ratio_mean": (ratio * mask).sum() / active,
            "kl": (kl * mask).sum() / active,
        }
    return loss, metrics


def mu_schedule(step: int, warmup: int, decay: int, peak: float, valley: float) -> float:
    """Weight of the expert term at `step`: linear 0 -> peak over `warmup` steps, then
    cosine peak -> valley over `decay` steps, then valley."""
    if step < warmup:
        return peak * step / warmup
    if step >= warmup + decay:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))


def sft_phi_loss(logps, mask, detach_phi=True, use_phi=True, num_tokens=None):
    """Token-mean expert NLL, each token weighted by phi = p * (1 - p), p = exp(logp).

    logps, mask: [B, L]. use_phi=False gives the plain SFT loss. detach_phi=True treats
    phi as a constant; False also differentiates phi (d/dlogp of -phi*logp is then
    -(phi + logp * (p - 2p^2))). num_tokens: normaliser (expert tokens of the whole
    step, for gradient accumulation; default mask.sum()).
    """
    mask = mask.to(logps.dtype)
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    weight = torch.ones_like(logps)
    if use_phi:
        p = torch.exp(logps)
        weight = p * (1 - p)
        if detach_phi:
            weight = weight.detach()
    return -(weight * logps * mask).sum() / torch.clamp(torch.as_tensor(num_tokens, dtype=logps.dtype), min=1.0)


def chord_loss(logps, old_logps, ref_logps, advantages, mask, expert_logps, expert_mask, mu, *, use_phi=True,
               detach_phi=True, num_expert_tokens=None, **grpo_kwargs):
    """L = (1 - mu) * L_GRPO(rollouts) + mu * L_SFT-phi(expert rows).

    The rollout tensors and grpo_kwargs are those of grpo_loss; expert_logps,
    expert_mask: [E, L_e]. Returns (loss, metrics) with both terms in the metrics.
    """
    rl_loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, mask, **grpo_kwargs)
    expert_loss = sft_phi_loss(expert_logps, expert_mask, detach_phi, use_phi, num_expert_tokens)
    metrics = {**metrics, "rl_loss": rl_loss.detach(), "expert_loss": expert_loss.detach()}
    return (1 - mu) * rl_loss + mu * expert_loss, metrics


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    preset = PRESETS[args.preset]
    mu_warmup, mu_decay, mu_peak, mu_valley, use_phi = (
        preset[i] if value is None else value
        for i, value in enumerate((args.mu_warmup, args.mu_decay, args.mu_peak, args.mu_valley, args.phi)))
    if not (0 <= mu_valley <= 1 and 0 <= mu_peak <= 1) or mu_warmup < 0 or mu_decay < 0:
        raise SystemExit("error: --mu-peak and --mu-valley must be in [0, 1], --mu-warmup and --mu-decay >= 0")
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every step's prompts
    distributed.check_divisible(args.prompts_per_step, "--prompts-per-step")
    output_dir = Path(args.output_dir)
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)
    batch_size = args.prompts_per_step * args.group_size  # sequences per generation batch
    expert_temperature = args.expert_temperature or args.temperature
    expert_rows_per_step = max(1, round(batch_size * args.expert_data_ratio / (1 - args.expert_data_ratio)))
    distributed.check_divisible(expert_rows_per_step, "the expert rows per step (from --expert-data-ratio)")

    # ---- data, reward, expert demonstrations, policy and reference (only when beta > 0)
    reward_fn, eval_fn = load_reward_fn(args.reward_fn), load_eval_fn(args.eval_fn)
    try:
        train_rows = load_rows(args.train_data, required=required_fields(reward_fn))
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        expert_pool, cache, cache_header = load_expert_pool(args.expert_pool, train_rows, args.expert_cache)
        model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        train_rows = keep_short_prompts(train_rows, tokenizer, args.max_prompt_tokens, args.long_prompts, args.train_data)
        model = distributed.shard(load_policy(model_path, args))
        ref_model = load_reference(args, model) if args.beta > 0 else None
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    model.train()
    # ---- optimizer and schedule
    optimizer = torch.optim.AdamW(distributed.optimizer_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    # the learning rate decays once per optimizer step (TRL), num_iterations of them per generation batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / (args.steps * args.num_iterations)))
    if state:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {output_dir / runfolder.CHECKPOINT} at step {start_step}")
    advantage_fn = torch.compile(group_advantages, dynamic=True) if args.compile else group_advantages
    loss_fn = functools.partial(torch.compile(chord_loss, dynamic=True) if args.compile else chord_loss,
                                eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, loss_type=args.loss_type,
                                importance_sampling_level=args.importance_sampling_level,
                                max_completion_length=args.max_new_tokens, num_sequences=batch_size,
                                use_phi=use_phi, detach_phi=args.detach_phi)
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)
    print(f"{batch_size} rollouts + {expert_rows_per_step} expert rows from {cache_header.get('teacher', '?')!r} per step; "
          f"mu: warmup {mu_warmup}, decay {mu_decay}, peak {mu_peak}, valley {mu_valley}; phi {use_phi}")

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args)

    micro_starts = range(0, batch_size // distributed.world_size(), args.micro_batch_size)  # this rank's micro-batches
    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="chord",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        mu = mu_schedule(step, mu_warmup, mu_decay, mu_peak, mu_valley)
        # ---- collect: G completions per prompt, one batched generate (seeded by step: resumable)
        generator = seeding.step_generator(args.seed, step)  # the prompts' draw, then the expert rows'
        indices = torch.randint(
            len(train_rows), (args.prompts_per_step,), generator=generator
        ).tolist()
        expert_indices = torch.randint(len(expert_pool), (expert_rows_per_step,), generator=generator)
        rows = distributed.local_share([train_rows[i] for i in indices])
        rollouts = generate_rollouts(
            model,
            tokenizer,
            [r["prompt"] for r in rows],
            args.group_size,
            args.max_new_tokens,
            args.temperature,
            seeds=distributed.local_share(seeding.prompt_seeds(args.seed, step, len(indices))),
            autocast_bf16=args.autocast_bf16,
            top_k=args.top_k,
            top_p=args.top_p,
            static_cache=args.static_cache,
        )
        clock.lap("generate")

        # ---- score and compute group-relative advantages
        group_rows = [row for row in rows for _ in range(args.group_size)]
        rewards = distributed.gather(reward_scores(reward_fn, group_rows, rollouts["texts"], args.strip_think))  # whole batch
        advantages = distributed.local_share(advantage_fn(rewards, args.group_size, args.scale_rewards)).to(args.device)
        input_ids, attention_mask, prompt_len = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
        completion_mask = rollouts["completion_mask"]
        num_tokens = distributed.all_sum(completion_mask.sum())  # the whole batch's: the loss is normalised by it
        expert_prompts = [expert_pool[i] for i in distributed.local_share(expert_indices).tolist()]
        expert_batches, num_expert_tokens = expert_micro_batches(tokenizer, expert_prompts, cache, len(micro_starts),
                                                                 args.device)
        clock.lap("score")

        # ---- old (sampling) and reference log-probs, no grad, once per generation batch
        old_logps, ref_logps = old_and_ref_logps(model, ref_model, rollouts, args)
        clock.lap("logps")

        # ---- optimise: num_iterations passes over the generation batch
        for iteration in range(args.num_iterations):
            total_loss, rl_loss, expert_loss, expert_prob, metric_sums = 0.0, 0.0, 0.0, 0.0, {}
            for s, expert_batch in zip(micro_starts, expert_batches):  # a rollout slice and an expert slice
                sl = slice(s, s + args.micro_batch_size)
                with autocast:
                    logps = completion_logps(model, input_ids[sl], attention_mask[sl], prompt_len,
                                             args.temperature, args.logp_chunk_tokens).float()
                    expert_logps, expert_mask = expert_row_logps(model, expert_batch, expert_temperature,
                                                                 args.logp_chunk_tokens, like=logps)
                loss, metrics = loss_fn(
                    logps, logps.detach() if old_logps is None else old_logps[sl].float(),
                    None if ref_logps is None else ref_logps[sl].float(), advantages[sl], completion_mask[sl],
                    expert_logps, expert_mask, mu, num_expert_tokens=num_expert_tokens, num_tokens=num_tokens)
                loss.backward()
                total_loss += loss.detach()
                rl_loss += metrics.pop("rl_loss")
                expert_loss += metrics.pop("expert_loss")
                expert_prob += (expert_logps.detach().exp() * expert_mask).sum() / num_expert_tokens.clamp(min=1)
                share = completion_mask[sl].sum() / num_tokens.clamp(min=1)
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value * share
            total_loss = distributed.all_sum(float(total_loss))
            rl_loss, expert_loss, expert_prob = (distributed.all_sum(v) for v in (rl_loss, expert_loss, expert_prob))
            grad_norm = distributed.sum_gradients_and_clip(model.parameters(), args.max_grad_norm)
            checkpoint.stop_if_not_finite(total_loss, step + 1, output_dir, grad_norm)
            optimizer.step()
            checkpoint.stop_if_weights_not_finite(model, step + 1, output_dir)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        clock.lap("update")

        # ---- log, evaluate, checkpoint
        lengths = distributed.gather(completion_mask.sum(1).float())
        metric_sums = {key: distributed.all_sum(value) for key, value in metric_sums.items()}
        logger.log(
            step + 1,
            {
                "train/loss": total_loss,
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                "train/mu": mu,
                "train/rl_loss": float(rl_loss),
                "train/expert_loss": float(expert_loss),
                "train/expert_token_prob": float(expert_prob),
                "train/reward": rewards.mean(),
                "train/reward_std": rewards.view(-1, args.group_size).std(1).mean(),
                "train/completion_length": lengths.mean(),
                "train/truncated": distributed.gather(rollouts["truncated"].float()).mean(),
                **{f"train/{k}": float(v) for k, v in metric_sums.items()},
                **clock.metrics(),
            },
        )
        progress.set_postfix(reward=f"{rewards.mean():.3f}", mu=f"{mu:.3f}")
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args)) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval)
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
