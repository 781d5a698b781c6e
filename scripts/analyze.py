"""Analyses of finished runs, as the papers show them: held-out accuracy against
rollouts seen, KL to the SFT reference, and the distributions of response lengths and
of log-probs of each method's responses against the expert's.

Per run (cached in <run>/analysis.json): on the first `prompts` held-out prompts,
- KL(policy || SFT reference) per response, estimated on samples at temperature 1
  with the k3 estimator summed over tokens, sum_t [exp(r_t) - 1 - r_t] with
  r_t = log pi_ref(y_t) - log pi(y_t): unbiased like the plain log-ratio sum, but never
  negative, so a small KL does not read as a negative one;
- greedy response lengths (tokens, with eos);
- per-token mean log-prob under the policy of its own greedy responses and of the
  expert's responses (how far the policy's mass sits from the expert's).
`python scripts/analyze.py --runs-dir results/runs` redraws the plots of a finished main job.
"""

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

from shared.data import load_expert_cache, load_rows
from shared.logprobs import completion_logps
from shared.modeling import load_model, load_tokenizer
from shared.rollout import encode_prompt_response, generate_rollouts
from shared.runfolder import write_json


@dataclass
class Args:
    runs_dir: str = "results/runs"
    """the main job's runs: <method>_seed<N>/ folders with checkpoint/ and metrics.jsonl"""
    out_dir: str = "results"
    """where curves.png, lengths.png and logprobs.png go"""
    eval_data: str = "data/toy/eval.jsonl"
    """held-out prompts"""
    expert_cache: str = "data/toy/expert_cache.jsonl"
    """expert responses (for the eval prompts too: the toy oracle covers any prompt)"""
    prompts: int = 128
    """held-out prompts per analysis"""
    max_new_tokens: int = 16
    """response length limit"""


@torch.no_grad()
def analyze_run(checkpoint: Path, reference: Path, prompts: list[str], expert: list[str], max_new_tokens: int) -> dict:
    tokenizer, policy = load_tokenizer(str(checkpoint)), load_model(str(checkpoint)).eval()
    ref = load_model(str(reference)).eval()
    torch.manual_seed(0)
    sampled = generate_rollouts(policy, tokenizer, prompts, 1, max_new_tokens, temperature=1.0)
    ids = torch.cat([sampled["prompt_ids"], sampled["completion_ids"]], 1)
    mask = torch.cat([sampled["prompt_mask"], sampled["completion_mask"]], 1)
    start, completion_mask = sampled["prompt_ids"].size(1), sampled["completion_mask"].float()
    ref_minus_policy = completion_logps(ref, ids, mask, start) - completion_logps(policy, ids, mask, start)
    k3 = (torch.exp(ref_minus_policy) - 1 - ref_minus_policy) * completion_mask
    greedy = generate_rollouts(policy, tokenizer, prompts, 1, max_new_tokens, do_sample=False)
    lengths = greedy["completion_mask"].sum(1)
    # the tokens the policy emitted, as emitted: a truncated response has no eos (re-encoding its text would add one)
    own_ids = torch.cat([greedy["prompt_ids"], greedy["completion_ids"]], 1)
    own_mask = torch.cat([greedy["prompt_mask"], greedy["completion_mask"]], 1)
    own_response_mask = greedy["completion_mask"].float()
    own = ((completion_logps(policy, own_ids, own_mask, greedy["prompt_ids"].size(1)) * own_response_mask).sum(1)
           / own_response_mask.sum(1).clamp(min=1))
    exp_ids, exp_mask, exp_response_mask, exp_start = encode_prompt_response(tokenizer, prompts, expert, ids.device)
    exp = (completion_logps(policy, exp_ids, exp_mask, exp_start) * exp_response_mask).sum(1) / exp_response_mask.sum(1)
    return {"kl": float(k3.sum(1).mean()), "kl_estimator": "k3", "lengths": lengths.tolist(), "own_logprob": own.tolist(),
            "expert_logprob": exp.tolist()}


