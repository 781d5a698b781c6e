"""End-to-end runs of each script on the tiny world, through the command line."""

import dataclasses
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, train_in_process
from transformers import AutoModelForCausalLM

from shared.rewards import reward_scores
from shared.scoring import gold


def common_flags(world, out):
    return ["--model", world["model"], "--train-data", world["train"], "--eval-data", world["eval"],
            "--output-dir", str(out), "--eval-every", "2", "--eval-prompts", "8", "--save-every", "2"]


def sft_flags(world, out):
    return common_flags(world, out) + ["--expert-cache", world["expert_cache"], "--steps", "4", "--batch-size", "8",
                                       "--micro-batch-size", "4", "--max-new-tokens", "8"]


def grpo_flags(world, out, model):
    flags = common_flags(world, out) + ["--steps", "4", "--prompts-per-step", "2", "--group-size", "4",
                                        "--micro-batch-size", "4", "--max-new-tokens", "8", "--beta", "0.1",
                                        "--num-iterations", "2", "--learning-rate", "1e-3"]
    flags[flags.index("--model") + 1] = model
    return flags


def losses(out):
    return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


def assert_same_weights(dir_a, dir_b):
    a = AutoModelForCausalLM.from_pretrained(dir_a / "checkpoint")
    b = AutoModelForCausalLM.from_pretrained(dir_b / "checkpoint")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


def assert_interrupted_run_resumes_exactly(script: str, flags: list[str], full, stop_at: int) -> None:
    """The run of `flags` stopped at step `stop_at` and resumed gives the same losses and
    weights as the uninterrupted run already written to `full`."""
    flags = list(flags)
    interrupted = full.with_name(full.name + "_interrupted")
    flags[flags.index("--output-dir") + 1] = str(interrupted)
    train_in_process(script, *flags, "--stop-at-step", str(stop_at))
    train_in_process(script, *flags, "--resume")
    assert losses(interrupted) == pytest.approx(losses(full), rel=1e-5, abs=1e-7)
    assert_same_weights(interrupted, full)


ALGORITHMS = ["sft", "grpo", "chord", "adpo", "adpo_pairwise", "aapa", "uniapl", "gpm", "gprl"]


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_has_help_listing_every_flag(name, capsys, monkeypatch):
    """`python algos/NAME.py --help`, run in this process (runpy: the file's own __main__
    block, without a new interpreter importing torch again): exit 0, and every field of
    the script's Args is a flag in the help text."""
    path = str(ROOT / "algos" / f"{name}.py")
    fields = [field.name for field in dataclasses.fields(runpy.run_path(path, run_name="algos_module")["Args"])]
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(path, run_name="__main__")
    assert stop.value.code in (0, None)
    text = capsys.readouterr().out
    missing = [field for field in fields if f"--{field.replace('_', '-')}" not in text]
    assert len(fields) > 10 and not missing, (name, missing)


@pytest.fixture(scope="module")
def sft_run(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train_in_process("algos/sft.py", *sft_flags(tiny_world, out))
    return out


def test_sft_end_to_end_checkpoint_loads(sft_run):
    model = AutoModelForCausalLM.from_pretrained(sft_run / "checkpoint")
    assert model.config.model_type == "qwen3"
    result = json.loads((sft_run / "eval.json").read_text())
    evals = [json.loads(line) for line in (sft_run / "metrics.jsonl").read_text().splitlines() if "eval/gold" in line]
    assert result["gold"] == evals[-1]["eval/gold"] and result["initial_gold"] == evals[0]["eval/gold"]
    assert len(losses(sft_run)) == 4 and losses(sft_run)[-1] < losses(sft_run)[0]  # lr 1e-3 on 8 demonstrations
    assert (sft_run / "checkpoint" / "trainer_state.pt").exists()


def test_sft_resume_equals_uninterrupted(tiny_world, sft_run, tmp_path):
    train_in_process("algos/sft.py", *sft_flags(tiny_world, tmp_path), "--stop-at-step", "2")
    assert len(losses(tmp_path)) == 2
    train_in_process("algos/sft.py", *sft_flags(tiny_world, tmp_path), "--resume")
    assert losses(tmp_path) == pytest.approx(losses(sft_run), rel=1e-5)
    assert_same_weights(tmp_path, sft_run)


def test_grpo_end_to_end_and_resume(tiny_world, sft_run, tmp_path):
    full = tmp_path / "full"
    train_in_process("algos/grpo.py", *grpo_flags(tiny_world, full, str(sft_run / "checkpoint")))
    assert len(losses(full)) == 4
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(v)) for m in metrics for v in m.values())
    assert_interrupted_run_resumes_exactly("algos/grpo.py", grpo_flags(tiny_world, full, str(sft_run / "checkpoint")), full,
                                           stop_at=2)



