"""Prompt datasets (local JSONL or any hub dataset, through `datasets`) and the
expert cache (pre-collected expert responses keyed by prompt)."""

import json
from pathlib import Path

import torch
from datasets import load_dataset

from shared.distributed import all_sum
from shared.ifeval import NotScorable, from_rlvr, missing_nltk_data, official_random_letter
from shared.modeling import chat_prompt
from shared.rollout import encode_prompt_response
from shared.scoring import instruction_problem
from shared.toyworld import write_jsonl

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_rows(source: str, split: str = "train") -> list[dict]:
    """The rows of a local .json/.jsonl/.csv/.parquet file or a hub dataset, unchecked;
    a missing, empty or unreadable one is one ValueError line naming it."""
    local_format = LOCAL_FORMATS.get(Path(source).suffix.lower())
    if local_format and not Path(source).is_file():
        raise ValueError(f"dataset file {source!r} does not exist")
    if local_format and Path(source).stat().st_size == 0:
        raise ValueError(f"dataset {source!r} has no rows")
    try:
        if local_format:
            dataset = load_dataset(local_format, data_files=source, split="train")
        else:
            dataset = load_dataset(source, split=split)
    except Exception as error:  # broken JSON, mixed column types, unknown hub id: datasets wraps them all
        cause = (str(error.__cause__ or error).strip().splitlines() or [type(error.__cause__ or error).__name__])[0]
        raise ValueError(f"dataset {source!r} could not be read: {cause}") from None
    rows = dataset.to_list()
    if not rows:
        raise ValueError(f"dataset {source!r} has no rows")
    return rows


def load_rows(source: str, split: str = "train", required: tuple[str, ...] = ("prompt", "instruction_id_list"),
              drop_missing_nltk: bool = False) -> list[dict]:
    """Rows from a local .json/.jsonl/.csv/.parquet file or a hub dataset id, validated
    field by field. IFEval-style rows (prompt, instruction_id_list, kwargs) are read as
    they are; RLVR-IFeval rows (messages, ground_truth) are converted to that schema.
    Instruction ids and kwargs, where present, are checked row by row.
    drop_missing_nltk: drop (with a printed count and the ids) the rows whose checkers
    need NLTK data that is not installed, instead of refusing the file: a partial score."""
    rows = read_rows(source, split)
    if "prompt" not in rows[0] and "ground_truth" in rows[0]:  # allenai/RLVR-IFeval: messages + ground_truth
        converted, not_scorable = [], 0
        for index, row in enumerate(rows):
            try:
                converted.append(from_rlvr(row, index))
            except NotScorable:
                not_scorable += 1
            except ValueError as error:
                raise ValueError(f"dataset {source!r} {error}") from None
        if not_scorable:
            print(f"note: dropped {not_scorable} of {len(rows)} rows of {source} whose verifier asks for 'around N' words "
                  "(their dataset accepts counts within max(round(N/10), 1) of N, which IFEval's checkers cannot score)")
        if not converted:
            raise ValueError(f"dataset {source!r} has no row IFEval's checkers can score")
        rows = converted
    if drop_missing_nltk:
        rows = _without_rows_missing_nltk(rows, source)
    for index, row in enumerate(rows):
        for field in required:
            if field not in row or row[field] is None:
                raise ValueError(f"dataset {source!r} row {index}: missing field {field!r}")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ValueError(f"dataset {source!r} row {index}: field 'prompt' must be a non-empty string")
        if "instruction_id_list" in row:
            problem = instruction_problem(row)
            if problem:
                raise ValueError(f"dataset {source!r} row {index}: {problem}")
    random_letters = [row.get("key", index) for index, row in enumerate(rows) if "instruction_id_list" in row and any(
        official_random_letter(i, k) for i, k in zip(row["instruction_id_list"],
                                                      row.get("kwargs") or [None] * len(row["instruction_id_list"])))]
    if random_letters:
        print(f"note: {len(random_letters)} row(s) of {source} (keys {', '.join(map(str, random_letters[:10]))}) ask for "
              "the frequency of a 'letter' that is not a letter; as IFEval's official checker does, they are scored "
              "against a random letter, drawn here from a fixed seed")
    return rows


