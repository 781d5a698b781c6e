"""UniAPL: Unified Adversarial Preference Learning (arXiv 2509.25148 v1), one single-stage objective.

Per step: sample G completions for each prompt, score them, normalise rewards
within each group into advantages, then minimise the clipped surrogate
-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) + beta*KL_k3 per token,
aggregated by loss_type. With num_iterations == 1 the old policy is the current
one (old_logps = logps.detach()), so rho == 1 and only its gradient matters.
UniAPL adds expert demonstrations and an online (GAIL-style) discriminator D to every
step: A = A_task + lambda * A_adv, A_adv the group advantage of log D(x, y), and
L = L_GRPO(A) + (c_sft + nu) * NLL(expert rows), nu a Lagrange multiplier (dual ascent)
for the constraint divergence-from-expert <= epsilon.
The paper's method section is not public; our reading and its flags: docs/algorithms.md#uniapl.
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
from shared.discriminator import make_discriminator
from shared.embeddings import load_encoder, sentence_embeddings
from shared.logprobs import completion_logps, expert_row_logps, old_and_ref_logps
from shared.modeling import load_policy, load_reference, load_tokenizer
from shared.rewards import load_eval_fn, load_reward_fn, required_fields, reward_scores
from shared.rollout import generate_rollouts


@dataclass
class Args(flags.ExpertFlags, flags.RunFlags):
    model: str = "runs/sft/checkpoint"
    """initial policy (the SFT checkpoint, or a base model: UniAPL is single-stage) and default encoder"""
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
    output_dir: str = "runs/uniapl"
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
    """fraction of each batch's sequences that are expert demonstrations"""
    sft_coef: float = 1.0
    """c_sft: fixed weight of the expert NLL in every step"""
    adv_coef: float = 0.1
    """lambda: weight of the adversarial reward log D(x, y) added to the task reward"""
    divergence: Literal["nll", "disc"] = "nll"
    """constraint measure: expert-data NLL per token, or the discriminator's -E[log D(rollouts)]"""
    epsilon: float = 0.35
    """constraint bound: divergence <= epsilon (the SFT checkpoint's expert NLL is about 0.4 here)"""
    dual_lr: float = 1.0
    """dual ascent step: nu <- max(0, nu + dual_lr * (divergence - epsilon))"""
    initial_multiplier: float = 0.0
    """nu at step 0"""
    disc_steps: int = 1
    """k: discriminator BCE steps per policy step"""
    disc_learning_rate: float = 1e-3
    """discriminator (Adam) learning rate"""
    disc_hidden: int = 64
    """hidden width of the discriminator head"""
    disc_layers: tuple[int, ...] = (0, -1)
    """encoder hidden-state layers mean-pooled into the sentence embedding (0: token embeddings, -1: last)"""
    disc_encoder: str = ""
    """frozen encoder for sentence embeddings: a causal LM id or folder ('' = the initial policy, frozen)"""
    label_smoothing: float = 0.1
    """discriminator targets 1 - s and s instead of 1 and 0 (guards against a saturated D)"""
    gradient_penalty: float = 0.0
    """R1 penalty weight on ||grad_features D|| at expert features (another guard; 0 = off)"""
    saturation_threshold: float = 0.99
    """log the fraction of responses D judges with confidence beyond this (a saturated D)"""
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
    """k3 KL coefficient to the initial policy"""
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
    label_smoothing=(0, 0.5, True, False),
    disc_steps=flags.NON_NEGATIVE,
    dual_lr=flags.NON_NEGATIVE,
    initial_multiplier=flags.NON_NEGATIVE,
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


def uniapl_policy_loss(logps, old_logps, ref_logps, advantages, mask, expert_logps, expert_mask, expert_coef, *,
                       num_expert_tokens=None, **grpo_kwargs):
    """L_GRPO(advantages) + expert_coef * token-mean NLL of the expert rows, with
    expert_coef = c_sft + nu (the multiplier, when the divergence is the NLL).
    Returns (loss, metrics) with both terms in the metrics."""
    rl_loss, metrics = grpo_loss(logps, old_logps, ref_logps, advantages, mask, **grpo_kwargs)
    expert_mask = expert_mask.to(expert_logps.dtype)
    num_expert_tokens = expert_mask.sum() if num_expert_tokens is None else num_expert_tokens
    nll = -(expert_logps * expert_mask).sum() / torch.clamp(
        torch.as_tensor(num_expert_tokens, dtype=expert_logps.dtype), min=1.0
    )
    return rl_loss + expert_coef * nll, {**metrics, "rl_loss": rl_loss.detach(), "expert_nll": nll.detach()}


