"""How a prompt is put to the model (--system-prompt, --chat-template-kwargs), checked on
the real Qwen3 tokenizer, and what the reward and evaluation functions see of a
reasoning model's answer (--strip-think)."""

import pytest
from conftest import run_main

from shared.evaluation import evaluate
from shared.modeling import chat_prompt, load_model, load_tokenizer
from shared.rewards import reward_scores
from shared.rollout import encode_prompts


def test_qwen3_prompts_turn_thinking_off_by_default(qwen3_tokenizer_folder):
    tokenizer = load_tokenizer(str(qwen3_tokenizer_folder))
    assert chat_prompt(tokenizer, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_qwen3_system_prompt_and_thinking_on(qwen3_tokenizer_folder):
    tokenizer = load_tokenizer(str(qwen3_tokenizer_folder), "Be brief.", '{"enable_thinking": true}')
    text = chat_prompt(tokenizer, "hi")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids, mask = encode_prompts(tokenizer, ["hi", "a longer prompt"], "cpu")
    assert tokenizer.decode(ids[0][mask[0].bool()]) == text  # what the model is fed, left-padded
    assert ids[0, 0].item() == tokenizer.pad_token_id == 151643


def test_the_tiny_template_takes_a_system_turn(tiny_world):
    tokenizer = load_tokenizer(tiny_world["model"], "sys")
    assert chat_prompt(tokenizer, "hi") == "<|system|>sys<|im_end|><|user|>hi<|im_end|><|assistant|>"


@pytest.mark.parametrize("value, message", [
    ("enable_thinking", "must be a JSON object such as"),
    ("[1, 2]", "must be a JSON object (name: value)"),
    ('{"tokenize": true}', "may not set tokenize"),
])
def test_bad_chat_template_kwargs_are_one_line_naming_the_flag(tiny_world, value, message):
    code = run_main("algos/grpo.py", "--model", tiny_world["model"], "--chat-template-kwargs", value,
                    "--output-dir", "/nonexistent/never-made")
    assert isinstance(code, str) and code.startswith("error: --chat-template-kwargs") and message in code


def count_a(row, text):
    return float(text.count("a"))


def test_the_reward_sees_the_answer_after_the_think_block():
    rows, texts = [{"prompt": "p"}] * 3, ["<think>aaa</think> a", "<think>aaaa never closed", "just a"]
    assert reward_scores(count_a, rows, texts, strip_think=True).tolist() == [1.0, 0.0, 1.0]
    assert reward_scores(count_a, rows, texts).tolist() == [4.0, 4.0, 1.0]


def test_evaluation_scores_the_answers_and_returns_the_whole_texts(tiny_world, monkeypatch):
    """The tiny model's greedy responses given a think block in front: the score must
    see them without it, the returned texts with it."""
    import shared.evaluation as evaluation
    import shared.rollout as rollout

    tokenizer, model = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    real = rollout.generate_rollouts

    def thinking(*args, **kwargs):
        out = real(*args, **kwargs)
        out["texts"] = [f"<think>{t}?</think>\n{t}" for t in out["texts"]]
        return out

    monkeypatch.setattr(evaluation, "generate_rollouts", thinking)
    seen = []
    rows = [{"prompt": "copy abc"}, {"prompt": "reverse abd"}]
    result = evaluate(model, tokenizer, rows, lambda r, texts: seen.extend(texts) or {"gold": 0.0, "reward": 0.0},
                      max_new_tokens=6, strip_think=True)
    plain = real(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=6, do_sample=False)["texts"]
    assert seen == [t.lstrip() for t in plain] and all(t.startswith("<think>") for t in result["texts"])
