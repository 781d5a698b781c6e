"""No output replaces an input of the same command, and the data-building scripts and
expert pools refuse what would fail later: one `error:` line, before any model loads,
and the input file untouched."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, run_main
from transformers import AutoModelForCausalLM

from shared.data import load_expert_pool, load_rows
from shared.flags import check_output_file
from shared.modeling import load_tokenizer

sys.path.insert(0, str(ROOT / "scripts"))
import score_responses  # noqa: E402


def one_line_error(result) -> str:
    """The error line of a command run as a process (CompletedProcess) or in this one (run_main's exit message)."""
    if isinstance(result, str):
        assert result.startswith("error:") and "\n" not in result, result
        return result
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:"), result.stderr[-2000:]
    return last


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink"])
def test_an_output_that_is_an_input_is_refused_however_it_is_spelled(tmp_path, spelling):
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(data, tmp_path / "link.jsonl")
    out = {"same": data, "dotted": tmp_path / "sub" / ".." / "rows.jsonl", "symlink": tmp_path / "link.jsonl"}[spelling]
    with pytest.raises(SystemExit, match="--out .* is the same file as --data"):
        check_output_file(str(out), "--out", {"--data": str(data)})
    check_output_file(str(tmp_path / "verdicts.jsonl"), "--out", {"--data": str(data)})  # another path is fine
    assert data.read_text() == "{}\n"


@pytest.mark.parametrize("output, input_", [("out", "responses"), ("out", "data"), ("summary", "responses"),
                                            ("summary", "data"), ("summary", "out")])
def test_score_responses_never_writes_over_its_inputs(tmp_path, output, input_):
    paths = {"data": tmp_path / "rows.jsonl", "responses": tmp_path / "responses.jsonl", "out": tmp_path / "verdicts.jsonl"}
    paths["data"].write_text(json.dumps({"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"],
                                         "kwargs": [{}]}) + "\n")
    paths["responses"].write_text(json.dumps({"prompt": "p", "response": "no comma here"}) + "\n")
    before = {name: path.read_text() for name, path in paths.items() if path.exists()}
    flags = {"data": str(paths["data"]), "responses": str(paths["responses"]), "out": str(paths["out"]) if output == "summary" else ""}
    flags[output] = str(paths[input_])
    with pytest.raises(SystemExit, match=f"--{output} .* is the same file as --{input_}"):
        score_responses.main(score_responses.Args(**flags))
    assert {name: path.read_text() for name, path in paths.items() if path.exists()} == before


@pytest.mark.parametrize("script", ["scripts/build_preference_pairs.py", "scripts/build_expert_cache.py"])
def test_data_builders_never_write_over_their_data(tiny_world, tmp_path, script):
    data = tmp_path / "train.jsonl"
    data.write_bytes(open(tiny_world["train"], "rb").read())
    before = data.read_bytes()
    flags = ["--data", str(data), "--out", str(data)] + (["--model", tiny_world["model"]] if "pairs" in script else [])
    assert "is the same file as --data" in one_line_error(run_main(script, *flags))
    assert data.read_bytes() == before


def test_preference_pairs_refuse_a_low_temperature_ids_the_toy_world_cannot_label_and_zero_pairs(tiny_world, tmp_path):
    out = tmp_path / "pairs.jsonl"
    base = ["--model", tiny_world["model"], "--data", tiny_world["train"], "--out", str(out), "--max-new-tokens", "4"]
    assert "--temperature must be in [0.001" in one_line_error(
        run_main("scripts/build_preference_pairs.py", *base, "--temperature", "1e-4"))
    official = tmp_path / "official.jsonl"
    official.write_text(json.dumps({"key": 1, "prompt": "Answer.", "instruction_id_list": ["punctuation:no_comma"],
                                    "kwargs": [{}]}) + "\n")
    base[base.index("--data") + 1] = str(official)
    message = one_line_error(run_main("scripts/build_preference_pairs.py", *base))
    assert "row 1" in message and "'punctuation:no_comma' is not a toy-world id" in message
    assert not out.exists()


def test_zero_preference_pairs_is_an_error_and_writes_nothing(tiny_world, tmp_path):
    """At the temperature floor the tiny model samples the same text twice for each
    prompt: every pair ties on every axis, so no file is written and the GPM is not
    left to fail later on an empty one."""
    out = tmp_path / "pairs.jsonl"
    result = run_main("scripts/build_preference_pairs.py", "--model", tiny_world["model"], "--data", tiny_world["train"],
                      "--out", str(out), "--num-prompts", "4", "--max-new-tokens", "4", "--temperature", "0.001")
    assert "tied on every axis" in one_line_error(result) and not out.exists()


