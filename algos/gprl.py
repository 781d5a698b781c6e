"""GPRL: policy optimisation against a General Preference Model (arXiv 2605.18721), with a drift monitor.

Per step: sample G completions for each prompt, score them, normalise rewards
within each group into advantages, then minimise the clipped surrogate
-min(r*A, clip(r, 1-eps, 1+eps)*A) + beta*KL_k3 per token, r = pi/pi_old,
aggregated by loss_type. With num_iterations == 1 the old policy is the current
one (old_logps = logps.detach()), so r == 1 and only its gradient matters.
The rewards are a GPM's, per dimension: S_l(i) = mean_{j != i} s_l(i, j),
A_l = S_l / max(std S_l, floor), A = sum_l w_l A_l, w_l ~ gate_l(x) * rho_l. Every N
steps a drift monitor compares the policy's greedy responses with frozen reference
ones on probe prompts; on single-axis exploitation (one axis holds the gain while
another falls) it shrinks that axis's weight rho_l, tightens eps and raises beta.
The paper's body is not available; our reading and its flags: docs/algorithms.md#gpm-and-gprl.
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

from shared import checkpoint, distributed, drift_probe, evaluation, flags, runfolder, runlog, seeding
from shared.data import keep_short_prompts, load_eval_rows, load_rows
from shared.logprobs import completion_logps, old_and_ref_logps
from shared.modeling import load_gpm, load_policy, load_reference, load_tokenizer
from shared.rewards import load_eval_fn, load_reward_fn, required_fields, reward_scores
from shared.rollout import encode_prompt_response, generate_rollouts


@dataclass
class Args(flags.RunFlags):
    model: str = "runs/sft/checkpoint"
    """initial policy (and reference): hub id or local folder, e.g. the SFT checkpoint"""
    gpm: str = "runs/gpm/checkpoint"
    """trained General Preference Model (algos/gpm.py output: backbone + gpm_heads.pt)"""
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
    """task reward, logged only (GPRL optimises the GPM): 'module:function' of (row, completion_text)"""
    output_dir: str = "runs/gprl"
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
    beta: float = 0.04
    """initial k3 KL coefficient to the reference (the monitor raises it on alarm)"""
    clip_eps: float = 0.2
    """initial clip range: the ratio pi/pi_old is clipped to [1 - clip_eps, 1 + clip_eps] (GRPO's --eps-low =
    --eps-high); the monitor tightens it on alarm"""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    """how per-token losses are aggregated (see grpo_loss); bnpo normalises each micro-batch by its own
    tokens (TRL), so its result depends on --micro-batch-size and the number of processes"""
    num_iterations: int = 1
    """optimizer steps per generation batch; > 1 stores old log-probs at generation"""
    judge: Literal["axes", "scalar"] = "axes"
    """axes: each GPM dimension normalised on its own, then weighted (GPRL); scalar: the weighted GPM score
    normalised once after summing, as a scalar judge would give GRPO (the ablation; the monitor still acts)"""
    adv_std_floor: float = 0.01
    """the smallest group std a dimension (or the scalar score) is divided by, in GPM score units"""
    drift_every: int = 5
    """run the drift monitor every this many steps"""
    drift_adjust: bool = True
    """act on alarms (shrink rho and eps, raise beta); --no-drift-adjust only measures and logs, the monitor-off twin"""
    probe_prompts: int = 64
    """probe-set prompts whose reference responses are frozen at the start"""
    dominance: float = 0.7
    """alarm when one dimension holds at least this share of the positive margin over the reference ..."""
    noise_z: float = 3.0
    """... while another dimension's margin is below -noise_z standard errors (gains count above +noise_z)"""
    rho_shrink: float = 0.5
    """on alarm the dominant dimension's weight rho is multiplied by this"""
    rho_min: float = 0.1
    """floor of any rho"""
    clip_eps_shrink: float = 0.5
    """on alarm the clip range is multiplied by this"""
    clip_eps_min: float = 0.05
    """floor of the clip range"""
    beta_grow: float = 2.0
    """on alarm beta is multiplied by this (and is at least beta_alarm)"""
    beta_alarm: float = 0.04
    """beta after an alarm when it was lower (so a run started at beta 0 still tightens)"""
    beta_max: float = 0.5
    """ceiling of beta"""
    relax: float = 0.5
    """when clear, rho, eps and beta move this fraction of the way back to 1, eps and beta"""
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
    drift_every=flags.AT_LEAST_1,
    probe_prompts=flags.AT_LEAST_1,
    dominance=(0, 1, True, True),
    noise_z=(None, None, True, True),
    adv_std_floor=flags.POSITIVE,
)


