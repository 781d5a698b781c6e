"""The main job in its smallest mode: every method runs from one SFT checkpoint, the table
lists them all with finite numbers, the plots are drawn, and a second call redoes nothing."""

import math
import os
import subprocess
import sys

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
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            (tmp_path / "table.md").read_text().splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert list(rows) == METHODS
    for method, cells in rows.items():
        gold = float(cells[0].split(" ")[0])
        assert 0.0 <= gold <= 1.0, method
        if method not in ("base model", "SFT"):
            kl = float(cells[3].split(" ")[0])
            assert math.isfinite(kl) and kl >= 0.0, method
    for plot in ("curves.png", "lengths.png", "logprobs.png"):
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    assert first.stdout.count("$ algos/") == 13  # SFT, the GPM and 11 RL runs
    again = reproduce(tmp_path)
    assert "$ algos/" not in again.stdout and (tmp_path / "table.md").read_text().count("\n| ") == len(METHODS) + 1