@pytest.mark.slow
def test_micro_batches_and_gradient_checkpointing_leave_training_unchanged(tiny_world, sft_run, tmp_path):
    """The memory knobs change memory, not results: one full-batch forward/backward per step
    against micro-batches of 2 (with gradient checkpointing for SFT), same losses and weights.
    GRPO runs without checkpointing here: with it, every row runs in full instead of sharing
    its group's prompt, which equals the shared path only to float rounding (test_shared_prompt.py
    checks that to 1e-12 in float64), and Adam's first steps turn rounding-level differences
    of near-zero gradients into lr-sized ones, so whole runs would not match digit for digit."""
    for script, flags, batch, knobs in [
            ("algos/sft.py", sft_flags(tiny_world, tmp_path / "sft_full"), 8, ["--gradient-checkpointing"]),
            ("algos/grpo.py", grpo_flags(tiny_world, tmp_path / "grpo_full", str(sft_run / "checkpoint")), 8, [])]:
        full = Path(flags[flags.index("--output-dir") + 1])
        small = full.with_name(full.name.replace("full", "small"))
        train_in_process(script, *flags, "--micro-batch-size", str(batch))
        train_in_process(script, *flags, "--output-dir", str(small), "--micro-batch-size", "2", *knobs)
        assert losses(small) == pytest.approx(losses(full), rel=1e-5, abs=1e-7), script
        assert_same_weights(small, full)


def test_chord_end_to_end_and_resume(tiny_world, sft_run, tmp_path):
    full = tmp_path / "full"
    flags = grpo_flags(tiny_world, full, str(sft_run / "checkpoint")) + [
        "--expert-cache", tiny_world["expert_cache"], "--expert-pool", tiny_world["train"], "--preset", "example", "--mu-warmup", "2", "--mu-decay", "2"]
    train_in_process("algos/chord.py", *flags)
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/mu"] for m in metrics if "train/mu" in m] == pytest.approx([0.0, 0.25, 0.5, 0.26])
    assert all(0 < m["train/expert_token_prob"] < 1 for m in metrics if "train/mu" in m)
    assert json.loads((full / "eval.json").read_text())["step"] == 4
    assert_interrupted_run_resumes_exactly("algos/chord.py", flags, full, stop_at=2)


def adpo_listwise_flags(world, sft_run, out):
    flags = grpo_flags(world, out, str(sft_run / "checkpoint"))
    flags[flags.index("--beta") + 1] = "0.05"
    return flags


@pytest.fixture(scope="module")
def adpo_listwise_run(tiny_world, sft_run, tmp_path_factory):
    """One 4-step ADPO listwise run (two micro-batches of 4 rollouts a step), shared by the tests below."""
    full = tmp_path_factory.mktemp("adpo_listwise") / "full"
    train_in_process("algos/adpo.py", *adpo_listwise_flags(tiny_world, sft_run, full))
    return full


def test_adpo_listwise_end_to_end_and_resume(tiny_world, sft_run, adpo_listwise_run):
    full = adpo_listwise_run
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/loss" in m]
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(v)) for m in metrics for v in m.values())
    assert all(0.1 <= m["train/tau_min"] <= m["train/tau_max"] <= 5.0 for m in train)
    assert_interrupted_run_resumes_exactly("algos/adpo.py", adpo_listwise_flags(tiny_world, sft_run, full), full, stop_at=2)


