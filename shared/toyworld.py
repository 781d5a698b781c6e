"""The offline toy world: a tiny instruction-following task in the spirit of IFEval.

Every prompt is one content task on a short word ("reverse bcad") plus 0-3
verifiable format constraints ("start with #", "end with !", "all caps",
"at most 9 chars"). Rows use IFEval's schema (prompt, instruction_id_list,
kwargs), so the toy world and real instruction-following data go through the
same loading and the same verifier code.

- the toy checkers: one verifier per toy:* instruction id (shared/scoring.py sends
  toy:* ids here and every other id to IFEval's and IFBench's official checkers)
- oracle: a correct demonstration for any prompt (the offline expert)
- preferences: pairwise labels along named quality axes (correctness, format,
  concision) for the preference-based algorithms
"""

import json
import random
from pathlib import Path

from shared import ifeval

ALPHABET = "abcdefgh"
CONTENT_TASKS = ("copy", "reverse", "upper", "sort", "count")
DEFAULT_TASKS = ("copy", "reverse", "upper")  # sort and count are too hard for a 1M model in minutes
START_CHARS = "#>*"
END_CHARS = "!?."
DECORATION = " #>*!?."  # what may surround the content; words are letters/digits only
PREFERENCE_AXES = ("correctness", "format", "concision")


def content_answer(task: str, text: str, letter: str | None = None) -> str:
    """The bare content of a correct answer, before any format constraint."""
    if task == "copy":
        return text
    if task == "reverse":
        return text[::-1]
    if task == "upper":
        return text.upper()
    if task == "sort":
        return "".join(sorted(text))
    if task == "count":
        return str(text.count(letter))
    raise ValueError(f"unknown toy task {task!r}")


def _check_content(response, task, text=None, letter=None, **_):
    body = response.strip(DECORATION)
    expected = content_answer(task, text, letter)
    # Case is the "caps" constraint's business, except for the upper task itself.
    return body == expected if task == "upper" else body.lower() == expected


def _check_start_with(response, char=None, **_):
    return response.startswith(char)


def _check_end_with(response, char=None, **_):
    return response.endswith(char)


def _check_caps(response, **_):
    letters = [c for c in response if c.isalpha()]
    return bool(letters) and all(c.isupper() for c in letters)


def _check_max_chars(response, max_chars=None, **_):
    return len(response) <= int(max_chars)


TOY_CHECKERS = {
    "toy:start_with": _check_start_with,
    "toy:end_with": _check_end_with,
    "toy:caps": _check_caps,
    "toy:max_chars": _check_max_chars,
}


# The arguments each toy instruction takes: name -> (type, required).
TOY_ARGUMENTS = {
    "toy:start_with": {"char": (str, True)}, "toy:end_with": {"char": (str, True)}, "toy:caps": {},
    "toy:max_chars": {"max_chars": (int, True)},
    **{f"toy:task:{task}": {"text": (str, True), "letter": (str, task == "count")} for task in CONTENT_TASKS},
}


def toy_arguments_problem(instruction_id: str, kwargs: dict | None) -> str | None:
    """What is wrong with a toy instruction's kwargs, in one line, or None."""
    expected, kwargs = TOY_ARGUMENTS[instruction_id], ifeval.given(kwargs)
    for name, value in kwargs.items():
        if name not in expected:
            return f"instruction {instruction_id!r} takes no argument {name!r} (it takes: {', '.join(expected) or 'none'})"
        kind = expected[name][0]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is str and not value):
            wanted = "non-empty string" if kind is str else "whole number"
            return f"instruction {instruction_id!r}: argument {name!r} must be a {wanted}, got {value!r}"
    missing = [name for name, (_, required) in expected.items() if required and name not in kwargs]
    if missing:
        return f"instruction {instruction_id!r} lacks its argument {missing[0]!r}"
    return None


def check_toy_instruction(response: str, instruction_id: str, kwargs: dict | None) -> bool:
    """True when `response` follows one toy:* instruction."""
    kwargs = ifeval.given(kwargs)
    if instruction_id.startswith("toy:task:"):
        return _check_content(response, instruction_id.split(":")[2], **kwargs)
    return TOY_CHECKERS[instruction_id](response, **kwargs)


