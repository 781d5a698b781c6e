"""The diagnostic worlds' data, each checked for the property it is built to have: the
plain world (the negative control) gives no method a failure to fix; the imperfect
teacher is wrong on exactly the stated fraction, in a way the verifier sees;
the shifted eval split shares no instruction combination with training; the judge
world's concision labels pay a scripted policy that cuts its answers short, which gold
and the true axes charge for."""

import json

import pytest
from conftest import run_main

from shared import scoring, toyworld
from shared.data import load_expert_cache


def test_the_plain_world_leaves_no_failure_to_fix(tmp_path):
    """The plain world's data as scripts/reproduce.py --world plain builds them (--num-eval 1024)."""
    paths = toyworld.write_splits(tmp_path, num_eval=1024)
    splits = {name: [json.loads(line) for line in open(path)] for name, path in paths.items()}
    # an exact teacher: its demonstration is right on every prompt of every split
    assert all(scoring.gold(row, toyworld.oracle(row)) == 1.0 for rows in splits.values() for row in rows)
    # the reward checks every check gold makes: on right and broken answers alike, full reward exactly when gold is 1
    for row in splits["eval"][:300]:
        answer = toyworld.oracle(row)
        for response in (answer, answer[:-1], answer + answer[-1], answer.lower(), answer[::-1], "", "x" * 30):
            assert (scoring.reward(row, response) == 1.0) == (scoring.gold(row, response) == 1.0), (row, response)
    # eval is i.i.d. with training: every instruction combination it asks for is one RL trains on
    trained = {toyworld.combination(row) for row in splits["train"]}
    assert {toyworld.combination(row) for row in splits["eval"]} <= trained


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
    prompts = [row["prompt"] for name, rows in splits.items() if name != "eval_mixed" for row in rows]
    assert len(prompts) == len(set(prompts)) and len(splits["eval_shift"]) == 64


def test_bad_held_out_fraction_is_one_line(tmp_path):
    code = run_main("scripts/build_toy_world.py", "--held-out-combinations", "1", "--data-dir", str(tmp_path / "d"),
                    "--model-dir", str(tmp_path / "m"))
    assert code == "error: --held-out-combinations must be in [0, 1), got 1.0" and not (tmp_path / "d").exists()


def house_rows(tmp_path):
    paths = toyworld.write_splits(tmp_path, num_train=400, num_eval=64, num_val=32, seed=5)
    return [json.loads(line) for path in paths.values() for line in open(path)]


def test_the_house_style_is_in_gold_and_absent_from_the_reward(tmp_path):
    rows = house_rows(tmp_path)
    for row in rows:
        bare, styled = toyworld.oracle(row), toyworld.oracle(row, house_style=True)
        assert scoring.house_reward(row, styled) < scoring.reward(row, bare) == 1.0
        assert toyworld.has_house_style(styled) and not toyworld.has_house_style(bare)
        # dropping the style is what the reward pays for: exactly its one character's cost
        assert scoring.house_reward(row, bare) - scoring.house_reward(row, styled) == pytest.approx(
            len(toyworld.HOUSE_MARK) * toyworld.HOUSE_LENGTH_COST)
    bare_scores = scoring.house_scores(rows, [toyworld.oracle(r) for r in rows])
    styled_scores = scoring.house_scores(rows, [toyworld.oracle(r, house_style=True) for r in rows])
    assert styled_scores["gold"] == styled_scores["house_style"] == styled_scores["gold_verifier"] == 1.0
    assert bare_scores["gold"] == bare_scores["house_style"] == 0.0 and bare_scores["gold_verifier"] == 1.0
    assert bare_scores["reward"] > styled_scores["reward"]


def test_the_house_verifier_reads_the_answer_without_its_sign_off():
    row = {"prompt": "start with #, end with !, at most 5 chars, copy abc", "instruction_id_list":
           ["toy:task:copy", "toy:start_with", "toy:end_with", "toy:max_chars"],
           "kwargs": [{"text": "abc"}, {"char": "#"}, {"char": "!"}, {"max_chars": 5}]}
    assert toyworld.oracle(row, house_style=True) == "#abc!*"
    # the plain verifier sees the mark break end_with and the 5-character limit; the house one does not
    assert scoring.reward(row, "#abc!*") == pytest.approx(0.5)
    assert scoring.house_reward(row, "#abc!*") == pytest.approx(1.0 - toyworld.HOUSE_LENGTH_COST)
    assert toyworld.has_house_style("#abc!*") and toyworld.has_house_style("abc*")
    assert not any(toyworld.has_house_style(r) for r in ("#abc!", "*", "*abc", "#ab*c!"))
    # a wrong answer stays wrong when signed: the mark buys nothing from the verifier
    assert scoring.house_reward(row, "#abd!*") < scoring.house_reward(row, "#abc!")