def test_an_expert_pool_is_named_in_its_errors_and_needs_two_prompts_where_a_spread_is_taken(tiny_world, tmp_path):
    train_rows = load_rows(tiny_world["train"])
    with pytest.raises(ValueError, match="^--expert-pool: .*no_such.jsonl"):
        load_expert_pool(str(tmp_path / "no_such.jsonl"), train_rows, tiny_world["expert_cache"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="^--expert-pool: .*empty.jsonl.* has no rows"):
        load_expert_pool(str(tmp_path / "empty.jsonl"), train_rows, tiny_world["expert_cache"])
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": train_rows[0]["prompt"]}) + "\n")
    pool, _, _ = load_expert_pool(str(one), train_rows, tiny_world["expert_cache"])  # CHORD can use one prompt
    assert pool == [train_rows[0]["prompt"]]
    with pytest.raises(ValueError, match="--expert-pool .*one.jsonl' has 1 distinct prompt.*at least 2 are needed"):
        load_expert_pool(str(one), train_rows, tiny_world["expert_cache"], min_prompts=2, why="a spread")
    for script in ("algos/aapa.py", "algos/uniapl.py"):  # both ask for two, before any model loads
        result = run_main(script, "--model", tiny_world["model"], "--train-data", tiny_world["train"], "--eval-data",
                          tiny_world["eval"], "--expert-cache", tiny_world["expert_cache"], "--expert-pool", str(one),
                          "--output-dir", str(tmp_path / script))
        assert "has 1 distinct prompt(s); at least 2 are needed" in one_line_error(result), script


def test_a_teacher_cut_at_its_token_limit_is_recorded_and_dropped_unless_kept(tiny_world, tmp_path, capsys):
    """A teacher that never picks a special token cannot end within 1 token: every answer is
    truncated. By default none may be imitated (nothing written, one line); with
    --keep-truncated they are written, each with finish_reason "length"."""
    out, teacher = tmp_path / "cache.jsonl", tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"])
    with torch.no_grad():  # logit 0 for the special tokens (eos among them), below the best of ~250 random ones
        model.lm_head.weight[load_tokenizer(tiny_world["model"]).all_special_ids] = 0.0
    model.save_pretrained(teacher)
    load_tokenizer(tiny_world["model"]).save_pretrained(teacher)
    flags = ["--data", tiny_world["train"], "--out", str(out), "--teacher", str(teacher), "--max-new-tokens", "1"]
    capsys.readouterr()
    result = run_main("scripts/build_expert_cache.py", *flags)  # in this process: no new interpreter per run
    assert "every teacher answer was cut at --max-new-tokens 1" in one_line_error(result) and not out.exists()
    assert "64 of 64 teacher answers reached --max-new-tokens 1 without ending: dropped" in capsys.readouterr().out
    assert run_main("scripts/build_expert_cache.py", *flags, "--keep-truncated") in (None, 0)
    assert "kept (--keep-truncated)" in capsys.readouterr().out
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["__header__"]["dropped_prompts"] == []
    assert len(lines) == 65 and all(line["finish_reason"] == "length" for line in lines[1:])


def test_prompts_whose_teacher_answer_was_dropped_are_skipped_by_the_runs_not_refused(tiny_world, tmp_path):
    from shared.data import write_expert_cache
    rows = load_rows(tiny_world["train"])
    prompts = [row["prompt"] for row in rows]
    cache_path = tmp_path / "cache.jsonl"
    write_expert_cache(cache_path, prompts[1:], ["answer"] * (len(prompts) - 1), teacher="t", generation={},
                       finish_reasons=["stop"] * (len(prompts) - 1), dropped_prompts=prompts[:1])
    pool, cache, header = load_expert_pool("", rows, str(cache_path))
    assert pool == prompts[1:] and prompts[0] not in cache and header["dropped_prompts"] == prompts[:1]
    write_expert_cache(cache_path, prompts[1:], ["answer"] * (len(prompts) - 1), teacher="t", generation={})
    with pytest.raises(ValueError, match="misses 1 of 64 prompts"):  # absent without being dropped: an error still
        load_expert_pool("", rows, str(cache_path))
