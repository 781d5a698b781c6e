"""The main job in its smallest mode: every method runs from one SFT checkpoint, the table
lists them all with finite numbers, the plots are drawn, and a second call redoes nothing."""

import math
import os
import subprocess
import sys

import pytest
from conftest import ROOT

METHODS = ["base model", "SFT", "GRPO", "CHORD-phi", "CHORD-mu", "AAPA-GRPO", "AAPA-SFT", "AAPA-CHORD", "AAPA staged",
           "UniAPL", "ADPO listwise", "ADPO pairwise", "GPRL"]
SMALLEST = ["--seeds", "1", "--sft-steps", "10", "--rl-steps", "2", "--gpm-steps", "4", "--eval-prompts", "16",
            "--prompts-per-step", "4", "--group-size", "4", "--side-prompts", "200"]


def reproduce(out_dir) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "scripts/reproduce.py", "--out-dir", str(out_dir), *SMALLEST], cwd=ROOT,
                            capture_output=True, text=True, env={"TQDM_DISABLE": "1", **os.environ})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_smallest_main_job_tables_every_method_and_resumes_without_rerunning(tmp_path):
    first = reproduce(tmp_path)
    lines = (tmp_path / "table.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method")).strip("| ").split(" | ")
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            (line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and not line.startswith("| method"))}
    assert list(rows) == METHODS
    for method, cells in rows.items():
        assert 0.0 <= float(cells["gold accuracy"]) <= 1.0, method
        if method not in ("base model", "SFT"):
            kl = float(cells["KL to SFT"])
            assert math.isfinite(kl) and kl >= 0.0, method
        # the paired column is this seed's gold minus GRPO's
        difference = float(cells["gold accuracy"]) - float(rows["GRPO"]["gold accuracy"])
        assert float(cells["gold - GRPO (paired by seed)"]) == pytest.approx(difference, abs=1.5e-3), method
    for plot in ("curves.png", "lengths.png", "logprobs.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert first.stdout.count("$ algos/") == 13  # SFT, the GPM and 11 RL runs
    again = reproduce(tmp_path)
    assert "$ algos/" not in again.stdout and (tmp_path / "table.md").read_text().count("\n| ") == len(METHODS) + 1