def skew_scores(v_a, v_b):
    """Per-dimension skew-symmetric scores s_l(a, b) = a[2l] b[2l+1] - a[2l+1] b[2l]: [..., 2k] x [..., 2k] -> [..., k]."""
    return v_a[..., 0::2] * v_b[..., 1::2] - v_a[..., 1::2] * v_b[..., 0::2]


def gpm_scores(v_a, v_b, gate):
    """s(a, b) = sum_l gate_l * s_l(a, b), gate [..., k] >= 0 (summing to k). Skew-symmetric: s(a, b) = -s(b, a)."""
    return (gate * skew_scores(v_a, v_b)).sum(-1)


def group_dim_scores(v, group_size):
    """S_l(i) = mean over j != i of s_l(i, j) within each group. v [B*G, 2k] -> [B*G, k];
    each group's S_l sums to zero (skew-symmetry)."""
    grouped = v.view(-1, group_size, v.size(-1))
    pairwise = skew_scores(grouped[:, :, None, :], grouped[:, None, :, :])  # [B, G, G, k], zero diagonal
    return (pairwise.sum(dim=2) / (group_size - 1)).reshape(-1, pairwise.size(-1))


def gprl_advantages(v, gate, rho, group_size, std_floor=0.05, judge="axes"):
    """A = sum_l w_l * S_l / max(std_group(S_l), std_floor), w_l = gate_l * rho_l / sum_l' gate_l' * rho_l'.

    v: [B*G, 2k] GPM embeddings; gate: [B*G, k] (the prompt's gate, repeated); rho: [k].
    S_l is already group-centred (skew-symmetry), so a dimension whose group scores are
    all equal contributes 0. Each dimension is normalised by its own group std, but never
    by less than std_floor (GPM score units, s in [-1, 1]): an axis on which the G
    responses differ only by noise (1e-4) then stays at ~1e-4 / std_floor instead of being
    blown up to unit scale, while responses the GPM tells apart act at unit scale.
    judge="scalar" is the scalar-judge ablation: the same weighted sum S = sum_l w_l S_l
    normalised once, after summing (so the axis with the largest spread dominates).
    Returns (advantages [B*G], per-dimension normalised advantages [B*G, k]).
    """
    k = gate.size(-1)
    scores = group_dim_scores(v, group_size).view(-1, group_size, k)
    per_dim = scores / scores.std(dim=1, keepdim=True).clamp(min=std_floor)
    weights = gate * rho
    weights = (weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)).view(-1, group_size, k)
    if judge == "scalar":
        total = (weights * scores).sum(-1)
        advantages = total / total.std(dim=1, keepdim=True).clamp(min=std_floor)
    else:
        advantages = (weights * per_dim).sum(-1)
    return advantages.reshape(-1), per_dim.reshape(-1, k)


def probe_margin_stats(per_prompt_margins):
    """The drift monitor's reading: the mean over the probe prompts of s_l(policy response,
    reference response) and its standard error (std over prompts / sqrt(n)), the noise
    against which a change is judged. [n, k] -> ([k], [k])."""
    n = per_prompt_margins.size(0)
    se = per_prompt_margins.std(0) / math.sqrt(n) if n > 1 else torch.zeros(per_prompt_margins.size(1))
    return per_prompt_margins.mean(0), se


def drift_update(margins, margin_se, rho, eps, beta, *, eps0=0.2, beta0=0.04, dominance=0.7, noise_z=3.0,
                 rho_shrink=0.5, rho_min=0.1, eps_shrink=0.5, eps_min=0.05, beta_grow=2.0, beta_alarm=0.04, beta_max=0.5,
                 relax=0.5):
    """One step of the drift monitor, cumulative: the policy against the frozen reference.

    margins, margin_se: [k] per-dimension margins of the policy over the reference
    responses (0 at the start: the policy is the reference) and their standard errors;
    rho: [k] dimension weights. A dimension has gained when its margin exceeds
    noise_z * se, and has fallen when it is below -noise_z * se. Alarm: one dimension
    holds >= `dominance` of the (significant) positive margin while another has fallen.
    Slow, steady exploitation adds up until it is seen; noise stays within the band.
    On alarm: rho of the dominant dimension shrinks, eps shrinks, beta grows (each within
    its bound). Otherwise each relaxes back by `relax`.
    Returns (rho, eps, beta, event) with event a dict of the numbers behind the decision.
    """
    band = noise_z * margin_se
    positive = torch.where(margins > band, margins, torch.zeros_like(margins)).clamp(min=0.0)
    total = positive.sum()
    shares = positive / total if total > 0 else torch.zeros_like(margins)
    dominant = int(shares.argmax())
    others_falling = [l for l in range(margins.numel()) if l != dominant and margins[l] < -band[l]]
    alarm = bool(total > 0 and shares[dominant] >= dominance and others_falling)
    rho = rho.clone()
    if alarm:
        rho[dominant] = max(rho_min, float(rho[dominant]) * rho_shrink)
        eps = max(eps_min, eps * eps_shrink)
        beta = min(beta_max, max(beta * beta_grow, beta_alarm))
    else:
        rho = rho + relax * (1.0 - rho)
        eps = eps + relax * (eps0 - eps)
        beta = beta + relax * (beta0 - beta)
    event = {"alarm": alarm, "dominant": dominant, "dominant_share": float(shares[dominant]), "falling": others_falling,
             "margins": margins.tolist(), "band": band.tolist()}
    return rho, eps, beta, event


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


