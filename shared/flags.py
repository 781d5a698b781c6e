"""The flags every script shares (RunFlags), those of the scripts with expert demonstrations (ExpertFlags),
and the checks that refuse a bad value with one error line before any data or model is read."""

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from shared.modeling import DEFAULT_CHAT_TEMPLATE_KWARGS, DTYPES, default_device


@dataclasses.dataclass
class RunFlags:
    """How a run is carried out, the same for every algorithm; each algorithm's Args adds
    its own flags to these (they come first in --help)."""
    resume: bool = False
    """continue the run in --output-dir from its newest complete checkpoint (from step 0 if it has none)"""
    overwrite: bool = False
    """delete the run already in --output-dir and start again (without it, such a folder is refused)"""
    allow_flag_changes: bool = False
    """with --resume, accept flags that differ from the run's (they are recorded in run.json)"""
    stop_at_step: int = 0
    """end this invocation after this step, as an interruption would (0: run to the end)"""
    dtype: str = "float32"
    """weights dtype: float32 or bfloat16 (float16 is refused: AdamW's moments underflow in it)"""
    autocast_bf16: bool = False
    """run forward passes, sampling included, under bfloat16 autocast (GPU memory/speed knob)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    device: str = dataclasses.field(default_factory=default_device)
    """cuda or cpu"""
    compile: bool = dataclasses.field(default_factory=torch.cuda.is_available)
    """torch.compile the algorithm's pure functions: losses, advantages (default on with CUDA)"""
    track: bool = False
    """log to Weights & Biases as well as tensorboard"""
    wandb_project: str = "posttrain"
    """wandb project name"""
    lora_r: int = 0
    """LoRA rank (peft): train adapters only, the reference being the base with them off (0: train every weight)"""
    lora_alpha: float = 16.0
    """LoRA scale numerator: the adapters add (lora_alpha / lora_r) * B A to each target weight"""
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """names of the linear layers that get adapters (Qwen3's attention and MLP projections)"""
    static_cache: bool = False
    """decode training rollouts into a KV cache allocated once, with a torch.compile'd step (the first compiles)"""
    generation_batch_size: int = 64
    """prompts per generate call outside the training step (evaluation, AAPA's discriminator fit and anchor metrics,
    GPRL's drift probes): lower it for long answers on a GPU"""
    deterministic: bool = False
    """deterministic CUDA kernels (torch.use_deterministic_algorithms), for bit-exact resume on a GPU; slower"""
    system_prompt: str = ""
    """a system turn before every prompt, in training, sampling and evaluation ("" for none)"""
    chat_template_kwargs: str = DEFAULT_CHAT_TEMPLATE_KWARGS
    """JSON object of options for the tokenizer's chat template (Qwen3: enable_thinking; the tiny template ignores them)"""
    strip_think: bool = True
    """reward and evaluation functions see the answer after a reasoning model's </think> (an unclosed <think>: empty)"""


@dataclasses.dataclass
class ExpertFlags:
    """Where the expert demonstrations of CHORD, AAPA and UniAPL come from, and the
    temperature their log-probs are taken at: the same three flags in each."""
    expert_cache: str = "data/toy/expert_cache.jsonl"
    """expert responses keyed by prompt (scripts/build_expert_cache.py)"""
    expert_pool: str = "data/toy/sft_prompts.jsonl"
    """prompts whose expert demonstrations the run may use: by default SFT's 500 (data/toy/sft_prompts.jsonl), the
    demonstrations the SFT checkpoint saw, so the method gets no extra supervised data; '' = every training prompt"""
    expert_temperature: float = 0.0
    """temperature of the expert rows' log-probs (0: the sampling temperature, as Trinity-RFT computes rollouts and
    expert rows in one pass; 1: the raw model)"""


def check_range(args, **rules) -> None:
    """One error line for the first flag outside its range. rules: field=(low, high,
    low_inclusive, high_inclusive); None means unbounded on that side."""
    for field, (low, high, low_inclusive, high_inclusive) in rules.items():
        value = getattr(args, field)
        too_low = low is not None and (value < low if low_inclusive else value <= low)
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high or (isinstance(value, float) and not math.isfinite(value)):
            opening, closing = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
            interval = f"{opening}{'-inf' if low is None else low}, {'inf' if high is None else high}{closing}"
            raise SystemExit(f"error: --{field.replace('_', '-')} must be in {interval}, got {value}")