def _without_rows_missing_nltk(rows: list[dict], source: str) -> list[dict]:
    kept, dropped = [], {}
    for row in rows:
        ids = row.get("instruction_id_list")
        needing = [i for i in ids if isinstance(i, str) and missing_nltk_data(i)] if isinstance(ids, list) else []
        if needing:
            for instruction_id in needing:
                dropped[instruction_id] = dropped.get(instruction_id, 0) + 1
        else:
            kept.append(row)
    if dropped:
        print(f"note: dropped {len(rows) - len(kept)} of {len(rows)} rows of {source} whose checkers need NLTK data "
              f"that is not installed ({', '.join(f'{i} x{n}' for i, n in sorted(dropped.items()))}); the scores "
              "cover the other rows only")
    if not kept:
        raise ValueError(f"dataset {source!r}: every row needs NLTK data that is not installed")
    return kept


def load_eval_rows(source: str, count: int) -> list[dict]:
    """The first `count` rows of the held-out set; when it has fewer, all of them, said
    in one printed line (and every evaluation records how many prompts it scored)."""
    rows = load_rows(source)
    if len(rows) < count:
        print(f"note: --eval-prompts {count} but {source} has {len(rows)} rows; every evaluation scores those {len(rows)}")
    return rows[:count]


def load_pairs(source: str, hard_labels: bool = False) -> list[dict]:
    """Preference pairs (prompt, chosen, rejected, optional soft `label`), each response
    a string or chat messages (the last message's content), as rows with plain-text
    chosen/rejected and a float label in [0, 1] (1 with no label; with hard_labels 1, pairs
    labelled 0.5 dropped with a printed count).
    A pair with chosen == rejected would train on nothing and is refused."""
    rows = load_rows(source, required=("prompt", "chosen", "rejected"))
    for index, row in enumerate(rows):
        for field in ("chosen", "rejected"):
            value = row[field]
            if isinstance(value, list) and value and isinstance(value[-1], dict):
                value = value[-1].get("content")
            if not isinstance(value, str):  # an empty response is a response (a model may say nothing)
                raise ValueError(f"pairs {source!r} row {index}: field {field!r} must be a string or a list of chat messages")
            row[field] = value
        if row["chosen"] == row["rejected"]:
            raise ValueError(f"pairs {source!r} row {index}: 'chosen' and 'rejected' are the same response")
        label = 1.0 if row.get("label") is None else row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
            raise ValueError(f"pairs {source!r} row {index}: field 'label' must be a probability in [0, 1], got {label!r}")
        row["label"] = float(label)
    if hard_labels:  # a 0.5 pair (a trade-off) states no overall preference to harden
        kept = [row for row in rows if row["label"] != 0.5]
        if len(kept) < len(rows):
            print(f"{source}: {len(rows) - len(kept)} pairs with label 0.5 dropped (hard labels: no overall preference)")
        rows = [{**row, "label": 1.0} for row in kept]
    return rows


def keep_short_prompts(rows: list[dict], tokenizer, max_prompt_tokens: int, on_long: str, source: str) -> list[dict]:
    """The rows whose chat-templated prompt has at most max_prompt_tokens tokens.
    Longer ones are dropped with a printed count (on_long="drop") or stop the run,
    naming the first such row (on_long="error"); max_prompt_tokens <= 0 keeps all."""
    if max_prompt_tokens <= 0:
        return rows
    encoded = tokenizer([chat_prompt(tokenizer, row["prompt"]) for row in rows], add_special_tokens=False)["input_ids"]
    too_long = [index for index, ids in enumerate(encoded) if len(ids) > max_prompt_tokens]
    if too_long and on_long == "error":
        first = too_long[0]
        raise ValueError(f"dataset {source!r} row {first}: prompt has {len(encoded[first])} tokens, more than "
                         f"--max-prompt-tokens {max_prompt_tokens} ({len(too_long)} such rows); raise the limit or "
                         f"pass --long-prompts drop")
    if len(too_long) == len(rows):
        raise ValueError(
            f"dataset {source!r}: all {len(rows)} prompts are longer than --max-prompt-tokens {max_prompt_tokens}"
        )
    if too_long:
        print(f"dropped {len(too_long)} of {len(rows)} prompts of {source!r} longer than "
              f"--max-prompt-tokens {max_prompt_tokens}")
    dropped = set(too_long)
    return [row for index, row in enumerate(rows) if index not in dropped]


