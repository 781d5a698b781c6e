"""Prompt datasets (local JSONL or any hub dataset, through `datasets`) and the
expert cache (pre-collected expert responses keyed by prompt)."""

import json
from pathlib import Path

from datasets import load_dataset

from shared.ifeval import from_rlvr
from shared.modeling import chat_prompt
from shared.toyworld import write_jsonl


def load_rows(source: str, split: str = "train", required: tuple[str, ...] = ("prompt", "instruction_id_list")) -> list[dict]:
    """Rows from a .json/.jsonl file or a hub dataset id, validated field by field.
    IFEval-style rows (prompt, instruction_id_list, kwargs) are read as they are;
    RLVR-IFeval rows (messages, ground_truth) are converted to that schema."""
    if source.endswith((".json", ".jsonl")) and not Path(source).exists():
        raise ValueError(f"dataset file {source!r} does not exist")
    if source.endswith((".json", ".jsonl")) and not Path(source).read_text().strip():
        raise ValueError(f"dataset {source!r} has no rows")
    try:
        if source.endswith((".json", ".jsonl")):
            dataset = load_dataset("json", data_files=source, split="train")
        else:
            dataset = load_dataset(source, split=split)
    except Exception as error:  # broken JSON, mixed column types, unknown hub id: datasets wraps them all
        cause = (str(error.__cause__ or error).strip().splitlines() or [type(error.__cause__ or error).__name__])[0]
        raise ValueError(f"dataset {source!r} could not be read: {cause}") from None
    rows = dataset.to_list()
    if not rows:
        raise ValueError(f"dataset {source!r} has no rows")
    if "prompt" not in rows[0] and "ground_truth" in rows[0]:  # allenai/RLVR-IFeval: messages + ground_truth
        try:
            rows = [from_rlvr(row, index) for index, row in enumerate(rows)]
        except ValueError as error:
            raise ValueError(f"dataset {source!r} {error}") from None
    for index, row in enumerate(rows):
        for field in required:
            if field not in row or row[field] is None:
                raise ValueError(f"dataset {source!r} row {index}: missing field {field!r}")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise ValueError(f"dataset {source!r} row {index}: field 'prompt' must be a non-empty string")
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
        raise ValueError(f"dataset {source!r}: all {len(rows)} prompts are longer than --max-prompt-tokens {max_prompt_tokens}")
    if too_long:
        print(f"dropped {len(too_long)} of {len(rows)} prompts of {source!r} longer than "
              f"--max-prompt-tokens {max_prompt_tokens}")
    dropped = set(too_long)
    return [row for index, row in enumerate(rows) if index not in dropped]


def write_expert_cache(path: str | Path, prompts: list[str], responses: list[str], teacher: str,
                       generation: dict) -> None:
    """One JSONL line per prompt; the first line records who wrote the responses and how."""
    header = {"teacher": teacher, "generation": generation, "num_responses": len(responses)}
    write_jsonl([{"__header__": header}] + [{"prompt": p, "response": r} for p, r in zip(prompts, responses)], path)


def load_expert_cache(path: str | Path, prompts: list[str] | None = None) -> tuple[dict[str, str], dict]:
    """The cache as {prompt: response} and its header; checks that every prompt in
    `prompts` is covered and names the missing ones otherwise."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"expert cache {str(path)!r} does not exist; build it with scripts/build_expert_cache.py")
    header, cache = {}, {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: not valid JSON") from None
            if "__header__" in record:
                header = record["__header__"]
            elif not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
                raise ValueError(f"expert cache {str(path)!r} line {line_number}: needs string fields 'prompt' and 'response'")
            else:
                cache[record["prompt"]] = record["response"]
    missing = [p for p in (prompts or []) if p not in cache]
    if missing:
        raise ValueError(f"expert cache {str(path)!r} misses {len(missing)} of {len(prompts)} prompts, "
                         f"for example {missing[0]!r}; rebuild it for this dataset")
    return cache, header
