"""Supervised fine-tuning on expert demonstrations (the expert cache), or on chat
conversations (--messages-data, optionally packed).

Loss: mean negative log-likelihood over response tokens only (prompt and padding
masked), normalised by the response tokens of the whole accumulated batch, as in
TRL's SFTTrainer. On conversations: over every token, or the assistant turns with
--assistant-only-loss (TRL's two choices).
docs/algorithms.md#sft.
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
from shared.data import (
    conversation_batch,
    keep_short_prompts,
    load_conversations,
    load_eval_rows,
    load_expert_cache,
    load_rows,
    with_expert_answers,
)
from shared.logprobs import completion_logps, packed_token_logps
from shared.modeling import load_policy, load_tokenizer
from shared.rewards import load_eval_fn
from shared.rollout import encode_prompt_response


@dataclass
class Args(flags.RunFlags):
    model: str = "data/tiny-qwen3"
    """policy to fine-tune: hub id (Qwen/Qwen3-0.6B) or local folder"""
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
    expert_cache: str = "data/toy/expert_cache.jsonl"
    """expert responses keyed by prompt (scripts/build_expert_cache.py)"""
    messages_data: str = ""
    """chat rows with a 'messages' list of role/content turns, trained on instead of --train-data and --expert-cache"""
    assistant_only_loss: bool = False
    """with --messages-data: the loss on assistant turns only (the chat template must mark them with {% generation %})"""
    packing: bool = False
    """with --messages-data: concatenate conversations into rows of up to --max-seq-len tokens, each seeing only itself"""
    max_seq_len: int = 1024
    """with --messages-data: the longest row; longer conversations are dropped with a count"""
    output_dir: str = "runs/sft"
    """checkpoint, metrics.jsonl, eval.json and tensorboard logs go here"""
    seed: int = 1
    """seed for data order and initialisation"""
    steps: int = 200
    """optimizer steps (200 leaves the tiny model clearly imperfect, so RL has room)"""
    batch_size: int = 32
    """sequences per optimizer step"""
    micro_batch_size: int = 32
    """sequences per forward/backward; gradients are accumulated up to batch_size"""
    learning_rate: float = 1e-3
    """peak AdamW learning rate"""
    warmup_steps: int = 10
    """linear warmup, then linear decay to 0"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    eval_every: int = 100
    """evaluate on the held-out split every this many steps (and at start and end)"""
    eval_prompts: int = 256
    """held-out prompts used per evaluation"""
    max_new_tokens: int = 24
    """generation length at evaluation"""
    save_every: int = 100
    """checkpoint every this many steps (and at the end)"""
    logp_chunk_tokens: int = 0
    """tokens per chunk when computing log-probs from hidden states (0: 64 MiB of logits per chunk)"""


