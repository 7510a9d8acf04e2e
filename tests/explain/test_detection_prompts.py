"""Detection and fuzzing prompts: what each asks (a list for several contexts, one digit for
one), the tolerant list parser, and the log-odds judgement read from token logprobs."""

import math

import pytest

from jumpscope.explain.backend import ChatReply, TokenLogprobs
from jumpscope.explain.detection_prompts import (detection_request, fuzzing_request, judgement_margin,
                                                 parse_detection, parse_fuzzing)
from jumpscope.explain.prompts import Context


def test_detection_request_shows_unmarked_numbered_contexts_and_asks_for_a_json_list():
    contexts = [Context(["The", " cat"], [0.0, 3.0]), Context(["a", " dog"], [0.0, 0.0]),
                Context(["x"], [1.0])]
    req = detection_request("cats", contexts)
    system, user = (m.content for m in req.messages)
    assert "JSON list" in system and "0 or 1" in system
    assert "Explanation: cats" in user
    assert "Example 1:\nThe cat\n\nExample 2:\na dog\n\nExample 3:\nx\n\n" in user
    assert "<<" not in user
    assert "exactly 3 integers" in user


def test_fuzzing_request_shows_the_marks():
    contexts = [Context(["The", " cat"], [0.0, 3.0]), Context(["a", " dog"], [2.0, 0.0])]
    req = fuzzing_request("cats", contexts)
    user = req.messages[1].content
    assert "Example 1:\nThe<< cat>>\n\nExample 2:\n<<a>> dog\n\n" in user
    assert "Activations" not in user  # no values: they would give the right marks away
    assert "JSON list" in req.messages[0].content and "exactly 2 integers" in user


@pytest.mark.parametrize("text, n, expected", [
    ("[1, 0, 1]", 3, [1, 0, 1]),
    ("[1,0,1]", 3, [1, 0, 1]),
    ("```json\n[0, 0, 1]\n```", 3, [0, 0, 1]),
    ("Answer: [1,0,1]", 3, [1, 0, 1]),
    ("Here is my answer:\n[true, false, true]\nThe first and last mention cats.", 3, [1, 0, 1]),
    ('["yes", "no", "no"]', 3, [1, 0, 0]),
    ("1. yes\n2. no\n3. yes", 3, [1, 0, 1]),
    ("1: Yes\n2: No", 2, [1, 0]),
    ("Example 1: 0\nExample 2: 1\nExample 3: 1", 3, [0, 1, 1]),
    ("**1.** yes - mentions a cat\n**2.** no", 2, [1, 0]),
    ("[2, 5]", 5, [0, 1, 0, 0, 1]),
    ("2, 5", 5, [0, 1, 0, 0, 1]),
    ("Examples [1, 3] match.", 4, [1, 0, 1, 0]),
    ("1 0 1", 3, [1, 0, 1]),
    ("[]", 3, [0, 0, 0]),
    ("None.", 2, [0, 0]),
    ("[1]", 1, [1]),
    ("[1, 1]", 2, [1, 1]),  # a full-length label list, not the index list 'example 1 twice'
    # unusable
    ("[1, 0]", 3, None),
    ("[1, 0, 1, 1]", 3, None),
    ("[1, 1]", 5, None),  # neither n labels nor distinct indices
    ("[2, 9]", 5, None),  # index out of range
    ("1. yes\n2. no", 3, None),  # a numbered answer missing example 3
    ("1: yes\n1: no\n2: no", 2, None),
    ("I don't know", 3, None),
    ("The answer depends on context.", 2, None),
    ("", 2, None),
    (None, 2, None),
])
def test_parse_detection(text, n, expected):
    assert parse_detection(text, n) == expected


@pytest.mark.parametrize("text, n, expected", [
    ("[0, 1]", 2, [0, 1]),
    ("Answer: [false, true, true]", 3, [0, 1, 1]),
    ("1. no\n2. yes", 2, [0, 1]),
    ("[0, 1, 0]", 2, None),
    ("unsure", 2, None),
])
def test_parse_fuzzing(text, n, expected):
    assert parse_fuzzing(text, n) == expected


def test_one_context_asks_for_a_single_digit_with_logprobs():
    req = detection_request("cats", [Context(["The", " cat"], [0.0, 3.0])])
    system, user = (m.content for m in req.messages)
    assert "exactly one example" in system and "single digit" in system and "JSON" not in system
    assert "Example 1:\nThe cat\n\n" in user and "<<" not in user
    assert req.max_tokens == 2 and req.top_logprobs == 5
    fuzz = fuzzing_request("cats", [Context(["The", " cat"], [0.0, 3.0])])
    assert "Example 1:\nThe<< cat>>" in fuzz.messages[1].content and fuzz.top_logprobs == 5


def _reply(*positions):
    return ChatReply(text="".join(t for t, _, _ in positions),
                     logprobs=tuple(TokenLogprobs(t, lp, top) for t, lp, top in positions))


def test_judgement_margin_is_the_log_odds_of_one_over_zero():
    # P('1') = 0.6 (' 1' and '1' are the same answer), P('0') = 0.2 + 0.1 ('No' counts as 0)
    reply = _reply(("1", math.log(0.4), {"1": math.log(0.4), " 1": math.log(0.2), "0": math.log(0.2),
                                         "No": math.log(0.1), "The": math.log(0.05)}))
    assert judgement_margin(reply) == pytest.approx(math.log(0.6 / 0.3))
    # the first non-blank token decides: a leading space token is skipped
    spaced = _reply((" ", -0.01, {" ": -0.01}), ("0", math.log(0.7), {"0": math.log(0.7), "1": math.log(0.1)}))
    assert judgement_margin(spaced) == pytest.approx(math.log(0.1 / 0.7))


def test_judgement_margin_with_one_answer_listed_has_its_sign_and_none_without_either():
    only_yes = _reply(("Yes", math.log(0.5), {"Yes": math.log(0.5), "The": math.log(0.1)}))
    assert judgement_margin(only_yes) > 0
    only_no = _reply(("0", math.log(0.5), {"0": math.log(0.5), "The": math.log(0.1)}))
    assert judgement_margin(only_no) < 0
    assert judgement_margin(_reply(("The", -0.1, {"The": -0.1, "A": -3.0}))) is None
    assert judgement_margin(ChatReply(text="1")) is None  # no logprobs: the text parser answers
    assert judgement_margin(None) is None