def test_adpo_listwise_logged_kl_does_not_depend_on_micro_batches(tiny_world, sft_run, adpo_listwise_run, tmp_path):
    # the logged KL was once divided by the number of micro-batches
    full, split = adpo_listwise_run, tmp_path / "split"
    split_flags = adpo_listwise_flags(tiny_world, sft_run, split)
    split_flags[split_flags.index("--micro-batch-size") + 1] = "8"  # one micro-batch of the 2 x 4 rollouts
    train_in_process("algos/adpo.py", *split_flags)
    kl = {name: [m["train/kl"] for m in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "train/kl" in m]
          for name, folder in (("two micro-batches", full), ("one", split))}
    assert kl["two micro-batches"][0] > 0 and kl["two micro-batches"] == pytest.approx(kl["one"], rel=1e-4, abs=1e-9)


@pytest.fixture(scope="module")
def pairs_file(tiny_world, sft_run, tmp_path_factory):
    pairs = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    train_in_process("scripts/build_preference_pairs.py", "--model", str(sft_run / "checkpoint"), "--data", tiny_world["train"],
                     "--out", str(pairs), "--num-prompts", "64", "--max-new-tokens", "8")
    return pairs


def test_preference_pairs_and_adpo_pairwise_end_to_end(tiny_world, sft_run, pairs_file, tmp_path):
    pairs = pairs_file
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(0.5 <= r["label"] <= 1.0 and set(r["axes"]) == {"correctness", "format", "concision"} for r in rows)
    # a scalar tie is kept only as a trade-off: better on one axis, worse on another
    assert all(max(r["axes"].values()) > 0.5 > min(r["axes"].values()) for r in rows if r["label"] == 0.5)
    out = tmp_path / "adpo"
    flags = common_flags(tiny_world, out) + ["--model", str(sft_run / "checkpoint"), "--pairs-data", str(pairs),
                                             "--steps", "3", "--batch-size", "4", "--micro-batch-size", "1", "--max-new-tokens", "8"]
    del flags[flags.index("--train-data"):flags.index("--train-data") + 2]
    train_in_process("algos/adpo_pairwise.py", *flags)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(metrics) == 3 and all(0 <= m["train/accuracy"] <= 1 for m in metrics)
    # at step 1 the policy is the reference: every margin is 0 and the loss is log 2 whatever the labels
    assert metrics[0]["train/loss"] == pytest.approx(0.693147, abs=1e-4)
    bad = tmp_path / "bad_pairs.jsonl"
    bad.write_text('{"prompt": "copy ab", "chosen": "ab", "rejected": "ba", "label": 1.5}\n')
    result = run_script("algos/adpo_pairwise.py", *flags, "--pairs-data", str(bad), "--output-dir", str(tmp_path / "bad"),
                        expect_ok=False)
    assert result.returncode != 0 and "row 0: field 'label'" in result.stderr and "Traceback" not in result.stderr


def test_aapa_staged_from_base_model_discriminator_frozen_and_resume(tiny_world, tmp_path):
    """From the untrained model, whose responses are far from the expert's, the fixed
    discriminator must separate them on held-out prompts; it must not change while the
    policy trains; stopping inside stage 1 and resuming must equal an uninterrupted run."""
    full = tmp_path / "full"
    flags = grpo_flags(tiny_world, full, tiny_world["model"]) + [
        "--expert-cache", tiny_world["expert_cache"], "--expert-pool", tiny_world["train"], "--staged", "--stage1-steps", "2", "--disc-prompts", "64",
        "--disc-holdout", "0.25"]
    train_in_process("algos/aapa.py", *flags)
    saved = torch.load(full / "discriminator.pt", weights_only=True)
    assert saved["heldout_accuracy"] > 0.75
    final = torch.load(full / "checkpoint" / "trainer_state.pt", weights_only=True)["extra"]["discriminator"]
    assert all(torch.equal(saved["state_dict"][k], final["state_dict"][k]) for k in saved["state_dict"])
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/stage"] for m in metrics if "train/stage" in m] == [1, 1, 2, 2]
    assert all("eval/disc_accuracy_fresh" in m and "eval/anchor_score_expert" in m for m in metrics if "eval/gold" in m)
    assert (full / "stage1" / "config.json").exists()
    assert_interrupted_run_resumes_exactly("algos/aapa.py", flags, full, stop_at=1)