# each flag's valid range, (low, high, low inclusive, high inclusive), checked before anything is read
FLAG_RANGES = dict(
    max_prompt_tokens=flags.NON_NEGATIVE,
    steps=flags.AT_LEAST_1,
    batch_size=flags.AT_LEAST_1,
    micro_batch_size=flags.AT_LEAST_1,
    learning_rate=flags.POSITIVE,
    weight_decay=flags.NON_NEGATIVE,
    max_grad_norm=flags.POSITIVE,
    eval_every=flags.AT_LEAST_1,
    eval_prompts=flags.AT_LEAST_1,
    max_new_tokens=flags.AT_LEAST_1,
    save_every=flags.AT_LEAST_1,
    logp_chunk_tokens=flags.NON_NEGATIVE,
    max_seq_len=flags.AT_LEAST_2,
)


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood.

    logps: [B, L] log-prob of each response token; mask: [B, L], 1 on response tokens.
    num_tokens: the normaliser; pass the response-token count of the whole accumulated
    batch so that micro-batch losses sum to the full-batch token mean (default: mask.sum()).
    """
    if num_tokens is None:
        num_tokens = mask.sum()
    return -(logps * mask).sum() / torch.clamp(torch.as_tensor(num_tokens, dtype=logps.dtype), min=1.0)


if __name__ == "__main__":
    args = tyro.cli(Args)
    flags.check_flags(args, FLAG_RANGES)
    if (args.packing or args.assistant_only_loss) and not args.messages_data:
        raise SystemExit("error: --packing and --assistant-only-loss apply to --messages-data conversations")
    if args.batch_size % args.micro_batch_size:
        raise SystemExit(
            f"error: --batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}"
        )
    distributed.setup(args)  # under torchrun: each rank takes 1/N of every batch
    distributed.check_divisible(args.batch_size, "--batch-size")
    output_dir = Path(args.output_dir)
    state = runfolder.claim_output_dir(args)  # one run per folder; the checkpoint's state with --resume
    start_step = state["step"] if state else 0
    seeding.seed_everything(args.seed, args.deterministic)

    # ---- data: prompts and their expert responses
    eval_fn = load_eval_fn(args.eval_fn)
    try:
        eval_rows = load_eval_rows(args.eval_data, args.eval_prompts)
        if args.messages_data:
            train_rows, cache_header = [], {"teacher": args.messages_data}
        else:
            train_rows = load_rows(args.train_data, required=("prompt",))
            cache, cache_header = load_expert_cache(args.expert_cache, [r["prompt"] for r in train_rows])
            kept = set(with_expert_answers([r["prompt"] for r in train_rows], cache, "--train-data"))
            train_rows = [r for r in train_rows if r["prompt"] in kept]
    except ValueError as error:
        raise SystemExit(f"error: {error}")

    # ---- model, optimizer, schedule
    model_path = str(output_dir / runfolder.CHECKPOINT) if state else args.model
    try:
        tokenizer = load_tokenizer(model_path, args.system_prompt, args.chat_template_kwargs)
        train_rows = keep_short_prompts(train_rows, tokenizer, args.max_prompt_tokens, args.long_prompts, args.train_data) \
            if train_rows else load_conversations(args.messages_data, tokenizer, args.assistant_only_loss, args.max_seq_len,
                                                  args.packing)
        model = distributed.shard(load_policy(model_path, args))
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    responses = [None if args.messages_data else cache[r["prompt"]] for r in train_rows]
    model.train()
    optimizer = torch.optim.AdamW(distributed.optimizer_groups(model), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(
            (s + 1) / max(1, args.warmup_steps), max(0.0, (args.steps - s) / max(1, args.steps - args.warmup_steps))
        ),
    )
    if state:
        distributed.load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        print(f"resumed from {output_dir / runfolder.CHECKPOINT} at step {start_step}")
    loss_fn = torch.compile(sft_loss, dynamic=True) if args.compile else sft_loss
    logger = runlog.RunLogger(output_dir, args, args.track, args.wandb_project, resume_step=start_step)
    autocast = torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast_bf16)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train_rows)} demonstrations "
          f"from {cache_header.get('teacher', '?')!r}")

    # run_eval(step, log=True)
    run_eval = functools.partial(evaluation.evaluate_and_log, model, tokenizer, eval_rows, eval_fn, logger, args)

    if start_step == 0:
        runfolder.write_json(output_dir / "initial_eval.json", {k: v for k, v in run_eval(0).items() if k != "texts"})
    final_eval = None
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, desc="sft",
                    disable=os.environ.get("TQDM_DISABLE") == "1")
    for step in progress:
        clock = runlog.PhaseTimer()
        # ---- sample a batch (depends only on seed and step: resumable)
        order = seeding.step_generator(args.seed, step)
        indices = torch.randint(len(train_rows), (args.batch_size,), generator=order).tolist()
        indices = distributed.local_share(indices)
        if args.messages_data:  # (ids, doc, loss): the targets t whose token is trained, in its own document
            micro_batches = [conversation_batch([train_rows[i] for i in indices[s:s + args.micro_batch_size]],
                                                tokenizer.pad_token_id, args.device)
                             for s in range(0, len(indices), args.micro_batch_size)]
            micro_batches = [(ids, doc, loss[:, 1:] * ((doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)), None)
                             for ids, doc, loss in micro_batches]  # a document's first token has nothing before it
        else:
            batch_prompts = [train_rows[i]["prompt"] for i in indices]
            batch_responses = [responses[i] for i in indices]
            micro_batches = [encode_prompt_response(tokenizer, batch_prompts[s:s + args.micro_batch_size],
                                                    batch_responses[s:s + args.micro_batch_size], args.device)
                             for s in range(0, len(indices), args.micro_batch_size)]
        # a tensor, not a float: a compiled loss would otherwise recompile for every new count
        num_tokens = distributed.all_sum(sum((response_mask.sum() for _, _, response_mask, _ in micro_batches),
                                            torch.zeros((), device=args.device)))

        # ---- forward/backward over micro-batches, token-mean over the whole batch
        total_loss = 0.0
        for ids, mask, response_mask, prompt_len in micro_batches:
            with autocast:
                if args.messages_data:  # mask is each token's document; response_mask the trained targets
                    logps, _ = packed_token_logps(model, ids, mask, args.logp_chunk_tokens)
                else:
                    logps = completion_logps(model, ids, mask, prompt_len, chunk_tokens=args.logp_chunk_tokens)
            loss = loss_fn(logps.float(), response_mask, num_tokens)
            loss.backward()
            total_loss += loss.detach()
        total_loss = distributed.all_sum(float(total_loss))
        grad_norm = distributed.sum_gradients_and_clip(model.parameters(), args.max_grad_norm)
        checkpoint.stop_if_not_finite(total_loss, step + 1, output_dir, grad_norm)
        optimizer.step()
        checkpoint.stop_if_weights_not_finite(model, step + 1, output_dir)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        clock.lap("step")

        # ---- log, evaluate, checkpoint
        logger.log(step + 1, {"train/loss": total_loss, "train/grad_norm": float(grad_norm),
                              "train/lr": scheduler.get_last_lr()[0], **clock.metrics()})
        progress.set_postfix(loss=f"{total_loss:.3f}")
        final_eval = checkpoint.evaluate_save_or_stop(step + 1, args, run_eval, lambda: checkpoint.save_checkpoint(
            output_dir, model, tokenizer, optimizer, scheduler, step + 1, args)) or final_eval

    evaluation.write_final_eval(output_dir, args.steps, final_eval, run_eval)
    logger.close()
    print(f"done: checkpoint in {output_dir / runfolder.CHECKPOINT}")
