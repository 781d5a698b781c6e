"""scripts/score_responses.py: IFEval's four numbers for responses made anywhere,
counted by hand here; one error line for a response file that does not match."""

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_main

sys.path.insert(0, str(ROOT / "scripts"))
import score_responses  # noqa: E402

ROWS = [
    {"key": 1, "prompt": "Answer in lowercase, no commas.",
     "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"], "kwargs": [{}, {}]},
    {"key": 2, "prompt": "Write at least 3 words.",
     "instruction_id_list": ["length_constraints:number_words"], "kwargs": [{"num_words": 3, "relation": "at least"}]},
    {"key": 3, "prompt": "Two bullets.", "instruction_id_list": ["detectable_format:number_bullet_lists"],
     "kwargs": [{"num_bullets": 2}]},
    {"key": 4, "prompt": "Use three sentences.", "instruction_id_list": ["length_constraints:number_sentences"],
     "kwargs": [{"num_sentences": 3, "relation": "at least"}]},
]
RESPONSES = {
    "Answer in lowercase, no commas.": "hello, world",  # lowercase yes, no-comma no
    "Write at least 3 words.": "two words",  # no
    "Two bullets.": "* a\n* b\n* ",  # raw: 3 bullets (strict no); without the last line: 2 (loose yes)
    "Use three sentences.": "One. Two. Three.",
}


def write(tmp_path, rows, responses):
    data, answers = tmp_path / "rows.jsonl", tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in responses.items()))
    return str(data), str(answers)


@pytest.fixture
def no_nltk_data(tmp_path, monkeypatch):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])


def test_four_numbers_and_verdicts_counted_by_hand(tmp_path, no_nltk_data):
    data, answers = write(tmp_path, ROWS[:3], {p: RESPONSES[p] for p in [r["prompt"] for r in ROWS[:3]]})
    out = tmp_path / "verdicts.jsonl"
    summary = score_responses.main(score_responses.Args(data=data, responses=answers, out=str(out)))
    # instructions: lowercase yes/yes, no_comma no/no, words no/no, bullets no/yes
    assert summary == pytest.approx({"rows": 3, "prompt_strict": 0 / 3, "instruction_strict": 1 / 4,
                                     "prompt_loose": 1 / 3, "instruction_loose": 2 / 4})
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["strict"] for line in lines] == [[True, False], [False], [False]]
    assert [line["loose"] for line in lines] == [[True, False], [False], [True]]


def test_rows_needing_missing_nltk_data_are_refused_or_dropped_by_flag(tmp_path, no_nltk_data, capsys):
    data, answers = write(tmp_path, ROWS, RESPONSES)
    with pytest.raises(SystemExit, match="^error: .*row 3: .*NLTK data punkt_tab, which is not installed"):
        score_responses.main(score_responses.Args(data=data, responses=answers))
    summary = score_responses.main(score_responses.Args(data=data, responses=answers, drop_rows_missing_nltk=True))
    assert summary["rows"] == 3
    printed = capsys.readouterr().out
    assert "dropped 1 of 4 rows" in printed and "length_constraints:number_sentences x1" in printed


@pytest.mark.parametrize("change, expected", [
    ("missing", "has no response for 1 prompt(s)"),
    ("extra", "has 1 prompt(s) that are not in --data"),
    ("bad json", "line 2: not valid JSON"),
    ("no response field", "line 1: needs a string 'prompt' and a string 'response'"),
    ("conflicting duplicate", "line 4: a second, different response for the prompt 'Two bullets.'"),
    ("identical duplicate", None),
])
def test_a_response_file_that_does_not_match_gets_one_error_line(tmp_path, change, expected, no_nltk_data):
    responses = {p: RESPONSES[p] for p in [r["prompt"] for r in ROWS[:3]]}
    if change == "missing":
        responses.pop("Two bullets.")
    if change == "extra":
        responses["Something else."] = "x"
    data, answers = write(tmp_path, ROWS[:3], responses)
    if change == "bad json":
        Path(answers).write_text(Path(answers).read_text().replace('{"prompt": "Write', '{"prompt: "Write'))
    if change == "no response field":
        Path(answers).write_text(json.dumps({"prompt": "Two bullets.", "text": "x"}) + "\n")
    if change.endswith("duplicate"):
        again = RESPONSES["Two bullets."] + ("" if change == "identical duplicate" else " (edited)")
        Path(answers).write_text(Path(answers).read_text() + json.dumps({"prompt": "Two bullets.", "response": again}) + "\n")
    if expected is None:  # the same response twice is one response
        assert score_responses.main(score_responses.Args(data=data, responses=answers))["rows"] == 3
        return
    with pytest.raises(SystemExit) as stop:
        score_responses.main(score_responses.Args(data=data, responses=answers))
    assert str(stop.value).startswith("error: ") and expected in str(stop.value) and "\n" not in str(stop.value)


def test_command_line_prints_the_four_numbers_last(tmp_path, capsys, monkeypatch):
    data, answers = write(tmp_path, ROWS[:2], {p: RESPONSES[p] for p in [r["prompt"] for r in ROWS[:2]]})
    nltk = pytest.importorskip("nltk")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))  # no punkt anywhere: the same answer on every machine
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nltk read NLTK_DATA when this process imported it
    capsys.readouterr()
    assert run_main("scripts/score_responses.py", "--data", data, "--responses", answers) in (None, 0)
    assert capsys.readouterr().out.strip().splitlines()[-1] == ("prompt_strict=0.0000 instruction_strict=0.3333 "
                                                                 "prompt_loose=0.0000 instruction_loose=0.3333")
