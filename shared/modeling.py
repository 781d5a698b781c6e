"""Loading a policy and its tokenizer (hub id or local folder), and building the
tiny offline model that stands in for one.

The tiny model is a real Qwen3-architecture checkpoint with a byte-level
tokenizer and a chat template, saved with `save_pretrained`, so the offline
default goes through exactly the same `from_pretrained` path as Qwen/Qwen3-0.6B.
"""

import contextlib
import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

# One special token per role: the tiny model reads bytes, so every template byte costs compute.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPM_HEADS = "gpm_heads.pt"  # the GPM's value and gate heads, saved by algos/gpm.py beside its backbone


def build_tiny_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: one token per byte, so any text encodes.
    vocab_size: pad the vocabulary with never-produced filler tokens to this width
    (151,936 stands in for Qwen3's tokenizer at the real shape, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    special_count = 5  # eos, pad and the three role tokens below
    for i in range(len(vocab), (vocab_size or 0) - special_count):
        vocab[f"<filler_{i}>"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 8,
                     intermediate_size: int = 384, seed: int = 0, vocab_size: int | None = None,
                     num_kv_heads: int | None = None, head_dim: int | None = None,
                     max_position_embeddings: int = 256) -> Path:
    """Create and save a randomly initialised Qwen3-architecture model and its tokenizer.
    The defaults make the tiny toy-world model; scripts/real_shape.py passes Qwen3-0.6B's
    configuration (vocabulary 151,936 included) to run every algorithm at the real shape."""
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2), head_dim=head_dim or hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Qwen3 thinks before it answers unless told not to; the recipe trains and scores answers.
DEFAULT_CHAT_TEMPLATE_KWARGS = '{"enable_thinking": false}'


def load_tokenizer(name_or_path: str, system_prompt: str = "", chat_template_kwargs: str = DEFAULT_CHAT_TEMPLATE_KWARGS):
    """Left padding (so every completion starts at the same column), pad and eos checked.
    system_prompt (a system turn before every prompt, "" for none) and
    chat_template_kwargs (a JSON object passed to the chat template) say how chat_prompt
    formats a prompt; the flags of the same names set them."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {name_or_path!r}: not a saved model folder, and not "
                         f"reachable as a hub id ({type(error).__name__})") from None
    tokenizer.padding_side = "left"
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no eos token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # completions are masked after eos, so sharing it is safe
    if not tokenizer.chat_template:
        raise ValueError(f"tokenizer of {name_or_path!r} has no chat template; use an instruct/chat checkpoint")
    tokenizer.stop_token_ids = stop_token_ids(name_or_path, tokenizer)
    tokenizer.system_prompt, tokenizer.chat_template_kwargs = system_prompt, json.loads(chat_template_kwargs)
    return tokenizer


def stop_token_ids(name_or_path: str, tokenizer) -> list[int]:
    """Every token that ends a response: the tokenizer's eos and the model's
    generation_config eos list. Qwen3 ends a chat turn with <|im_end|> (151645, its
    tokenizer's eos) and a document with <|endoftext|> (151643); its generation_config
    lists both, and sampling, masks and the expert cache stop on either."""
    try:
        listed = GenerationConfig.from_pretrained(name_or_path).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's eos alone
        listed = None
    listed = [listed] if isinstance(listed, int) else list(listed or [])
    return sorted({tokenizer.eos_token_id, *listed})


def load_model(name_or_path: str, dtype: str = "float32", device: str = "cpu",
               gradient_checkpointing: bool = False):
    """A causal LM from a hub id or a local folder, weights in `dtype` on `device`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").exists():
        raise ValueError(f"--model {name_or_path!r} is a folder without config.json: not a saved model")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype]).to(device)
    except Exception as error:  # missing, unreachable, or a damaged weights file (safetensors' own error type)
        raise ValueError(
            f"cannot load a model from {name_or_path!r}: not a readable saved model folder, and not "
            f"reachable as a hub id ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})"
        ) from None
    disable_dropout(model)
    model.tokenizer_vocab_size = tokenizer_vocab_size(name_or_path, model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def tokenizer_vocab_size(name_or_path: str, model) -> int:
    """How many ids the model's tokenizer can produce. Qwen3's embedding has 151,936
    rows for 151,669 tokens (padded for speed): the 267 rows past the tokenizer are no
    token, so sampling never draws them and log-probs normalise over the tokenizer's ids
    alone (shared/rollout.py: vocab_limit). A folder without a tokenizer: every row."""
    rows = model.get_output_embeddings().weight.size(0)
    try:
        return min(rows, len(AutoTokenizer.from_pretrained(name_or_path)))
    except (OSError, ValueError):
        return rows


def load_policy(model_path: str, args):
    """The model a run trains. Without --lora-r: every weight of model_path. With it:
    args.model's weights frozen, and LoRA adapters (peft) on --lora-target-modules:
    new ones (B = 0, so the run starts at args.model exactly), or, resuming, the ones
    saved in model_path. The adapters are what a checkpoint then holds (with
    adapter_config.json naming args.model as the base, so from_pretrained of the
    checkpoint builds base plus adapters)."""
    if not args.lora_r:
        return load_model(model_path, args.dtype, args.device, args.gradient_checkpointing)
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ModuleNotFoundError:
        raise ValueError("--lora-r needs the peft package: pip install peft") from None
    base = load_model(args.model, args.dtype, args.device, args.gradient_checkpointing)
    if (Path(model_path) / "adapter_config.json").exists():
        policy = PeftModel.from_pretrained(base, model_path, is_trainable=True)
    else:
        try:
            policy = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                     target_modules=list(args.lora_target_modules), bias="none",
                                                     task_type="CAUSAL_LM"))
        except ValueError as error:  # peft's "Target modules {...} not found in the base model"
            raise ValueError(f"--lora-target-modules: {str(error).splitlines()[0][:200]}") from None
    if Path(args.model).exists():  # a local base: named by its absolute path, so the checkpoint loads from anywhere
        policy.peft_config["default"].base_model_name_or_path = str(Path(args.model).resolve())
    return policy


