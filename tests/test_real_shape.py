"""scripts/real_shape.py's commands, each run on a toy-sized model (--shape tiny): the
measurement at Qwen3-0.6B's shape takes most of an hour, so a command broken by a
change elsewhere (a flag renamed, a default that now reads other data) is caught here
instead of there."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow  # thirteen runs, about two minutes on 2 cores
def test_every_real_shape_command_runs_on_a_tiny_model(tmp_path):
    result = subprocess.run([sys.executable, "scripts/real_shape.py", "--shape", "tiny", "--work-dir", str(tmp_path),
                             "--table", ""], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and not line.startswith("| algorithm")]
    rows = rows[len(rows) // 2:]  # each row is printed as it is measured, then again in the table
    assert len(rows) == 13 and not [row for row in rows if "failed" in row], "\n".join(rows)
    cells = {row.strip("| ").split(" | ")[0]: row.strip("| ").split(" | ")[1:4] for row in rows}
    assert all("-" not in peaks[:2] for peaks in cells.values())  # every run logged its setup and step peaks
    assert [name for name, peaks in cells.items() if peaks[2] == "-"] == ["gpm"]  # the one without a generation eval
