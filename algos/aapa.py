"""AAPA: Adversarially Anchored Preference Alignment (arXiv 2509.25148 v2), a plug-in for SFT, GRPO and CHORD.

Per step: sample G completions for each prompt, score them, normalise rewards
within each group into advantages, then minimise the clipped surrogate
-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*KL_k3 per token,
aggregated by loss_type. With num_iterations == 1 the old policy is the current
one (old_logps = logps.detach()), so rho == 1 and only its gradient matters.
AAPA first fits a FIXED discriminator D(x, y) (a small head on frozen sentence
embeddings: offline expert responses vs the initial policy's rollouts) and freezes it;
each rollout's anchor score s = log D is centred per group and added to the advantage:
A = A_task + lambda * A_anchor. Base sft: L_SFT + lambda * (policy gradient on A_anchor);
base chord: CHORD's loss with A. --staged: A-SFT, then A-GRPO, in one command.
The paper's method section is not public; our reading and its flags: docs/algorithms.md#aapa.
"""

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from shared import checkpoint, discriminator, distributed, evaluation, flags, runfolder, runlog, seeding
from shared.data import expert_micro_batches, keep_short_prompts, load_eval_rows, load_expert_pool, load_rows
from shared.embeddings import load_encoder, sentence_embeddings
from shared.logprobs import completion_logps, expert_row_logps, old_and_ref_logps
from shared.modeling import load_policy, load_reference, load_tokenizer
from shared.rewards import load_eval_fn, load_reward_fn, required_fields, reward_scores
from shared.rollout import generate_rollouts

DISCRIMINATOR = "discriminator.pt"  # <output_dir>/discriminator.pt, and a copy in every checkpoint
STAGE1 = "stage1"  # --staged: <output_dir>/stage1 holds the A-SFT weights
ANCHOR_SCALE_MIN = 0.1  # nats: the floor of the anchor scale, so a D that cannot separate anything amplifies nothing


