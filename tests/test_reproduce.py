"""The main job in its smallest mode: every method runs from one SFT checkpoint, the table
reports each run's own numbers and the paired differences computed from them, the plots
are drawn, a second call redoes nothing; and the job's command list and statistics."""

import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_main

sys.path.insert(0, str(ROOT / "scripts"))
from reproduce import (  # noqa: E402
    LEARNING_RATES,
    POOL_SCRIPTS,
    PRIMARY,
    WORLDS,
    check_hyperparameters,
    gprl_diagnostics,
    holm,
    holm_over_testable,
    p_value,
    paired,
    power,
    prediction_outcome,
    same_runs,
    slug,
    table_rows,
    verdict,
    write_summary,
)

from shared.evaluation import WORLD_SCORE_KEYS  # noqa: E402

SETTINGS = {"rl_steps": 8, "side_prompts": 200, "prompts_per_step": 4, "group_size": 4, "data_dir": "data/toy"}
TABLE_ROWS = table_rows(ROOT / "runs", 1, {**SETTINGS, "all": False})  # the rows of the table, from the job's description
ALL_ROWS = table_rows(ROOT / "runs", 1, {**SETTINGS, "all": True})
ROWS = ["base model", "SFT", *[row.name for row in TABLE_ROWS]]
# the first design (--world toy): every row and the nine PRIMARY claims on data/toy
SMALLEST = ["--world", "toy", "--seeds", "1", "--sft-steps", "10", "--rl-steps", "2", "--gpm-steps", "4", "--eval-prompts", "16",
            "--prompts-per-step", "4", "--group-size", "4", "--side-prompts", "200"]


def reproduce(out_dir, *extra) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "--out-dir", str(out_dir), *SMALLEST, *extra], cwd=ROOT,
                            capture_output=True, text=True, env={"TQDM_DISABLE": "1", **os.environ})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_paired_differences_get_a_t_interval_over_seeds():
    values = [0.10, 0.14, 0.12]
    half = 4.303 * statistics.stdev(values) / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    text, excludes = paired(values)
    assert text == f"+0.120 [{0.12 - half:+.3f}, {0.12 + half:+.3f}]" and excludes == "yes, above"
    assert paired([0.1, -0.1, 0.05])[1] == "no" and paired([-0.2, -0.25, -0.22])[1] == "yes, below"
    assert paired([0.3]) == ("+0.300", "– (1 seed)")
    # past 10 degrees of freedom too (a table once stopped there): 12 seeds, t(0.975, 11) = 2.201 (printed tables)
    twelve = [0.1, 0.2] * 6
    half = 2.201 * statistics.stdev(twelve) / math.sqrt(12)
    assert paired(twelve)[0] == f"+0.150 [{0.15 - half:+.3f}, {0.15 + half:+.3f}]"


def test_holm_adjustment_against_a_hand_computation():
    # sorted 0.01 < 0.02 < 0.04 < 0.30: x4, x3, x2, x1, then running maxima
    assert holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
    assert holm([0.5, 0.01]) == pytest.approx([0.5, 0.02])
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04])


def printed_commands(capsys, *flags) -> list[str]:
    """`python scripts/reproduce.py --print-commands FLAGS`, in this process; its printed lines."""
    capsys.readouterr()
    assert run_main("scripts/reproduce.py", "--print-commands", *flags) == 0
    return capsys.readouterr().out.splitlines()


