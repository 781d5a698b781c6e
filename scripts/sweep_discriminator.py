"""How well AAPA's fixed discriminator generalises, per feature and head setting: the
held-out accuracy and AUC (split by prompt) of fit_discriminator on one SFT checkpoint's
rollouts against the expert cache, the numbers AAPA's --disc-* defaults were picked from.

Features are computed once per layer choice; every head setting is then fitted on the
same data. Prints one table (Markdown) and writes nothing.
"""

from dataclasses import dataclass

import torch
import tyro

from algos.aapa import fit_discriminator
from shared.data import load_expert_pool, load_rows
from shared.embeddings import sentence_embeddings
from shared.modeling import default_device, load_model, load_tokenizer
from shared.rollout import generate_rollouts


@dataclass
class Args:
    model: str = "runs/sft/checkpoint"
    """the SFT checkpoint whose rollouts are the negatives (AAPA's initial policy)"""
    train_data: str = "data/toy/train.jsonl"
    """training prompts (the pool must lie inside them)"""
    expert_pool: str = "data/toy/sft_prompts.jsonl"
    """prompts with expert demonstrations, as AAPA's --expert-pool"""
    expert_cache: str = "data/toy/expert_cache.jsonl"
    """expert responses keyed by prompt"""
    disc_prompts: int = 500
    """prompts drawn from the pool (the main job's 500)"""
    holdout: float = 0.2
    """fraction of them held out"""
    layers: tuple[str, ...] = ("0,-1", "-1", "0")
    """feature layer choices to compare, each a comma-separated list"""
    hidden: tuple[int, ...] = (4, 16, 64)
    """head widths to compare"""
    epochs: tuple[int, ...] = (50, 200, 500)
    """full-batch Adam steps to compare"""
    learning_rate: float = 3e-3
    """head learning rate"""
    max_new_tokens: int = 16
    """rollout length limit"""
    temperature: float = 0.7
    """rollout temperature"""
    seed: int = 1
    """prompt draw, rollouts and head initialisation"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        train_rows = load_rows(args.train_data)
        pool, cache, _ = load_expert_pool(args.expert_pool, train_rows, args.expert_cache)
        tokenizer, model = load_tokenizer(args.model), load_model(args.model, "float32", default_device()).eval()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[: args.disc_prompts]
    prompts = [pool[i] for i in order.tolist()]
    num_holdout = max(1, int(len(prompts) * args.holdout))
    torch.manual_seed(args.seed)
    rollouts = generate_rollouts(model, tokenizer, prompts, 1, args.max_new_tokens, args.temperature)["texts"]
    is_copy = torch.tensor([text == cache[p] for p, text in zip(prompts, rollouts)])
    device = next(model.parameters()).device
    print(f"{len(prompts)} prompts, {num_holdout} held out; {int(is_copy.sum())} rollouts equal the expert's (dropped)\n")
    print("| layers | hidden | epochs | fit accuracy | held-out accuracy | held-out AUC | anchor scale |")
    print("|---|---|---|---|---|---|---|")
    for layer_text in args.layers:
        layers = tuple(int(x) for x in layer_text.split(","))
        expert = sentence_embeddings(model, tokenizer, prompts, [cache[p] for p in prompts], device, layers)
        policy = sentence_embeddings(model, tokenizer, prompts, rollouts, device, layers)
        for hidden in args.hidden:
            for epochs in args.epochs:
                torch.manual_seed(args.seed)
                _, record = fit_discriminator(expert, policy, is_copy, num_holdout, hidden, epochs, args.learning_rate)
                print(
                    f"| {layer_text} | {hidden} | {epochs} | {record['fit_accuracy']:.3f} | {record['heldout_accuracy']:.3f} "
                    f"| {record['heldout_auc']:.3f} | {record['anchor_scale']:.3f} |"
                )