def eval_curve(run_dir: Path, rollouts_per_step: int) -> list[tuple[int, float]]:
    """(rollouts seen, held-out gold) at every evaluation of a run."""
    points = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/gold" in record:
            points[record["step"]] = record["eval/gold"]
    return [(step * rollouts_per_step, gold) for step, gold in sorted(points.items())]


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    palette = plt.get_cmap("tab20").colors
    colors = palette[0::2] + palette[1::2]  # ten strong colours, then their light twins: no two methods share one
    for index, (method, runs) in enumerate(curves.items()):
        by_x = defaultdict(list)
        for run in runs:
            for x, y in run:
                by_x[x].append(y)
        xs = sorted(by_x)
        ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], marker="o", label=method,
                color=colors[index % len(colors)])
    ax.set_xlabel("rollouts seen (prompts x G x steps)")
    ax.set_ylabel("held-out gold accuracy (mean over seeds)")
    ax.set_title("Held-out accuracy during RL, all methods from the same SFT checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_distributions(analyses: dict[str, list[dict]], path_lengths: Path, path_logprobs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(analyses)
    fig, ax = plt.subplots(figsize=(max(8, len(methods)), 4.5))
    ax.boxplot([[x for a in analyses[m] for x in a["lengths"]] for m in methods], showfliers=False)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("greedy response length (tokens)")
    ax.set_title("Response-length distributions on held-out prompts")
    fig.tight_layout()
    fig.savefig(path_lengths, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(8, len(methods)), 4.5))
    positions = range(len(methods))
    own = [[x for a in analyses[m] for x in a["own_logprob"]] for m in methods]
    expert = [[x for a in analyses[m] for x in a["expert_logprob"]] for m in methods]
    ax.boxplot(own, positions=[p - 0.18 for p in positions], widths=0.3, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "tab:blue", "alpha": 0.5})
    ax.boxplot(expert, positions=[p + 0.18 for p in positions], widths=0.3, showfliers=False, patch_artist=True,
               boxprops={"facecolor": "tab:orange", "alpha": 0.5})
    ax.set_xticks(list(positions), methods, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("mean token log-prob under the policy")
    ax.set_title("Log-probs of the policy's own greedy responses (blue) and of the expert's (orange)")
    fig.tight_layout()
    fig.savefig(path_logprobs, dpi=120)
    plt.close(fig)


def analyze(runs: dict[str, list[Path]], references: dict[int, Path], eval_data: str, expert_cache: str, out_dir: Path,
            prompts: int = 128, max_new_tokens: int = 16) -> dict[str, list[dict]]:
    """Analyse every run (cached per run), draw the distribution plots; returns the analyses by method."""
    rows = load_rows(eval_data)[:prompts]
    prompt_texts = [r["prompt"] for r in rows]
    try:
        cache, _ = load_expert_cache(expert_cache, prompt_texts)
        expert = [cache[p] for p in prompt_texts]
    except ValueError:  # a cache for the training prompts only: the toy oracle answers any prompt
        from shared.toyworld import oracle

        expert = [oracle(r) for r in rows]
    analyses: dict[str, list[dict]] = {}
    for method, run_dirs in runs.items():
        for run_dir in run_dirs:
            cached = run_dir / "analysis.json"
            if not cached.exists() or json.loads(cached.read_text()).get("kl_estimator") != "k3":
                seed = int(re.search(r"seed(\d+)$", run_dir.name).group(1))
                result = analyze_run(run_dir / "checkpoint", references[seed], prompt_texts, expert, max_new_tokens)
                write_json(cached, result)
            analyses.setdefault(method, []).append(json.loads(cached.read_text()))
    plot_distributions(analyses, out_dir / "lengths.png", out_dir / "logprobs.png")
    return analyses


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs_dir = Path(args.runs_dir)
    runs: dict[str, list[Path]] = defaultdict(list)
    for run_dir in sorted(runs_dir.glob("*_seed*")):
        if (run_dir / "eval.json").exists() and (run_dir / "checkpoint" / "config.json").exists() \
                and not run_dir.name.startswith("gpm"):
            runs[run_dir.name.rsplit("_seed", 1)[0]].append(run_dir)
    references = {int(p.name.rsplit("seed", 1)[1]): p / "checkpoint" for p in runs_dir.glob("sft_seed*")}
    analyses = analyze(runs, references, args.eval_data, args.expert_cache, Path(args.out_dir), args.prompts,
                       args.max_new_tokens)
    for method, results in analyses.items():
        print(f"{method}: KL to SFT {sum(r['kl'] for r in results) / len(results):.4f}")
    print(f"plots in {args.out_dir}/lengths.png and logprobs.png")
