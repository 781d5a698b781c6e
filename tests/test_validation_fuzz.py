"""Every script checks its flags and data before any model loads: random flag
combinations and broken rows either reach the model loading step or stop with exactly
one `error:` line, never a traceback. The scripts run in this process (runpy) with
model loading replaced by a sentinel, so hundreds of cases take seconds."""

import contextlib
import dataclasses
import importlib
import io
import json
import random
import runpy
import sys
import traceback

import pytest
from conftest import ROOT

import shared.modeling
import shared.runfolder


class ReachedModelLoading(Exception):
    pass


def refuse_to_load(*args, **kwargs):
    raise ReachedModelLoading()


def run_until_model_loading(script: str, argv: list[str]) -> tuple[str, str]:
    """('ok', '') when validation passed, ('error', message) for a clean stop, or
    ('crash', traceback) for anything else."""
    stderr, stdout = io.StringIO(), io.StringIO()
    old_argv = sys.argv
    sys.argv = [script, *argv]
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            runpy.run_path(str(ROOT / script), run_name="__main__")
        return "crash", "the script ran to the end without loading a model"
    except ReachedModelLoading:
        return "ok", ""
    except SystemExit as stop:
        message = str(stop.code) if not isinstance(stop.code, int) else stderr.getvalue()
        return "error", message
    except Exception:
        return "crash", traceback.format_exc()
    finally:
        sys.argv = old_argv
        for lock in shared.runfolder._held_locks:
            lock.close()
        shared.runfolder._held_locks.clear()


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


GOOD_ROW = {"prompt": "copy ab", "instruction_id_list": ["toy:task:copy"], "kwargs": [{"text": "ab"}]}
BAD_ROWS = [
    {"prompt": "copy ab", "instruction_id_list": ["toy:task:copy", "toy:caps"], "kwargs": [{"text": "ab"}]},
    {"prompt": "copy ab", "instruction_id_list": ["toy:nonsense"], "kwargs": [{}]},
    {"prompt": "copy ab", "instruction_id_list": "toy:task:copy", "kwargs": [{"text": "ab"}]},
    {"prompt": "copy ab", "instruction_id_list": ["toy:task:copy"], "kwargs": ["text=ab"]},
    {"prompt": "", "instruction_id_list": ["toy:task:copy"], "kwargs": [{}]},
    {"instruction_id_list": ["toy:task:copy"], "kwargs": [{}]},
    '{"prompt": "copy ab", ',
]
BAD_PAIRS = [
    {"prompt": "copy ab", "chosen": "ab", "rejected": "ab", "label": 1.0},
    {"prompt": "copy ab", "chosen": "ab", "rejected": "ba", "label": 1.5},
    {"prompt": "copy ab", "chosen": "ab", "rejected": 3, "label": 1.0},
    {"prompt": "copy ab", "chosen": "ab", "label": 1.0},
]
BAD_CACHE_LINES = [
    {"prompt": "copy ab", "response": ""},
    {"prompt": "copy ab", "response": "ba"},  # after the good line: a conflicting duplicate
    "[1, 2]",
    "not json",
]
# (flag, values); most values are out of range, some are fine
FLAGS = [
    ("--steps", ["0", "-3", "2"]), ("--prompts-per-step", ["0", "2"]), ("--group-size", ["0", "1", "2"]),
    ("--micro-batch-size", ["0", "4"]), ("--eval-every", ["0", "2"]), ("--eval-prompts", ["0", "4"]),
    ("--temperature", ["0", "-1", "nan", "0.7"]), ("--max-new-tokens", ["0", "8"]), ("--learning-rate", ["0", "-1e-4", "inf", "1e-4"]),
    ("--beta", ["-0.1", "0.0", "0.04"]), ("--eps-low", ["1.5", "-0.1", "0.2"]), ("--eps-high", ["-1", "0.28"]),
    ("--device", ["cuda", "tpu", "cpu"]), ("--dtype", ["float8", "float32"]), ("--stop-at-step", ["-1", "99", "1"]),
    ("--save-every", ["0", "2"]), ("--max-grad-norm", ["0", "1.0"]), ("--num-iterations", ["0", "1"]),
]


def script_flags(script: str) -> set[str]:
    """The flags the script's Args has."""
    module = importlib.import_module(script.replace("/", ".").removesuffix(".py"))
    return {"--" + field.name.replace("_", "-") for field in dataclasses.fields(module.Args)}


RL_SCRIPTS = ["algos/grpo.py", "algos/chord.py", "algos/aapa.py", "algos/uniapl.py", "algos/adpo.py", "algos/gprl.py"]
PAIR_SCRIPTS = ["algos/gpm.py", "algos/adpo_pairwise.py"]


