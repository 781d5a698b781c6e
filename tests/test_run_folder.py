"""One run per output folder, whatever instant a process dies at: the folder guard
(refuse, overwrite, lock, flag changes), checkpoint recovery after a save cut at every
step of its sequence, the metrics history on resume, and end-to-end kills."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, train_in_process

from shared import checkpoint, runfolder, seeding
from shared.checkpoint import save_checkpoint
from shared.runfolder import CHECKPOINT, COMPLETE, TRAINER_STATE, claim_output_dir, recover_checkpoint
from shared.runlog import RunLogger


@dataclasses.dataclass
class Flags:
    output_dir: str
    seed: int = 1
    learning_rate: float = 1e-4
    group_size: int = 8
    resume: bool = False
    overwrite: bool = False
    allow_flag_changes: bool = False
    stop_at_step: int = 0
    micro_batch_size: int = 64


@dataclasses.dataclass
class FlagsWithData(Flags):
    train_data: str = ""


class SavesAFile:
    """Stands in for a model or tokenizer: save_pretrained writes one file."""

    def parameters(self):
        return iter([torch.nn.Parameter(torch.zeros(1))])

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "weights.txt").write_text("w")


def save(folder: Path, step: int) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    save_checkpoint(folder, SavesAFile(), SavesAFile(), optimizer, scheduler, step, Flags(str(folder)))


def saved_step(folder: Path) -> int:
    return torch.load(folder / CHECKPOINT / TRAINER_STATE, weights_only=True)["step"]


def release_locks():
    for lock in runfolder._held_locks:
        lock.close()
    runfolder._held_locks.clear()


def claim(folder: Path, **flags):
    """claim_output_dir as a process that ends right after it would (its lock released)."""
    try:
        return claim_output_dir((FlagsWithData if "train_data" in flags else Flags)(str(folder), **flags))
    finally:
        release_locks()


def start(folder: Path, **flags):
    state = claim(folder, **flags)
    flag_class = FlagsWithData if "train_data" in flags else Flags
    RunLogger(folder, flag_class(str(folder), **flags), resume_step=state["step"] if state else 0).close()
    return state


def test_a_folder_holding_a_run_is_refused_without_resume_and_cleared_with_overwrite(tmp_path):
    start(tmp_path / "a")
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):
        claim(tmp_path / "a")
    (tmp_path / "a" / "eval.json").write_text("{}")
    assert claim(tmp_path / "a", overwrite=True) is None
    assert [p.name for p in (tmp_path / "a").iterdir()] == [".lock"]


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    start(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files no run writes \\(notes.txt\\)"):
        claim(tmp_path / "a", overwrite=True)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine" and (tmp_path / "a" / "run.json").exists()


def test_overwrite_deletes_the_outputs_an_algorithm_declares_and_only_its_own(tmp_path):
    # AAPA declares discriminator.pt and stage1; to any other script they are someone else's files
    start(tmp_path / "a")
    (tmp_path / "a" / "stage1").mkdir()
    (tmp_path / "a" / "discriminator.pt").write_text("D")
    with pytest.raises(SystemExit, match="holds files no run writes \\(discriminator.pt, stage1\\)"):
        claim(tmp_path / "a", overwrite=True)
    try:
        assert claim_output_dir(Flags(str(tmp_path / "a"), overwrite=True), own_outputs=("discriminator.pt", "stage1")) is None
    finally:
        release_locks()
    assert [p.name for p in (tmp_path / "a").iterdir()] == [".lock"]


@pytest.mark.parametrize("where", ["empty", "cwd", "parent of cwd", "home", "root", "git repository", "project"])
def test_output_dirs_whose_overwrite_would_delete_more_than_a_run_are_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    (work / ".git").mkdir(parents=True)
    (work / "sub").mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work / "sub" if where == "parent of cwd" else work)
    folder = {"empty": "", "cwd": ".", "parent of cwd": "..", "home": str(Path.home()), "root": "/",
              "git repository": str(work), "project": str(ROOT)}[where]
    with pytest.raises(SystemExit, match="^error: --output-dir"):
        claim_output_dir(Flags(folder, overwrite=True))
    assert (work / "keep.txt").exists() and (work / ".git").is_dir()
    assert not (work / ".lock").exists()  # refused before anything was created


@dataclasses.dataclass
class FlagsWithInputs(Flags):
    model: str = ""
    expert_cache: str = ""


@pytest.mark.parametrize("relation", ["equal", "output inside model", "model inside output"])
def test_an_output_dir_overlapping_an_input_is_refused_before_anything_is_deleted(tmp_path, relation):
    model = tmp_path / "run" / "checkpoint"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    output = {"equal": model, "output inside model": model / "out", "model inside output": tmp_path / "run"}[relation]
    with pytest.raises(SystemExit, match="overlaps --model"):
        claim_output_dir(FlagsWithInputs(str(output), overwrite=True, model=str(model)))
    assert (model / "config.json").read_text() == "{}"
    cache = tmp_path / "cache.jsonl"
    cache.write_text("")
    with pytest.raises(SystemExit, match="overlaps --expert-cache"):
        claim_output_dir(FlagsWithInputs(str(cache), expert_cache=str(cache)))
    assert cache.is_file()


def test_a_run_inside_another_runs_folder_is_refused(tmp_path):
    start(tmp_path / "a")
    save(tmp_path / "a", 1)
    for inner in (tmp_path / "a" / "checkpoint", tmp_path / "a" / "b" / "c"):
        with pytest.raises(SystemExit, match="is inside the run folder"):
            claim(inner)
    assert saved_step(tmp_path / "a") == 1


def test_resume_refuses_changed_flags_naming_them_unless_allowed(tmp_path):
    start(tmp_path / "a")
    with pytest.raises(SystemExit) as stop:
        claim(tmp_path / "a", resume=True, seed=2, group_size=4, micro_batch_size=8)
    message = str(stop.value)
    assert "--seed 1 -> 2" in message and "--group-size 8 -> 4" in message and "micro-batch" not in message
    assert claim(tmp_path / "a", resume=True, micro_batch_size=8) is None  # run-neutral
    assert claim(tmp_path / "a", resume=True, seed=2, allow_flag_changes=True) is None


def test_a_second_process_is_kept_out_while_the_first_holds_the_folder(tmp_path):
    claim_output_dir(Flags(str(tmp_path / "a")))  # held by this process until release_locks
    code = ("import sys; from shared.runfolder import claim_output_dir; from test_run_folder import Flags; "
            f"claim_output_dir(Flags({str(tmp_path / 'a')!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    release_locks()
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"error: --output-dir {str(tmp_path / 'a')!r} is in use by another running process"]
    assert claim(tmp_path / "a") is None  # free again once the holder is gone


def test_bad_output_folders_give_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        claim(tmp_path / "file")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(SystemExit, match="cannot be written"):
            claim(tmp_path / "ro" / "run")


class Cut(Exception):
    pass


@pytest.mark.parametrize("cut_at", range(9))
def test_a_save_cut_at_any_instant_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch, cut_at):
    # The save sequence's file-system steps, in order: write model, tokenizer, trainer state,
    # the complete marker, delete a stale .old, rename checkpoint -> .old, rename .tmp ->
    # checkpoint, delete .old; cut_at 8 lets the whole save finish.
    save(tmp_path, step=2)
    calls = {"n": 0}

    def step(real):
        def wrapped(*args, **kwargs):
            if calls["n"] == cut_at:
                raise Cut()
            calls["n"] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(SavesAFile, "save_pretrained", step(SavesAFile.save_pretrained))
    monkeypatch.setattr(checkpoint.torch, "save", step(torch.save))
    monkeypatch.setattr(checkpoint.Path, "touch", step(Path.touch))
    monkeypatch.setattr(checkpoint.os, "replace", step(os.replace))
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path, ignore_errors=False: real_rmtree(path, ignore_errors=True)
                        if not Path(path).name.endswith(".old") else step(real_rmtree)(path, ignore_errors=True))
    with pytest.raises(Cut):
        save(tmp_path, step=4)
        raise Cut()  # the last cut point is after the whole save
    monkeypatch.undo()
    recover_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]
    assert (tmp_path / CHECKPOINT / COMPLETE).exists() and (tmp_path / CHECKPOINT / "weights.txt").exists()
    # once the new checkpoint is complete (marker written) it is the one kept
    assert saved_step(tmp_path) == (4 if cut_at >= 4 else 2)


def test_resume_keeps_exactly_the_history_up_to_the_checkpoint(tmp_path):
    logger = RunLogger(tmp_path, Flags(str(tmp_path)))
    for step in range(0, 6):
        logger.log(step, {"x": step})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x": ')  # a line cut by the kill
        f.write('\n[1, 2]\n{"x": 3}\n{"step": "two"}\n')  # lines edited by hand into other JSON
    RunLogger(tmp_path, Flags(str(tmp_path)), resume_step=4).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4]
    RunLogger(tmp_path, Flags(str(tmp_path)), resume_step=0).close()  # no checkpoint: the run starts again at 0
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_write_json_never_writes_nan(tmp_path):
    runfolder.write_json(tmp_path / "x.json", {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads((tmp_path / "x.json").read_text(), parse_constant=pytest.fail) == {"a": None, "b": [1.0, None]}


# ---- end to end: GRPO on the tiny world, killed at the worst instants


def grpo_flags(world, model, out, *extra):
    return ["--model", model, "--train-data", world["train"], "--eval-data", world["eval"], "--output-dir", str(out),
            "--steps", "4", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "6", "--eval-every", "2",
            "--save-every", "2", "--eval-prompts", "4", *extra]


def grpo(world, model, out, *extra):
    return run_script("algos/grpo.py", *grpo_flags(world, model, out, *extra), expect_ok=False)


def metric_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in json.loads(line)]


@pytest.mark.slow  # five GRPO runs; the recovery itself is tested in process at every step of the save above
def test_kill_between_the_renames_then_resume_and_a_missing_final_eval(tiny_world, tmp_path):
    out = tmp_path / "run"
    assert grpo(tiny_world, tiny_world["model"], out, "--stop-at-step", "2").returncode == 0
    # the state a kill between the two renames of the step-4 save leaves: .old (step 2) and .tmp (step 4)
    assert grpo(tiny_world, tiny_world["model"], tmp_path / "full").returncode == 0
    os.replace(out / CHECKPOINT, out / (CHECKPOINT + ".old"))
    shutil.copytree(tmp_path / "full" / CHECKPOINT, out / (CHECKPOINT + ".tmp"))
    shutil.copy(tmp_path / "full" / "metrics.jsonl", out / "metrics.jsonl")
    shutil.copy(tmp_path / "full" / "run.json", out / "run.json")

    rerun = grpo(tiny_world, tiny_world["model"], out)
    assert rerun.returncode != 0 and "already holds a run" in rerun.stderr and "Traceback" not in rerun.stderr
    changed = grpo(tiny_world, tiny_world["model"], out, "--resume", "--seed", "3")
    assert changed.returncode != 0 and "--seed 1 -> 3" in changed.stderr
    resumed = grpo(tiny_world, tiny_world["model"], out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 4" in resumed.stdout and saved_step(out) == 4
    assert metric_steps(out) == [1, 2, 3, 4]  # nothing lost, nothing twice
    assert json.loads((out / "eval.json").read_text()) == json.loads((tmp_path / "full" / "eval.json").read_text())

    # stopped after the last checkpoint but before eval.json: --resume writes it, logging nothing new
    (out / "eval.json").unlink()
    lines = (out / "metrics.jsonl").read_text()
    assert grpo(tiny_world, tiny_world["model"], out, "--resume").returncode == 0
    assert json.loads((out / "eval.json").read_text()) == json.loads((tmp_path / "full" / "eval.json").read_text())
    assert (out / "metrics.jsonl").read_text() == lines


def test_resume_refuses_input_data_replaced_since_the_run_started(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a"}\n')
    folder = tmp_path / "run"
    start(folder, train_data=str(data))
    save(folder, 1)
    assert claim(folder, resume=True, train_data=str(data))["step"] == 1  # unchanged: resumes
    data.write_text('{"prompt": "b"}\n')
    with pytest.raises(SystemExit, match="input data that changed since the run started \\(--train-data"):
        claim(folder, resume=True, train_data=str(data))
    assert claim(folder, resume=True, allow_flag_changes=True, train_data=str(data))["step"] == 1


def test_a_damaged_run_record_is_one_line_on_resume(tmp_path):
    start(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(SystemExit, match="run.json is damaged"):
        claim(tmp_path, resume=True)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    save(tmp_path, 1)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="saving the checkpoint of step 2 failed \\(No space left on device\\); "
                                         "the last checkpoint \\(step 1\\) is kept"):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert saved_step(tmp_path) == 1 and not (tmp_path / "checkpoint.tmp").exists()


class CreatesAFileWhenUnpickled:
    """What a crafted trainer_state.pt would hold: unpickling it calls Path.touch."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_trainer_state_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    folder, target = tmp_path / "run", tmp_path / "created_by_the_pickle"
    start(folder)
    save(folder, step=3)
    assert claim(folder, resume=True)["step"] == 3  # our own file loads under weights_only
    torch.save({"step": 3, "payload": CreatesAFileWhenUnpickled(target)}, folder / CHECKPOINT / TRAINER_STATE)
    assert not target.exists()
    with pytest.raises(SystemExit) as stop:
        claim(folder, resume=True)
    assert str(stop.value).startswith("error:") and "refusing to unpickle" in str(stop.value)
    assert "\n" not in str(stop.value)
    assert not target.exists()
    # the message that names the kept checkpoint (after a non-finite loss) never unpickles it either
    assert "step unknown" in checkpoint._kept_checkpoint(folder) and not target.exists()


