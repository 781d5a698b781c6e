"""ADPO listwise: Anchored Direct Preference Optimization (arXiv 2510.18913) on on-policy groups.

Per step: sample G completions for each prompt, score them, normalise rewards
within each group into advantages, then minimise the cross-entropy of
softmax(u) against q = softmax(A / beta_r) within each group, u_i = (l_i - l_i^anchor)
/ tau, l a sequence log-prob and the anchor the sampling policy; tau is adaptive per
prompt (softer for high entropy and low reward). The offline pairwise mode: adpo_pairwise.py.
Formulas, the author's code (wk222/TRL-ADPO) and our choices: docs/algorithms.md#adpo.
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
from shared.data import keep_short_prompts, load_eval_rows, load_rows
from shared.logprobs import batch_logps, completion_logps
from shared.modeling import load_policy, load_tokenizer
from shared.rewards import load_eval_fn, load_reward_fn, required_fields, reward_scores
from shared.rollout import generate_rollouts


@dataclass
class Args(flags.RunFlags):
    model: str = "runs/sft/checkpoint"
    """initial policy: hub id or local folder, e.g. the SFT checkpoint"""
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
    output_dir: str = "runs/adpo"
    """checkpoint, metrics.jsonl, eval.json and tensorboard logs go here"""
    seed: int = 1
    """seed for prompt order and sampling"""
    steps: int = 60
    """generation batches; each gives num_iterations optimizer steps"""
    prompts_per_step: int = 16
    """prompts per generation batch"""
    group_size: int = 8
    """completions per prompt (G)"""
    micro_batch_size: int = 64
    """sequences per forward/backward, a multiple of group_size (a group's softmax needs all of its samples)"""
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
    num_iterations: int = 2
    """optimizer steps per generation batch; the anchor only acts from the second one"""
    beta_r: float = 0.5
    """target temperature: q = softmax(A / beta_r)"""
    adaptive_tau: bool = True
    """per-prompt tau from policy entropy and group reward (paper); --no-adaptive-tau uses tau0"""
    tau0: float = 0.8
    """base anchor temperature (paper: 0.8)"""
    tau_alpha: float = 1.0
    """adaptive tau: weight of the normalised entropy H (paper: 1.0)"""
    tau_reward_coef: float = 1.0
    """adaptive tau: weight of (1 - H) * (1 - R), R the group's normalised mean reward (our choice)"""
    tau_min: float = 0.1
    """adaptive tau lower bound (paper: 0.1)"""
    tau_max: float = 5.0
    """adaptive tau upper bound (our choice)"""
    length_normalize: bool = False
    """sequence log-prob as the token mean instead of the sum"""
    beta: float = 0.0
    """k3 KL to the anchor (sampling policy), token mean"""
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
    tau0=flags.POSITIVE,
    beta_r=flags.POSITIVE,
    tau_min=flags.POSITIVE,
    tau_max=flags.POSITIVE,
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


def sequence_logps(logps, mask, length_normalize=False):
    """l = sum of token log-probs over the response (token mean with length_normalize). [B, L] -> [B]."""
    mask = mask.to(logps.dtype)
    total = (logps * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0) if length_normalize else total


def group_entropy(entropies, mask, group_size):
    """Mean over each group's sequences of the sequence's mean token entropy, as the
    author's code averages (a token-weighted mean would let long completions decide).
    entropies, mask: [P*G, L] -> [P]."""
    mask = mask.to(entropies.dtype)
    per_sequence = (entropies * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return per_sequence.view(-1, group_size).mean(1)


def adaptive_tau(normalized_entropy, group_mean_reward, tau0=0.8, alpha=1.0, reward_coef=1.0, tau_min=0.1, tau_max=5.0):
    """tau = clip(tau0 * (1 + alpha*H + reward_coef*(1-H)*(1-R)), tau_min, tau_max) per prompt.

    normalized_entropy H: [P] mean token entropy / log(vocab) in [0, 1];
    group_mean_reward: [P], min-max normalised over the batch into R (0.5 when all equal).
    Uncertain policies (high H) and hard prompts (low R) get a softer anchor.
    """
    low, high = group_mean_reward.min(), group_mean_reward.max()
    spread = high - low
    normalized_reward = torch.where(spread > 1e-8, (group_mean_reward - low) / spread.clamp(min=1e-8),
                                    torch.full_like(group_mean_reward, 0.5))
    h = normalized_entropy.clamp(0.0, 1.0)
    return (tau0 * (1 + alpha * h + reward_coef * (1 - h) * (1 - normalized_reward))).clamp(tau_min, tau_max)


def adpo_listwise_loss(logps, anchor_logps, mask, advantages, tau, group_size, *, beta_r=0.5, length_normalize=False,
                       beta=0.0, num_groups=None, num_tokens=None):
    """Cross-entropy of softmax(u) against q = softmax(A / beta_r) within each group.

    logps, anchor_logps, mask: [B, L] token log-probs (current policy, anchor) with B =
    groups * group_size, samples of a group contiguous; advantages: [B]; tau: [groups].
    u_i = (l_i - l_i^anchor) / tau. Mean over groups (num_groups of the whole batch for
    accumulation) + beta * token-mean k3 KL to the anchor (over num_tokens).
    Returns (loss, metrics).
    """
    mask = mask.to(logps.dtype)
    num_groups = logps.size(0) // group_size if num_groups is None else num_groups
    num_tokens = mask.sum() if num_tokens is None else num_tokens
    log_ratio = (sequence_logps(logps, mask, length_normalize) - sequence_logps(anchor_logps, mask, length_normalize))
    u = (log_ratio.view(-1, group_size) / tau[:, None]).clamp(-50.0, 50.0)
    q = torch.softmax(advantages.view(-1, group_size).to(logps.dtype) / beta_r, dim=1)
    loss = -(q * torch.log_softmax(u, dim=1)).sum() / num_groups
    delta = (anchor_logps - logps).clamp(-20.0, 20.0)
    kl = ((torch.exp(delta) - delta - 1) * mask).sum() / torch.clamp(torch.as_tensor(num_tokens, dtype=logps.dtype), min=1.0)
    if beta != 0.0:
        loss = loss + beta * kl
    with torch.no_grad():
        metrics = {"kl": kl.detach(), "u_abs": u.abs().mean(), "target_entropy": -(q * q.clamp(min=1e-30).log()).sum(1).mean()}
    return loss, metrics


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    if args.micro_batch_size % args.group_size:
        raise SystemExit(f"error: --micro-batch-size {args.micro_batch_size} must be a multiple of --group-size "
                         f"{args.group_size} (a group's softmax needs all of its samples)")
    if args.tau_min > args.tau_max:
        raise SystemExit(f"error: --tau-min {args.tau_min} must be <= --tau-max {args.tau_max}")
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every step's prompts
    distributed.check_divisible(args.prompts_per_step, "--prompts-per-step")
    output_dir = Path(args.output_dir)
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)
    batch_size = args.prompts_per_step * args.group_size  # sequences per generation batch

    # ---- data, reward and policy (the anchor is the sampling policy itself: no reference model)
    reward_fn, eval_fn = load_reward_fn(args.reward_fn), load_eval_fn(args.eval_fn)
    try:
        train_rows = load_rows(args.train_data, required=required_fields(reward_fn))
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        train_rows = keep_short_prompts(train_rows, tokenizer, args.max_prompt_tokens, args.long_prompts, args.train_data)
        model = distributed.shard(load_policy(model_path, args))
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
    loss_fn = functools.partial(torch.compile(adpo_listwise_loss, dynamic=True) if args.compile else adpo_listwise_loss,
                                group_size=args.group_size, beta_r=args.beta_r, length_normalize=args.length_normalize,
                                beta=args.beta, num_groups=args.prompts_per_step)
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)
    log_vocab = math.log(model.get_output_embeddings().weight.size(0))  # entropies / log(vocab) lie in [0, 1]

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args)

    micro_starts = range(0, batch_size // distributed.world_size(), args.micro_batch_size)  # this rank's micro-batches
    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="adpo",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        # ---- collect: G completions per prompt, one batched generate (seeded by step: resumable)
        indices = torch.randint(
            len(train_rows), (args.prompts_per_step,), generator=seeding.step_generator(args.seed, step)
        ).tolist()
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
        advantages = distributed.local_share(advantage_fn(rewards, args.group_size)).to(args.device)
        input_ids, attention_mask, prompt_len = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
        completion_mask = rollouts["completion_mask"]
        num_tokens = distributed.all_sum(completion_mask.sum())  # the whole batch's: the loss is normalised by it
        clock.lap("score")

        # ---- anchor = the sampling policy: its log-probs and entropies, one no-grad pass; adaptive tau
        anchor_logps, entropies = batch_logps(model, rollouts, args, with_entropy=True)
        normalized_entropy = distributed.gather(group_entropy(entropies, completion_mask, args.group_size) / log_vocab)
        group_mean_reward = rewards.view(-1, args.group_size).mean(1).to(args.device)
        tau = adaptive_tau(normalized_entropy, group_mean_reward, args.tau0, args.tau_alpha, args.tau_reward_coef,
                           args.tau_min, args.tau_max) if args.adaptive_tau else torch.full_like(group_mean_reward, args.tau0)
        local_tau = distributed.local_share(tau)  # tau is set over the whole batch (min-max of rewards)
        clock.lap("logps")

        # ---- optimise: num_iterations passes over the generation batch. On the first the policy
        # is the anchor (u = 0): the gradient is (1/G - q_i)/tau * grad l_i and the anchor
        # constrains nothing; from the second on, softmax(u) is pulled back towards q
        for iteration in range(args.num_iterations):
            total_loss, metric_sums = 0.0, {}
            for s in micro_starts:
                sl = slice(s, s + args.micro_batch_size)
                groups = slice(s // args.group_size, (s + args.micro_batch_size) // args.group_size)
                with autocast:
                    logps = completion_logps(model, input_ids[sl], attention_mask[sl], prompt_len,
                                             args.temperature, args.logp_chunk_tokens).float()
                loss, metrics = loss_fn(logps, anchor_logps[sl], completion_mask[sl], advantages[sl], local_tau[groups],
                                        num_tokens=num_tokens)
                loss.backward()
                total_loss += loss.detach()
                share = input_ids[sl].size(0) / batch_size
                for key, value in metrics.items():  # kl is already this micro-batch's part of the batch's token mean
                    metric_sums[key] = metric_sums.get(key, 0.0) + (value if key == "kl" else value * share)
            total_loss = distributed.all_sum(float(total_loss))
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
                "train/reward": rewards.mean(),
                "train/reward_std": rewards.view(-1, args.group_size).std(1).mean(),
                "train/completion_length": lengths.mean(),
                "train/truncated": distributed.gather(rollouts["truncated"].float()).mean(),
                "train/tau_mean": tau.mean(),
                "train/tau_min": tau.min(),
                "train/tau_max": tau.max(),
                "train/normalized_entropy": normalized_entropy.mean(),
                **{f"train/{k}": float(v) for k, v in metric_sums.items()},
                **clock.metrics(),
            },
        )
        progress.set_postfix(reward=f"{rewards.mean():.3f}")
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args)) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval)
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