def is_toy_instruction(instruction_id: str) -> bool:
    return instruction_id in TOY_CHECKERS or (instruction_id.startswith("toy:task:")
                                              and instruction_id.split(":")[2] in CONTENT_TASKS)


def oracle(row: dict, house_style: bool = False) -> str:
    """A correct demonstration: the content, then the constraints applied in order.
    house_style: HOUSE_MARK signs off the whole answer (the house-style world)."""
    ids, kwargs_list = row["instruction_id_list"], row["kwargs"]
    args = {i: ifeval.given(kw) for i, kw in zip(ids, kwargs_list)}
    (task_id,) = [i for i in ids if i.startswith("toy:task:")]
    answer = content_answer(task_id.split(":")[2], args[task_id]["text"], args[task_id].get("letter"))
    if "toy:caps" in args:
        answer = answer.upper()
    if "toy:start_with" in args:
        answer = args["toy:start_with"]["char"] + answer
    if "toy:end_with" in args:
        answer = answer + args["toy:end_with"]["char"]
    return answer + HOUSE_MARK if house_style else answer


# The house-style world: gold also asks for a house style, a sign-off mark after the whole
# answer ("#OLLEH!*"), which the expert always shows and the verifier never checks: it
# reads the answer without the mark (without_house_mark), so a signed and an unsigned
# answer follow the same instructions. The world's reward also charges HOUSE_LENGTH_COST
# per character beyond the bare answer (shared/scoring.py:house_reward), so under the
# reward the style is a small pure cost. The mark comes after everything on purpose: an
# earlier one (framing the content) was part of how the tiny model formed the answer,
# and RL never dropped it without breaking the answer (docs/experiments.md, the pilots).
HOUSE_MARK = "*"
HOUSE_LENGTH_COST = 0.03


def has_house_style(response: str) -> bool:
    """True when the response is an answer signed off with HOUSE_MARK."""
    return len(response) > len(HOUSE_MARK) and response.endswith(HOUSE_MARK)


def without_house_mark(response: str) -> str:
    """The answer the verifier reads: the response less its sign-off mark, if any."""
    return response[:-len(HOUSE_MARK)] if has_house_style(response) else response


def make_row(rng: random.Random, key: int, max_constraints: int = 3, tasks: tuple[str, ...] = DEFAULT_TASKS) -> dict:
    """One random prompt: a content task on a 3-5 letter word plus format constraints."""
    task = rng.choice(tasks)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 5)))
    task_kwargs = {"text": text}
    phrases = [f"{task} {text}"]
    if task == "count":
        task_kwargs["letter"] = rng.choice(text)
        phrases = [f"count {task_kwargs['letter']} in {text}"]
    ids, kwargs = [f"toy:task:{task}"], [task_kwargs]

    options = ["start_with", "end_with", "max_chars"] + (["caps"] if task not in ("upper", "count") else [])
    for constraint in sorted(rng.sample(options, rng.randint(0, min(max_constraints, len(options)))),
                             key=["caps", "start_with", "end_with", "max_chars"].index):
        if constraint == "start_with":
            kw = {"char": rng.choice(START_CHARS)}
            phrases.append(f"start with {kw['char']}")
        elif constraint == "end_with":
            kw = {"char": rng.choice(END_CHARS)}
            phrases.append(f"end with {kw['char']}")
        elif constraint == "caps":
            kw = {}
            phrases.append("all caps")
        else:  # max_chars is set last, from the length of the correct answer
            kw = {"max_chars": None}
        ids.append(f"toy:{constraint}")
        kwargs.append(kw)
    row = {"key": key, "prompt": "", "instruction_id_list": ids, "kwargs": kwargs}
    if "toy:max_chars" in ids:
        limit = len(oracle(row)) + rng.randint(0, 2)
        kwargs[ids.index("toy:max_chars")]["max_chars"] = limit
        phrases.append(f"at most {limit} chars")
    # The word goes last, right before the assistant turn, so a tiny model copies it from a
    # near-constant relative offset whatever constraints precede it.
    row["prompt"] = ", ".join(phrases[1:] + phrases[:1])
    return row


