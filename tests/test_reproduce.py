"""The main job in its smallest mode: every method runs from one SFT checkpoint, the table
reports each run's own numbers and the paired differences computed from them, the plots
are drawn, a second call redoes nothing; and the job's command list and statistics."""

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from reproduce import check_hyperparameters, paired  # noqa: E402

METHODS = ["base model", "SFT", "GRPO", "CHORD-phi", "CHORD-mu", "AAPA-GRPO", "AAPA-SFT", "AAPA-CHORD", "AAPA staged",
           "UniAPL", "ADPO listwise", "ADPO pairwise", "GPRL"]
RUN_NAMES = {"GRPO": "grpo", "CHORD-phi": "chord-phi", "CHORD-mu": "chord-mu", "AAPA-GRPO": "aapa-grpo", "AAPA-SFT": "aapa-sft",
             "AAPA-CHORD": "aapa-chord", "AAPA staged": "aapa_staged", "UniAPL": "uniapl", "ADPO listwise": "adpo_listwise",
             "ADPO pairwise": "adpo_pairwise", "GPRL": "gprl", "SFT": "sft"}
SMALLEST = ["--seeds", "1", "--sft-steps", "10", "--rl-steps", "2", "--gpm-steps", "4", "--eval-prompts", "16",
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


def test_print_commands_lists_both_phases_and_quick_never_overrides_a_given_flag():
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "--print-commands", "--quick", "--rl-steps", "7"],
                            cwd=ROOT, capture_output=True, text=True)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 3 + 11  # one seed: SFT, pairs, GPM, then 11 RL runs
    assert lines[0].startswith("algos/sft.py --seed 1 --steps 150 ")  # --quick's SFT length
    assert all("--steps 7 " in line for line in lines[3:])  # the given --rl-steps, not --quick's
    assert lines.index(next(l for l in lines if "gpm.py" in l)) < lines.index(next(l for l in lines if "gprl.py" in l))
    sweep = subprocess.run([sys.executable, "scripts/reproduce.py", "--print-commands", "--sweep"], cwd=ROOT,
                           capture_output=True, text=True).stdout.splitlines()
    assert len(sweep) == 3 + 11 * 3 and all("data/toy/val.jsonl" in line for line in sweep if "--eval-data" in line)


def test_smallest_main_job_tables_every_method_and_resumes_without_rerunning(tmp_path):
    first = reproduce(tmp_path)
    lines = (tmp_path / "table.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method")).strip("| ").split(" | ")
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            (line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and not line.startswith("| method"))}
    assert list(rows) == METHODS
    runs = tmp_path / "runs"
    gold = {m: json.loads((runs / f"{name}_seed1" / "eval.json").read_text())["gold"] for m, name in RUN_NAMES.items()}
    gold["base model"] = json.loads((runs / "sft_seed1" / "initial_eval.json").read_text())["gold"]
    for method, cells in rows.items():
        assert float(cells["gold"]) == pytest.approx(gold[method], abs=5e-4), method  # the run's own number
        assert float(cells["gold - SFT [95% CI]"]) == pytest.approx(gold[method] - gold["SFT"], abs=1.5e-3), method
        assert float(cells["gold - GRPO [95% CI]"]) == pytest.approx(gold[method] - gold["GRPO"], abs=1.5e-3), method
        if method not in ("base model", "SFT"):
            kl = float(cells["KL to SFT"])
            assert math.isfinite(kl) and kl >= 0.0, method
    for plot in ("curves.png", "lengths.png", "logprobs.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert first.stdout.count("$ algos/") == 13  # SFT, the GPM and 11 RL runs
    again = reproduce(tmp_path)
    assert "$ " not in again.stdout and (tmp_path / "table.md").read_text().count("\n| ") == len(METHODS) + 1
    # other settings over finished runs: refused up front, the table left as it was
    table = (tmp_path / "table.md").read_text()
    changed = subprocess.run([sys.executable, "scripts/reproduce.py", "--out-dir", str(tmp_path), *SMALLEST, "--eval-prompts", "8"],
                             cwd=ROOT, capture_output=True, text=True)
    assert changed.returncode != 0 and "holds a run made with other settings (--eval-prompts 16 -> 8)" in changed.stderr
    assert "$ " not in changed.stdout and (tmp_path / "table.md").read_text() == table


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


def test_the_sweeps_choices_are_read_from_the_same_out_dir(tmp_path):
    (tmp_path / "hyperparameters.json").write_text('{"GRPO": {"learning_rate": 0.000123}}')
    lines = subprocess.run([sys.executable, "scripts/reproduce.py", "--out-dir", str(tmp_path), "--print-commands"],
                           cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
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