def uniapl_advantages(task_rewards, disc_logits, group_size, adv_coef, scale="group"):
    """A = A_task + coef * A_adv: the task reward and the adversarial reward log D(x, y)
    (log sigmoid(logit) <= 0: responses D takes for the policy's own score lower) are each
    group-normalised on their own (group_advantages), then added. Normalising their sum
    instead would let coef cancel in every group whose task rewards tie, so lambda and nu
    would not act at their stated scale. All [B*G]."""
    adversarial = group_advantages(torch.nn.functional.logsigmoid(disc_logits), group_size, scale)
    return group_advantages(task_rewards, group_size, scale) + adv_coef * adversarial


def online_discriminator_loss(head, expert_features, policy_features, label_smoothing=0.0, gradient_penalty=0.0):
    """Class-balanced BCE of D = sigmoid(head(features)): experts towards 1 - s, policy
    rollouts towards s (s = label_smoothing), plus gradient_penalty * E ||d head / d f||^2
    at the expert features (R1). Returns (loss, metrics)."""
    if gradient_penalty > 0:
        expert_features = expert_features.detach().requires_grad_(True)
    expert_logits, policy_logits = head(expert_features), head(policy_features)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    loss = 0.5 * (bce(expert_logits, torch.full_like(expert_logits, 1 - label_smoothing))
                  + bce(policy_logits, torch.full_like(policy_logits, label_smoothing)))
    penalty = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if gradient_penalty > 0:
        (grad,) = torch.autograd.grad(expert_logits.sum(), expert_features, create_graph=True)
        penalty = grad.pow(2).sum(dim=1).mean()
        loss = loss + gradient_penalty * penalty
    with torch.no_grad():
        accuracy = 0.5 * ((expert_logits > 0).float().mean() + (policy_logits <= 0).float().mean())
    return loss, {"accuracy": accuracy, "penalty": penalty.detach()}