def load_reference(args, policy):
    """The frozen initial policy (KL reference, default discriminator encoder). With
    --lora-r it is the policy itself read with its adapters off (adapters_off): the
    base weights never change, so no second copy is needed. Otherwise args.model
    loaded again, frozen, sharded like the policy."""
    from shared import distributed

    if args.lora_r:
        return policy
    return distributed.shard(load_model(args.model, args.dtype, args.device).eval().requires_grad_(False))


def load_gpm(path: str, dtype: str, device: str, system_prompt: str, chat_template_kwargs: str):
    """The GPM that algos/gpm.py saved in `path`: its frozen backbone, value and gate heads
    (bias-free linear maps of the hidden state), tokenizer and dimension names.
    ValueError, naming --gpm, for a folder without heads or with heads for another backbone."""
    heads_path = Path(path) / GPM_HEADS
    if not heads_path.exists():
        raise ValueError(f"--gpm {path!r} has no {GPM_HEADS}; train one with algos/gpm.py")
    tokenizer = load_tokenizer(path, system_prompt, chat_template_kwargs)
    backbone = load_model(path, dtype, device).eval().requires_grad_(False)
    hidden_size = backbone.config.hidden_size
    try:  # weights_only: a user-given file is never unpickled as code
        heads = torch.load(heads_path, weights_only=True)
        value_head = torch.nn.Linear(hidden_size, 2 * heads["dims"], bias=False).to(device)
        gate_head = torch.nn.Linear(hidden_size, heads["dims"], bias=False).to(device)
        value_head.load_state_dict(heads["value_head"])
        gate_head.load_state_dict(heads["gate_head"])
    except Exception as error:
        raise ValueError(f"--gpm {path!r}: {GPM_HEADS} is not GPM heads saved by algos/gpm.py for this backbone "
                         f"({type(error).__name__})") from None
    names = heads["axes"] or [f"dim{l}" for l in range(heads["dims"])]
    return backbone, value_head.requires_grad_(False), gate_head.requires_grad_(False), tokenizer, names


def adapters_off(model):
    """A context in which a LoRA policy computes as its base (peft's disable_adapter);
    for any other model, nothing changes."""
    return model.disable_adapter() if hasattr(model, "peft_config") else contextlib.nullcontext()


def disable_dropout(model) -> None:
    """Dropout off everywhere, as TRL does by default: with dropout on, the log-probs of
    the update's forward pass would differ from the old/reference ones at rho = 1 for no
    reason but the noise, and the sampled and trained distributions would differ."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for key, value in model.config.to_dict().items():
        if "dropout" in key and isinstance(value, float):
            setattr(model.config, key, 0.0)


def chat_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it: the system turn if any, one user turn and the
    assistant header, with the template options load_tokenizer recorded (a tokenizer
    made elsewhere: no system turn, thinking off)."""
    system = getattr(tokenizer, "system_prompt", "")
    messages = [{"role": "system", "content": system}] * bool(system) + [{"role": "user", "content": prompt}]
    options = getattr(tokenizer, "chat_template_kwargs", None)
    options = json.loads(DEFAULT_CHAT_TEMPLATE_KWARGS) if options is None else options
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **options)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