def write_expert_cache(path: str | Path, prompts: list[str], responses: list[str], teacher: str,
                       generation: dict, finish_reasons: list[str] | None = None,
                       dropped_prompts: list[str] = ()) -> None:
    """One JSONL line per prompt (with its finish reason, "stop" or "length", when the
    teacher generated it); the first line records who wrote the responses, how, and
    the prompts whose answers were dropped (the teacher was cut at its token limit, or said nothing)."""
    header = {"teacher": teacher, "generation": generation, "num_responses": len(responses),
              "dropped_prompts": list(dropped_prompts)}
    reasons = finish_reasons or [None] * len(responses)
    write_jsonl([{"__header__": header}] + [{"prompt": p, "response": r, **({"finish_reason": f} if f else {})}
                                             for p, r, f in zip(prompts, responses, reasons)], path)


def load_expert_pool(pool_source: str, train_rows: list[dict], cache_path: str,
                     min_prompts: int = 1, why: str = "") -> tuple[list[str], dict, dict]:
    """The prompts whose expert demonstrations a run may use: those of `pool_source`
    (a prompt file or hub id; '' = every training prompt), each covered by the expert
    cache, at least `min_prompts` distinct ones (`why` says what needs them). Returns
    (pool prompts, cache {prompt: response}, cache header)."""
    pool_name = f"--expert-pool {pool_source!r}" if pool_source else "the training prompts"
    try:
        pool = [row["prompt"] for row in (load_rows(pool_source, required=("prompt",)) if pool_source else train_rows)]
    except ValueError as error:
        raise ValueError(f"--expert-pool: {error}") from None
    if len(set(pool)) < min_prompts:
        raise ValueError(f"{pool_name} has {len(set(pool))} distinct prompt(s); at least {min_prompts} are needed ({why})")
    try:
        cache, header = load_expert_cache(cache_path, pool)
    except ValueError as error:
        raise ValueError(f"{error} (the prompts of {pool_name}; --expert-pool '' uses the training prompts)") from None
    covered = with_expert_answers(pool, cache, pool_name)
    if len(set(covered)) < min_prompts:
        raise ValueError(f"{pool_name} has {len(set(covered))} prompt(s) with an expert answer; at least {min_prompts} "
                         f"are needed ({why})")
    return covered, cache, header


def with_expert_answers(prompts: list[str], cache: dict, name: str) -> list[str]:
    """The prompts that have an answer in the cache, in order; those the cache dropped
    (listed in its header) are skipped with one printed note."""
    covered = [prompt for prompt in prompts if prompt in cache]
    if len(covered) < len(prompts):
        print(f"note: {len(prompts) - len(covered)} prompt(s) of {name} skipped: the expert cache dropped their "
              "answers (the teacher was cut at its token limit, or said nothing)")
    return covered