def dual_update(multiplier: float, divergence: float, epsilon: float, lr: float) -> float:
    """Projected dual ascent on nu for the constraint divergence <= epsilon: nu grows
    while it is violated and shrinks to 0 when it is slack."""
    return max(0.0, multiplier + lr * (divergence - epsilon))


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every step's prompts
    distributed.check_divisible(args.prompts_per_step, "--prompts-per-step")
    output_dir = Path(args.output_dir)
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)
    expert_temperature = args.expert_temperature or args.temperature
    batch_size = args.prompts_per_step * args.group_size  # sequences per generation batch
    expert_rows_per_step = max(1, round(batch_size * args.expert_data_ratio / (1 - args.expert_data_ratio)))
    distributed.check_divisible(expert_rows_per_step, "the expert rows per step (from --expert-data-ratio)")

    # ---- data, reward, expert demonstrations, policy, frozen initial policy (KL reference, default encoder)
    reward_fn, eval_fn = load_reward_fn(args.reward_fn), load_eval_fn(args.eval_fn)
    try:
        train_rows = load_rows(args.train_data, required=required_fields(reward_fn))
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        expert_pool, cache, cache_header = load_expert_pool(args.expert_pool, train_rows, args.expert_cache,
            min_prompts=2, why="the discriminator's features are standardised by their spread over expert responses")
        model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        train_rows = keep_short_prompts(train_rows, tokenizer, args.max_prompt_tokens, args.long_prompts, args.train_data)
        model = distributed.shard(load_policy(model_path, args))
        ref_model = load_reference(args, model) if args.beta > 0 or not args.disc_encoder else None
        encoder, encoder_tokenizer = load_encoder(args, ref_model, tokenizer)  # D's features: frozen
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    model.train()
    # ---- optimizer and schedule
    optimizer = torch.optim.AdamW(distributed.optimizer_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    # the learning rate decays once per optimizer step (TRL), num_iterations of them per generation batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / (args.steps * args.num_iterations)))
    advantage_fn = torch.compile(uniapl_advantages, dynamic=True) if args.compile else uniapl_advantages
    loss_fn = functools.partial(torch.compile(uniapl_policy_loss, dynamic=True) if args.compile else uniapl_policy_loss,
                                eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta, loss_type=args.loss_type,
                                importance_sampling_level=args.importance_sampling_level,
                                max_completion_length=args.max_new_tokens, num_sequences=batch_size)

    # ---- the online discriminator: features standardised with fixed statistics of expert responses
    if state:
        disc_state = state["extra"]["discriminator"]
    else:
        order = torch.randperm(len(expert_pool), generator=torch.Generator().manual_seed(args.seed))
        probe = [expert_pool[i] for i in order[:256].tolist()]
        probe_features = sentence_embeddings(encoder, encoder_tokenizer, probe, [cache[p] for p in probe], args.device,
                                             args.disc_layers)
        disc_state = {"feature_mean": probe_features.mean(0), "feature_std": probe_features.std(0) + 1e-6,
                      "multiplier": args.initial_multiplier}
    head = make_discriminator(disc_state["feature_mean"].numel(), args.disc_hidden).to(args.device)
    disc_optimizer = torch.optim.Adam(head.parameters(), lr=args.disc_learning_rate)
    multiplier = disc_state["multiplier"]
    if state:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        head.load_state_dict(disc_state["head"])
        disc_optimizer.load_state_dict(disc_state["optimizer"])
        print(f"resumed from {output_dir / runfolder.CHECKPOINT} at step {start_step} (multiplier {multiplier:.4f})")
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)

    def features(prompts, responses):
        raw = sentence_embeddings(encoder, encoder_tokenizer, prompts, responses, args.device, args.disc_layers)
        return (raw - disc_state["feature_mean"]) / disc_state["feature_std"]

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args)

    micro_starts = range(0, batch_size // distributed.world_size(), args.micro_batch_size)  # this rank's micro-batches
    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="uniapl",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        # ---- collect: G completions per prompt, one batched generate (seeded by step: resumable)
        generator = seeding.step_generator(args.seed, step)  # the prompts' draw, then the expert rows'
        indices = torch.randint(
            len(train_rows), (args.prompts_per_step,), generator=generator
        ).tolist()
        expert_indices = torch.randint(len(expert_pool), (expert_rows_per_step,), generator=generator)
        disc_indices = torch.randint(len(expert_pool), (args.prompts_per_step,), generator=generator)  # more expert rows for D
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

        # ---- discriminator: k BCE steps, expert responses vs the current policy's, on the SAME pool prompts
        # (one fresh sample each), so D cannot tell the sides apart by their prompts (co-trained online)
        group_rows = [row for row in rows for _ in range(args.group_size)]
        disc_prompts = [expert_pool[i] for i in disc_indices.tolist() + expert_indices.tolist()]
        mine = distributed.local_share(disc_prompts)  # each rank embeds its share; every rank fits the same head
        own_samples = generate_rollouts(
            model, tokenizer, mine, 1, args.max_new_tokens, args.temperature,
            seeds=distributed.local_share(seeding.prompt_seeds(args.seed, -step - 1, len(disc_prompts))),
            autocast_bf16=args.autocast_bf16, top_k=args.top_k, top_p=args.top_p, static_cache=args.static_cache)["texts"]
        expert_features = distributed.gather(features(mine, [cache[p] for p in mine]))
        policy_features = distributed.gather(features(mine, own_samples))
        disc_metrics = {"accuracy": torch.tensor(float("nan")), "penalty": torch.tensor(0.0)}
        for _ in range(args.disc_steps):
            disc_loss, disc_metrics = online_discriminator_loss(head, expert_features, policy_features, args.label_smoothing,
                                                         args.gradient_penalty)
            disc_optimizer.zero_grad()
            disc_loss.backward()
            disc_optimizer.step()
        with torch.no_grad():  # D's verdict on the training rollouts (their advantages) and on its own batch
            policy_logits = head(distributed.gather(features([r["prompt"] for r in group_rows], rollouts["texts"])))
            expert_logits = head(expert_features)
        high = math.log(args.saturation_threshold / (1 - args.saturation_threshold))  # logit of the threshold
        saturated = torch.cat([policy_logits < -high, expert_logits > high]).float().mean()

        # ---- score: A = A_task + (lambda [+ nu]) * A_adv, each group-normalised on its own
        rewards = distributed.gather(reward_scores(reward_fn, group_rows, rollouts["texts"], args.strip_think))  # whole batch
        adv_coef = args.adv_coef + (multiplier if args.divergence == "disc" else 0.0)
        advantages = distributed.local_share(
            advantage_fn(rewards, policy_logits.cpu(), args.group_size, adv_coef, args.scale_rewards)).to(args.device)
        input_ids, attention_mask, prompt_len = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
        completion_mask = rollouts["completion_mask"]
        num_tokens = distributed.all_sum(completion_mask.sum())  # the whole batch's: the loss is normalised by it
        expert_prompts = [expert_pool[i] for i in distributed.local_share(expert_indices).tolist()]
        expert_batches, num_expert_tokens = expert_micro_batches(tokenizer, expert_prompts, cache, len(micro_starts),
                                                                 args.device)
        clock.lap("score")

        # ---- old (sampling) and reference log-probs, no grad, once per generation batch
        old_logps, ref_logps = old_and_ref_logps(model, ref_model if args.beta > 0 else None, rollouts, args)
        clock.lap("logps")

        # ---- optimise: L_GRPO + (c_sft [+ nu]) * expert NLL, num_iterations passes over the generation batch
        expert_coef = args.sft_coef + (multiplier if args.divergence == "nll" else 0.0)
        for iteration in range(args.num_iterations):
            total_loss, rl_loss, expert_nll, metric_sums = 0.0, 0.0, 0.0, {}
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
                    expert_logps, expert_mask, expert_coef, num_expert_tokens=num_expert_tokens, num_tokens=num_tokens)
                loss.backward()
                total_loss += loss.detach()
                rl_loss += metrics.pop("rl_loss")
                expert_nll += metrics.pop("expert_nll")
                share = completion_mask[sl].sum() / num_tokens.clamp(min=1)
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value * share
            total_loss = distributed.all_sum(float(total_loss))
            rl_loss, expert_nll = distributed.all_sum(rl_loss), distributed.all_sum(expert_nll)  # the dual step's: whole batch
            grad_norm = distributed.sum_gradients_and_clip(model.parameters(), args.max_grad_norm)
            checkpoint.stop_if_not_finite(total_loss, step + 1, output_dir, grad_norm)
            optimizer.step()
            checkpoint.stop_if_weights_not_finite(model, step + 1, output_dir)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        clock.lap("update")

        # ---- dual ascent on the constraint divergence <= epsilon
        divergence = float(expert_nll) if args.divergence == "nll" else float(
            -torch.nn.functional.logsigmoid(policy_logits).mean())
        multiplier_used, multiplier = multiplier, dual_update(multiplier, divergence, args.epsilon, args.dual_lr)

        # ---- log, evaluate, checkpoint
        lengths = distributed.gather(completion_mask.sum(1).float())
        metric_sums = {key: distributed.all_sum(value) for key, value in metric_sums.items()}
        logger.log(
            step + 1,
            {
                "train/loss": total_loss,
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                "train/rl_loss": float(rl_loss),
                "train/expert_nll": float(expert_nll),
                "constraint/divergence": divergence,
                "constraint/epsilon": args.epsilon,
                "constraint/violation": divergence - args.epsilon,
                "constraint/multiplier": multiplier_used,
                "constraint/next_multiplier": multiplier,
                "disc/loss": disc_loss.item() if args.disc_steps else float("nan"),
                "disc/accuracy": float(disc_metrics["accuracy"]),
                "disc/gradient_penalty": float(disc_metrics["penalty"]),
                "disc/saturated": float(saturated),
                "disc/expert_prob": float(torch.sigmoid(expert_logits).mean()),
                "disc/policy_prob": float(torch.sigmoid(policy_logits).mean()),
                "train/reward": rewards.mean(),
                "train/log_d": torch.nn.functional.logsigmoid(policy_logits).mean(),
                "train/reward_std": rewards.view(-1, args.group_size).std(1).mean(),
                "train/completion_length": lengths.mean(),
                "train/truncated": distributed.gather(rollouts["truncated"].float()).mean(),
                **{f"train/{k}": float(v) for k, v in metric_sums.items()},
                **clock.metrics(),
            },
        )
        progress.set_postfix(reward=f"{rewards.mean():.3f}", nu=f"{multiplier:.3f}",
                             d_acc=f"{float(disc_metrics['accuracy']):.2f}")
        discriminator_state = {**disc_state, "head": head.state_dict(), "optimizer": disc_optimizer.state_dict(),
                               "multiplier": multiplier}
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args,
            extra={"discriminator": discriminator_state})) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval, final_multiplier=multiplier)
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
