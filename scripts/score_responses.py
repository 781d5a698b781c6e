"""Score responses that were generated anywhere (not only by a model trained here)
with IFEval's four numbers, by the official checkers under Google's rule.

    python scripts/score_responses.py --data google/IFEval --responses my_responses.jsonl --out verdicts.jsonl

--data: rows with IFEval's fields (prompt, instruction_id_list, kwargs), a .jsonl path
or a hub dataset id (IFBench_test rows too). --responses: .jsonl with `prompt` and
`response` on every line, one line per row of --data (the format of the response files
Google published beside IFEval). The last printed line is

    prompt_strict=0.XXXX instruction_strict=0.XXXX prompt_loose=0.XXXX instruction_loose=0.XXXX

--out writes one line per row: the prompt, each instruction's strict and loose verdict.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import tyro

from shared.data import load_rows
from shared.flags import check_output_file
from shared.runfolder import write_json
from shared.scoring import instruction_scores, instruction_verdicts


@dataclass
class Args:
    data: str = "google/IFEval"
    """rows to score against: .jsonl path or hub dataset id with prompt, instruction_id_list, kwargs"""
    responses: str = ""
    """.jsonl with a `prompt` and a `response` per line, one line per row of --data"""
    out: str = ""
    """optional .jsonl of per-row verdicts"""
    summary: str = ""
    """optional .json of the four numbers"""
    split: str = "train"
    """split of a hub dataset (google/IFEval has only train)"""
    strip_think: bool = False
    """drop a reasoning model's <think>...</think> block before checking (off: the official numbers)"""
    drop_rows_missing_nltk: bool = False
    """score only the rows whose checkers' NLTK data is installed, printing which were dropped (a partial score)"""


def read_responses(path: str) -> dict[str, str]:
    """prompt -> response, with one error line for a malformed file."""
    if not Path(path).is_file():
        raise ValueError(f"--responses {path!r} does not exist")
    responses = {}
    text = Path(path).read_text(encoding="utf-8-sig")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--responses {path!r} line {number}: not valid JSON ({error.msg})") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prompt"), str)
            or not isinstance(record.get("response"), str)
        ):
            raise ValueError(f"--responses {path!r} line {number}: needs a string 'prompt' and a string 'response'")
        if record["prompt"] in responses and responses[record["prompt"]] != record["response"]:
            raise ValueError(f"--responses {path!r} line {number}: a second, different response for the prompt "
                             f"{record['prompt'][:60]!r}")
        responses[record["prompt"]] = record["response"]
    if not responses:
        raise ValueError(f"--responses {path!r} has no responses")
    return responses


def match(rows: list[dict], responses: dict[str, str], path: str) -> list[str]:
    """The response of every row, in row order; a missing or an extra prompt is an error."""
    prompts = {row["prompt"] for row in rows}
    missing = [row["prompt"] for row in rows if row["prompt"] not in responses]
    extra = [prompt for prompt in responses if prompt not in prompts]
    if missing:
        raise ValueError(f"--responses {path!r} has no response for {len(missing)} prompt(s) of --data, "
                         f"e.g. {missing[0][:80]!r}")
    if extra:
        raise ValueError(f"--responses {path!r} has {len(extra)} prompt(s) that are not in --data, e.g. {extra[0][:80]!r}")
    return [responses[row["prompt"]] for row in rows]


def main(args: Args) -> dict:
    if not args.responses:
        raise SystemExit("error: --responses is required (a .jsonl with 'prompt' and 'response')")
    inputs = {"--responses": args.responses, "--data": args.data}
    if args.out:
        check_output_file(args.out, "--out", inputs)
    if args.summary:
        check_output_file(args.summary, "--summary", {**inputs, "--out": args.out})
    try:
        responses = read_responses(args.responses)
        rows = load_rows(args.data, split=args.split, drop_missing_nltk=args.drop_rows_missing_nltk)
        if args.drop_rows_missing_nltk:
            responses = {p: r for p, r in responses.items() if p in {row["prompt"] for row in rows}}
        texts = match(rows, responses, args.responses)
        scores = instruction_scores(rows, texts, strip_think=args.strip_think)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.out:
        with open(args.out, "w") as f:
            for row, text in zip(rows, texts):
                verdicts = instruction_verdicts(row, text, args.strip_think)
                f.write(json.dumps({"prompt": row["prompt"], "instruction_id_list": row["instruction_id_list"],
                                    "strict": [s for s, _ in verdicts], "loose": [l for _, l in verdicts],
                                    "prompt_strict": all(s for s, _ in verdicts),
                                    "prompt_loose": all(l for _, l in verdicts)}) + "\n")
    summary = {"rows": len(rows), "prompt_strict": scores["gold"], "instruction_strict": scores["instruction_strict"],
               "prompt_loose": scores["gold_loose"], "instruction_loose": scores["instruction_loose"]}
    if args.summary:
        write_json(Path(args.summary), summary)
    print(f"prompt_strict={summary['prompt_strict']:.4f} instruction_strict={summary['instruction_strict']:.4f} "
          f"prompt_loose={summary['prompt_loose']:.4f} instruction_loose={summary['instruction_loose']:.4f}")
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
