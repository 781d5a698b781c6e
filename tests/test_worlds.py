"""The diagnostic worlds' data, each checked for the property it is built to have: the
imperfect teacher is wrong on exactly the stated fraction, in a way the verifier sees;
the shifted eval split shares no instruction combination with training."""

import json

import pytest
from conftest import run_main

from shared import scoring, toyworld
from shared.data import load_expert_cache


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_the_imperfect_teacher_is_wrong_on_exactly_the_stated_fraction(rate):
    rows = toyworld.make_split(300, seed=4)
    answers, wrong = toyworld.imperfect_demonstrations(rows, rate, seed=9)
    assert sum(wrong) == round(rate * len(rows))
    for row, answer, is_wrong in zip(rows, answers, wrong):
        verdicts = dict(zip(row["instruction_id_list"], (strict for strict, _ in scoring.instruction_verdicts(row, answer))))
        content = verdicts.pop(row["instruction_id_list"][0])
        assert content != is_wrong and all(verdicts.values()), (row["prompt"], answer)  # only the content is wrong
        assert scoring.gold(row, answer) == float(not is_wrong)
    assert toyworld.imperfect_demonstrations(rows, rate, seed=9) == (answers, wrong)  # the same draw from the same seed


def test_the_imperfect_cache_records_its_errors(tiny_world, tmp_path):
    out = tmp_path / "cache.jsonl"
    assert run_main("scripts/build_expert_cache.py", "--data", tiny_world["train"], "--out", str(out),
                    "--oracle-error-rate", "0.25", "--oracle-seed", "3") is None
    rows = [json.loads(line) for line in open(tiny_world["train"])]
    cache, header = load_expert_cache(out)
    assert header["generation"]["wrong"] == 16 and header["generation"]["error_rate"] == 0.25
    assert sum(scoring.gold(row, cache[row["prompt"]]) == 0.0 for row in rows) == 16


@pytest.mark.parametrize("flags, message", [
    (["--oracle-error-rate", "1.5"], "error: --oracle-error-rate must be in [0.0, 1.0], got 1.5"),
    (["--oracle-error-rate", "0.2", "--teacher", "some/model"], "needs --teacher oracle"),
])
def test_bad_imperfect_teacher_flags_are_one_line(tmp_path, flags, message):
    code = run_main("scripts/build_expert_cache.py", "--out", str(tmp_path / "cache.jsonl"), *flags)
    assert isinstance(code, str) and message in code and not (tmp_path / "cache.jsonl").exists()


def test_the_shifted_split_shares_no_combination_with_training(tmp_path):
    paths = toyworld.write_splits(tmp_path, num_train=600, num_eval=64, num_val=32, seed=2, held_out=0.25)
    splits = {name: [json.loads(line) for line in open(path)] for name, path in paths.items()}
    held = toyworld.held_out_combinations(0.25, seed=2)
    seen = {toyworld.combination(row) for name in ("train", "val", "eval") for row in splits[name]}
    shifted = {toyworld.combination(row) for row in splits["eval_shift"]}
    assert shifted and shifted <= held and not shifted & seen
    for task in toyworld.DEFAULT_TASKS:  # every task is still trained, and shifted
        assert (f"toy:task:{task}",) in seen and any(c[0] == f"toy:task:{task}" for c in shifted)
    prompts = [row["prompt"] for rows in splits.values() for row in rows]
    assert len(prompts) == len(set(prompts)) and len(splits["eval_shift"]) == 64


def test_bad_held_out_fraction_is_one_line(tmp_path):
    code = run_main("scripts/build_toy_world.py", "--held-out-combinations", "1", "--data-dir", str(tmp_path / "d"),
                    "--model-dir", str(tmp_path / "m"))
    assert code == "error: --held-out-combinations must be in [0, 1), got 1.0" and not (tmp_path / "d").exists()
