"""Autointerp prompts and parsers: contexts from example tensors, marking and 0-10 scaling, what
each request asks, and the parsers on the messy reply styles real models produce."""

import math

import pytest
import torch

from jumpscope.analysis.records import PAD_TOKEN
from jumpscope.explain.backend import ChatReply, TokenLogprobs
from jumpscope.explain.detection_prompts import detection_request, fuzzing_request, parse_detection
from jumpscope.explain.prompts import (Context, contexts_from_examples, explanation_request, format_context,
                                       parse_explanation, parse_simulation, scaled_activation, simulation_request)

STRINGS = ["The", " cat", " sat", " on", " mat", "<<", ">>", "\n"]


def test_context_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        Context(["a", "b"], [1.0])


def test_contexts_from_examples_drops_pad_and_applies_the_activating_rule():
    P = PAD_TOKEN
    ids = torch.tensor([[P, 0, 1, 2], [P, P, P, P], [3, 4, P, P], [0, 2, 4, P]], dtype=torch.int32)
    acts = torch.tensor([[9.0, 0.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    active = contexts_from_examples(ids, acts, STRINGS)
    assert [c.tokens for c in active] == [["The", " cat", " sat"], ["The", " sat", " mat"]]
    assert active[0].acts == [0.0, 2.0, 0.5]  # the 9.0 at the PAD position is gone with it
    quiet = contexts_from_examples(ids, acts, STRINGS, activating=False)
    assert [c.tokens for c in quiet] == [[" on", " mat"]]
    everything = contexts_from_examples(ids, acts, STRINGS, activating=None)
    assert len(everything) == 3  # only the all-PAD row goes
    random_windows = contexts_from_examples(ids, None, STRINGS, activating=False)
    assert len(random_windows) == 3 and all(c.acts == [0.0] * len(c.tokens) for c in random_windows)


def test_contexts_from_examples_rejects_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match="token strings"):
        contexts_from_examples(torch.tensor([[0, 99]]), torch.tensor([[1.0, 0.0]]), STRINGS)


def test_format_marks_exactly_the_firing_tokens():
    ctx = Context(["The", " cat", " sat", " on"], [0.0, 2.0, 0.5, 0.0])
    assert format_context(ctx) == "The<< cat>><< sat>> on"
    assert format_context(ctx, mark=False) == "The cat sat on"
    # 2.0 is the max -> 10; 0.5 / 2.0 * 10 = 2.5 rounds half up -> 3
    assert format_context(ctx, show_values=True) == 'The<< cat>><< sat>> on\nActivations: " cat" 10, " sat" 3'
    # on another example's scale (max 4.0): 2.0 -> 5, 0.5 -> 1.25 -> 1
    assert format_context(ctx, max_act=4.0, show_values=True).endswith('" cat" 5, " sat" 1')
    assert format_context(Context(["a"], [0.0]), show_values=True) == "a\nActivations: none"


@pytest.mark.parametrize("act, max_act, expected", [(3.0, 3.0, 10), (1.5, 3.0, 5), (0.0, 3.0, 0), (1e-6, 3.0, 1),
                                                    (7.0, 3.0, 10), (1.0, 0.0, 0), (0.149, 1.0, 1), (0.151, 1.0, 2)])
def test_scaled_activation(act, max_act, expected):
    assert scaled_activation(act, max_act) == expected


def test_tokens_that_look_like_marks_do_not_break_anything():
    ctx = Context(["<<", "x", ">>", "\n", "\t"], [0.0, 1.0, 2.0, 0.0, 0.0])
    assert format_context(ctx) == "<<<<x>><<>>>>\n\t"
    assert '">>" 10' in format_context(ctx, show_values=True)
    for make in (detection_request, fuzzing_request):
        assert make("brackets", [ctx]).messages[1].content
    sim = simulation_request("brackets", ctx)
    # one line per token: the newline and tab tokens are escaped, never raw
    assert "Tokens (5):\n<<\nx\n>>\n\\n\n\\t\n\n" in sim.messages[1].content
    assert parse_explanation("<<x>> tokens") == "<<x>> tokens"
    assert parse_detection("<<[1]>>", 1) == [1]


def test_explanation_request_shows_numbered_marked_examples_on_one_scale():
    strong = Context(["A", " dog"], [0.0, 4.0])
    weak = Context(["B", " cat"], [0.0, 1.0])
    req = explanation_request([strong, weak])
    assert req.max_tokens == 120 and req.temperature == 0.0 and req.top_logprobs == 0
    assert [m.role for m in req.messages] == ["system", "user"]
    assert "<<" in req.messages[0].content and "short phrase" in req.messages[0].content
    user = req.messages[1].content
    assert 'Example 1:\nA<< dog>>\nActivations: " dog" 10' in user
    # the weak example is scaled by the max over both examples (4.0), not its own peak
    assert 'Example 2:\nB<< cat>>\nActivations: " cat" 3' in user
    assert explanation_request([strong], max_tokens=50).max_tokens == 50


@pytest.mark.parametrize("text, expected", [
    ("the word 'not' after a modal verb", "the word 'not' after a modal verb"),
    ("Explanation: closing brackets in code", "closing brackets in code"),
    ('"closing brackets in code"', "closing brackets in code"),
    ("**Explanation:** mentions of cats", "mentions of cats"),
    ("**mentions of cats**", "mentions of cats"),
    ("**Explanation**: mentions of cats", "mentions of cats"),
    ("Final answer - **dates in the past**", "dates in the past"),
    ("```\nmentions of cats\n```", "mentions of cats"),
    ("Sure! Here is my explanation:\n\nmentions of cats\n\nThese appear because...", "mentions of cats"),
    ("Explanation:\n`__init__` methods", "`__init__` methods"),
    ("- dates in the past", "dates in the past"),
    ("\n\n  Answer: “feline nouns”  \n", "feline nouns"),
    ("The marked tokens in these 12 examples have a common feature: the name 'Lily'", "the name 'Lily'"),
    ("What the marked tokens have in common is: past-tense verbs", "past-tense verbs"),
    ("Tokens that share a common theme - colours", "colours"),
    ("The marked tokens in these 12 examples have in common that they are dates", "they are dates"),
    ("The 12 examples share a common trait: years", "years"),
    ("words that have something in common", "words that have something in common"),
    ("", None),
    ("   \n ``` \n", None),
    (None, None),
    ('""', None),
])
def test_parse_explanation(text, expected):
    assert parse_explanation(text) == expected


def test_parse_explanation_caps_the_length():
    assert len(parse_explanation("x" * 1000)) == 300


def test_simulation_request_asks_for_tab_lines_with_logprobs():
    ctx = Context(["The", " cat", " sat"], [0.0, 5.0, 0.0])
    req = simulation_request("cats", ctx)
    assert req.top_logprobs == 5
    assert "tab" in req.messages[0].content and "0 to 10" in req.messages[0].content
    user = req.messages[1].content
    assert "Tokens (3):\nThe\n cat\n sat\n\n" in user and "Output 3 lines" in user
    assert req.max_tokens >= 3 * 4  # room for 'token<TAB>value\n' per token


def reply(text, logprobs=None):
    return ChatReply(text=text, logprobs=logprobs)


@pytest.mark.parametrize("text, n, expected", [
    ("The\t0\n cat\t8\n sat\t1", 3, [0.0, 8.0, 1.0]),
    ("The\t0\n cat\t8\n sat\t1\n", 3, [0.0, 8.0, 1.0]),
    ("Here are the activations:\n```\nThe\t0\n cat\t 8 \n sat\t10\n```", 3, [0.0, 8.0, 10.0]),
    ("2017\t3\n\t0", 2, [3.0, 0.0]),  # a number token, and an empty-looking token
    ("The 0\ncat: 8\nsat | 1", 3, [0.0, 8.0, 1.0]),  # no tabs: the number ending each line
    ("The\t0\ncat\t15", 2, [0.0, 10.0]),  # above the scale counts as 10
    ("[0, 8, 1]", 3, [0.0, 8.0, 1.0]),
    ("The\t0\n cat\t8", 3, None),  # too few
    ("The\t0\n cat\t8\n sat\t1\n on\t0", 3, None),  # too many
    ("The\t?\n cat\tmaybe\n sat\t", 3, None),
    ("I cannot tell.", 2, None),
    ("", 1, None),
])
def test_parse_simulation_text(text, n, expected):
    assert parse_simulation(reply(text), n) == expected


def test_parse_simulation_failed_reply():
    assert parse_simulation(ChatReply(text=None, error="timeout"), 3) is None
    assert parse_simulation(None, 3) is None


def lp(token, top=None):
    """A reply token generated with certainty unless ``top`` says otherwise."""
    top = {token: 0.0} if top is None else top
    return TokenLogprobs(token=token, logprob=max(top.values()), top=top)


def test_parse_simulation_takes_the_expected_value_from_logprobs():
    half = math.log(0.5)
    tokens = (lp("a"), lp("\t"), lp("2", {"2": half, "4": half}), lp("\n"),
              lp("b"), lp("\t"), lp("0"), lp("\n"),
              # a non-number alternative is dropped and the rest renormalised: (1*.2 + 6*.2) / .4 = 3.5
              lp("c"), lp("\t"), lp("1", {"1": math.log(0.2), " 6": math.log(0.2), "x": math.log(0.6)}))
    got = parse_simulation(reply("a\t2\nb\t0\nc\t1", tokens), 3)
    assert got == pytest.approx([3.0, 0.0, 3.5])


def test_parse_simulation_falls_back_where_a_value_spans_several_tokens():
    # a tokenizer that splits '10' into '1', '0': the first piece's alternatives are not values
    tokens = (lp("a"), lp("\t"), lp("1", {"1": math.log(0.9), "2": math.log(0.1)}), lp("0"), lp("\n"),
              lp("b"), lp("\t3"))  # the tab and the value in one token still reads as 3
    assert parse_simulation(reply("a\t10\nb\t3", tokens), 2) == [10.0, 3.0]
