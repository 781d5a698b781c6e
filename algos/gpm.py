"""General Preference Model (GPM; "Beyond Bradley-Terry Models: A General Preference
Model for Language Model Alignment", ICML 2025), the preference model GPRL optimises.

Each response gets an embedding v(x, y) in R^{2k} (a value head on the last token's
hidden state, L2-normalised) and each prompt a gate lambda(x) = k * softmax(W h / sqrt(H))
over k dimensions (h the last prompt token's hidden state, H its width; the gates sum to
k, as in the reference repository, whose bias-free heads we follow too). The score
    s(i, j) = sum_l lambda_l(x) * (v_i[2l] v_j[2l+1] - v_i[2l+1] v_j[2l])
is skew-symmetric, s(i, j) = -s(j, i), and P(i > j) = sigmoid(s(i, j) / tau). Unlike a
scalar Bradley-Terry reward it can represent cyclic (intransitive) preferences.
Training: -[q log sigmoid(s(w, l)/tau) + (1 - q) log sigmoid(-s(w, l)/tau)], q the
pair's (soft) label. docs/algorithms.md#gpm-and-gprl. Our addition, on by default when pairs carry per-axis labels:
the same loss on each dimension's own score with that axis' label (--axis-weight), so
that dimension l means axis l and GPRL's drift monitor can name what drifts.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from shared import checkpoint, distributed, flags, runfolder, runlog, seeding
from shared.data import keep_short_prompts, load_pairs
from shared.modeling import GPM_HEADS, load_model, load_tokenizer
from shared.rollout import encode_prompt_response


@dataclass
class Args(flags.RunFlags):
    model: str = "runs/sft/checkpoint"
    """backbone: any causal LM id or folder (the tiny SFT model offline)"""
    pairs_data: str = "data/toy/pairs.jsonl"
    """prompt, chosen, rejected, optional soft `label` and per-axis `axes` (scripts/build_preference_pairs.py, or a hub id)"""
    max_prompt_tokens: int = 512
    """pairs whose prompt is longer than this (chat-templated tokens) are dropped or stop the run, see --long-prompts
    (0: no limit)"""
    long_prompts: Literal["drop", "error"] = "drop"
    """what to do with prompts over --max-prompt-tokens: drop them with a printed count, or stop with an error"""
    output_dir: str = "runs/gpm"
    """checkpoint (backbone + heads), metrics.jsonl, eval.json and tensorboard logs go here"""
    seed: int = 1
    """seed for the held-out split, batch order and head initialisation"""
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 64
    """pairs per step"""
    micro_batch_size: int = 64
    """pairs per forward/backward; gradients are accumulated over the step's batch"""
    learning_rate: float = 1e-4
    """AdamW learning rate of backbone and heads, linearly decayed to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    dims: int = 3
    """k: number of 2-d skew-symmetric blocks (the embedding has 2k entries)"""
    score_temperature: float = 0.1
    """tau of P(i > j) = sigmoid(s / tau)"""
    axis_weight: float = 1.0
    """weight of the per-dimension loss against per-axis labels (needs an `axes` column with k axes; 0 = plain GPM)"""
    hard_labels: bool = False
    """use q = 1 for chosen instead of the soft `label` column"""
    holdout: float = 0.1
    """fraction of the pairs held out for accuracy"""
    eval_every: int = 100
    """held-out accuracy every this many steps (and at the start and end)"""
    save_every: int = 100
    """checkpoint every this many steps (and at the end)"""


# each flag's valid range, (low, high, low inclusive, high inclusive), checked before anything is read
FLAG_RANGES = dict(max_prompt_tokens=flags.NON_NEGATIVE, steps=flags.AT_LEAST_1, batch_size=flags.AT_LEAST_1,
                   micro_batch_size=flags.AT_LEAST_1, learning_rate=flags.POSITIVE, weight_decay=flags.NON_NEGATIVE,
                   max_grad_norm=flags.POSITIVE, eval_every=flags.AT_LEAST_1, save_every=flags.AT_LEAST_1,
                   dims=flags.AT_LEAST_1, score_temperature=flags.POSITIVE, holdout=(0, 1, False, False))


def skew_scores(v_a, v_b):
    """Per-dimension skew-symmetric scores s_l(a, b) = a[2l] b[2l+1] - a[2l+1] b[2l]: [..., 2k] x [..., 2k] -> [..., k]."""
    return v_a[..., 0::2] * v_b[..., 1::2] - v_a[..., 1::2] * v_b[..., 0::2]


def gpm_scores(v_a, v_b, gate):
    """s(a, b) = sum_l gate_l * s_l(a, b), gate [..., k] >= 0 (summing to k). Skew-symmetric: s(a, b) = -s(b, a)."""
    return (gate * skew_scores(v_a, v_b)).sum(-1)


def gpm_loss(v_chosen, v_rejected, gate, label, tau=0.1, axis_labels=None, axis_weight=0.0, num_pairs=None):
    """Soft-label logistic loss on s(chosen, rejected) / tau, mean over pairs; with
    axis_labels [N, k] (0.5 = tie), plus axis_weight times the same loss per dimension.
    Returns (loss, metrics)."""
    logsigmoid = torch.nn.functional.logsigmoid
    num_pairs = v_chosen.size(0) if num_pairs is None else num_pairs
    score = gpm_scores(v_chosen, v_rejected, gate) / tau
    label = torch.as_tensor(label, dtype=score.dtype, device=score.device)
    loss = -(label * logsigmoid(score) + (1 - label) * logsigmoid(-score)).sum() / num_pairs
    axis_loss = torch.zeros((), dtype=score.dtype, device=score.device)
    if axis_labels is not None and axis_weight > 0:
        per_dim = skew_scores(v_chosen, v_rejected) / tau
        axis_loss = -(axis_labels * logsigmoid(per_dim) + (1 - axis_labels) * logsigmoid(-per_dim)).mean(-1).sum() / num_pairs
        loss = loss + axis_weight * axis_loss
    with torch.no_grad():
        metrics = {"accuracy": (score > 0).to(score.dtype).mean(), "axis_loss": axis_loss.detach()}
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
    if args.lora_r:  # the GPM's checkpoint is GPRL's judge, loaded as a whole model
        raise SystemExit("error: --lora-r: algos/gpm.py trains its backbone whole")
    output_dir = Path(args.output_dir)
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every batch of pairs
    distributed.check_divisible(args.batch_size, "--batch-size")
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)

    # ---- pairs: text, soft labels, per-axis labels; a held-out split
    model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
    try:
        pairs = load_pairs(args.pairs_data, args.hard_labels)
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        pairs = keep_short_prompts(pairs, tokenizer, args.max_prompt_tokens, args.long_prompts, args.pairs_data)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    chosen, rejected = [p["chosen"] for p in pairs], [p["rejected"] for p in pairs]
    labels = torch.tensor([p["label"] for p in pairs])
    axis_names = list(pairs[0]["axes"]) if isinstance(pairs[0].get("axes"), dict) else []
    use_axes = args.axis_weight > 0 and len(axis_names) == args.dims
    if args.axis_weight > 0 and not use_axes:
        print(f"per-axis loss off: the pairs have {len(axis_names)} axes and --dims is {args.dims}")
    axis_labels = torch.tensor([[float(p["axes"][a]) for a in axis_names] for p in pairs]) if use_axes else None
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    num_holdout = max(1, int(len(pairs) * args.holdout))
    heldout, train = order[:num_holdout], order[num_holdout:]

    # ---- backbone and heads, optimizer, schedule
    try:
        backbone = distributed.shard(load_model(model_path, args.dtype, args.device, args.gradient_checkpointing))
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    hidden_size = backbone.config.hidden_size
    value_head = torch.nn.Linear(hidden_size, 2 * args.dims, bias=False).to(
        args.device
    )  # heads without bias, as the reference
    gate_head = torch.nn.Linear(hidden_size, args.dims, bias=False).to(args.device)
    for head in (value_head, gate_head):
        torch.nn.init.normal_(head.weight, std=1 / (hidden_size + 1))  # the reference's initialisation
    if state:
        heads = torch.load(output_dir / runfolder.CHECKPOINT / GPM_HEADS, weights_only=True)
        value_head.load_state_dict(heads["value_head"])
        gate_head.load_state_dict(heads["gate_head"])
    parameters = [*backbone.parameters(), *value_head.parameters(), *gate_head.parameters()]
    optimizer = torch.optim.AdamW(distributed.optimizer_groups(backbone, value_head, gate_head), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / args.steps))
    if state:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {output_dir / runfolder.CHECKPOINT} at step {start_step}")
    loss_fn = torch.compile(gpm_loss, dynamic=True) if args.compile else gpm_loss
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    backbone.train()

    def heads_record():
        return {"value_head": value_head.state_dict(), "gate_head": gate_head.state_dict(), "dims": args.dims,
                "axes": axis_names if use_axes else [], "tau": args.score_temperature}

    @torch.no_grad()
    def run_eval(step, log=True):
        """Held-out accuracy: the fraction of pairs with s(chosen, rejected) > 0; per axis on its non-tied pairs."""
        backbone.eval()
        scores, dim_scores = [], []
        for s in range(0, len(heldout), 128):
            part = heldout[s:s + 128]
            prompts = [pairs[i]["prompt"] for i in part]
            v, gate = gpm_embed(backbone, value_head, gate_head, tokenizer, prompts + prompts,
                                [chosen[i] for i in part] + [rejected[i] for i in part], args.device)
            n = len(part)
            scores.append(gpm_scores(v[:n], v[n:], gate[:n]))
            dim_scores.append(skew_scores(v[:n], v[n:]))
        backbone.train()
        scores, dim_scores = torch.cat(scores), torch.cat(dim_scores)
        result = {"heldout_accuracy": float((scores > 0).float().mean())}
        if use_axes:
            held_axes = axis_labels[heldout].to(args.device)
            for l, name in enumerate(axis_names):
                decided = held_axes[:, l] != 0.5
                agree = (dim_scores[:, l] > 0) == (held_axes[:, l] > 0.5)
                result[f"axis_accuracy/{name}"] = float(agree[decided].float().mean()) if decided.any() else float("nan")
        if log:
            logger.log(step, {f"eval/{k}": v for k, v in result.items()})
        tqdm.write(f"step {step}: held-out pairwise accuracy {result['heldout_accuracy']:.3f} " +
                   " ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in result.items() if k.startswith("axis")))
        return result

    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", run_eval(0))
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="gpm",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        # ---- a batch of pairs (depends only on seed and step: resumable); chosen and rejected in one forward
        part = [
            train[i]
            for i in torch.randint(len(train), (args.batch_size,), generator=seeding.step_generator(args.seed, step)).tolist()
        ]
        part = distributed.local_share(part)
        loss, metrics, gate_entropy = 0.0, {}, 0.0
        for start in range(0, len(part), args.micro_batch_size):
            micro = part[start:start + args.micro_batch_size]
            prompts, share = [pairs[i]["prompt"] for i in micro], len(micro) / args.batch_size
            with autocast:
                v, gate = gpm_embed(backbone, value_head, gate_head, tokenizer, prompts + prompts,
                                    [chosen[i] for i in micro] + [rejected[i] for i in micro], args.device)
            v, gate, n = v.float(), gate.float(), len(micro)
            # num_pairs = the whole batch: the micro-batch losses add up to the full batch's mean
            micro_loss, micro_metrics = loss_fn(v[:n], v[n:], gate[:n], labels[micro].to(args.device), args.score_temperature,
                                                axis_labels[micro].to(args.device) if use_axes else None, args.axis_weight,
                                                num_pairs=torch.tensor(float(args.batch_size), device=args.device))
            micro_loss.backward()
            loss += micro_loss.item()
            for key, value in micro_metrics.items():
                # accuracy is a per-micro-batch mean, axis_loss already a share of the batch sum
                metrics[key] = metrics.get(key, 0.0) + float(value) * (share if key == "accuracy" else 1.0)
            gate_entropy += share * float(-(gate * gate.clamp(min=1e-12).log()).sum(-1).mean().detach())
        loss, gate_entropy = distributed.all_sum(loss), distributed.all_sum(gate_entropy)
        metrics = {key: distributed.all_sum(value) for key, value in metrics.items()}
        grad_norm = distributed.sum_gradients_and_clip(parameters, args.max_grad_norm)
        checkpoint.stop_if_not_finite(loss, step + 1, output_dir, grad_norm)
        optimizer.step()
        checkpoint.stop_if_weights_not_finite(backbone, step + 1, output_dir)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        clock.lap("step")

        # ---- log, evaluate, checkpoint
        logger.log(step + 1, {"train/loss": loss, "train/grad_norm": float(grad_norm), "train/lr": scheduler.get_last_lr()[0],
                              **{f"train/{k}": v for k, v in metrics.items()}, "train/gate_entropy": gate_entropy,
                              **clock.metrics()})
        progress.set_postfix(loss=f"{loss:.3f}")
        final_eval = (
            checkpoint.evaluate_save_or_stop(
                step + 1,
                args,
                run_eval,
                lambda: checkpoint.save_checkpoint(
                    output_dir,
                    backbone,
                    tokenizer,
                    optimizer,
                    scheduler,
                    step + 1,
                    args,
                    extra_files={GPM_HEADS: heads_record()},
                ),
            )
            or final_eval
        )

    if not (output_dir / "eval.json").exists() or json.loads((output_dir / "eval.json").read_text()).get("step") != args.steps:
        final_eval = final_eval or run_eval(args.steps, log=False)
        runfolder.write_json(
            output_dir / "eval.json",
            {
                "step": args.steps,
                **final_eval,
                "initial_heldout_accuracy": json.loads((output_dir / "initial_eval.json").read_text())["heldout_accuracy"],
            },
        )
    logger.close()
    print(f"done: GPM checkpoint in {output_dir / runfolder.CHECKPOINT}")