def case(rng: random.Random, script: str, world, folder) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [GOOD_ROW] * 3
    if rng.random() < 0.3:
        rows = rows + [rng.choice(BAD_ROWS)]
    data = write_jsonl(folder / "rows.jsonl", rows)
    argv = ["--model", world["model"], "--output-dir", str(folder / "out")]
    if script in PAIR_SCRIPTS:
        pairs = [{"prompt": "copy ab", "chosen": "ab", "rejected": "ba", "label": 0.8}] * 2
        if rng.random() < 0.3:
            pairs = pairs + [rng.choice(BAD_PAIRS)]
        argv += ["--pairs-data", write_jsonl(folder / "pairs.jsonl", pairs)]
    if script == "algos/adpo_pairwise.py":
        argv += ["--eval-data", data]
    elif script != "algos/gpm.py":
        argv += ["--train-data", data, "--eval-data", data]
    if script in ("algos/sft.py", "algos/chord.py", "algos/aapa.py", "algos/uniapl.py"):
        cache = [{"prompt": "copy ab", "response": "ab"}]
        if rng.random() < 0.3:
            cache = cache + [rng.choice(BAD_CACHE_LINES)]
        argv += ["--expert-cache", write_jsonl(folder / "cache.jsonl", cache)]
    if script == "algos/gprl.py":
        argv += ["--gpm", world["model"]]
    available = script_flags(script)
    for flag, values in rng.sample(FLAGS, 4):
        if flag in available:
            argv += [flag, rng.choice(values)]
    return argv


@pytest.mark.parametrize("script", ["algos/sft.py", *PAIR_SCRIPTS, *RL_SCRIPTS])
def test_random_flags_and_rows_stop_cleanly_before_any_model_loads(script, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    rng = random.Random(hash(script) % 1000)
    outcomes = {"ok": 0, "error": 0}
    for index in range(25):
        argv = case(rng, script, tiny_world, tmp_path / str(index))
        outcome, message = run_until_model_loading(script, argv)
        assert outcome != "crash", f"{script} {' '.join(argv)}\n{message}"
        if outcome == "error":
            lines = message.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{script} {' '.join(argv)}\n{message}"
        outcomes[outcome] += 1
    assert outcomes["error"] > 0  # the generator does produce bad input


@pytest.mark.parametrize("script, argv, expected", [
    ("algos/grpo.py", ["--eps-low", "1.5"], "--eps-low must be in [0, 1)"),
    ("algos/grpo.py", ["--eval-prompts", "0"], "--eval-prompts must be in [1, inf)"),
    ("algos/grpo.py", ["--group-size", "1", "--scale-rewards", "none"], "--group-size must be in [2, inf)"),
    ("algos/grpo.py", ["--beta", "-0.1"], "--beta must be in [0, inf)"),
    ("algos/grpo.py", ["--reward-fn", "json:dumps"], "must take two arguments"),
    ("algos/grpo.py", ["--reward-fn", "nowhere:f"], "no module named 'nowhere'"),
    ("algos/gprl.py", ["--dominance", "1.5"], "--dominance must be in [0, 1]"),
    ("algos/gprl.py", ["--noise-z", "nan"], "--noise-z must be in [-inf, inf]"),
    ("algos/grpo.py", ["--eval-fn", "json:dumps"], "--eval-fn 'json:dumps' must take two arguments (rows, texts)"),
    ("algos/sft.py", ["--eval-fn", "shared.scoring:nothing"], "module 'shared.scoring' has no function 'nothing'"),
    ("algos/sft.py", ["--steps", "0"], "--steps must be in [1, inf)"),
    ("algos/sft.py", ["--dtype", "float16"], "--dtype float16 cannot be trained with AdamW"),
    ("algos/grpo.py", ["--temperature", "1e-40"], "--temperature must be in [0.001, inf)"),
    ("algos/grpo.py", ["--seed", "-1"], "--seed must be in [0, 2^63)"),
    ("algos/grpo.py", ["--output-dir", ""], "--output-dir is empty"),
])
def test_each_class_of_bad_flag_names_the_flag(script, argv, expected, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW])
    base = ["--model", tiny_world["model"], "--output-dir", str(tmp_path / "out"), "--train-data", data, "--eval-data", data]
    if script == "algos/sft.py":
        base += ["--expert-cache", write_jsonl(tmp_path / "cache.jsonl", [{"prompt": "copy ab", "response": "ab"}])]
    outcome, message = run_until_model_loading(script, base + argv)
    assert outcome == "error" and expected in message and len(message.strip().splitlines()) == 1, message


