"""Every algorithm under torchrun with FSDP2 on 2 CPU processes (gloo), against the
same command in one process: the same global batch must give the same losses and the
same weights. Tolerance: losses rel 1e-5, weights abs 1e-5 (float32; the two runs
pad and reduce in a different order, and Adam's first steps divide by sqrt(v) of
gradients near zero, which is where the last digits go)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_script, train_in_process
from test_scripts import common_flags, grpo_flags, losses
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")


def torchrun(script: str, *flags: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(ROOT / script), *flags]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} under torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def weights(out):
    return AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()


def assert_same_run(single, dist, learning_rate=1e-3):
    """Same losses, and the same weights to within 1e-5, except that Adam may turn the
    rounding of a near-zero gradient (two processes sum in another order) into an
    lr-sized step: a few elements in a thousand may differ, by at most the learning rate
    (seen: 2 of 8,352 embedding entries by 1.1e-5 in GPRL, where weights moved 2.5e-3)."""
    assert losses(dist) == pytest.approx(losses(single), rel=1e-5, abs=1e-7)
    a, b = weights(single), weights(dist)
    assert a.keys() == b.keys()
    for key in a:
        difference = (a[key] - b[key]).abs()
        off = difference > 1e-5
        assert off.float().mean() <= 1e-3 and difference.max() <= learning_rate, (key, int(off.sum()), difference.max())


def without(flags, name):
    at = flags.index(name)
    return flags[:at] + flags[at + 2:]


def sft_flags(world, out):
    return common_flags(world, out) + ["--expert-cache", world["expert_cache"], "--steps", "3", "--batch-size", "8",
                                       "--micro-batch-size", "2", "--max-new-tokens", "8", "--learning-rate", "1e-3"]


def rl_flags(world, out):
    flags = grpo_flags(world, out, world["model"])
    flags[flags.index("--steps") + 1], flags[flags.index("--prompts-per-step") + 1] = "3", "4"
    return flags


@pytest.mark.parametrize("script, make_flags", [pytest.param("algos/sft.py", sft_flags, marks=pytest.mark.slow),
                                               ("algos/grpo.py", rl_flags)])
def test_sft_and_grpo_under_torchrun_equal_one_process(tiny_world, tmp_path, script, make_flags):
    single, dist = tmp_path / f"{script}-single", tmp_path / f"{script}-dist"
    train_in_process(script, *make_flags(tiny_world, single))
    torchrun(script, *make_flags(tiny_world, dist))
    assert_same_run(single, dist)
    # one metrics line per step and evaluation: only rank 0 wrote
    steps = [json.loads(line)["step"] for line in (dist / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (single / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_interrupted_torchrun_run_resumes_exactly(tiny_world, tmp_path):
    full, parts, moved = tmp_path / "full", tmp_path / "parts", tmp_path / "moved"
    train_in_process("algos/grpo.py", *rl_flags(tiny_world, full))  # equal to the torchrun run (test above)
    torchrun("algos/grpo.py", *rl_flags(tiny_world, parts), "--stop-at-step", "1")
    assert (parts / "checkpoint" / "complete").exists() and not (parts / "eval.json").exists()
    shutil.copytree(parts, moved, ignore=shutil.ignore_patterns(".lock"))
    torchrun("algos/grpo.py", *rl_flags(tiny_world, parts), "--resume")
    assert_same_run(full, parts)
    # the optimizer state is saved whole, in the one-process format: one process resumes it too
    train_in_process("algos/grpo.py", *rl_flags(tiny_world, moved), "--resume")
    assert_same_run(full, moved)


@pytest.mark.parametrize("change, line", [
    (("--prompts-per-step", "3"), "error: --prompts-per-step (3) must be a multiple of the number of processes (2) under torchrun"),
    pytest.param(("--temperature", "0"), "error: --temperature must be in [0.001, inf), got 0.0",
                 marks=pytest.mark.slow),  # before the job is joined
    pytest.param(("--train-data", "/no/such.jsonl"), "error: ", marks=pytest.mark.slow),  # after it is joined
])
def test_an_error_every_rank_meets_is_printed_once(tiny_world, tmp_path, change, line):
    flags = rl_flags(tiny_world, tmp_path / "out")
    if change[0] in flags:
        flags[flags.index(change[0]) + 1] = change[1]
    else:
        flags += change
    result = torchrun("algos/grpo.py", *flags, expect_ok=False)
    assert result.returncode != 0
    ours = [text for text in result.stderr.splitlines() if text.startswith("error: ")]
    assert len(ours) == 1 and ours[0].startswith(line), result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("error:")[0]


@pytest.mark.parametrize("failing_rank", [pytest.param("0", marks=pytest.mark.slow), "1"])
def test_an_error_on_one_rank_stops_every_rank_within_seconds_with_one_line(tiny_world, tmp_path, failing_rank):
    """A reward function that raises on one rank only: its peer sits in a collective that
    gloo cannot cancel. The job must end promptly (not at the backend's 30-minute timeout),
    with the error line once and no traceback from either rank (torchrun's own failure
    summary follows, which we do not control)."""
    (tmp_path / "rank_reward.py").write_text(
        "import os\n\ndef reward(row, text):\n"
        f"    if os.environ['RANK'] == '{failing_rank}':\n        raise ValueError('only on this rank')\n"
        "    return float(len(text) % 2)\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "algos/grpo.py"), *rl_flags(tiny_world, tmp_path / "out"), "--reward-fn", "rank_reward:reward"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)})
    assert result.returncode != 0
    assert result.stderr.count("error: the reward function raised ValueError: only on this rank") == 1, result.stderr[-3000:]
    ours = result.stderr.split("torch.distributed.elastic")[0]  # what the ranks printed before the launcher's summary
    assert "algos/grpo.py\", line" not in ours and "Connection closed" not in ours, ours[-3000:]


@pytest.fixture(scope="module")
def pairs(tiny_world, tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    train_in_process("scripts/build_preference_pairs.py", "--model", tiny_world["model"], "--data", tiny_world["train"],
                     "--out", str(path), "--num-prompts", "32", "--max-new-tokens", "8")
    return path


def other_algorithms(tiny_world, pairs, gpm):
    """script -> flags(output folder) for the seven other scripts, 2 steps each; GPRL reads
    the GPM checkpoint in `gpm` (GPM runs first)."""
    expert = ["--expert-cache", tiny_world["expert_cache"], "--expert-pool", tiny_world["train"], "--steps", "2"]
    pair_flags = ["--model", tiny_world["model"], "--pairs-data", str(pairs), "--steps", "2", "--batch-size", "4",
                  "--micro-batch-size", "2", "--eval-every", "2", "--save-every", "2"]
    runs = {
        "algos/chord.py": lambda out: rl_flags(tiny_world, out) + expert + ["--preset", "example", "--mu-warmup", "1",
                                                                              "--expert-data-ratio", "0.2"],
        "algos/aapa.py": lambda out: rl_flags(tiny_world, out) + expert + ["--disc-prompts", "32", "--staged",
                                                                             "--stage1-steps", "1", "--expert-data-ratio", "0.2"],
        "algos/uniapl.py": lambda out: rl_flags(tiny_world, out) + expert
        + ["--disc-steps", "2", "--expert-data-ratio", "0.2"],
        "algos/adpo.py": lambda out: without(rl_flags(tiny_world, out), "--beta") + ["--steps", "2"],
        "algos/adpo_pairwise.py": lambda out: pair_flags + ["--eval-data", tiny_world["eval"], "--eval-prompts", "8",
                                                             "--output-dir", str(out)],
        "algos/gpm.py": lambda out: pair_flags + ["--holdout", "0.25", "--output-dir", str(out)],
        "algos/gprl.py": lambda out: without(rl_flags(tiny_world, out), "--beta") + [
            "--gpm", str(gpm / "checkpoint"), "--steps", "2", "--drift-every", "1", "--probe-prompts", "4"],
    }
    return {**{k: v for k, v in runs.items() if k != "algos/gprl.py"}, "algos/gprl.py": runs["algos/gprl.py"]}


@pytest.mark.slow  # the equality test below runs the same commands and checks more
def test_every_other_algorithm_runs_under_torchrun_and_saves_a_loadable_checkpoint(tiny_world, pairs, tmp_path):
    for script, make_flags in other_algorithms(tiny_world, pairs, tmp_path / "algos/gpm.py").items():
        out = tmp_path / script
        torchrun(script, *make_flags(out))
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "train/loss" in line] == [1, 2]
        assert all(torch.isfinite(v).all() for v in weights(out).values())
    AutoModelForCausalLM.from_pretrained(tmp_path / "algos/aapa.py" / "stage1")  # AAPA's stage-1 weights, gathered too


@pytest.mark.slow
def test_every_other_algorithm_under_torchrun_equals_one_process(tiny_world, pairs, tmp_path):
    for script, make_flags in other_algorithms(tiny_world, pairs, tmp_path / "single" / "algos/gpm.py").items():
        single, dist = tmp_path / "single" / script, tmp_path / "dist" / script
        train_in_process(script, *make_flags(single))
        torchrun(script, *make_flags(dist))
        assert_same_run(single, dist)


@pytest.mark.slow
def test_killed_torchrun_run_resumes_exactly(tiny_world, tmp_path):
    """SIGKILL to the whole torchrun job after its first checkpoint, then --resume."""
    full, killed = tmp_path / "full", tmp_path / "killed"

    def flags(out):
        made = rl_flags(tiny_world, out)
        made[made.index("--steps") + 1] = "6"
        return made

    train_in_process("algos/grpo.py", *flags(full))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "algos/grpo.py"), *flags(killed)]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (killed / "checkpoint" / "complete").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not (killed / "eval.json").exists()  # killed mid-run, not after it
    torchrun("algos/grpo.py", *flags(killed), "--resume")
    assert_same_run(full, killed)


def test_sigterm_to_torchrun_saves_one_agreed_step_on_every_rank(tiny_world, tmp_path):
    """What SLURM or Kubernetes does before a kill: SIGTERM to the launcher, which passes it
    to both ranks. The ranks agree on one step, save it whole, and the job says so once."""
    out = tmp_path / "preempted"
    flags = rl_flags(tiny_world, out)
    flags[flags.index("--steps") + 1] = "40"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "algos/grpo.py"), *flags, "--save-every", "100", "--eval-every", "100"]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while job.poll() is None and time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and '"step": 2' in (out / "metrics.jsonl").read_text()):
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]
    stopped_at = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"]
    assert 2 <= stopped_at < 40 and logged == list(range(1, stopped_at + 1)), stderr[-3000:]
    assert stderr.count("stopped at step") == 1 and f"stopped at step {stopped_at} by SIGTERM" in stderr, stderr[-3000:]
    assert (out / "checkpoint" / "complete").exists() and not (out / "eval.json").exists()


FOREACH_STEP = '''
import sys
import torch
from shared import distributed
from shared.modeling import load_model
from shared.logprobs import completion_logps

model_path, out, grouped = sys.argv[1], sys.argv[2], sys.argv[3] == "grouped"

class Flags:
    device = "cpu"

distributed.setup(Flags())
model = distributed.shard(load_model(model_path))
groups = distributed.optimizer_groups(model) if grouped else model.parameters()
# foreach=True: AdamW's default on CUDA (torch picks the per-tensor loop on CPU)
optimizer = torch.optim.AdamW(groups, lr=1e-2, foreach=distributed.world_size() > 1)
torch.manual_seed(0)
ids = torch.randint(5, 200, (4, 12))
mask = torch.ones_like(ids)
for _ in range(2):
    mine = distributed.local_share(ids)
    loss = -completion_logps(model, mine, distributed.local_share(mask), 6).sum() / ids.numel()
    loss.backward()
    distributed.sum_gradients_and_clip(list(model.parameters()), 1e9)
    try:
        optimizer.step()
    except RuntimeError as error:
        print("step failed:", str(error).splitlines()[0])
        raise SystemExit(3)
    optimizer.zero_grad()
state = distributed.full_state_dict(model)
if distributed.is_main():
    torch.save(state, out)
distributed.finish()
'''


@pytest.mark.slow  # two torchrun jobs and one process
def test_adamw_foreach_updates_a_sharded_model(tiny_world, tmp_path):
    """FSDP2 shards the decoder layers into DTensors and leaves embeddings and head
    plain: AdamW's foreach path (its CUDA default) fails on one group holding both.
    Our two groups (distributed.optimizer_groups) step, and equal one process's update."""
    script = tmp_path / "foreach_step.py"
    script.write_text(FOREACH_STEP)
    mixed = torchrun(str(script), tiny_world["model"], str(tmp_path / "mixed.pt"), "mixed", expect_ok=False)
    assert mixed.returncode != 0 and "got mixed torch.Tensor and DTensor" in mixed.stdout + mixed.stderr
    torchrun(str(script), tiny_world["model"], str(tmp_path / "dist.pt"), "grouped")
    run_script(str(script), tiny_world["model"], str(tmp_path / "single.pt"), "grouped")
    dist, single = torch.load(tmp_path / "dist.pt"), torch.load(tmp_path / "single.pt")
    assert dist.keys() == single.keys()
    for name in single:
        assert torch.allclose(dist[name], single[name], atol=1e-5), name
    assert not torch.equal(single["model.embed_tokens.weight"], weights_before(tiny_world)["model.embed_tokens.weight"])


def weights_before(world):
    return AutoModelForCausalLM.from_pretrained(world["model"]).state_dict()


def test_an_optimizer_state_saved_with_other_groups_is_refused_in_one_line(tiny_world):
    """A checkpoint from before the two groups (one group of every tensor) cannot be
    mapped onto them: refused by name, never loaded into the wrong tensors."""
    from shared import distributed
    from shared.modeling import load_model

    model = load_model(tiny_world["model"])
    count = len(list(model.parameters()))
    old = torch.optim.AdamW(model.parameters())
    new = torch.optim.AdamW(distributed.optimizer_groups(model))
    assert [len(g["params"]) for g in new.param_groups] == [count - 2, 2]  # the layers; tied embeddings/head and norm
    with pytest.raises(SystemExit, match=rf"groups of \[{count}\] tensors, this run's \[{count - 2}, 2\]"):
        distributed.load_optimizer_state(new, old.state_dict())


@pytest.mark.slow
def test_a_lora_run_under_torchrun_equals_one_process(tiny_world, tmp_path):
    lora = ["--lora-r", "4", "--learning-rate", "3e-2"]
    train_in_process("algos/grpo.py", *rl_flags(tiny_world, tmp_path / "single"), *lora)
    torchrun("algos/grpo.py", *rl_flags(tiny_world, tmp_path / "dist"), *lora)
    assert losses(tmp_path / "dist") == pytest.approx(losses(tmp_path / "single"), rel=1e-5, abs=1e-7)
    from safetensors.torch import load_file
    single, dist = (load_file(tmp_path / run / "checkpoint" / "adapter_model.safetensors") for run in ("single", "dist"))
    assert single.keys() == dist.keys() and single
    assert all(torch.allclose(single[k], dist[k], atol=1e-5) for k in single)
