"""Every command of docs/gpu.md's single-GPU recipe, read from the file (so this test
follows the docs) and run as written on tiny stand-ins of the same kind: a tiny
Qwen3-architecture model saved with from_pretrained files for Qwen3-0.6B and for the
teacher, a tiny RLVR-IFeval-shaped training set, a tiny IFEval-shaped eval set and a
tiny chosen/rejected pair set. Only the model ids, dataset ids, the output folder and
the sizes (steps, tokens, prompts, batch) change; every other flag is the docs' own."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

from shared.modeling import load_tokenizer

SIZES = {"--steps": "2", "--eval-every": "1", "--eval-prompts": "4", "--max-new-tokens": "8", "--batch-size": "8",
         "--prompts-per-step": "4", "--group-size": "4", "--micro-batch-size": "4", "--max-prompt-tokens": "96",
         "--max-seq-len": "64", "--generation-batch-size": "4"}
RLVR_TRUTHS = [{"func_name": "validate_lowercase"}, {"func_name": "validate_no_commas"}]


def recipe() -> str:
    """The first bash block of docs/gpu.md: the single-GPU recipe."""
    text = (ROOT / "docs" / "gpu.md").read_text()
    return text.split("```bash\n", 1)[1].split("```", 1)[0]


def stand_ins(tiny_world, root):
    """Local files in place of every hub id the recipe names."""
    teacher = root / "teacher"
    shutil.copytree(tiny_world["model"], teacher)
    # a teacher that always finishes (the untrained tiny model would be cut at the token
    # limit, and its answers dropped): special tokens get logit 0, below the largest of
    # the ~250 random visible logits, and every visible token ends the answer
    tokenizer = load_tokenizer(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.all_special_ids] = 0.0
    model.save_pretrained(teacher)
    config = json.loads((teacher / "generation_config.json").read_text())
    config["eos_token_id"] = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).strip()
                              and i not in tokenizer.all_special_ids] + [tokenizer.eos_token_id]
    (teacher / "generation_config.json").write_text(json.dumps(config))
    rlvr, ifeval, pairs = root / "rlvr.jsonl", root / "ifeval.jsonl", root / "pairs.jsonl"
    rlvr.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {word} {i}"}],
                                        "ground_truth": json.dumps(RLVR_TRUTHS[i % 2])}) + "\n"
                            for i, word in enumerate(["abc", "bcd", "cde", "def", "efg", "fgh", "ghi", "hij"])))
    ifeval.write_text("".join(json.dumps({"key": i, "prompt": f"answer {i} in lowercase", "kwargs": [{}],
                                          "instruction_id_list": ["change_case:english_lowercase"]}) + "\n" for i in range(4)))
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i}"},
                                                      {"role": "assistant", "content": f"hi {i}"}]}) + "\n"
                             for i in range(8)))
    pairs.write_text("".join(json.dumps({"prompt": f"pick {i}", "chosen": "yes", "rejected": f"no {i}"}) + "\n"
                             for i in range(16)))
    return {"Qwen/Qwen3-0.6B": tiny_world["model"], "Qwen/Qwen3-4B": str(teacher), "allenai/RLVR-IFeval": str(rlvr),
            "google/IFEval": str(ifeval), "HuggingFaceH4/no_robots": str(chats), "argilla/ultrafeedback-binarized-preferences-cleaned": str(pairs),
            "runs/qwen3": str(root / "runs"), "data/ifeval/expert_cache.jsonl": str(root / "expert_cache.jsonl")}


def on_stand_ins(script: str, replacements: dict) -> str:
    for hub_id, local in replacements.items():
        script = script.replace(hub_id, local)
    for flag, size in SIZES.items():
        script = re.sub(rf"{flag} \d+", f"{flag} {size}", script)
    return script


@pytest.mark.slow  # fourteen commands, about two minutes on 2 cores
def test_the_recipe_runs_on_the_stand_ins_but_for_ids_and_sizes(tiny_world, tmp_path):
    script = recipe()
    assert "python algos/gprl.py" in script and script.count("python ") >= 14  # the block the users read
    replacements = stand_ins(tiny_world, tmp_path)
    assert all(hub_id in script for hub_id in replacements)  # the recipe still names what we stand in for
    runnable = on_stand_ins(script, replacements).replace("python ", f"{sys.executable} ")
    commands = [line for line in runnable.splitlines() if line.startswith(sys.executable)]
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", runnable], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1"}, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("sft-chat", "sft", "grpo", "grpo-lora", "chord-phi", "chord-mu", "aapa-grpo", "aapa-sft", "uniapl", "adpo-listwise",
                 "adpo-pairwise", "gpm", "gprl"):
        assert (tmp_path / "runs" / name / "checkpoint" / "complete").exists(), name
    assert len(commands) == 14  # chat SFT, the teacher, SFT, eleven training commands
    assert (tmp_path / "runs" / "grpo-lora" / "checkpoint" / "adapter_config.json").exists()
    cache = [json.loads(line) for line in (tmp_path / "expert_cache.jsonl").read_text().splitlines()]
    assert len(cache) == 9 and all(line["finish_reason"] == "stop" for line in cache[1:])