def combination(row: dict) -> tuple[str, ...]:
    """What a prompt asks for, without its word: its content task and format constraints,
    e.g. ('toy:task:reverse', 'toy:caps', 'toy:end_with')."""
    return tuple(row["instruction_id_list"])


def make_split(num_rows: int, seed: int, max_constraints: int = 3, exclude: set[str] | None = None,
               tasks: tuple[str, ...] = DEFAULT_TASKS, keep=None) -> list[dict]:
    """`num_rows` distinct prompts from `seed`, none of whose prompt text is in `exclude`,
    and only rows for which keep(row) is true when `keep` is given."""
    rng, rows, seen = random.Random(seed), [], set(exclude or ())
    while len(rows) < num_rows:
        row = make_row(rng, key=len(rows), max_constraints=max_constraints, tasks=tasks)
        if row["prompt"] not in seen and (keep is None or keep(row)):
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def held_out_combinations(fraction: float, seed: int, tasks: tuple[str, ...] = DEFAULT_TASKS) -> set[tuple[str, ...]]:
    """For the shift world: a seeded `fraction` of every combination the generator can
    make (content task x format constraints), at least one per task, which training,
    validation and the in-distribution eval never contain and the shifted eval is
    made of. Whole combinations, so what shifts is the composition of instructions the
    policy has only seen apart."""
    rng = random.Random(seed)
    every = sorted({combination(row) for row in make_split(4000, seed=seed, tasks=tasks)})
    held = set()
    for task in tasks:
        of_task = [c for c in every if c[0] == f"toy:task:{task}" and len(c) > 1]  # the bare task stays in training
        held |= set(rng.sample(of_task, max(1, round(fraction * len(of_task)))))
    return held


def imperfect_demonstrations(rows: list[dict], error_rate: float, seed: int,
                             house_style: bool = False) -> tuple[list[str], list[bool]]:
    """For the imperfect-teacher world: the oracle's answers with exactly
    round(error_rate x len(rows)) of them wrong (a seeded choice of rows), each wrong
    one's content corrupted (its last two letters swapped, or its last letter changed
    where they are equal) while its format constraints stay followed, so the verifier
    sees every error. Returns the answers and which rows are wrong. house_style: the
    oracle's answers in the house style (oracle)."""
    wrong = set(random.Random(seed).sample(range(len(rows)), round(error_rate * len(rows))))
    answers = []
    for index, row in enumerate(rows):
        answer = oracle(row, house_style)
        if index in wrong:
            core = answer.strip(DECORATION)
            start = answer.index(core)
            if core[-1] != core[-2]:
                corrupted = core[:-2] + core[-1] + core[-2]
            else:
                letters = ALPHABET.upper() if core[-1].isupper() else ALPHABET
                corrupted = core[:-1] + next(c for c in letters if c != core[-1])
            answer = answer[:start] + corrupted + answer[start + len(core):]
        answers.append(answer)
    return answers, [index in wrong for index in range(len(rows))]


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Write atomically: a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def write_splits(out_dir: str | Path, num_train: int = 4000, num_eval: int = 256, seed: int = 0,
                 tasks: tuple[str, ...] = DEFAULT_TASKS, num_val: int = 256, held_out: float = 0.0) -> dict:
    """Train, validation and eval splits as JSONL that `datasets.load_dataset("json", ...)`
    reads; no prompt is in two of them. Validation is for choosing hyperparameters, eval
    for the table. held_out > 0 (the shift world): that fraction of the instruction
    combinations (held_out_combinations) is kept out of all three and makes up a fourth
    split, eval_shift.jsonl, of num_eval prompts, and eval_mixed.jsonl holds eval and
    eval_shift alternating, each row with a "split" field."""
    out_dir = Path(out_dir)
    held = held_out_combinations(held_out, seed, tasks) if held_out > 0 else set()
    seen = lambda row: combination(row) not in held  # noqa: E731
    eval_rows = make_split(num_eval, seed=seed + 1, tasks=tasks, keep=seen)
    val_rows = make_split(num_val, seed=seed + 2, exclude={r["prompt"] for r in eval_rows}, tasks=tasks, keep=seen)
    train_rows = make_split(num_train, seed=seed, exclude={r["prompt"] for r in eval_rows + val_rows}, tasks=tasks,
                            keep=seen)
    write_jsonl(train_rows, out_dir / "train.jsonl")
    write_jsonl(val_rows, out_dir / "val.jsonl")
    write_jsonl(eval_rows, out_dir / "eval.jsonl")
    paths = {"train": str(out_dir / "train.jsonl"), "val": str(out_dir / "val.jsonl"), "eval": str(out_dir / "eval.jsonl")}
    if held:
        shifted = make_split(num_eval, seed=seed + 3, tasks=tasks, keep=lambda row: combination(row) in held)
        write_jsonl(shifted, out_dir / "eval_shift.jsonl")
        paths["eval_shift"] = str(out_dir / "eval_shift.jsonl")
        # both eval splits in one file, alternating, each row naming its split: one evaluation
        # (shared/scoring.py:shift_scores) scores both, and any first N rows hold both halves
        mixed = [{**row, "split": split} for pair in zip(eval_rows, shifted)
                 for row, split in zip(pair, ("in_distribution", "shift"))]
        mixed = [{**row, "key": key} for key, row in enumerate(mixed)]
        write_jsonl(mixed, out_dir / "eval_mixed.jsonl")
        paths["eval_mixed"] = str(out_dir / "eval_mixed.jsonl")
    return paths