def load_expert_cache(path: str | Path, prompts: list[str] | None = None) -> tuple[dict[str, str], dict]:
    """The cache as {prompt: response} and its header; checks that every prompt in
    `prompts` is covered (or listed in the header as dropped: its teacher answer was cut
    at the token limit, or empty) and names the missing ones otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"expert cache {str(path)!r} does not exist; build it with scripts/build_expert_cache.py")
    header, cache = {}, {}
    with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is not part of the JSON
        for line_number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: not valid JSON") from None
            if not isinstance(record, dict):
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: not a JSON object")
            if "__header__" in record:
                header = record["__header__"]
            elif not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: needs string fields 'prompt' and 'response'")
            elif not record["response"].strip():
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: empty response (nothing to imitate)")
            elif cache.get(record["prompt"], record["response"]) != record["response"]:
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: prompt {record['prompt'][:60]!r} "
                                 "appears earlier with a different response")
            else:
                cache[record["prompt"]] = record["response"]
    dropped = set(header.get("dropped_prompts", []))  # deliberately absent: the callers skip them
    missing = [p for p in (prompts or []) if p not in cache and p not in dropped]
    if missing:
        raise ValueError(f"expert cache {str(path)!r} misses {len(missing)} of {len(prompts)} prompts, "
                         f"for example {missing[0]!r}; rebuild it for this dataset")
    return cache, header


CHAT_ROLES = ("system", "user", "assistant", "tool")


def load_conversations(source: str, tokenizer, assistant_only: bool, max_seq_len: int, packing: bool) -> list[dict]:
    """Chat rows (a `messages` list of {"role", "content"} turns) as training rows of
    token ids, each with `loss` (1 on the tokens the loss covers: every token, or with
    assistant_only the assistant turns the chat template marks with {% generation %})
    and `doc` (which conversation of the row each token belongs to). With packing,
    conversations are concatenated in order into rows of at most max_seq_len tokens;
    without, one per row. A conversation longer than max_seq_len is dropped with a count.
    --system-prompt is put first in a conversation that has no system turn."""
    rows, examples = read_rows(source), []
    for index, row in enumerate(rows):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str) for m in messages):
            raise ValueError(f"dataset {source!r} row {index}: field 'messages' must be a non-empty list of "
                             f"{{'role': one of {', '.join(CHAT_ROLES)}, 'content': text}} turns")
        if assistant_only and not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"dataset {source!r} row {index}: no assistant turn to train on (--assistant-only-loss)")
        system = getattr(tokenizer, "system_prompt", "")
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=assistant_only,
                                                **(getattr(tokenizer, "chat_template_kwargs", None) or {}))
        loss = encoded["assistant_masks"] if assistant_only else [1] * len(encoded["input_ids"])
        if assistant_only and not any(loss):
            raise ValueError(f"--assistant-only-loss: the chat template of the tokenizer marks no assistant tokens "
                             f"(dataset {source!r} row {index}); it needs {{% generation %}} blocks, or drop the flag")
        examples.append({"ids": list(encoded["input_ids"]), "loss": list(loss)})
    kept = [e for e in examples if len(e["ids"]) <= max_seq_len]
    if not kept:
        raise ValueError(f"dataset {source!r}: every conversation is longer than --max-seq-len {max_seq_len}")
    if len(kept) < len(examples):
        print(f"dropped {len(examples) - len(kept)} of {len(examples)} conversations of {source!r} longer than "
              f"--max-seq-len {max_seq_len}")
    packed = []
    for example in kept:
        if packing and packed and len(packed[-1]["ids"]) + len(example["ids"]) <= max_seq_len:
            row = packed[-1]
            row["doc"] += [row["doc"][-1] + 1] * len(example["ids"])
            row["ids"] += example["ids"]
            row["loss"] += example["loss"]
        else:
            packed.append({**example, "doc": [0] * len(example["ids"])})
    return packed


def conversation_batch(rows: list[dict], pad_token_id: int, device) -> tuple:
    """Right-padded ids, doc and loss tensors [B, L] of training rows (load_conversations);
    padding has doc -1 and loss 0."""
    width = max(len(row["ids"]) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    doc = torch.full((len(rows), width), -1, dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row["ids"])] = torch.tensor(row["ids"])
        doc[i, :len(row["ids"])] = torch.tensor(row["doc"])
        loss[i, :len(row["ids"])] = torch.tensor(row["loss"])
    return ids.to(device), doc.to(device), loss.to(device)



def expert_micro_batches(tokenizer, prompts: list[str], cache: dict, parts: int, device):
    """The expert demonstrations of `prompts` (this rank's), encoded and split into
    `parts` contiguous micro-batches (None for an empty one), and the whole batch's
    expert token count over every rank: a tensor, not a float, so that a compiled loss
    does not recompile for every new count."""
    chunks = [part.tolist() for part in torch.tensor_split(torch.arange(len(prompts)), parts)]
    batches = [encode_prompt_response(tokenizer, [prompts[i] for i in chunk], [cache[prompts[i]] for i in chunk], device)
               if chunk else None for chunk in chunks]
    count = all_sum(sum((batch[2].sum() for batch in batches if batch is not None), torch.zeros((), device=device)))
    return batches, count