@pytest.mark.parametrize("row, expected", [
    (BAD_ROWS[0], "'kwargs' must be a list with one entry per instruction"),
    (BAD_ROWS[1], "unknown instruction id 'toy:nonsense'"),
    (BAD_ROWS[2], "'instruction_id_list' must be a list of strings"),
    (BAD_ROWS[3], "every entry of 'kwargs' must be an object"),
])
def test_each_class_of_bad_row_names_the_file_and_row(row, expected, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW, row])
    argv = ["--model", tiny_world["model"], "--output-dir", str(tmp_path / "out"), "--train-data", data, "--eval-data", data]
    outcome, message = run_until_model_loading("algos/grpo.py", argv)
    assert outcome == "error" and f"{data!r} row 1: {expected}" in message, message


@pytest.mark.parametrize("pair, expected", [
    (BAD_PAIRS[0], "row 1: 'chosen' and 'rejected' are the same response"),
    (BAD_PAIRS[1], "row 1: field 'label' must be a probability in [0, 1], got 1.5"),
    (BAD_PAIRS[2], "row 1: field 'rejected' must be a string or a list of chat messages"),
])
def test_each_class_of_bad_pair_names_the_row(pair, expected, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "copy ab", "chosen": "ab", "rejected": "ba"}, pair])
    outcome, message = run_until_model_loading("algos/gpm.py", ["--model", tiny_world["model"], "--pairs-data", pairs,
                                                                "--output-dir", str(tmp_path / "out")])
    assert outcome == "error" and expected in message, message


@pytest.mark.parametrize("line, expected", [
    (BAD_CACHE_LINES[0], "line 3: empty response"),
    (BAD_CACHE_LINES[1], "line 3: prompt 'copy ab' appears earlier with a different response"),
    (BAD_CACHE_LINES[2], "line 3: not a JSON object"),
])
def test_each_class_of_bad_expert_cache_line_names_the_line(line, expected, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW])
    cache = write_jsonl(tmp_path / "cache.jsonl", [{"__header__": {}}, {"prompt": "copy ab", "response": "ab"}, line])
    outcome, message = run_until_model_loading("algos/sft.py", ["--model", tiny_world["model"], "--output-dir",
                                                                str(tmp_path / "out"), "--train-data", data,
                                                                "--eval-data", data, "--expert-cache", cache])
    assert outcome == "error" and expected in message, message


@pytest.mark.parametrize("script, argv, expected", [
    ("scripts/build_expert_cache.py", ["--data", "missing.jsonl"], "does not exist"),
    ("scripts/build_expert_cache.py", ["--batch-size", "0"], "--batch-size must be in [1, inf)"),
    ("scripts/build_preference_pairs.py", ["--num-prompts", "0"], "--num-prompts must be in [1, inf)"),
    ("scripts/build_preference_pairs.py", ["--temperature", "0"], "--temperature must be in [0.001, inf)"),
])
def test_data_building_scripts_validate_their_input(script, argv, expected, tmp_path):
    outcome, message = run_until_model_loading(script, ["--out", str(tmp_path / "out.jsonl"), *argv])
    assert outcome == "error" and expected in message and len(message.strip().splitlines()) == 1, message
    outcome, message = run_until_model_loading(script, ["--out", str(tmp_path)])
    assert outcome == "error" and "is a folder" in message, message


@pytest.mark.parametrize("source, expected", [
    ("def reward(row, text:\n    return 1.0\n", "importing 'user_reward' failed with SyntaxError"),
    ("raise RuntimeError('no config file')\n", "importing 'user_reward' failed with RuntimeError: no config file"),
    ("import package_that_is_not_installed\n", "its module imports 'package_that_is_not_installed', which is not installed"),
    ("x = 1\n", "module 'user_reward' has no function 'reward'"),
])
def test_a_reward_module_that_cannot_be_used_says_why(source, expected, tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    (tmp_path / "user_reward.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_reward", None)
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW])
    argv = ["--model", tiny_world["model"], "--output-dir", str(tmp_path / "out"), "--train-data", data,
            "--eval-data", data, "--reward-fn", "user_reward:reward"]
    outcome, message = run_until_model_loading("algos/grpo.py", argv)
    assert outcome == "error" and expected in message and len(message.strip().splitlines()) == 1, message


def test_training_rows_without_the_fields_the_reward_reads_are_refused_before_loading(tiny_world, tmp_path, monkeypatch):
    monkeypatch.setattr(shared.modeling, "load_model", refuse_to_load)
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "copy ab"}])
    data = write_jsonl(tmp_path / "rows.jsonl", [GOOD_ROW])
    argv = ["--model", tiny_world["model"], "--output-dir", str(tmp_path / "out"), "--train-data", bare, "--eval-data", data]
    outcome, message = run_until_model_loading("algos/grpo.py", argv)
    assert outcome == "error" and "row 0: missing field 'instruction_id_list'" in message, message
    (tmp_path / "any_reward.py").write_text("def reward(row, text):\n    return float(len(text))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_until_model_loading("algos/grpo.py", argv + ["--reward-fn", "any_reward:reward"])[0] == "ok"