def gpm_embed(backbone, value_head, gate_head, tokenizer, prompts, responses, device):
    """v(x, y) [N, 2k] from the hidden state at the response's last token (eos), L2-normalised,
    and the gate lambda(x) [N, k], summing to k, from the hidden state at the prompt's last token."""
    ids, mask, response_mask, prompt_len = encode_prompt_response(tokenizer, prompts, responses, device)
    response_lengths = response_mask.sum(1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids).last_hidden_state.float()
    rows = torch.arange(ids.size(0), device=ids.device)
    v = torch.nn.functional.normalize(value_head(hidden[rows, prompt_len + response_lengths - 1]), dim=-1)
    # the reference model's eigenvalue gate: k * softmax(head(h) / sqrt(H)), so the gates sum
    # to k and start near 1 each, instead of sharing one unit of score between k dimensions
    k = gate_head.out_features
    gate = k * torch.softmax(gate_head(hidden[:, prompt_len - 1]) / math.sqrt(hidden.size(-1)), dim=-1)
    return v, gate


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every step's prompts
    distributed.check_divisible(args.prompts_per_step, "--prompts-per-step")
    output_dir = Path(args.output_dir)
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)
    batch_size = args.prompts_per_step * args.group_size  # sequences per generation batch

    # ---- data, reward, the preference model, policy and reference (always: the monitor may raise beta)
    reward_fn, eval_fn = load_reward_fn(args.reward_fn), load_eval_fn(args.eval_fn)
    try:
        train_rows = load_rows(args.train_data, required=required_fields(reward_fn))
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        gpm_backbone, value_head, gate_head, gpm_tokenizer, dim_names = load_gpm(
            args.gpm, args.dtype, args.device, args.system_prompt, args.chat_template_kwargs)
        gpm_backbone = distributed.shard(gpm_backbone)
        model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        train_rows = keep_short_prompts(train_rows, tokenizer, args.max_prompt_tokens, args.long_prompts, args.train_data)
        model = distributed.shard(load_policy(model_path, args))
        ref_model = load_reference(args, model)
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
    advantage_fn = torch.compile(gprl_advantages, dynamic=True) if args.compile else gprl_advantages
    # eps and beta are the drift monitor's, given per call: they change only at checks (a compiled loss recompiles then)
    loss_fn = functools.partial(torch.compile(grpo_loss, dynamic=True) if args.compile else grpo_loss,
                                loss_type=args.loss_type, max_completion_length=args.max_new_tokens, num_sequences=batch_size)
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)

    @torch.no_grad()
    def embed(prompts, responses):
        return gpm_embed(gpm_backbone, value_head, gate_head, gpm_tokenizer, prompts, responses, args.device)

    # ---- drift monitor: probe prompts with frozen reference responses (the initial policy, greedy)
    probe_rows = drift_probe.probe_set(train_rows, args.probe_prompts, args.seed + 1)
    probe_prompts = [row["prompt"] for row in probe_rows]
    reference_texts = drift_probe.greedy_responses(ref_model, tokenizer, probe_prompts, args, base_weights=True)
    reference_v, _ = embed(probe_prompts, reference_texts)
    monitor = state["extra"]["monitor"] if state else {
        "rho": torch.ones(len(dim_names)), "eps": args.clip_eps, "beta": args.beta, "alarms": 0}

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args)

    micro_starts = range(0, batch_size // distributed.world_size(), args.micro_batch_size)  # this rank's micro-batches
    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="gprl",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        eps, beta, rho = monitor["eps"], monitor["beta"], monitor["rho"]
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

        # ---- score: one GPM forward per rollout, per-dimension group advantages
        group_rows = [row for row in rows for _ in range(args.group_size)]
        rewards = distributed.gather(reward_scores(reward_fn, group_rows, rollouts["texts"], args.strip_think))  # logged only
        v, gate = (distributed.gather(t) for t in embed([r["prompt"] for r in group_rows], rollouts["texts"]))
        advantages, per_dim = advantage_fn(v, gate, rho.to(args.device), args.group_size, args.adv_std_floor, args.judge)
        advantages = distributed.local_share(advantages)
        input_ids, attention_mask, prompt_len = rollouts["input_ids"], rollouts["attention_mask"], rollouts["prompt_len"]
        completion_mask = rollouts["completion_mask"]
        num_tokens = distributed.all_sum(completion_mask.sum())  # the whole batch's: the loss is normalised by it
        clock.lap("score")

        # ---- old (sampling) and reference log-probs, no grad, once per generation batch
        old_logps, ref_logps = old_and_ref_logps(model, ref_model if beta > 0 else None, rollouts, args)
        clock.lap("logps")

        # ---- optimise: PPO-clip (eps) + beta * KL, num_iterations passes over the generation batch
        for iteration in range(args.num_iterations):
            total_loss, metric_sums = 0.0, {}
            for s in micro_starts:
                sl = slice(s, s + args.micro_batch_size)
                with autocast:
                    logps = completion_logps(model, input_ids[sl], attention_mask[sl], prompt_len,
                                             args.temperature, args.logp_chunk_tokens).float()
                loss, metrics = loss_fn(
                    logps, logps.detach() if old_logps is None else old_logps[sl].float(),
                    None if ref_logps is None else ref_logps[sl].float(), advantages[sl], completion_mask[sl],
                    eps_low=eps, eps_high=eps, beta=beta, num_tokens=num_tokens)
                loss.backward()
                total_loss += loss.detach()
                share = completion_mask[sl].sum() / num_tokens.clamp(min=1)
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value * share
            total_loss = distributed.all_sum(float(total_loss))
            grad_norm = distributed.sum_gradients_and_clip(model.parameters(), args.max_grad_norm)
            checkpoint.stop_if_not_finite(total_loss, step + 1, output_dir, grad_norm)
            optimizer.step()
            checkpoint.stop_if_weights_not_finite(model, step + 1, output_dir)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        clock.lap("update")

        # ---- drift monitor every drift_every steps: margins vs the frozen reference responses
        drift_log = {}
        if (step + 1) % args.drift_every == 0:
            texts = drift_probe.greedy_responses(model, tokenizer, probe_prompts, args)
            per_prompt = skew_scores(embed(probe_prompts, texts)[0], reference_v).cpu()  # [n, k]: s_l(policy, reference)
            margins, margin_se = probe_margin_stats(per_prompt)
            # the next steps' rho, eps and beta; this step's loss used the ones above (logged as train/*)
            next_rho, next_eps, next_beta, event = drift_update(
                margins, margin_se, monitor["rho"], monitor["eps"], monitor["beta"], eps0=args.clip_eps, beta0=args.beta,
                dominance=args.dominance, noise_z=args.noise_z, rho_shrink=args.rho_shrink, rho_min=args.rho_min,
                eps_shrink=args.clip_eps_shrink, eps_min=args.clip_eps_min, beta_grow=args.beta_grow,
                beta_alarm=args.beta_alarm, beta_max=args.beta_max, relax=args.relax)
            if not args.drift_adjust:  # the alarm is still counted and logged: would it have fired?
                next_rho, next_eps, next_beta = monitor["rho"], monitor["eps"], monitor["beta"]
            monitor = {"rho": next_rho, "eps": next_eps, "beta": next_beta, "alarms": monitor["alarms"] + event["alarm"]}
            truth = drift_probe.true_preferences(probe_rows, texts, reference_texts, dim_names)  # toy world only
            drift_log = drift_probe.monitor_log(event, monitor, margins, per_prompt, truth, dim_names)
            if event["alarm"]:
                tqdm.write(drift_probe.alarm_message(step + 1, event, monitor, dim_names))

        # ---- log, evaluate, checkpoint
        lengths = distributed.gather(completion_mask.sum(1).float())
        metric_sums = {key: distributed.all_sum(value) for key, value in metric_sums.items()}
        logger.log(
            step + 1,
            {
                "train/loss": total_loss,
                "train/grad_norm": float(grad_norm),
                "train/lr": scheduler.get_last_lr()[0],
                "train/eps": eps,
                "train/beta": beta,
                "train/reward": rewards.mean(),
                "train/reward_std": rewards.view(-1, args.group_size).std(1).mean(),
                **{f"train/advantage_abs/{n}": float(per_dim[:, l].abs().mean()) for l, n in enumerate(dim_names)},
                **{f"train/gate/{n}": float(gate[:, l].mean()) for l, n in enumerate(dim_names)},
                "train/completion_length": lengths.mean(),
                "train/truncated": distributed.gather(rollouts["truncated"].float()).mean(),
                **{f"train/{k}": float(v) for k, v in metric_sums.items()},
                **drift_log,
                **clock.metrics(),
            },
        )
        progress.set_postfix(reward=f"{rewards.mean():.3f}")
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args, extra={"monitor": monitor})) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval, drift_alarms=monitor["alarms"])
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
