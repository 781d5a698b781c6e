"""The discriminator head AAPA and UniAPL train on sentence features (shared/embeddings.py),
and the bookkeeping around AAPA's fixed one: the features it is fitted on, the fit on a
split by prompt with its held-out numbers, the saved record, and fresh rollouts judged
by it. The losses they are trained with and the scores they give the policy are the
algorithms' own (algos/aapa.py, algos/uniapl.py)."""

import os

import torch

from shared import distributed, seeding
from shared.embeddings import sentence_embeddings
from shared.rollout import generate_texts

FIT_NUMBERS = ("heldout_accuracy", "heldout_auc", "fit_accuracy", "fit_loss", "anchor_scale", "dropped_copies")


def make_discriminator(width: int, hidden: int) -> torch.nn.Module:
    """The lightweight head: [N, width] sentence features -> [N] logits."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1), torch.nn.Flatten(0)
    )


def binary_auc(expert_logits, policy_logits):
    """P(logit of a random expert response > logit of a random policy rollout), ties
    counting half: the area under the ROC curve (0.5 = chance). [N], [M] -> float."""
    difference = expert_logits[:, None] - policy_logits[None, :]
    return float((difference > 0).double().mean() + 0.5 * (difference == 0).double().mean())


def balanced_accuracy(expert_logits, policy_logits):
    """The mean of the two classes' accuracies at logit 0: expert judged expert, policy judged policy."""
    return float(0.5 * ((expert_logits > 0).float().mean() + (policy_logits <= 0).float().mean()))


def expert_and_policy_features(model, tokenizer, encoder, encoder_tokenizer, prompts, cache, args):
    """Features of each prompt's expert response and of one rollout of the policy (the
    initial one: this runs before training), and which rollouts equal the expert's text.
    Returns ([P, F], [P, F], [P] bool)."""
    expert_features = sentence_embeddings(encoder, encoder_tokenizer, prompts, [cache[p] for p in prompts], args.device,
                                          args.disc_layers)
    rollouts = generate_texts(model, tokenizer, prompts, args.generation_batch_size, args.max_new_tokens, args.temperature,
                              autocast_bf16=args.autocast_bf16, top_k=args.top_k, top_p=args.top_p)
    policy_features = sentence_embeddings(encoder, encoder_tokenizer, prompts, rollouts, args.device, args.disc_layers)
    return expert_features, policy_features, torch.tensor([text == cache[p] for p, text in zip(prompts, rollouts)])


def split_prompts(pool: list[str], num_prompts: int, holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """A fixed discriminator's prompts (num_prompts of the pool, drawn by seed) and the
    first `holdout` fraction of them (at least one), held out from its fit."""
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:num_prompts]
    prompts = [pool[i] for i in order.tolist()]
    return prompts, prompts[: max(1, int(len(prompts) * holdout))]


def fixed_record(state, args, fit, path, logger, num_prompts: int) -> dict:
    """The fixed discriminator's record: the resumed checkpoint's, the one --disc-path
    names, or the one `fit()` returns now, saved to `path` with its numbers printed and
    logged at step 0. A fit or a file that cannot be used ends the run with one line."""
    if state:
        return state["extra"]["discriminator"]
    try:
        record = load_record(args.disc_path) if args.disc_path else fit()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.disc_path:
        print(f"discriminator from {args.disc_path} (held-out accuracy {record['heldout_accuracy']:.3f})")
        return record
    record.update(layers=args.disc_layers, encoder=args.disc_encoder or args.model)
    save_record(record, path)
    print(f"discriminator: held-out accuracy {record['heldout_accuracy']:.3f}, AUC {record['heldout_auc']:.3f} "
          f"on {record['heldout_prompts']} held-out prompts (chance 0.5; fit accuracy {record['fit_accuracy']:.3f}); "
          f"{record['dropped_copies']} of {num_prompts} rollouts equal to the expert's dropped as negatives; "
          f"anchor scale {record['anchor_scale']:.3f} nats; saved to {path}")
    logger.log(0, {f"disc/{key}": record[key] for key in FIT_NUMBERS})
    return record


