"""scripts/bench_job_floor.py bounds the job's time by the work it counts: the count per
position must be what torch itself counts for the model, and the work per command must
follow the command's flags."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_main
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_job_floor import SFT_BATCH, flops_per_position, job_work, mean_lengths  # noqa: E402

from shared.modeling import load_tokenizer  # noqa: E402

# "all caps, end with ., reverse aehg": 8 instruction words (the two commas among them), then 4 letters
ROW = {"prompt": "all caps, end with ., reverse aehg", "instruction_id_list": ["toy:task:reverse", "toy:caps",
                                                                             "toy:end_with"],
       "kwargs": [{"text": "aehg"}, {}, {"char": "."}]}


def test_a_positions_operations_are_what_torch_counts_for_the_model(tiny_world):
    # eager attention, so torch's counter sees attention's two matrix products; without a mask every
    # position attends to all 10 keys, the context given to the count
    config = json.loads((Path(tiny_world["model"]) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_world["model"], attn_implementation="eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 256, (3, 10)))
    assert counter.get_total_flops() == pytest.approx(3 * 10 * flops_per_position(config, context=10), rel=1e-12)


def test_prompt_lengths_count_the_template_and_one_token_per_instruction_word(tiny_world, tmp_path):
    tokenizer = load_tokenizer(tiny_world["model"])  # the toy tokenizer: one token per character here
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    template = 3  # <|user|>, <|im_end|>, <|assistant|>
    assert mean_lengths(tokenizer, path, words=False) == (template + len(ROW["prompt"]), len("GHEA.") + 1)
    assert mean_lengths(tokenizer, path, words=True) == (template + 8 + 4, len("GHEA.") + 1)


def test_each_commands_work_follows_its_flags(tiny_world, tmp_path):
    tokenizer = load_tokenizer(tiny_world["model"])
    config = json.loads((Path(tiny_world["model"]) / "config.json").read_text())
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROW) + "\n")
    prompt, answer = len(ROW["prompt"]) + 3, 6
    per_position = flops_per_position(config, (prompt + answer) / 2)
    printed = [
        "algos/grpo.py --steps 4 --prompts-per-step 2 --group-size 3 --eval-every 2 --eval-prompts 5 --num-iterations 2",
        "algos/aapa.py --steps 4 --prompts-per-step 2 --group-size 3 --eval-every 4 --eval-prompts 5 --staged "
        "--stage1-steps 3",
        "algos/sft.py --steps 10 --eval-every 10 --eval-prompts 5",
        "algos/gpm.py --steps 80 --pairs-data pairs.jsonl",
        "scripts/build_preference_pairs.py --num-prompts 500",
    ]
    work = job_work(printed, path, path, config, tokenizer, words=False)
    assert (work["rl_steps"], work["sft_steps"]) == (4 + 1, 10)
    assert work["eval_prompts"] == 3 * 5 + 2 * 5 + 2 * 5
    rollout_positions = 2 * (prompt + 3 * answer)
    expected = (4 * rollout_positions * (1 + 3 * 2) + 1 * rollout_positions * 4  # sampling, then 3 per pass
                + 10 * SFT_BATCH * (prompt + answer) * 3 + 35 * (prompt + answer)) * per_position
    assert work["flops"] == pytest.approx(expected, rel=1e-12)


def test_the_floor_refuses_a_missing_model_in_one_line(tmp_path):
    assert run_main("scripts/bench_job_floor.py", "--model", str(tmp_path)) == \
        f"error: --model {str(tmp_path)!r} is not a saved model folder"