@dataclass
class Args(flags.ExpertFlags, flags.RunFlags):
    base: Literal["grpo", "sft", "chord"] = "grpo"
    """the algorithm the anchoring term is added to"""
    staged: bool = False
    """stage 1: A-SFT for stage1_steps; stage 2: A-GRPO for the remaining steps, from the stage-1 weights"""
    stage1_steps: int = 20
    """with --staged: steps of stage 1 (A-SFT); its weights are saved to <output_dir>/stage1"""
    stage1_learning_rate: float = 1e-4
    """with --staged: learning rate of stage 1 (stage 2 uses learning_rate)"""
    model: str = "runs/sft/checkpoint"
    """initial policy (and reference, and default discriminator encoder): hub id or local folder"""
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
    output_dir: str = "runs/aapa"
    """checkpoint, discriminator, metrics.jsonl, eval.json and tensorboard logs go here"""
    seed: int = 1
    """seed for prompt order and sampling"""
    steps: int = 60
    """generation batches in all (both stages with --staged)"""
    prompts_per_step: int = 16
    """prompts per generation batch"""
    group_size: int = 8
    """completions per prompt (G)"""
    anchor_coef: float = 0.5
    """lambda: weight of the group-normalised anchor advantage"""
    anchor_schedule: Literal["constant", "linear_decay", "linear_warmup"] = "constant"
    """lambda over the run: constant, decayed linearly to 0, or warmed up linearly from 0"""
    disc_encoder: str = ""
    """frozen encoder for sentence embeddings: a causal LM id or folder ('' = the reference policy)"""
    disc_path: str = ""
    """reuse a saved discriminator instead of training one"""
    disc_layers: tuple[int, ...] = (0, -1)
    """encoder hidden-state layers that are mean-pooled into the sentence embedding (0: token embeddings, -1: last)"""
    disc_prompts: int = 2000
    """prompts used to train the discriminator (one expert response and one policy rollout each)"""
    disc_holdout: float = 0.2
    """fraction of those prompts held out to report the discriminator's accuracy"""
    disc_hidden: int = 4
    """hidden width of the discriminator head (4: the best held-out accuracy in scripts/sweep_discriminator.py;
    wider heads memorise the fit set)"""
    disc_epochs: int = 500
    """full-batch Adam steps of discriminator training on the cached embeddings"""
    disc_learning_rate: float = 3e-3
    """discriminator learning rate"""
    expert_data_ratio: float = 0.2
    """sft/chord bases: fraction of each batch's sequences that are expert demonstrations"""
    chord_mu: float = 0.1
    """chord base: constant weight of the expert term (CHORD-phi)"""
    phi: bool = True
    """chord base: weight expert-token NLL by p * (1 - p)"""
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
    """peak AdamW learning rate, linearly decayed to 0 (stage 2 with --staged)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    beta: float = 0.0
    """k3 KL coefficient to the reference"""
    eps_low: float = 0.2
    """lower clip range: rho >= 1 - eps_low"""
    eps_high: float = 0.2
    """upper clip range: rho <= 1 + eps_high"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """how per-token losses are aggregated (see grpo_loss); bnpo normalises each micro-batch by its own
    tokens (TRL), so its result depends on --micro-batch-size and the number of processes"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """task-reward advantage std: per group, over the batch, or none (the anchor is divided by its fixed scale)"""
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
    disc_holdout=(0, 1, False, False),
    disc_prompts=(10, None, True, False),
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


def aapa_advantages(task_rewards, anchor_scores, group_size, anchor_coef, anchor_scale=1.0, scale="group",
                    use_task_reward=True):
    """A = A_task + lambda * A_anchor with A_anchor = (s - mean_group s) / anchor_scale.

    The task reward is group-normalised (group_advantages, `scale`); the anchor score s
    (nats) is only centred per group and divided by a FIXED scale, measured once on the
    discriminator's held-out responses (the spread of s between expert and policy
    responses), never by the group's own std: a group whose scores differ by noise
    (1e-3 nats) then gets a ~1e-3 anchor advantage instead of a unit-scale one, while
    a gap as large as the expert/policy gap acts at unit scale. use_task_reward=False
    (base SFT) leaves only lambda * A_anchor. All [B*G]; anchor_scale > 0.
    """
    grouped = anchor_scores.view(-1, group_size)
    anchor = ((grouped - grouped.mean(dim=1, keepdim=True)) / anchor_scale).reshape(-1)
    task = group_advantages(task_rewards, group_size, scale) if use_task_reward else torch.zeros_like(anchor)
    return task + anchor_coef * anchor


def aapa_loss(logps, old_logps, ref_logps, advantages, mask, expert_logps, expert_mask, rl_weight, expert_weight, *,
              use_phi=False, detach_phi=True, num_expert_tokens=None, **grpo_kwargs):
    """rl_weight * L_GRPO(advantages) + expert_weight * L_SFT(expert rows).

    Bases: grpo (1, 0); sft (1, 1) with use_phi=False, the advantages being lambda *
    A_anchor alone; chord (1 - mu, mu) with phi. Returns (loss, metrics).
    """
    rl_loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, mask, **grpo_kwargs)
    expert_loss = sft_phi_loss(expert_logps, expert_mask, detach_phi, use_phi, num_expert_tokens)
    metrics = {**metrics, "rl_loss": rl_loss.detach(), "expert_loss": expert_loss.detach()}
    return rl_weight * rl_loss + expert_weight * expert_loss, metrics


def discriminator_loss(logits, is_expert):
    """Class-balanced binary cross-entropy: the mean over expert responses (label 1) and
    the mean over policy rollouts (label 0), averaged, so dropping contradictory negatives
    does not tilt D towards 'expert'. [N] -> scalar."""
    is_expert = is_expert.to(logits.dtype)
    per_row = torch.nn.functional.binary_cross_entropy_with_logits(logits, is_expert, reduction="none")
    positives, negatives = is_expert.sum().clamp(min=1.0), (1 - is_expert).sum().clamp(min=1.0)
    return 0.5 * ((per_row * is_expert).sum() / positives + (per_row * (1 - is_expert)).sum() / negatives)


def fit_discriminator(expert_features, policy_features, policy_is_copy, num_holdout, hidden, epochs, learning_rate):
    """The fixed discriminator, fitted once by discriminator_loss on a split by prompt
    (shared/discriminator.py:fit_on_split: the first num_holdout prompts held out, rollouts
    equal to the expert's text dropped as negatives). The anchor scale is the std of
    s = log D over the held-out responses of both kinds (at least ANCHOR_SCALE_MIN).
    Returns (head, record) with the statistics and the held-out accuracy and AUC.
    """
    head, record, held_logits = discriminator.fit_on_split(expert_features, policy_features, policy_is_copy, num_holdout,
                                                           hidden, epochs, learning_rate, discriminator_loss)
    record["anchor_scale"] = max(ANCHOR_SCALE_MIN, float(anchor_scores(held_logits).std()))
    return head, record


def anchor_scores(logits):
    """s = log D(x, y) = log sigmoid(logit): 0 for expert-like responses, very negative for unlike ones."""
    return torch.nn.functional.logsigmoid(logits)


def anchor_coefficient(step: int, steps: int, coef: float, schedule: str) -> float:
    """lambda at `step` of `steps`."""
    if schedule == "linear_decay":
        return coef * (1 - step / max(1, steps))
    if schedule == "linear_warmup":
        return coef * min(1.0, step / max(1, steps))
    return coef


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    if args.staged and not 0 < args.stage1_steps < args.steps:
        raise SystemExit(f"error: --stage1-steps must be in (0, --steps) with --staged, got {args.stage1_steps}")
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every step's prompts
    distributed.check_divisible(args.prompts_per_step, "--prompts-per-step")
    output_dir = Path(args.output_dir)
    state = runfolder.claim_output_dir(args, own_outputs=(DISCRIMINATOR, STAGE1))  # one run per folder; --resume's state
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)
    expert_temperature = args.expert_temperature or args.temperature
    batch_size = args.prompts_per_step * args.group_size  # sequences per generation batch
    expert_rows_per_step = max(1, round(batch_size * args.expert_data_ratio / (1 - args.expert_data_ratio)))
    distributed.check_divisible(expert_rows_per_step, "the expert rows per step (from --expert-data-ratio)")

    # ---- data, expert demonstrations, reward; policy, frozen reference (KL, default encoder), discriminator encoder
    reward_fn, eval_fn = load_reward_fn(args.reward_fn), load_eval_fn(args.eval_fn)
    try:
        train_rows = load_rows(args.train_data, required=required_fields(reward_fn))
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        expert_pool, cache, cache_header = load_expert_pool(args.expert_pool, train_rows, args.expert_cache,
            min_prompts=2, why="the discriminator is fitted and scored on a split of the pool by prompt")
        model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        train_rows = keep_short_prompts(train_rows, tokenizer, args.max_prompt_tokens, args.long_prompts, args.train_data)
        model = distributed.shard(load_policy(model_path, args))
        ref_model = load_reference(args, model) if args.beta > 0 or not args.disc_encoder else None
        encoder, encoder_tokenizer = load_encoder(args, ref_model, tokenizer)  # D's features: frozen
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    model.train()

    def make_optimizer(step):
        """AdamW and a linear decay over the current stage's optimizer steps (the whole run unless --staged)."""
        stage1 = args.staged and step < args.stage1_steps
        length = args.stage1_steps if stage1 else args.steps - (args.stage1_steps if args.staged else 0)
        learning_rate = args.stage1_learning_rate if stage1 else args.learning_rate
        optimizer = torch.optim.AdamW(distributed.optimizer_groups(model), lr=learning_rate, weight_decay=args.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: max(0.0, 1 - s / (length * args.num_iterations))
        )

    optimizer, scheduler = make_optimizer(start_step)
    if state:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {output_dir / runfolder.CHECKPOINT} at step {start_step}")
    advantage_fn = torch.compile(aapa_advantages, dynamic=True) if args.compile else aapa_advantages
    loss_fn = functools.partial(torch.compile(aapa_loss, dynamic=True) if args.compile else aapa_loss,
                                eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, loss_type=args.loss_type,
                                importance_sampling_level=args.importance_sampling_level,
                                max_completion_length=args.max_new_tokens, num_sequences=batch_size)
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)

    # ---- the fixed discriminator: fitted once on expert responses vs initial-policy rollouts (or loaded), then frozen
    disc_prompts, holdout_prompts = discriminator.split_prompts(expert_pool, args.disc_prompts, args.disc_holdout, args.seed)

    def fit():
        torch.manual_seed(args.seed)  # the initial rollouts and the head's initialisation draw from it
        features = discriminator.expert_and_policy_features(model, tokenizer, encoder, encoder_tokenizer, disc_prompts, cache,
                                                            args)
        return fit_discriminator(*features, len(holdout_prompts), args.disc_hidden, args.disc_epochs,
                                 args.disc_learning_rate)[1]

    disc_record = discriminator.fixed_record(state, args, fit, output_dir / DISCRIMINATOR, logger, len(disc_prompts))
    head = discriminator.frozen_head(disc_record, args.device)

    def discriminator_logits(prompts, responses):
        features = sentence_embeddings(encoder, encoder_tokenizer, prompts, responses, args.device, disc_record["layers"])
        return head((features - disc_record["feature_mean"]) / disc_record["feature_std"])

    holdout_expert_logits = discriminator_logits(holdout_prompts, [cache[p] for p in holdout_prompts])
    # anchor_metrics(step): fresh rollouts on the discriminator's held-out prompts, judged by it
    anchor_metrics = functools.partial(discriminator.fresh_rollout_metrics, model, tokenizer, holdout_prompts,
                                       holdout_expert_logits, discriminator_logits, anchor_scores, args=args)

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args,
                                 extra=anchor_metrics)

    micro_starts = range(0, batch_size // distributed.world_size(), args.micro_batch_size)  # this rank's micro-batches
    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="aapa",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        base = ("sft" if step < args.stage1_steps else "grpo") if args.staged else args.base  # --staged: A-SFT, A-GRPO
        coef = anchor_coefficient(step, args.steps, args.anchor_coef, args.anchor_schedule)
        rl_weight, expert_weight = {"grpo": (1.0, 0.0), "sft": (1.0, 1.0), "chord": (1 - args.chord_mu, args.chord_mu)}[base]
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

        # ---- score: task reward, anchor score s = log D(x, y), advantages A_task + lambda * A_anchor
        group_rows = [row for row in rows for _ in range(args.group_size)]
        rewards = distributed.gather(reward_scores(reward_fn, group_rows, rollouts["texts"], args.strip_think))  # whole batch
        rollout_logits = distributed.gather(discriminator_logits([r["prompt"] for r in group_rows], rollouts["texts"]))
        scores = anchor_scores(rollout_logits).cpu()
        advantages = distributed.local_share(advantage_fn(rewards, scores, args.group_size, coef, disc_record["anchor_scale"],
                                                          args.scale_rewards, use_task_reward=base != "sft")).to(args.device)
        input_ids, attention_mask, prompt_len = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
        completion_mask = rollouts["completion_mask"]
        num_tokens = distributed.all_sum(completion_mask.sum())  # the whole batch's: the loss is normalised by it
        expert_prompts = [expert_pool[i] for i in distributed.local_share(expert_indices).tolist()] \
            if expert_weight > 0 else []
        expert_batches, num_expert_tokens = expert_micro_batches(tokenizer, expert_prompts, cache, len(micro_starts),
                                                                 args.device)
        clock.lap("score")

        # ---- old (sampling) and reference log-probs, no grad, once per generation batch
        old_logps, ref_logps = old_and_ref_logps(model, ref_model if args.beta > 0 else None, rollouts, args)
        clock.lap("logps")

        # ---- optimise: num_iterations passes over the generation batch
        for iteration in range(args.num_iterations):
            total_loss, rl_loss, expert_loss, metric_sums = 0.0, 0.0, 0.0, {}
            for s, expert_batch in zip(micro_starts, expert_batches):  # a rollout slice (and an expert slice)
                sl = slice(s, s + args.micro_batch_size)
                with autocast:
                    logps = completion_logps(model, input_ids[sl], attention_mask[sl], prompt_len,
                                             args.temperature, args.logp_chunk_tokens).float()
                    expert_logps, expert_mask = expert_row_logps(model, expert_batch, expert_temperature,
                                                                 args.logp_chunk_tokens, like=logps)
                loss, metrics = loss_fn(
                    logps, logps.detach() if old_logps is None else old_logps[sl].float(),
                    None if ref_logps is None else ref_logps[sl].float(), advantages[sl], completion_mask[sl],
                    expert_logps, expert_mask, rl_weight, expert_weight, use_phi=base == "chord" and args.phi,
                    num_expert_tokens=num_expert_tokens, num_tokens=num_tokens)
                loss.backward()
                total_loss += loss.detach()
                rl_loss += metrics.pop("rl_loss")
                expert_loss += metrics.pop("expert_loss")
                share = completion_mask[sl].sum() / num_tokens.clamp(min=1)
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value * share
            total_loss = distributed.all_sum(float(total_loss))
            rl_loss, expert_loss = distributed.all_sum(rl_loss), distributed.all_sum(expert_loss)
            grad_norm = distributed.sum_gradients_and_clip(model.parameters(), args.max_grad_norm)
            checkpoint.stop_if_not_finite(total_loss, step + 1, output_dir, grad_norm)
            optimizer.step()
            checkpoint.stop_if_weights_not_finite(model, step + 1, output_dir)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        clock.lap("update")

        # ---- log, evaluate, stage switch, checkpoint
        lengths = distributed.gather(completion_mask.sum(1).float())
        metric_sums = {key: distributed.all_sum(value) for key, value in metric_sums.items()}
        logger.log(
            step + 1,
            {
                "train/loss": total_loss,
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                "train/anchor_coef": coef,
                "train/anchor_score": scores.mean(),
                "train/anchor_advantage_abs": coef
                * (scores.view(-1, args.group_size) - scores.view(-1, args.group_size).mean(1, keepdim=True)).abs().mean()
                / disc_record["anchor_scale"],
                "train/rollouts_judged_expert": (rollout_logits > 0).float().mean(),
                "train/rl_loss": float(rl_loss),
                "train/expert_loss": float(expert_loss),
                "train/stage": 1 + (base == "grpo" and args.staged),
                "train/reward": rewards.mean(),
                "train/reward_std": rewards.view(-1, args.group_size).std(1).mean(),
                "train/completion_length": lengths.mean(),
                "train/truncated": distributed.gather(rollouts["truncated"].float()).mean(),
                **{f"train/{k}": float(v) for k, v in metric_sums.items()},
                **clock.metrics(),
            },
        )
        progress.set_postfix(reward=f"{rewards.mean():.3f}", anchor=f"{scores.mean():.3f}")
        if args.staged and step + 1 == args.stage1_steps:
            checkpoint.save_model(output_dir / STAGE1, model, tokenizer)
            optimizer, scheduler = make_optimizer(step + 1)
            tqdm.write(f"stage 1 (A-SFT) done at step {step + 1}: weights in {output_dir / STAGE1}; stage 2: A-GRPO")
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args,
            extra={"discriminator": disc_record})) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval, keys=("anchor_score_rollouts",),
                     disc_heldout_accuracy=disc_record["heldout_accuracy"])
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
