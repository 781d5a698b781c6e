import pytest

from shared import scoring, toyworld
from shared.data import load_expert_cache, load_rows


def test_oracle_follows_every_instruction():
    rows = toyworld.make_split(300, seed=3, tasks=toyworld.CONTENT_TASKS)
    for row in rows:
        answer = toyworld.oracle(row)
        assert scoring.reward(row, answer) == 1.0, (row["prompt"], answer)
        assert scoring.gold(row, answer) == 1.0


def test_reward_is_fraction_of_instructions_followed():
    row = {"prompt": "all caps, start with #, end with !, reverse abc",
           "instruction_id_list": ["toy:task:reverse", "toy:caps", "toy:start_with", "toy:end_with"],
           "kwargs": [{"text": "abc"}, {}, {"char": "#"}, {"char": "!"}]}
    assert toyworld.oracle(row) == "#CBA!"
    assert scoring.reward(row, "#CBA!") == 1.0
    assert scoring.reward(row, "cba") == 0.25  # content right (case is the caps rule's business)
    assert scoring.reward(row, "#CBA") == 0.75
    assert scoring.reward(row, "#ABC!") == 0.75
    assert scoring.gold(row, "#CBA") == 0.0
    assert scoring.reward(row, "") == 0.0


def test_upper_task_is_case_sensitive_and_max_chars_counts_characters():
    row = {"prompt": "at most 4 chars, upper ab", "instruction_id_list": ["toy:task:upper", "toy:max_chars"],
           "kwargs": [{"text": "ab"}, {"max_chars": 4}]}
    assert scoring.reward(row, "ab") == 0.5
    assert scoring.reward(row, "AB") == 1.0
    assert scoring.reward(row, "ABABA") == 0.0


def test_none_kwargs_from_datasets_are_ignored():
    row = {"instruction_id_list": ["toy:task:copy", "toy:end_with"],
           "kwargs": [{"text": "ab", "char": None, "letter": None}, {"text": None, "char": "?", "letter": None}]}
    assert toyworld.oracle(row) == "ab?"
    assert scoring.gold(row, "ab?") == 1.0


def test_unknown_instruction_is_a_clear_error():
    row = {"prompt": "p", "instruction_id_list": ["toy:caps", "toy:nope"], "kwargs": [{}, {}]}
    assert scoring.instruction_problem(row) == "unknown instruction id 'toy:nope'"
    row = {"prompt": "p", "instruction_id_list": ["toy:caps", "no_such:id"], "kwargs": [{}, {}]}
    assert "unknown instruction id 'no_such:id'" in scoring.instruction_problem(row)


def test_preferences_along_axes():
    row = {"instruction_id_list": ["toy:task:copy", "toy:end_with"], "kwargs": [{"text": "abc"}, {"char": "!"}]}
    assert toyworld.preference(row, "abc!", "abc", "format") == 1.0
    assert toyworld.preference(row, "abc", "abc!", "format") == 0.0
    assert toyworld.preference(row, "abc", "abc!", "correctness") == 0.5
    assert toyworld.preference(row, "abc!", "abc!!!!!", "concision") == 1.0
    with pytest.raises(ValueError, match="unknown preference axis"):
        toyworld.preference(row, "a", "b", "style")


def test_splits_are_disjoint_and_load_through_datasets(tmp_path):
    paths = toyworld.write_splits(tmp_path, num_train=200, num_eval=50, seed=7)
    train, held_out = load_rows(paths["train"]), load_rows(paths["eval"])
    assert len(train) == 200 and len(held_out) == 50
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    for row in held_out:  # the datasets round trip keeps the oracle exact
        assert scoring.gold(row, toyworld.oracle(row)) == 1.0


def test_same_seed_same_split():
    assert toyworld.make_split(20, seed=5) == toyworld.make_split(20, seed=5)
    assert toyworld.make_split(20, seed=5) != toyworld.make_split(20, seed=6)


def test_expert_cache_reports_missing_prompts(tiny_world):
    rows = load_rows(tiny_world["train"])
    cache, header = load_expert_cache(tiny_world["expert_cache"], [r["prompt"] for r in rows])
    assert header["teacher"] == "oracle" and len(cache) == len(rows)
    with pytest.raises(ValueError, match="misses 1 of 2 prompts"):
        load_expert_cache(tiny_world["expert_cache"], [rows[0]["prompt"], "not a cached prompt"])


def test_bad_dataset_rows_name_the_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "copy ab", "instruction_id_list": []}\n{"prompt": "", "instruction_id_list": []}\n')
    with pytest.raises(ValueError, match="row 1: field 'prompt' must be a non-empty string"):
        load_rows(str(path))
    path.write_text('{"text": "copy ab"}\n')
    with pytest.raises(ValueError, match="row 0: missing field 'prompt'"):
        load_rows(str(path))


def test_preference_pairs_keep_trade_offs_and_drop_only_full_ties():
    """The pair's labels by hand: a trade-off (label 0.5) survives with its per-axis labels."""
    row = {"prompt": "end with !, reverse abc", "instruction_id_list": ["toy:task:reverse", "toy:end_with"],
           "kwargs": [{"text": "abc"}, {"char": "!"}]}
    # better content, worse format, equally concise (|3 - 4| = |5 - 4|): a pure trade-off, mean label 0.5
    pair = toyworld.preference_pair(row, "cba", "xyzw!")
    assert pair is not None and pair["label"] == 0.5
    assert pair["axes"] == {"correctness": 1.0, "format": 0.0, "concision": 0.5}
    # chosen is the one preferred on the mean, with the per-axis labels flipped to match
    pair = toyworld.preference_pair(row, "xyz!", "cba!")
    assert pair["chosen"] == "cba!" and pair["label"] == pytest.approx(2 / 3)
    assert pair["axes"] == {"correctness": 1.0, "format": 0.5, "concision": 0.5}
    assert toyworld.preference_pair(row, "xyz", "zyx") is None  # a tie on every axis