def wait_for_logged_step(out: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (out / "metrics.jsonl").exists() and step in metric_steps(out):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run ended or hung before logging step {step}: {process.communicate()}")


def test_sigusr1_saves_the_step_in_progress_and_resume_continues_exactly(tiny_world, tmp_path):
    """SLURM's requeue signal (SIGTERM takes the same path; tested under torchrun) mid-run:
    the run saves the step it was on, says so in one line and exits 128 + 10; --resume
    then ends exactly where the uninterrupted run ends."""
    long_run = ("--steps", "12", "--save-every", "100", "--eval-every", "100")
    out = tmp_path / "preempted"
    command = [sys.executable, str(ROOT / "algos/grpo.py"), "--model", tiny_world["model"], "--train-data", tiny_world["train"],
               "--eval-data", tiny_world["eval"], "--output-dir", str(out), "--prompts-per-step", "2", "--group-size", "2",
               "--max-new-tokens", "6", "--eval-prompts", "4", *long_run]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    wait_for_logged_step(out, process, 2)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGUSR1, stderr[-2000:]
    stopped_at = saved_step(out)
    assert 2 <= stopped_at < 12 and metric_steps(out) == list(range(1, stopped_at + 1))  # nothing since the save lost
    assert stderr.count("stopped at step") == 1 and f"stopped at step {stopped_at} by SIGUSR1" in stderr
    assert "Traceback" not in stderr and not (out / "eval.json").exists()
    # the uninterrupted run and the resume need no signal: in this process, no new interpreter each
    train_in_process("algos/grpo.py", *grpo_flags(tiny_world, tiny_world["model"], tmp_path / "full", *long_run))
    train_in_process("algos/grpo.py", *grpo_flags(tiny_world, tiny_world["model"], out, *long_run, "--resume"))
    assert metric_steps(out) == list(range(1, 13))
    assert json.loads((out / "eval.json").read_text()) == json.loads((tmp_path / "full" / "eval.json").read_text())
    full_losses = [json.loads(line)["train/loss"] for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line]
    assert [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line] == pytest.approx(full_losses, rel=1e-5, abs=1e-7)


FILE_SIZE_LIMITED_SAVE = """
import resource, signal, sys
from pathlib import Path
import torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from shared.modeling import load_model, load_tokenizer
from shared.checkpoint import save_checkpoint
from test_run_folder import Flags, SavesAFile
folder, which = Path({folder!r}), {which!r}
if which == "model":  # the real safetensors writer
    model, tokenizer = load_model({model!r}, "float32", "cpu"), load_tokenizer({model!r})
    parameters = list(model.parameters())
else:  # the real torch.save writer: a small model file, a large optimizer state
    model = tokenizer = SavesAFile()
    parameters = [torch.nn.Parameter(torch.zeros(200_000))]
optimizer = torch.optim.AdamW(parameters, lr=0.1)
parameters[0].grad = torch.ones_like(parameters[0])
optimizer.step()
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
save_checkpoint(folder, model, tokenizer, optimizer, scheduler, 1, Flags(str(folder)))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))
save_checkpoint(folder, model, tokenizer, optimizer, scheduler, 2, Flags(str(folder)))
"""


@pytest.mark.parametrize("which", ["model", "trainer_state"])
def test_a_real_writer_failing_mid_save_is_one_line_and_keeps_the_previous_checkpoint(tiny_world, tmp_path, which):
    """Not a mocked OSError: the real safetensors and torch.save writers hit a file-size
    limit (the kernel's EFBIG, as a full disk gives ENOSPC) partway through a file."""
    folder = tmp_path / "run"
    code = FILE_SIZE_LIMITED_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), folder=str(folder), which=which,
                                         model=tiny_world["model"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: saving the checkpoint of step 2 failed (") and "step 1) is kept" in last, last
    assert saved_step(folder) == 1 and (folder / CHECKPOINT / COMPLETE).exists()
    assert not (folder / "checkpoint.tmp").exists()


def test_deterministic_turns_on_deterministic_kernels_before_any_model_loads(monkeypatch):

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seeding.seed_everything(3)
        assert not torch.are_deterministic_algorithms_enabled()
        seeding.seed_everything(3, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
