"""How far each algorithm file is from the base it was written from: the lines that
differ between algos/grpo.py and each RL algorithm (and algos/sft.py and
algos/adpo_pairwise.py, whose own bases are not GRPO, for reference), counted as
`diff` counts them (a changed line is one removed plus one added). The project's
targets: chord <= 110, adpo <= 170, gprl, uniapl and aapa <= 240.

    python scripts/diff_sizes.py
"""

import difflib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"chord": 110, "adpo": 170, "gprl": 240, "uniapl": 240, "aapa": 240}


def changed_lines(base: Path, other: Path) -> int:
    """Lines removed from `base` plus lines added in `other`."""
    diff = difflib.unified_diff(base.read_text().splitlines(), other.read_text().splitlines(), lineterm="", n=0)
    return sum(1 for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---")))


if __name__ == "__main__":
    base = ROOT / "algos" / "grpo.py"
    print(f"{'file':<24}{'lines':>7}{'changed vs grpo.py':>21}{'target':>9}")
    for name in ("chord", "adpo", "gprl", "uniapl", "aapa", "sft", "adpo_pairwise", "gpm"):
        path = ROOT / "algos" / f"{name}.py"
        target = TARGETS.get(name)
        print(f"{path.name:<24}{len(path.read_text().splitlines()):>7}{changed_lines(base, path):>21}"
              f"{target if target else '-':>9}")
