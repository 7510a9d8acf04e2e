"""Prompt encoding for generation: framed like training windows, or through the chat template."""

import pytest

from jumpscope.steer.generate import chat_prompt_ids, prompt_ids
from tiny_tokenizers import smollm2_like


def test_plain_prompts_start_with_the_document_token():
    tok = smollm2_like()
    w1, w2 = tok.convert_tokens_to_ids(["w1", "w2"])
    assert prompt_ids(tok, "w1 w2") == [0, w1, w2]  # <|endoftext|>, as training windows start; not <|im_start|>


def test_chat_prompts_use_the_template_after_the_document_token():
    tok = smollm2_like()
    start, end, user, assistant, w1 = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "user", "assistant",
                                                                 "w1"])
    assert prompt_ids(tok, "w1", chat=True) == chat_prompt_ids(tok, "w1") == [0, start, user, w1, end, start,
                                                                                assistant]


def test_chat_is_refused_without_a_template():
    with pytest.raises(ValueError, match="no chat template; drop --chat"):
        prompt_ids(smollm2_like(chat_template=None), "w1", chat=True)