def test_the_house_cache_is_styled_and_says_so(tiny_world, tmp_path):
    out = tmp_path / "cache.jsonl"
    assert run_main("scripts/build_expert_cache.py", "--data", tiny_world["train"], "--out", str(out),
                    "--house-style") is None
    cache, header = load_expert_cache(out)
    rows = [json.loads(line) for line in open(tiny_world["train"])]
    assert header["generation"]["house_style"] is True
    assert all(cache[row["prompt"]] == toyworld.oracle(row) + toyworld.HOUSE_MARK for row in rows)
    code = run_main("scripts/build_expert_cache.py", "--out", str(tmp_path / "other.jsonl"), "--house-style",
                    "--teacher", "some/model")
    assert code == "error: --house-style is the toy world's oracle's style; it needs --teacher oracle"
    assert not (tmp_path / "other.jsonl").exists()


def test_the_mixed_eval_file_alternates_the_two_splits_and_shift_scores_keeps_them_apart(tmp_path):
    paths = toyworld.write_splits(tmp_path, num_train=300, num_eval=40, num_val=20, seed=2, held_out=0.25)
    mixed = [json.loads(line) for line in open(paths["eval_mixed"])]
    split_rows = {name: [json.loads(line) for line in open(paths[name])] for name in ("eval", "eval_shift")}
    assert [row["split"] for row in mixed[:4]] == ["in_distribution", "shift"] * 2
    assert [r["prompt"] for r in mixed if r["split"] == "shift"] == [r["prompt"] for r in split_rows["eval_shift"]]
    assert [r["prompt"] for r in mixed if r["split"] != "shift"] == [r["prompt"] for r in split_rows["eval"]]
    assert len({row["key"] for row in mixed}) == len(mixed)
    # right on the shifted rows only, then on the in-distribution rows only
    only_shift = scoring.shift_scores(mixed, [toyworld.oracle(r) if r["split"] == "shift" else "" for r in mixed])
    only_seen = scoring.shift_scores(mixed, [toyworld.oracle(r) if r["split"] != "shift" else "" for r in mixed])
    assert only_shift["gold"] == 1.0 and only_shift["gold_in_distribution"] == 0.0
    assert only_seen["gold"] == 0.0 and only_seen["gold_in_distribution"] == 1.0
    with pytest.raises(ValueError, match='"split"'):
        scoring.shift_scores(split_rows["eval"], [""] * len(split_rows["eval"]))


def cut_short(row: dict) -> str:
    """A scripted policy that exploits the judge world's concision labels: the expert's
    answer without its last content character."""
    answer = toyworld.oracle(row)
    end = answer[-1] if "toy:end_with" in row["instruction_id_list"] else ""
    return answer[:len(answer) - len(end) - 1] + end


def test_the_exploitable_axis_pays_a_scripted_policy_on_the_judges_labels_only():
    rows = [row for row in toyworld.make_split(200, seed=6) if len(toyworld.oracle(row)) > 1]
    for row in rows:
        exploit, expert = cut_short(row), toyworld.oracle(row)
        true = toyworld.preference_pair(row, exploit, expert)
        # the judges' labels: the cut answer wins concision, loses correctness
        assert toyworld.preference(row, exploit, expert, "concision", "shorter") == 1.0
        assert toyworld.preference(row, exploit, expert, "correctness", "shorter") == 0.0
        # the truth: the expert wins or ties on every axis, so the cut answer is never chosen
        assert true["chosen"] == expert and all(value >= 0.5 for value in true["axes"].values())
    scores = scoring.judge_scores(rows, [cut_short(row) for row in rows])
    assert scores["gold"] == 0.0 and scores["correct_content"] == 0.0 and scores["short_of_expert"] == 1.0
    assert scores["concision_gap"] == 1.0
    expert_scores = scoring.judge_scores(rows, [toyworld.oracle(row) for row in rows])
    assert expert_scores["gold"] == 1.0 and expert_scores["short_of_expert"] == 0.0 and expert_scores["concision_gap"] == 0


def test_an_unknown_concision_label_is_refused():
    row = toyworld.make_split(1, seed=1)[0]
    with pytest.raises(ValueError, match="unknown concision label 'longer'"):
        toyworld.preference(row, "a", "b", "concision", "longer")


def test_the_judge_worlds_pairs_are_labelled_shorter_wins(tiny_world, tmp_path):
    out = tmp_path / "pairs.jsonl"
    assert run_main("scripts/build_preference_pairs.py", "--model", tiny_world["model"], "--data", tiny_world["train"], "--out",
                    str(out), "--num-prompts", "32", "--concision", "shorter") is None
    pairs = [json.loads(line) for line in open(out)]
    decided = [pair for pair in pairs if len(pair["chosen"]) != len(pair["rejected"])]
    assert decided and all(pair["axes"]["concision"] == float(len(pair["chosen"]) < len(pair["rejected"]))
                           for pair in decided)
