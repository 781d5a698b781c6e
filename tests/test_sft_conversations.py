"""SFT on chat conversations (--messages-data): rows read and masked as TRL reads them
(every token, or the assistant turns the template marks), packed rows that compute
exactly what their conversations would one by one, and a run that learns."""

import json

import pytest
import torch
from conftest import run_main

from shared.data import conversation_batch, load_conversations
from shared.logprobs import packed_token_logps
from shared.modeling import load_model, load_tokenizer

# the tiny template with the assistant's content marked, as templates that support
# assistant-only losses do
MARKED_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
    "<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_conversations(path, count=12):
    words = ["abc", "hello", "xyz", "tiny"]
    with open(path, "w") as out:
        for i in range(count):
            word = words[i % len(words)]
            out.write(json.dumps({"messages": [{"role": "user", "content": f"say {word}"},
                                               {"role": "assistant", "content": word * 2}]}) + "\n")
    return str(path)


def test_a_packed_row_computes_what_its_documents_compute_alone(tiny_world):
    model = load_model(tiny_world["model"]).eval()
    torch.manual_seed(0)
    first, second = torch.randint(5, 200, (7,)), torch.randint(5, 200, (5,))
    ids = torch.cat([first, second, torch.zeros(3, dtype=torch.long)])[None]
    doc = torch.tensor([[0] * 7 + [1] * 5 + [-1] * 3])
    with torch.no_grad():
        packed, in_document = packed_token_logps(model, ids, doc)
        for start, tokens in ((0, first), (7, second)):
            alone = torch.log_softmax(model(input_ids=tokens[None]).logits[0, :-1], -1)
            expected = alone.gather(-1, tokens[1:, None]).squeeze(-1)
            assert torch.allclose(packed[0, start:start + len(tokens) - 1], expected, atol=1e-5)
    # targets: every token but each document's first, and no padding
    assert in_document[0].tolist() == [True] * 6 + [False] + [True] * 4 + [False] * 3


def test_packing_fills_rows_up_to_the_limit_in_order(tiny_world, tmp_path):
    tokenizer = load_tokenizer(tiny_world["model"])
    source = write_conversations(tmp_path / "chats.jsonl")
    alone = load_conversations(source, tokenizer, False, 64, packing=False)
    packed = load_conversations(source, tokenizer, False, 64, packing=True)
    assert len(alone) == 12 and all(set(row["doc"]) == {0} and all(row["loss"]) for row in alone)
    assert len(packed) < len(alone) and all(len(row["ids"]) <= 64 for row in packed)
    assert [ids for row in packed for ids in row["ids"]] == [ids for row in alone for ids in row["ids"]]
    assert packed[0]["doc"][:len(alone[0]["ids"]) + 1] == [0] * len(alone[0]["ids"]) + [1]
    ids, doc, loss = conversation_batch(packed[:2], tokenizer.pad_token_id, "cpu")
    assert ids.shape == doc.shape == loss.shape and (doc[loss == 0] == -1).all()


def test_assistant_only_loss_covers_the_marked_turns(tiny_world, tmp_path):
    tokenizer = load_tokenizer(tiny_world["model"])
    source = write_conversations(tmp_path / "chats.jsonl", count=2)
    with pytest.raises(ValueError, match="marks no assistant tokens"):
        load_conversations(source, tokenizer, True, 64, packing=False)  # the tiny template has no marks
    tokenizer.chat_template = MARKED_TEMPLATE
    row = load_conversations(source, tokenizer, True, 64, packing=False)[0]
    trained = tokenizer.decode([t for t, keep in zip(row["ids"], row["loss"]) if keep])
    assert trained == "abcabc<|im_end|>"


@pytest.mark.parametrize("line, message", [
    ({"messages": "hi"}, "row 1: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "row 1: field 'messages'"),
    ({"prompt": "no messages"}, "row 1: field 'messages'"),
])
def test_bad_conversations_are_one_line_naming_the_row(tiny_world, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    write_conversations(path, count=1)
    with open(path, "a") as out:
        out.write(json.dumps(line) + "\n")
    code = run_main("algos/sft.py", "--model", tiny_world["model"], "--messages-data", str(path),
                    "--output-dir", str(tmp_path / "out"), "--eval-data", tiny_world["eval"])
    assert isinstance(code, str) and code.startswith("error: ") and message in code


def test_packing_without_conversations_is_refused():
    assert run_main("algos/sft.py", "--packing") == \
        "error: --packing and --assistant-only-loss apply to --messages-data conversations"


def test_sft_on_packed_conversations_learns(tiny_world, tmp_path):
    source = write_conversations(tmp_path / "chats.jsonl", count=40)
    out = tmp_path / "run"
    assert run_main("algos/sft.py", "--model", tiny_world["model"], "--messages-data", source, "--packing",
                    "--max-seq-len", "64", "--output-dir", str(out), "--eval-data", tiny_world["eval"], "--steps", "25",
                    "--batch-size", "8", "--micro-batch-size", "4", "--eval-every", "25", "--eval-prompts", "4",
                    "--save-every", "25", "--learning-rate", "1e-2", "--no-compile") is None
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
