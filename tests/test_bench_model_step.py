"""scripts/bench_model_step.py times a model step on a batch it builds itself: the batch
must hold each prompt group_size times, and its loss must read exactly the answers."""

import json
import sys
from pathlib import Path

import torch
from conftest import run_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_model_step import Args, batch, step  # noqa: E402

from shared import toyworld  # noqa: E402
from shared.modeling import load_model, load_tokenizer  # noqa: E402


def test_the_bench_batch_masks_exactly_each_oracle_answer_and_its_end(tiny_world):
    args = Args(model=tiny_world["model"], data=tiny_world["train"], prompts=3, group_size=2)
    tokenizer = load_tokenizer(tiny_world["model"])
    input_ids, attention_mask, answer_mask = batch(args, tokenizer)
    rows = [json.loads(line) for line in open(tiny_world["train"])][:3]
    assert input_ids.shape[0] == 6 and torch.equal(input_ids[0], input_ids[1])  # each prompt once per group member
    for index, row in enumerate(rows):
        answer = input_ids[2 * index][answer_mask[2 * index]].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == toyworld.oracle(row)
        assert attention_mask[2 * index].sum() == answer_mask[2 * index].sum() + answer_mask[2 * index].int().argmax()
    model = load_model(tiny_world["model"])
    step(model, input_ids, attention_mask, answer_mask)  # one forward and backward reaches every weight
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_bench_refuses_a_missing_model_or_data_in_one_line(tiny_world, tmp_path):
    missing_data = run_main("scripts/bench_model_step.py", "--model", tiny_world["model"], "--data",
                            str(tmp_path / "none.jsonl"))
    assert missing_data == f"error: --data '{tmp_path / 'none.jsonl'}' is not a file"
    missing_model = run_main("scripts/bench_model_step.py", "--model", str(tmp_path), "--data", tiny_world["train"])
    assert missing_model == f"error: --model '{tmp_path}' is not a saved model folder"