@pytest.mark.slow
def test_aapa_sft_and_chord_bases_run_with_a_saved_discriminator(tiny_world, sft_run, tmp_path):
    first = tmp_path / "first"
    flags = grpo_flags(tiny_world, first, str(sft_run / "checkpoint")) + [
        "--expert-cache", tiny_world["expert_cache"], "--expert-pool", tiny_world["train"], "--disc-prompts", "32", "--steps", "2"]
    train_in_process("algos/aapa.py", *flags)
    for base in ["sft", "chord"]:
        flags[flags.index("--output-dir") + 1] = str(tmp_path / base)
        train_in_process("algos/aapa.py", *flags, "--base", base, "--disc-path", str(first / "discriminator.pt"))
        metrics = [json.loads(line) for line in (tmp_path / base / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line]
        assert len(metrics) == 2 and all(m["train/expert_loss"] > 0 for m in metrics)
        assert not (tmp_path / base / "discriminator.pt").exists()  # reused, not retrained


def test_uniapl_end_to_end_and_resume(tiny_world, sft_run, tmp_path):
    full = tmp_path / "full"
    flags = grpo_flags(tiny_world, full, str(sft_run / "checkpoint"))  # --num-iterations 2: old log-probs stored
    flags += ["--expert-cache", tiny_world["expert_cache"], "--expert-pool", tiny_world["train"], "--epsilon", "0.0", "--disc-steps", "2", "--gradient-penalty", "0.1"]
    train_in_process("algos/uniapl.py", *flags)
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    # epsilon 0 is always violated: the multiplier starts at 0 and grows by the divergence every step
    multipliers = [m["constraint/multiplier"] for m in metrics]
    assert multipliers[0] == 0.0 and all(b > a for a, b in zip(multipliers, multipliers[1:]))
    assert all(m["constraint/next_multiplier"] == pytest.approx(m["constraint/multiplier"] + m["constraint/divergence"])
               for m in metrics)
    assert all(0 <= m["disc/accuracy"] <= 1 and 0 <= m["disc/saturated"] <= 1 for m in metrics)
    # the second pass's ratio is against the stored sampling log-probs, after one update: not 1
    assert all(abs(m["train/ratio_mean"] - 1) > 1e-6 for m in metrics)
    assert_interrupted_run_resumes_exactly("algos/uniapl.py", flags, full, stop_at=2)


GPM_FLAGS = ["--steps", "3", "--batch-size", "8", "--eval-every", "3", "--holdout", "0.25"]


@pytest.fixture(scope="module")
def gpm_run(sft_run, pairs_file, tmp_path_factory):
    gpm = tmp_path_factory.mktemp("gpm") / "gpm"
    train_in_process("algos/gpm.py", "--model", str(sft_run / "checkpoint"), "--pairs-data", str(pairs_file), "--output-dir", str(gpm),
                     *GPM_FLAGS)
    return gpm


def test_gpm_end_to_end(gpm_run):
    result = json.loads((gpm_run / "eval.json").read_text())
    assert 0 <= result["heldout_accuracy"] <= 1 and "axis_accuracy/correctness" in result
    assert (gpm_run / "checkpoint" / "gpm_heads.pt").exists()


def test_gpm_uneven_micro_batches_with_checkpointing_train_the_same_model(sft_run, pairs_file, gpm_run, tmp_path):
    gpm, gpm_small = gpm_run, tmp_path / "gpm_small"  # 3 + 3 + 2 pairs a step
    train_in_process("algos/gpm.py", "--model", str(sft_run / "checkpoint"), "--pairs-data", str(pairs_file), "--output-dir",
                     str(gpm_small), *GPM_FLAGS, "--micro-batch-size", "3", "--gradient-checkpointing")
    assert losses(gpm_small) == pytest.approx(losses(gpm), rel=1e-5, abs=1e-7)
    assert_same_weights(gpm_small, gpm)
    heads, small_heads = (torch.load(d / "checkpoint" / "gpm_heads.pt", weights_only=True) for d in (gpm, gpm_small))
    for name in ("value_head", "gate_head"):
        for key, value in heads[name].items():
            assert torch.allclose(value, small_heads[name][key], atol=1e-6), (name, key)


def gprl_flags(world, sft_run, gpm_run, out):
    flags = grpo_flags(world, out, str(sft_run / "checkpoint"))
    del flags[flags.index("--beta"):flags.index("--beta") + 2]
    return flags + ["--gpm", str(gpm_run / "checkpoint"), "--drift-every", "2", "--probe-prompts", "8"]


def test_gprl_end_to_end_and_resume(tiny_world, sft_run, gpm_run, tmp_path):
    full = tmp_path / "full"
    flags = gprl_flags(tiny_world, sft_run, gpm_run, full)
    train_in_process("algos/gprl.py", *flags)
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    drift = [m for m in metrics if "drift/alarm" in m]
    assert [m["step"] for m in drift] == [2, 4]
    assert all(f"drift/margin/{axis}" in m and f"drift/rho/{axis}" in m for m in drift for axis in ("correctness", "format", "concision"))
    bad_values = [(m["step"], k, v) for m in metrics for k, v in m.items() if not math.isfinite(v)]
    assert not bad_values
    assert_interrupted_run_resumes_exactly("algos/gprl.py", flags, full, stop_at=3)


def test_gprl_refuses_a_model_without_gpm_heads(tiny_world, sft_run, gpm_run, tmp_path):
    flags = gprl_flags(tiny_world, sft_run, gpm_run, tmp_path / "bad")
    result = run_script("algos/gprl.py", *flags, "--gpm", str(sft_run / "checkpoint"), expect_ok=False)
    assert result.returncode != 0 and "has no gpm_heads.pt" in result.stderr and "Traceback" not in result.stderr


def test_grpo_on_ifeval_style_data(tiny_world, tmp_path):
    """The real-data path: IFEval-schema rows with IFEval instruction ids, scored by the official checkers."""
    rows = [{"key": i, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs} for i, (prompt, ids, kwargs) in enumerate([
        ("Say hi in lowercase.", ["change_case:english_lowercase"], [{}]),
        ("Answer without commas.", ["punctuation:no_comma"], [{}]),
        ("Write at least 2 words.", ["length_constraints:number_words"], [{"num_words": 2, "relation": "at least"}]),
        ("End with the word done.", ["startend:end_checker"], [{"end_phrase": "done"}]),
    ])]
    data = tmp_path / "ifeval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grpo"
    flags = grpo_flags(tiny_world, out, tiny_world["model"]) + ["--train-data", str(data), "--eval-data", str(data), "--steps", "2"]
    train_in_process("algos/grpo.py", *flags)
    result = json.loads((out / "eval.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the gold in eval.json is the verifiers' verdict on the saved greedy responses
    assert result["gold"] == pytest.approx(sum(gold(r, text) for r, text in zip(rows, result["samples"])) / len(rows))
    assert all(f"eval/{name}" in metrics[-1] for name in ("gold", "gold_loose", "instruction_strict", "instruction_loose"))


@pytest.mark.slow  # five processes; tests/test_validation_fuzz.py checks the same paths in process
def test_bad_inputs_give_one_line_errors(tiny_world, tmp_path):
    other_prompts = tmp_path / "other.jsonl"
    other_prompts.write_text('{"prompt": "copy zz", "instruction_id_list": ["toy:task:copy"], "kwargs": [{"text": "zz"}]}\n')
    result = run_script("algos/sft.py", *sft_flags(tiny_world, tmp_path / "a"), "--train-data", str(other_prompts),
                        expect_ok=False)
    assert result.returncode != 0 and "misses 1 of 1 prompts" in result.stderr and "Traceback" not in result.stderr
    result = run_script("algos/grpo.py", *grpo_flags(tiny_world, tmp_path / "b", tiny_world["model"]),
                        "--group-size", "1", expect_ok=False)
    assert result.returncode != 0 and "--group-size must be in [2, inf)" in result.stderr
    (tmp_path / "not_a_model").mkdir()
    result = run_script("algos/grpo.py", *grpo_flags(tiny_world, tmp_path / "c", str(tmp_path / "not_a_model")), expect_ok=False)
    assert result.returncode != 0 and "not a saved model folder" in result.stderr and "Traceback" not in result.stderr
    result = run_script("algos/chord.py", *grpo_flags(tiny_world, tmp_path / "d", tiny_world["model"]),
                        "--expert-cache", tiny_world["expert_cache"], "--expert-data-ratio", "1.0", expect_ok=False)
    assert result.returncode != 0 and "--expert-data-ratio must be in (0, 1)" in result.stderr
    result = run_script("algos/grpo.py", *grpo_flags(tiny_world, tmp_path / "e", tiny_world["model"]),
                        "--max-prompt-tokens", "3", "--long-prompts", "error", expect_ok=False)
    assert result.returncode != 0 and "row 0: prompt has" in result.stderr and "Traceback" not in result.stderr


def final_weights_are_finite(out: Path) -> bool:
    if not (out / "checkpoint").exists():
        return True
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
    return all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("script", ["algos/sft.py", pytest.param("algos/grpo.py", marks=pytest.mark.slow)])
def test_an_update_that_makes_weights_non_finite_stops_the_run_and_is_never_saved(script, tiny_world, tmp_path):
    """--learning-rate 1e30: the loss stays finite for a step or two while the weights or
    the gradient norm blow up. The run must stop with one line naming the step, keep the
    last good checkpoint and write no eval.json."""
    out = tmp_path / "out"
    flags = sft_flags(tiny_world, out) if script == "algos/sft.py" else grpo_flags(tiny_world, out, tiny_world["model"])
    flags += ["--learning-rate", "1e30", "--save-every", "1"]
    result = run_script(script, *flags, expect_ok=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("at step" in last or "of step" in last), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (out / "eval.json").exists()
    assert final_weights_are_finite(out)


def test_a_reward_that_overflows_float32_is_named():
    """1e39 is a finite Python float but inf in float32: it is named as the reward, not
    left to surface later as a non-finite loss."""
    with pytest.raises(SystemExit, match="returned 1e\\+39 for prompt 'copy ab', which overflows float32"):
        reward_scores(lambda row, text: 1e39, [{"prompt": "copy ab"}], ["ab"])


def test_extending_a_finished_run_rewrites_its_eval_and_a_short_eval_set_is_recorded(tiny_world, tmp_path, capsys):
    out = tmp_path / "run"
    flags = grpo_flags(tiny_world, out, tiny_world["model"])
    flags[flags.index("--steps") + 1] = "2"
    flags[flags.index("--eval-prompts") + 1] = "999"  # the eval set has 16 rows
    capsys.readouterr()
    train_in_process("algos/grpo.py", *flags)
    printed = capsys.readouterr().out
    assert "--eval-prompts 999 but" in printed and "has 16 rows" in printed
    assert json.loads((out / "eval.json").read_text())["step"] == 2
    assert json.loads((out / "eval.json").read_text())["prompts"] == 16
    flags[flags.index("--steps") + 1] = "4"
    train_in_process("algos/grpo.py", *flags, "--resume", "--allow-flag-changes")
    record = json.loads((out / "eval.json").read_text())
    last_eval = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval/gold" in line][-1]
    assert record["step"] == 4 and last_eval["step"] == 4 and record["gold"] == last_eval["eval/gold"]


@pytest.mark.slow
def test_gprl_logs_the_eps_and_beta_its_loss_used(tiny_world, sft_run, pairs_file, tmp_path):
    """An alarm at every drift check (dominance 0, any change counts as a fall) changes
    eps and beta for the NEXT steps: train/eps and train/beta of a step are the values
    its loss used, i.e. the previous check's drift/eps and drift/beta."""
    gpm = tmp_path / "gpm"
    train_in_process("algos/gpm.py", "--model", str(sft_run / "checkpoint"), "--pairs-data", str(pairs_file), "--output-dir", str(gpm),
                     "--steps", "2", "--batch-size", "8", "--eval-every", "2", "--holdout", "0.25")
    out = tmp_path / "gprl"
    flags = grpo_flags(tiny_world, out, str(sft_run / "checkpoint"))
    del flags[flags.index("--beta"):flags.index("--beta") + 2]
    train_in_process("algos/gprl.py", *flags, "--gpm", str(gpm / "checkpoint"), "--drift-every", "1", "--probe-prompts", "8",
                     "--dominance", "0", "--noise-z", "-1000", "--beta", "0.04", "--learning-rate", "0.05")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/eps" in line]
    assert sum(m["drift/alarm"] for m in metrics) >= 1
    assert metrics[0]["train/eps"] == pytest.approx(0.2) and metrics[0]["train/beta"] == pytest.approx(0.04)
    for previous, current in zip(metrics, metrics[1:]):
        assert current["train/eps"] == pytest.approx(previous["drift/eps"])
        assert current["train/beta"] == pytest.approx(previous["drift/beta"])
    # the monitor-off twin: the same alarms are counted and logged, but eps and beta never move
    off = tmp_path / "gprl_off"
    flags[flags.index("--output-dir") + 1] = str(off)
    train_in_process("algos/gprl.py", *flags, "--gpm", str(gpm / "checkpoint"), "--drift-every", "1", "--probe-prompts", "8",
                     "--dominance", "0", "--noise-z", "-1000", "--beta", "0.04", "--learning-rate", "0.05", "--no-drift-adjust")
    metrics = [json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines() if "train/eps" in line]
    assert sum(m["drift/alarm"] for m in metrics) >= 1
    assert all(m["train/eps"] == 0.2 and m["drift/eps"] == 0.2 and m["train/beta"] == 0.04 for m in metrics)



def metrics_by_step(out: Path) -> dict[int, dict]:
    merged = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        merged.setdefault(record["step"], {}).update(record)
    return merged


def test_aapa_grpo_with_anchor_0_is_grpo(tiny_world, sft_run, tmp_path):
    """The table uses the GRPO run as AAPA-GRPO's anchor-0 control: the two must train the same policy."""
    flags = grpo_flags(tiny_world, tmp_path / "grpo", str(sft_run / "checkpoint"))
    flags[flags.index("--steps") + 1] = "2"
    train_in_process("algos/grpo.py", *flags)
    flags[flags.index("--output-dir") + 1] = str(tmp_path / "aapa")
    train_in_process("algos/aapa.py", *flags, "--anchor-coef", "0", "--expert-cache", tiny_world["expert_cache"],
                     "--expert-pool", "", "--disc-prompts", "16", "--disc-epochs", "3")
    grpo, aapa = metrics_by_step(tmp_path / "grpo"), metrics_by_step(tmp_path / "aapa")
    for step, record in grpo.items():
        for key, value in record.items():
            if key.startswith(("train/", "eval/")):
                assert aapa[step][key] == value, (step, key)
    assert_same_weights(tmp_path / "grpo", tmp_path / "aapa")


@pytest.mark.slow
def test_expert_rows_come_only_from_the_expert_pool(tiny_world, sft_run, tmp_path):
    """--expert-pool limits the demonstrations a run may see: a cache holding only the pool's
    responses is enough, and a pool prompt missing from the cache is named."""
    rows = [json.loads(line) for line in Path(tiny_world["train"]).read_text().splitlines()]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in rows[:12]))
    cache = [json.loads(line) for line in Path(tiny_world["expert_cache"]).read_text().splitlines()]
    pool_prompts = {row["prompt"] for row in rows[:12]}
    small_cache = tmp_path / "cache.jsonl"
    small_cache.write_text("".join(json.dumps(r) + "\n" for r in cache if "prompt" not in r or r["prompt"] in pool_prompts))
    for script, extra in [("algos/chord.py", ["--preset", "chord-mu"]), ("algos/uniapl.py", []),
                          ("algos/aapa.py", ["--base", "sft", "--disc-prompts", "10", "--disc-epochs", "3"])]:
        flags = grpo_flags(tiny_world, tmp_path / script.split("/")[1], str(sft_run / "checkpoint"))
        flags[flags.index("--steps") + 1] = "1"
        train_in_process(script, *flags, *extra, "--expert-cache", str(small_cache), "--expert-pool", str(pool))
    result = run_script("algos/chord.py", *flags, "--expert-cache", str(small_cache), "--expert-pool", "",
                        "--output-dir", str(tmp_path / "everything"), expect_ok=False)
    assert result.returncode != 0 and "error: expert cache" in result.stderr and "Traceback" not in result.stderr