def test_print_commands_lists_every_row_and_quick_never_overrides_a_given_flag(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the job's paths are relative to the project
    lines = printed_commands(capsys, "--world", "toy", "--quick", "--rl-steps", "8")
    assert len(lines) == 3 + len(TABLE_ROWS)  # one seed: SFT, pairs, GPM, then a line per row
    assert [line.split()[0] for line in lines[3:]] == [row.script for row in TABLE_ROWS]
    assert lines[0].startswith("algos/sft.py --seed 1 --steps 150 ")  # --quick's SFT length
    assert all("--steps 8 " in line for line in lines[3:])  # the given --rl-steps, not --quick's
    assert all("--learning-rate 0.0002 " in line for line in lines[3:])  # one rate for method and control
    assert lines.index(next(l for l in lines if "gpm.py" in l)) < lines.index(next(l for l in lines if "gprl.py" in l))
    # every demonstration comes from SFT's pool: the pairs, and the scripts' default --expert-pool
    assert "--data data/toy/sft_prompts.jsonl" in lines[1] and not any("--expert-pool" in line for line in lines)
    everything = printed_commands(capsys, "--world", "toy", "--quick", "--all")
    # with the exploratory rows: the scalar judge (GRPO, scalar judge) fitted to the same pairs as the GPM
    assert [line.split()[0] for line in everything[:4]] == ["algos/sft.py", "scripts/build_preference_pairs.py",
                                                            "algos/gpm.py", "algos/gpm.py"]
    assert "--dims 1 --axis-weight 0" in everything[3] and "--dims" not in everything[2]
    assert len(everything) == 4 + len(ALL_ROWS) and len(ALL_ROWS) > len(TABLE_ROWS)
    sweep = printed_commands(capsys, "--world", "toy", "--sweep")
    # two seeds the table never uses; every row with its own rate (a twin takes its method's) at each rate
    tuned = [row for row in TABLE_ROWS if not row.rate_of]
    assert 0 < len(tuned) < len(TABLE_ROWS)
    assert len(sweep) == 2 * (3 + len(tuned) * len(LEARNING_RATES)) and all("data/toy/val.jsonl" in line for line in sweep if "--eval-data" in line)
    assert all(" --seed 10" in line for line in sweep)
    # --rows: the named rows and only what they read (AAPA staged loads AAPA-GRPO's discriminator; GPRL the GPM)
    only = printed_commands(capsys, "--world", "toy", "--quick", "--rows", "AAPA staged", "GPRL")
    assert [line.split()[0] for line in only] == ["algos/sft.py", "scripts/build_preference_pairs.py", "algos/gpm.py",
                                                  "algos/aapa.py", "algos/aapa.py", "algos/gprl.py"]
    assert "aapa-grpo_seed1 --resume" in only[3] and "--staged" in only[4] and "--anchor-coef" not in only[4]


def test_each_row_field_reaches_its_command(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    lines = printed_commands(capsys, "--world", "toy", "--quick", "--all")
    by_row = dict(zip([slug(row.name) for row in ALL_ROWS], lines[4:]))  # after SFT, pairs, GPM, scalar judge
    for row in ALL_ROWS:
        line = by_row[slug(row.name)]
        assert line.startswith(row.script) and f"--output-dir results/quick/runs/{slug(row.name)}_seed1 " in line, row.name
        assert ("--group-size" in line) == row.rollouts, row.name  # offline rows: steps only
        assert f"--eval-every {row.eval_every or 2} " in line, row.name  # the row's own, or a fifth of --quick's 10 steps
        assert all(f"{flag} 0.0002" in line for flag in row.rate_flags), row.name
        assert all(f"{need}_seed1" in line for need in row.needs if need not in ("pairs", "gpm")), row.name
    assert any(not row.rollouts for row in ALL_ROWS) and any(row.eval_every for row in ALL_ROWS)
    assert any(len(row.rate_flags) > 1 for row in ALL_ROWS)


def test_every_primary_comparison_names_two_rows_of_the_job():
    def check(claims, rows):
        assert all(method in rows and control in rows and method != control for _, method, control in claims)
        assert len({(method, control) for _, method, control in claims}) == len(claims)

    check(PRIMARY, set(ROWS))  # the main job's claims name rows of its table
    for world in WORLDS.values():  # a world's may name an exploratory row: its job runs the rows it names
        check(world.claims, {"SFT", *(row.name for row in ALL_ROWS)})
        assert set(world.predictions) <= {(method, control) for _, method, control in world.claims}


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_a_world_runs_the_rows_its_claims_name_on_its_own_data(capsys, monkeypatch, name):
    monkeypatch.chdir(ROOT)
    world, data = WORLDS[name], f"data/worlds/{name}"
    lines = printed_commands(capsys, "--world", name, "--seeds", "2")
    named = {row for _, *pair in world.claims for row in pair} - {"SFT"}
    needed = {need for row in ALL_ROWS if row.name in named for need in row.needs}
    expected = [row for row in ALL_ROWS if row.name in named or slug(row.name) in needed]
    judges = sorted(needed & {"gpm", "scalar_judge"})  # each trained on the seed's one pairs file
    data_steps = (1 + len(judges)) if judges else 0
    sft_runs = 2 if world.generic_sft_steps else 1  # the house world: plain answers, then the house's demonstrations
    per_seed = sft_runs + data_steps + len(expected)  # SFT, the pairs and judges its rows read, one run per row
    assert len(lines) == 2 * per_seed
    assert [line.split()[0] for line in lines[sft_runs + data_steps:per_seed]] == [row.script for row in expected]
    for line in lines[sft_runs:sft_runs + data_steps]:  # the pairs, labelled as the world says, then the judges
        flags = shlex.split(line)
        assert (flags[0] == "scripts/build_preference_pairs.py") == (line is lines[sft_runs])
        assert f"results/worlds/{name}/runs/pairs_seed1.jsonl" in line
        assert (" ".join(world.pairs_flags) in line) == (line is lines[sft_runs]) or not world.pairs_flags
    for line in lines:
        flags = shlex.split(line)
        if flags[0] in ("scripts/build_preference_pairs.py", "algos/gpm.py"):
            continue
        value = {flag: flags[i + 1] for i, flag in enumerate(flags[:-1]) if flag.startswith("--")}
        assert "data/toy" not in line and f"--output-dir results/worlds/{name}/runs/" in line, line
        assert value["--eval-data"] == f"{data}/{world.eval_file}" and value["--eval-prompts"] == str(world.eval_prompts)
        assert value.get("--eval-fn") == (world.eval_fn or None), line
        if "generic_sft_seed" in value["--output-dir"]:  # the first pass: the oracle's plain answers
            assert value["--expert-cache"] == f"{data}/generic_cache.jsonl"
            assert value["--steps"] == str(world.generic_sft_steps)
        elif flags[0] == "algos/sft.py":  # SFT, or the continued-SFT row
            assert value["--train-data"] == f"{data}/sft_prompts.jsonl" and value["--expert-cache"] == f"{data}/expert_cache.jsonl"
            if world.generic_sft_steps:  # the second pass starts where the first ended
                assert value["--model"] == value["--output-dir"].replace("/sft_seed", "/generic_sft_seed") + "/checkpoint"
        else:  # an RL row: the world's prompts and reward, 40 steps of 64 prompts
            assert value["--train-data"] == f"{data}/train.jsonl" and value.get("--reward-fn") == (world.reward_fn or None)
            assert value["--steps"] == "40" and value["--prompts-per-step"] == "64"
        assert (value.get("--expert-pool") == f"{data}/sft_prompts.jsonl") == (flags[0] in POOL_SCRIPTS), line
    sweep = [line for line in printed_commands(capsys, "--world", name, "--sweep") if line.startswith("algos/") and
             not line.startswith("algos/gpm.py")]  # the training runs
    assert all(f"--eval-data {data}/val.jsonl " in line for line in sweep)
    assert all(("--eval-fn" in line) == bool(world.val_fn) for line in sweep)  # never the shifted split's scorer


def test_power_against_a_simulation_of_the_paired_t_test():
    rng = __import__("numpy").random.default_rng(0)
    differences = [0.05, 0.02, 0.09, -0.01, 0.06, 0.04]  # observed effect mean / sd = 1.27
    effect = statistics.mean(differences) / statistics.stdev(differences)
    samples = rng.normal(effect, 1.0, size=(40_000, 6))
    t = samples.mean(1) / (samples.std(1, ddof=1) / math.sqrt(6))
    simulated = float((abs(t) > 2.5706).mean())  # the t(5) quantile at 0.975
    assert power(differences) == pytest.approx(simulated, abs=0.01)
    assert power([0.0, 0.0]) != power([0.0, 0.0]) and power([0.1]) != power([0.1])  # NaN: no spread, one seed
    assert power([0.117, 0.139, 0.139, 0.128, 0.156, 0.133]) == pytest.approx(1.0)  # an effect of 10 sd: certain
    assert power([-d for d in differences]) == pytest.approx(power(differences))  # two-sided


@pytest.mark.slow  # about 3 minutes on 2 cores; it also rebuilds data/toy, which other tests read
def test_smallest_main_job_tables_every_row_and_resumes_without_rerunning(tmp_path):
    first = reproduce(tmp_path)
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert "at temperature 1, 16 prompts." in "".join(lines)  # the KL's prompts: min(64, --eval-prompts)
    start = next(i for i, line in enumerate(lines) if line.startswith("| row"))
    end = lines.index("", start)
    header = lines[start].strip("| ").split(" | ")
    table = {cells[0]: dict(zip(header, cells)) for cells in (line.strip("| ").split(" | ") for line in lines[start + 2:end])}
    assert list(table) == ROWS
    runs = tmp_path / "runs"
    gold = {row: json.loads((runs / f"{slug(row)}_seed1" / "eval.json").read_text())["gold"] for row in ROWS[1:]}
    gold["base model"] = json.loads((runs / "sft_seed1" / "initial_eval.json").read_text())["gold"]
    for row, cells in table.items():
        assert float(cells["gold"]) == pytest.approx(gold[row], abs=5e-4), row  # the run's own number
        if row not in ("base model", "SFT"):
            kl = float(cells["KL to SFT"])
            assert math.isfinite(kl) and kl >= 0.0, row
    comparisons = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and " - " in line.split(" | ")[1]
                   and not line.startswith("| claim")]
    assert len(comparisons) == len(PRIMARY)
    for (claim, method, control), cells in zip(PRIMARY, comparisons):
        assert cells[0] == claim and cells[1] == f"{method} - {control}"
        assert float(cells[2]) == pytest.approx(gold[method] - gold[control], abs=1.5e-3), claim
    for plot in ("curves.png", "lengths.png", "logprobs.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert first.stdout.count("$ algos/") == 2 + len(TABLE_ROWS)  # SFT, the GPM and a run per row
    again = reproduce(tmp_path)
    assert "$ " not in again.stdout and (tmp_path / "table.md").read_text().splitlines()[:len(lines) - 2] == lines[:-2]
    # other settings over finished runs: refused up front, the table left as it was
    table_text = (tmp_path / "table.md").read_text()
    changed = subprocess.run([sys.executable, "scripts/reproduce.py", "--out-dir", str(tmp_path), *SMALLEST, "--eval-prompts", "8"],
                             cwd=ROOT, capture_output=True, text=True)
    assert changed.returncode != 0 and "holds a run made with other settings (--eval-prompts 16 -> 8)" in changed.stderr
    assert "$ " not in changed.stdout and (tmp_path / "table.md").read_text() == table_text


@pytest.mark.parametrize("content, expected", [
    ("{not json", "is not valid JSON"),
    ('{"GRPOO": {"learning_rate": 1e-4}}', "names method 'GRPOO', which the job does not have"),
    ('{"GRPO": {"learning_rat": 1e-4}}', "the entry of 'GRPO' must hold 'learning_rate'"),
    ('{"GRPO": {"learning_rate": -1}}', "the learning rate of 'GRPO' must be a positive number"),
])
def test_a_bad_hyperparameters_file_is_one_line_before_anything_runs(tmp_path, content, expected):
    path = tmp_path / "hyperparameters.json"  # where --sweep --out-dir writes it
    path.write_text(content)
    with pytest.raises(SystemExit) as stop:
        check_hyperparameters(path, {"GRPO", "CHORD-mu"})
    assert str(stop.value).startswith("error: ") and expected in str(stop.value) and "\n" not in str(stop.value)


def test_the_sweeps_choices_are_read_from_the_same_out_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    (tmp_path / "hyperparameters.json").write_text('{"GRPO": {"learning_rate": 0.000123}}')
    lines = printed_commands(capsys, "--out-dir", str(tmp_path))
    assert "--learning-rate 0.000123" in next(line for line in lines if line.startswith("algos/grpo.py"))


def processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in open(f"/proc/{pid}/cmdline").read():
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_job_and_its_running_commands(tmp_path, signal_number):
    job = subprocess.Popen([sys.executable, "scripts/reproduce.py", "--out-dir", str(tmp_path), *SMALLEST], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"TQDM_DISABLE": "1", **os.environ})
    for line in job.stdout:
        if line.startswith("$ algos/sft.py"):
            break
    time.sleep(3)
    assert [pid for pid in processes_mentioning(str(tmp_path)) if pid != job.pid]  # the SFT command runs
    job.send_signal(signal_number)
    assert job.wait(timeout=60) == 128 + signal_number
    assert "stopped by" in job.stderr.read()
    time.sleep(1)
    assert processes_mentioning(str(tmp_path)) == []


def test_reproduce_refuses_a_missing_hyperparameters_file_and_one_given_to_the_sweep(tmp_path, capsys):
    missing = run_main("scripts/reproduce.py", "--out-dir", str(tmp_path), "--print-commands",
                       "--hyperparameters", str(tmp_path / "no_such.json"))
    assert missing.startswith("error: --hyperparameters") and "does not exist" in missing and "\n" not in missing
    assert capsys.readouterr().out == ""  # nothing printed, nothing run
    (tmp_path / "mine.json").write_text('{"GRPO": {"learning_rate": 0.000123}}')
    sweep = run_main("scripts/reproduce.py", "--out-dir", str(tmp_path), "--print-commands", "--sweep",
                     "--hyperparameters", str(tmp_path / "mine.json"))
    assert sweep.startswith("error: --sweep writes") and "drop --hyperparameters" in sweep


def test_print_commands_into_a_pipe_closed_early_is_no_traceback():
    result = subprocess.run(f"{shlex.quote(sys.executable)} scripts/reproduce.py --print-commands | head -n 1", shell=True,
                            cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.startswith("algos/") and result.stdout.count("\n") == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


@pytest.mark.slow  # about 1.5 minutes each on 2 cores; it builds data/worlds/<world>
@pytest.mark.parametrize("world", ["house", "judge"])
def test_a_world_job_tables_its_own_scores_and_its_claims(tmp_path, world):
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "--world", world, "--quick", "--sft-steps", "10",
                             "--rl-steps", "2", "--eval-prompts", "16", "--side-prompts", "40", "--out-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env={"TQDM_DISABLE": "1", **os.environ})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = (tmp_path / "table.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| row"))
    header = lines[start].strip("| ").split(" | ")
    table = {cells[0]: dict(zip(header, cells))
             for cells in (line.strip("| ").split(" | ") for line in lines[start + 2:lines.index("", start)])}
    claims = WORLDS[world].claims
    assert set(table) == {"base model", "SFT", *(row for _, *pair in claims for row in pair)}
    for row in set(table) - {"base model"}:
        record = json.loads((tmp_path / "runs" / f"{slug(row)}_seed1" / "eval.json").read_text())
        own = [key for key in WORLD_SCORE_KEYS if key in record]
        assert own and set(own) <= set(header)  # the world's scores, each the run's own
        for key in ("gold", *own):
            assert float(table[row][key]) == pytest.approx(record[key], abs=6e-4), (row, key)  # printed to 3 places
    assert [line.split(" | ")[0].strip("| ") for line in lines if line.startswith("| ") and " - " in line.split(" | ")[1]
            and not line.startswith("| claim")] == [claim for claim, _, _ in claims]


def test_a_prediction_holds_only_when_both_its_size_and_its_verdict_come_true():
    ahead = [0.05, 0.04, 0.06, 0.05, 0.07, 0.04]  # mean +0.052
    assert prediction_outcome((0.03, math.inf, True), ahead, 0.01).endswith("held")
    assert prediction_outcome((0.03, math.inf, True), ahead, 0.2).endswith("failed")  # right size, not supported
    assert prediction_outcome((0.06, math.inf, True), ahead, 0.01).endswith("failed")  # supported, too small
    assert prediction_outcome((-0.05, 0.05, False), [d - 0.05 for d in ahead], 0.6).endswith("held")  # a tie
    assert prediction_outcome((-0.05, 0.05, False), ahead, 0.6).endswith("failed")  # outside the tie's bounds
    assert prediction_outcome(None, ahead, 0.01) == "–"


def test_identical_runs_leave_the_holm_family_and_are_predicted_as_such():
    effect, other, same = [0.05, 0.02, 0.09, -0.01, 0.06, 0.04], [0.01, -0.02, 0.03, 0.0, 0.02, -0.01], [0.0] * 6
    adjusted = holm_over_testable([effect, same, other], [False, True, False])
    assert adjusted[1] != adjusted[1]  # NaN: no p, no verdict
    assert adjusted[0] == pytest.approx(holm([p_value(effect), p_value(other)])[0])  # a family of two, not three
    assert adjusted[2] == pytest.approx(holm([p_value(effect), p_value(other)])[1])
    assert verdict(same, adjusted[1], same=True).startswith("not testable")
    assert prediction_outcome((0.0, 0.0, False), same, adjusted[1], same=True).endswith("held")
    assert prediction_outcome((0.0, 0.0, False), other, adjusted[2]).endswith("failed")
    # equal gold is not the same runs: two different policies that both score 0 stay in the family
    kept = holm_over_testable([effect, same, other], [False, False, False])
    assert kept[1] == kept[1] and verdict(same, kept[1]) == "not shown (no difference detected)"


def test_same_runs_means_every_shared_score_and_sample_equal():
    run = {1: {"gold": 0.0, "house_style": 0.1, "samples": ["a*"], "wall_time": 9.0}}
    twin = {1: {**run[1], "wall_time": 7.0, "anchor_score_rollouts": -1.0}}  # its own extras and timing
    assert same_runs(run, twin)
    assert not same_runs(run, {1: {**run[1], "house_style": 0.0}})  # the same gold, another policy
    assert not same_runs(run, {1: {**run[1], "samples": ["a"]}})


def test_the_summary_lists_every_worlds_claims_in_the_order_of_worlds_and_adds_their_times(tmp_path):
    written = {"judge": 2297, "plain": 1800}  # two worlds have finished, out of the order of WORLDS
    for name, seconds in written.items():
        claims = [{"claim": claim, "comparison": f"{method} - {control}", "difference": "+0.100 [+0.050, +0.150]",
                   "holm_p": None if index else 0.0123, "verdict": "supported", "prediction": "held"}
                  for index, (claim, method, control) in enumerate(WORLDS[name].claims)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "claims.json").write_text(json.dumps({"world": name, "seeds": 6, "job_time": seconds,
                                                                 "claims": claims}))
    text = write_summary(tmp_path)
    assert (tmp_path / "summary.md").read_text() == text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| plain") or line.startswith("| judge")]
    order = [name for name in WORLDS if name in written]
    expected = [(name, claim) for name in order for claim, *_ in WORLDS[name].claims]
    assert [(row[0].strip("| "), row[1]) for row in rows] == expected
    assert rows[0][4] == "0.012" and rows[1][4] == "–"  # a comparison left out of the family has no Holm p
    assert f"all 2 together {sum(written.values())} s" in text and "plain 1800 s, judge 2297 s" in text


def test_the_gprl_section_averages_over_seeds_and_has_a_monitor_off_column_only_with_that_row(tmp_path):
    def run(name: str, golds: tuple[float, float], margin: float) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        records = [{"step": 0, "eval/gold": golds[0]}, {"step": 5, "drift/margin/correctness": margin},
                   {"step": 10, "eval/gold": golds[1]}]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(record) for record in records))
        return folder

    gprl = [run("gprl_seed1", (0.5, 0.2), 0.01), run("gprl_seed2", (0.7, 0.4), 0.03)]
    alone = [line for line in gprl_diagnostics({"GPRL": gprl}) if line.startswith("| ")]
    assert alone == ["| step | gold | correctness |", "| 0 | 0.600 |  |", "| 5 |  | +0.0200 |", "| 10 | 0.300 |  |"]
    monitor_off = [run("off_seed1", (0.5, 0.1), 0.0), run("off_seed2", (0.7, 0.1), 0.0)]
    both = [line for line in gprl_diagnostics({"GPRL": gprl, "GPRL, monitor off": monitor_off}) if line.startswith("| ")]
    assert both[0] == "| step | gold | gold, monitor off | correctness |" and both[-1] == "| 10 | 0.300 | 0.100 |  |"
    assert gprl_diagnostics({"GRPO": gprl}) == []