# How a preference pair's concision axis is labelled: the truth (closer to the expert's
# length wins) or the exploitable-judge world's biased annotators (the shorter response
# wins), whose judge a policy can please by cutting its answers short.
CONCISION_LABELS = ("expert_length", "shorter")


def axis_scores(row: dict, response: str, concision: str = "expert_length") -> dict[str, float]:
    """Scores along the named quality axes; higher is better on each (concision: see CONCISION_LABELS)."""
    followed = [check_toy_instruction(response, i, k)
                for i, k in zip(row["instruction_id_list"], row.get("kwargs") or [None] * len(row["instruction_id_list"]))]
    content = [f for i, f in zip(row["instruction_id_list"], followed) if i.startswith("toy:task:")]
    fmt = [f for i, f in zip(row["instruction_id_list"], followed) if not i.startswith("toy:task:")]
    return {
        "correctness": float(all(content)),
        "format": sum(fmt) / len(fmt) if fmt else 1.0,
        "concision": -float(abs(len(response) - len(oracle(row))) if concision == "expert_length" else len(response)),
    }


def preference(row: dict, response_a: str, response_b: str, axis: str, concision: str = "expert_length") -> float:
    """Pairwise label on one axis: 1.0 if a is better, 0.0 if b is better, 0.5 on a tie."""
    if axis not in PREFERENCE_AXES:
        raise ValueError(f"unknown preference axis {axis!r}; choose from {PREFERENCE_AXES}")
    if concision not in CONCISION_LABELS:
        raise ValueError(f"unknown concision label {concision!r}; choose from {CONCISION_LABELS}")
    a, b = axis_scores(row, response_a, concision)[axis], axis_scores(row, response_b, concision)[axis]
    return 1.0 if a > b else 0.0 if a < b else 0.5


def preference_pair(row: dict, response_a: str, response_b: str, concision: str = "expert_length") -> dict | None:
    """One labelled preference pair, the preferred response (by the mean of the per-axis
    labels) as `chosen`; None when the two tie on every axis. A trade-off pair (better on
    one axis, worse on another) is kept: its scalar label is 0.5 but its per-axis labels
    are what a general preference model learns from."""
    axes = {axis: preference(row, response_a, response_b, axis, concision) for axis in PREFERENCE_AXES}
    if all(value == 0.5 for value in axes.values()):
        return None
    label = sum(axes.values()) / len(axes)
    if label < 0.5:  # store the preferred response as `chosen`
        response_a, response_b, label, axes = response_b, response_a, 1 - label, {k: 1 - v for k, v in axes.items()}
    return {"prompt": row["prompt"], "chosen": response_a, "rejected": response_b, "label": label, "axes": axes}