# the usual ranges of check_range's rules
POSITIVE, NON_NEGATIVE, FRACTION = (0, None, False, False), (0, None, True, False), (0, 1, True, False)
AT_LEAST_1, AT_LEAST_2 = (1, None, True, False), (2, None, True, False)  # a group needs 2 samples to compare
TEMPERATURE = (1e-3, None, True, False)  # logits / T overflow below 1e-3
TOP_P = (0, 1, False, True)  # 0 would keep no token


# the ranges of the flags every RL script (grpo, chord, aapa, uniapl, adpo, gprl) has; each adds its own
RL_RANGES = dict(
    max_prompt_tokens=NON_NEGATIVE,
    steps=AT_LEAST_1,
    prompts_per_step=AT_LEAST_1,
    group_size=AT_LEAST_2,
    micro_batch_size=AT_LEAST_1,
    max_new_tokens=AT_LEAST_1,
    temperature=TEMPERATURE,
    top_k=NON_NEGATIVE,
    top_p=TOP_P,
    learning_rate=POSITIVE,
    weight_decay=NON_NEGATIVE,
    max_grad_norm=POSITIVE,
    beta=NON_NEGATIVE,
    num_iterations=AT_LEAST_1,
    eval_every=AT_LEAST_1,
    eval_prompts=AT_LEAST_1,
    save_every=AT_LEAST_1,
    logp_chunk_tokens=NON_NEGATIVE,
)


def _same_file(a: str, b: str) -> bool:
    """The same path, or two names (a link, ../) of one existing file."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or a.exists() and b.exists() and os.path.samefile(a, b)


def check_output_file(path: str, flag: str, inputs: dict[str, str] | None = None) -> None:
    """An output file path must not be a folder, its folder must be writable, and it must
    not be one of the command's inputs (`inputs`: flag -> path, outputs written before it
    included), which writing it would replace."""
    for input_flag, input_path in (inputs or {}).items():
        if input_path and _same_file(input_path, path):
            raise SystemExit(f"error: {flag} {str(path)!r} is the same file as {input_flag}; writing it would "
                             f"replace that {'input' if input_flag not in ('--out', '--summary') else 'output'}: "
                             "choose another path")
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {flag} {str(path)!r} is a folder; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"error: {flag} {str(path)!r}: its folder cannot be created ({error.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise SystemExit(f"error: {flag} {str(path)!r}: its folder is not writable")


def check_flags(args, flag_ranges: dict) -> None:
    """Before any data or model is read: the script's own flags against the ranges
    declared beside its Args, then the run flags every script shares."""
    check_range(args, **flag_ranges, stop_at_step=(0, args.steps, True, True))
    if not 0 <= args.seed < 2**63:
        raise SystemExit(f"error: --seed must be in [0, 2^63), got {args.seed}")
    if args.dtype not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.dtype == "float16":
        raise SystemExit("error: --dtype float16 cannot be trained with AdamW here (its eps 1e-8 and squared "
                         "gradients underflow in float16, and the weights turn NaN); use --dtype bfloat16, or "
                         "float32 with --autocast-bf16")
    check_chat_template_kwargs(args.chat_template_kwargs)
    check_range(args, generation_batch_size=AT_LEAST_1, lora_r=NON_NEGATIVE, lora_alpha=POSITIVE)
    if isinstance(args, ExpertFlags):
        check_range(args, expert_temperature=NON_NEGATIVE)
    if args.lora_r and not args.lora_target_modules:
        raise SystemExit("error: --lora-target-modules must name at least one module when --lora-r > 0")
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but this machine has no CUDA device (use --device cpu)")
    if device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu"):
        raise SystemExit(f"error: --device must be cpu or cuda[:N], got {device!r}")


def check_chat_template_kwargs(value: str, flag: str = "--chat-template-kwargs") -> None:
    """A JSON object whose names are not ones the call itself sets."""
    try:
        options = json.loads(value)
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {flag} must be a JSON object such as '{{\"enable_thinking\": false}}', got {value!r} "
                         f"({error.msg})") from None
    if not isinstance(options, dict):
        raise SystemExit(f"error: {flag} must be a JSON object (name: value), got {value!r}")
    taken = sorted(set(options) & {"conversation", "messages", "tokenize", "add_generation_prompt", "chat_template"})
    if taken:
        raise SystemExit(f"error: {flag} may not set {', '.join(taken)}: the scripts set it themselves")