def fit_on_split(expert_features, policy_features, policy_is_copy, num_holdout, hidden, epochs, learning_rate, loss_fn):
    """Fit a head once, full batch, on standardised features, minimising loss_fn(logits, is_expert).

    expert_features, policy_features: [P, F], row p = prompt p's expert response and the
    policy's rollout; the first num_holdout prompts are held out (a split by prompt: no
    held-out prompt is in the fit). policy_is_copy [P] bool: rollouts equal to the expert
    response; they are dropped as negatives (the same text labelled both ways is a
    contradiction), the expert row stays. Returns (head, record, held-out logits of the
    expert responses then the policy's), the record holding the head, the feature
    statistics, and the fit and held-out numbers.
    """
    holdout = torch.arange(expert_features.size(0), device=expert_features.device) < num_holdout
    keep = ~policy_is_copy.to(holdout.device)
    fit_expert, fit_policy = expert_features[~holdout], policy_features[~holdout & keep]
    held_expert, held_policy = expert_features[holdout], policy_features[holdout & keep]
    if fit_policy.size(0) == 0 or held_policy.size(0) == 0:
        raise ValueError(f"the initial policy reproduces the expert response on {int(policy_is_copy.sum())} of "
                         f"{policy_is_copy.numel()} discriminator prompts: too few negatives to fit or check D on")
    fit_x = torch.cat([fit_expert, fit_policy])
    # standardised features: raw embeddings are tiny (init std 0.02) and the head would barely move
    feature_mean, feature_std = fit_x.mean(0), fit_x.std(0) + 1e-6
    fit_y = torch.cat([torch.ones(fit_expert.size(0)), torch.zeros(fit_policy.size(0))]).to(fit_x.device)
    head = make_discriminator(fit_x.size(1), hidden).to(fit_x.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate)
    for _ in range(epochs):
        loss = loss_fn(head((fit_x - feature_mean) / feature_std), fit_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        expert_logits = head((held_expert - feature_mean) / feature_std)
        policy_logits = head((held_policy - feature_mean) / feature_std)
        fit_logits = head((fit_x - feature_mean) / feature_std)
    record = {"state_dict": head.state_dict(), "width": fit_x.size(1), "hidden": hidden, "feature_mean": feature_mean,
              "feature_std": feature_std, "fit_loss": loss.item(),
              "fit_accuracy": balanced_accuracy(fit_logits[fit_y == 1], fit_logits[fit_y == 0]),
              "heldout_accuracy": balanced_accuracy(expert_logits, policy_logits),
              "heldout_auc": binary_auc(expert_logits, policy_logits),
              "dropped_copies": int(policy_is_copy.sum()), "heldout_prompts": int(num_holdout)}
    return head, record, torch.cat([expert_logits, policy_logits])


def save_record(record: dict, path) -> None:
    """One rank writes it (every rank fitted the same head), through a temporary file, so
    a kill mid-write leaves no half record under the final name."""
    if distributed.is_main():
        torch.save(record, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)


def load_record(path, required=("anchor_scale",)) -> dict:
    """A record saved by save_record, loaded with weights_only (a user-given file is never
    unpickled as code), its head rebuilt once to check it; ValueError if it is not one."""
    try:
        record = torch.load(path, weights_only=True)
        make_discriminator(record["width"], record["hidden"]).load_state_dict(record["state_dict"])
        for key in required:  # a record from before a key existed (e.g. the anchor scale): fit again
            float(record[key])
    except Exception as error:
        raise ValueError(f"--disc-path {str(path)!r} is not a discriminator saved by algos/aapa.py "
                         f"({type(error).__name__})") from None
    return record


def frozen_head(record: dict, device) -> torch.nn.Module:
    head = make_discriminator(record["width"], record["hidden"]).to(device)
    head.load_state_dict(record["state_dict"])
    return head.eval().requires_grad_(False)  # frozen: never updated during policy optimisation


def fresh_rollout_metrics(model, tokenizer, prompts, expert_logits, judge, score_fn, step, args) -> dict:
    """Fresh rollouts on `prompts` (the discriminator's held-out ones) judged by `judge`
    (prompts, responses) -> logits, against the expert responses' logits: their mean score
    and D's accuracy. Drawn from their own generators, seeded by -step - 1: no training
    step's draws, the same after a resume."""
    fresh = generate_texts(model, tokenizer, prompts, args.generation_batch_size, args.max_new_tokens, args.temperature,
                           seeds=seeding.prompt_seeds(args.seed, -step - 1, len(prompts)),
                           autocast_bf16=args.autocast_bf16, top_k=args.top_k, top_p=args.top_p)
    fresh_logits = judge(prompts, fresh)
    return {"anchor_score_rollouts": float(score_fn(fresh_logits).mean()),
            "anchor_score_expert": float(score_fn(expert_logits).mean()),
            "disc_accuracy_fresh": balanced_accuracy(expert_logits, fresh_logits)}
