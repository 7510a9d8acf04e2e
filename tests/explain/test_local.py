"""The local transformers chat backend: batched generation equals one-by-one, logprobs are the
model's own, and requests that cannot run are error replies."""

import pytest
import torch

from jumpscope.models.loading import load_model
from jumpscope.explain.backend import ChatMessage, ChatRequest
from jumpscope.explain.local import TransformersChatBackend, prompt_token_ids
from tiny_causal_lm import write_tiny_causal_lm


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(write_tiny_causal_lm(tmp_path_factory.mktemp("lm"))))


def request(text, **fields):
    return ChatRequest(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", text)), **fields)


def test_a_batch_gives_the_same_replies_as_one_request_at_a_time(loaded):
    texts = ["hello", "abc bc aa lo hell cab hello, bell", "ace"]
    batched = TransformersChatBackend(loaded, batch_size=3).complete([request(t, max_tokens=6) for t in texts])
    alone = [TransformersChatBackend(loaded, batch_size=1).complete([request(t, max_tokens=6)])[0] for t in texts]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(r.error is None and r.completion_tokens > 0 for r in batched)
    assert batched[1].prompt_tokens > batched[0].prompt_tokens


def test_logprobs_are_the_models_own_next_token_log_probabilities(loaded):
    backend = TransformersChatBackend(loaded)
    reply = backend.complete([request("hello", max_tokens=4, top_logprobs=3)])[0]
    assert len(reply.logprobs) == reply.completion_tokens
    ids = prompt_token_ids(loaded.tokenizer, request("hello").messages)
    new = loaded.tokenizer(reply.text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # an independent forward over the prompt and the reply's first token
        logits = loaded.model(torch.tensor([ids + new[:1]])).logits[0, len(ids) - 1]
    expected = torch.log_softmax(logits.float(), -1)
    first = reply.logprobs[0]
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)  # greedy: the top token
    assert len(first.top) <= 3 and max(first.top.values()) == pytest.approx(first.logprob, abs=1e-6)


def test_a_prompt_longer_than_the_context_is_an_error_reply_not_an_exception(loaded):
    backend = TransformersChatBackend(loaded)
    replies = backend.complete([request("hello " * 200, max_tokens=4), request("hi", max_tokens=2)])
    assert replies[0].text is None and "exceeds the model's context" in replies[0].error
    assert replies[1].text is not None and backend.stats["failures"] == 1
    with pytest.raises(ValueError, match="batch_size"):
        TransformersChatBackend(loaded, batch_size=0)
