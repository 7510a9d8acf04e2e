"""Scoring explanations against fake backends that answer from the true labels (perfect scores),
always the same (chance: balanced accuracy 0.5, correlation 0.0), garbage or nothing (counted as
failed, never fatal); the held-out split; Pearson's constant rule."""

import random
import re

import pytest

import math

from jumpscope.explain.backend import Backend, ChatReply, TokenLogprobs
from jumpscope.explain.prompts import Context
from jumpscope.explain.scoring import (HeldOut, auc, detection_score, fuzzing_score, misplace_marks, pearson,
                                       simulation_score, split_examples)


class FakeBackend:
    """Answers each request with ``answer(request)``; records every complete() call."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    @property
    def identity(self):
        return "fake"

    def complete(self, requests):
        self.calls.append(list(requests))
        answers = [self.answer(r) for r in requests]  # once each: some answers count their calls
        return [a if isinstance(a, ChatReply) else ChatReply(text=a) for a in answers]


def shown_examples(request):
    """The example texts of a detection or fuzzing prompt, in order (test texts hold no blank line)."""
    user = request.messages[1].content
    found = re.findall(r"Example (\d+):\n(.*?)\n\n", user, re.S)
    assert [int(k) for k, _ in found] == list(range(1, len(found) + 1))
    return [text for _, text in found]


def shown_tokens(request):
    """The tokens of a simulation prompt, one per line (test tokens hold no newline or tab)."""
    user = request.messages[1].content
    n = int(re.search(r"Tokens \((\d+)\):\n", user).group(1))
    block = user.split(f"Tokens ({n}):\n", 1)[1].split("\n\nOutput", 1)[0]
    lines = block.split("\n")
    assert len(lines) == n
    return tuple(lines)


def make_contexts(seed=0, n_act=20, n_non=20, width=6):
    """Activating contexts hold ' cat' (at one random position, activation 1-9 there, a little on
    the next token); non-activating ones do not. Every text is unique (its own word ids)."""
    rng = random.Random(seed)
    act, non = [], []
    for i in range(n_act):
        tokens = [f" w{i}_{j}" for j in range(width)]
        acts = [0.0] * width
        k = rng.randrange(width - 1)
        tokens[k] = " cat"
        acts[k] = float(rng.randint(1, 9))
        acts[k + 1] = 0.5
        act.append(Context(tokens, acts))
    for i in range(n_non):
        non.append(Context([f" v{i}_{j}" for j in range(width)], [0.0] * width))
    return act, non


def text(ctx, marked=False):
    # the test's own rendering, independent of format_context
    return "".join(f"<<{t}>>" if marked and a > 0 else t for t, a in zip(ctx.tokens, ctx.acts))


# ---------------------------------------------------------------------------------------------
# Detection


def test_fake_backend_is_a_backend():
    assert isinstance(FakeBackend(lambda r: ""), Backend)


def test_detection_oracle_scores_one_with_balanced_batches():
    act, non = make_contexts()
    truth = {text(c): 1 for c in act} | {text(c): 0 for c in non}
    batches_seen = []

    def oracle(request):
        labels = [truth[t] for t in shown_examples(request)]
        batches_seen.append(labels)
        return str(labels)

    backend = FakeBackend(oracle)
    result = detection_score(backend, "the word cat", act, non, batch_size=10, seed=1)
    assert result["accuracy"] == 1.0 and result["n"] == 40 and result["failed"] == 0
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 4 == result["requests"]
    assert all(sum(b) == 5 and len(b) == 10 for b in batches_seen)  # half and half
    assert all(b != sorted(b) and b != sorted(b, reverse=True) for b in batches_seen)  # mixed, not grouped
    shown = [t for request in backend.calls[0] for t in shown_examples(request)]
    assert sorted(shown) == sorted(truth)  # every context once, unmarked


@pytest.mark.parametrize("answer", ["[0]", "[1]"])
def test_detection_constant_answer_scores_one_half(answer):
    act, non = make_contexts(n_act=13, n_non=7)  # unequal: plain accuracy would not be 0.5
    backend = FakeBackend(lambda r: str([int(answer[1])] * len(shown_examples(r))))
    result = detection_score(backend, "cats", act, non, batch_size=6, seed=0)
    assert result["accuracy"] == 0.5 and result["n"] == 20 and result["failed"] == 0


def test_detection_garbage_and_failed_replies_are_counted():
    act, non = make_contexts()
    garbage = detection_score(FakeBackend(lambda r: "I don't know"), "cats", act, non, batch_size=8)
    assert garbage["accuracy"] is None and garbage["n"] == 0 and garbage["failed"] == 5 == garbage["requests"]
    none = detection_score(FakeBackend(lambda r: ChatReply(text=None, error="HTTP 500")), "cats", act, non)
    assert none["accuracy"] is None and none["failed"] == none["requests"] == 4


def test_detection_scores_what_parsed_and_counts_the_rest():
    act, non = make_contexts()
    truth = {text(c): 1 for c in act} | {text(c): 0 for c in non}
    seen = []

    def flaky(request):  # every other request fails
        seen.append(request)
        if len(seen) % 2 == 0:
            return ChatReply(text=None, error="timeout")
        return "Answer:\n" + "\n".join(f"{i}. {'yes' if truth[t] else 'no'}"
                                       for i, t in enumerate(shown_examples(request), 1))

    result = detection_score(FakeBackend(flaky), "cats", act, non, batch_size=10)
    assert result["accuracy"] == 1.0 and result["failed"] == 2 and result["n"] == 20


def test_detection_is_deterministic_for_a_seed():
    act, non = make_contexts()

    def run(seed):
        backend = FakeBackend(lambda r: "[]")
        detection_score(backend, "cats", act, non, seed=seed)
        return [shown_examples(r) for r in backend.calls[0]]

    assert run(3) == run(3)
    assert run(3) != run(4)


def digit_reply(p_one):
    """A one-digit reply whose first token puts probability ``p_one`` on '1' and the rest on '0'."""
    top = {"1": math.log(p_one), "0": math.log(1 - p_one)}
    token = "1" if p_one >= 0.5 else "0"
    return ChatReply(text=token, logprobs=(TokenLogprobs(token, top[token], top),))


def test_one_context_per_request_reads_the_log_odds_and_ranks_by_them():
    act, non = make_contexts(n_act=9, n_non=7)
    truth = {text(c): 1 for c in act} | {text(c): 0 for c in non}
    # a scorer biased towards '1' (every answer is '1') that still ranks positives above negatives
    biased = FakeBackend(lambda r: digit_reply(0.9 if truth[shown_examples(r)[0]] else 0.6))
    result = detection_score(biased, "cats", act, non, batch_size=1)
    assert result["requests"] == 16 == result["n"] and result["failed"] == 0
    assert result["accuracy"] == 0.5 and result["tpr"] == 1.0 and result["tnr"] == 0.0
    assert result["auc"] == 1.0
    oracle = detection_score(FakeBackend(lambda r: digit_reply(0.8 if truth[shown_examples(r)[0]] else 0.2)),
                             "cats", act, non, batch_size=1)
    assert oracle["accuracy"] == 1.0 and oracle["auc"] == 1.0
    constant = detection_score(FakeBackend(lambda r: digit_reply(0.7)), "cats", act, non, batch_size=1)
    assert constant["accuracy"] == 0.5 and constant["auc"] == 0.5  # every pair a tie
    # without logprobs the text answers, and there is no AUC
    plain = detection_score(FakeBackend(lambda r: str(truth[shown_examples(r)[0]])), "cats", act, non, batch_size=1)
    assert plain["accuracy"] == 1.0 and plain["auc"] is None


def test_auc_counts_ties_half():
    assert auc([(2.0, 1), (1.0, 0)]) == 1.0
    assert auc([(1.0, 1), (2.0, 0)]) == 0.0
    assert auc([(1.0, 1), (1.0, 0), (3.0, 1), (0.0, 0)]) == 0.875  # 3 wins, 1 tie of 4 pairs
    assert auc([(1.0, 1)]) is None


def test_detection_without_contexts_sends_nothing():
    backend = FakeBackend(lambda r: "[]")
    result = detection_score(backend, "cats", [], [])
    assert result["accuracy"] is None and result["n"] == 0 and result["failed"] == 0 and backend.calls == []


# ---------------------------------------------------------------------------------------------
# Fuzzing


def test_misplace_marks_moves_every_mark_keeping_the_count():
    ctx = Context(["a", "b", "c", "d", "e"], [0.0, 2.0, 0.0, 3.0, 0.0])
    moved = misplace_marks(ctx, random.Random(0))
    assert moved.tokens == ctx.tokens
    assert sorted(a for a in moved.acts if a > 0) == [2.0, 3.0]
    assert {i for i, a in enumerate(moved.acts) if a > 0}.isdisjoint({1, 3})
    assert misplace_marks(Context(["a", "b"], [1.0, 1.0]), random.Random(0)) is None  # nowhere to go
    assert misplace_marks(Context(["a"], [0.0]), random.Random(0)) is None  # nothing to move


def test_fuzzing_oracle_scores_one_and_half_the_marks_are_moved():
    act, _ = make_contexts(n_act=21)
    right = {text(c, marked=True) for c in act}
    n_marks = {text(c): sum(a > 0 for a in c.acts) for c in act}
    shown = []

    def oracle(request):
        texts = shown_examples(request)
        shown.extend(texts)
        return str([int(t in right) for t in texts])

    result = fuzzing_score(FakeBackend(oracle), "the word cat", act, batch_size=6, seed=2)
    assert result["accuracy"] == 1.0 and result["n"] == 21 and result["failed"] == 0
    assert sum(t not in right for t in shown) == 10  # 21 // 2 shown with wrong marks
    for t in shown:  # each context once, with as many marks as it truly has
        plain = t.replace("<<", "").replace(">>", "")
        assert t.count("<<") == n_marks.pop(plain)
    assert n_marks == {}


@pytest.mark.parametrize("label", [0, 1])
def test_fuzzing_constant_answer_scores_one_half(label):
    act, _ = make_contexts(n_act=20)
    result = fuzzing_score(FakeBackend(lambda r: str([label] * len(shown_examples(r)))), "cats", act, seed=5)
    assert result["accuracy"] == 0.5 and result["n"] == 20


def test_fuzzing_garbage_is_counted():
    act, _ = make_contexts(n_act=20)
    result = fuzzing_score(FakeBackend(lambda r: "Hmm, hard to say."), "cats", act, batch_size=10)
    assert result["accuracy"] is None and result["failed"] == result["requests"] == 2


# ---------------------------------------------------------------------------------------------
# Simulation


def test_simulation_oracle_correlates():
    act, non = make_contexts(n_act=8, n_non=4)
    contexts = act + non
    true = {tuple(c.tokens): c.acts for c in contexts}
    peak = max(max(c.acts) for c in contexts)

    def oracle(request):
        tokens = shown_tokens(request)
        return "\n".join(f"{t}\t{round(10 * a / peak)}" for t, a in zip(tokens, true[tokens]))

    backend = FakeBackend(oracle)
    result = simulation_score(backend, "the word cat", contexts)
    assert result["correlation"] > 0.99
    assert result["n_contexts"] == 12 and result["failed"] == 0 and result["n_tokens"] == 72
    assert len(backend.calls) == 1 and len(backend.calls[0]) == 12
    assert all(r.top_logprobs == 5 for r in backend.calls[0])


def test_simulation_constant_prediction_scores_zero():
    act, non = make_contexts(n_act=4, n_non=4)
    result = simulation_score(FakeBackend(lambda r: "\n".join(f"{t}\t0" for t in shown_tokens(r))), "cats", act + non)
    assert result["correlation"] == 0.0 and result["n_contexts"] == 8


def test_simulation_failures_are_counted():
    act, non = make_contexts(n_act=3, n_non=2)
    garbage = simulation_score(FakeBackend(lambda r: "I don't know"), "cats", act + non)
    assert garbage == {"correlation": None, "n_contexts": 0, "failed": 5, "n_tokens": 0}
    calls = []

    def half(request):
        calls.append(request)
        if len(calls) % 2:
            return ChatReply(text=None, error="timeout")
        return "\n".join(f"{t}\t{5 if t == ' cat' else 0}" for t in shown_tokens(request))

    result = simulation_score(FakeBackend(half), "cats", act + non + [Context([], [])])
    assert result["failed"] == 3 and result["n_contexts"] == 2  # the empty context is not sent


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5): 4 / sqrt(5 * 5)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0
    assert pearson([3.0 + 1e-15, 3.0, 3.0 - 1e-15], [1, 2, 3]) == 0.0  # rounding noise is constant
    assert pearson([1.0], [2.0]) == 0.0
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


# ---------------------------------------------------------------------------------------------
# The held-out split


def ranked(prefix, peaks):
    return [Context([f"{prefix}{i}"], [p]) for i, p in enumerate(peaks)]


def test_split_is_disjoint_sized_spread_and_deterministic():
    top = ranked("t", [100.0 - i for i in range(30)])  # 100 .. 71
    sample = ranked("s", [50.0 - i for i in range(40)])  # 50 .. 11
    explain, score = split_examples(top, sample, n_explain=20, n_score=20, seed=0)
    assert len(explain) == 20 and len(score) == 20
    assert {id(c) for c in explain}.isdisjoint({id(c) for c in score})
    is_top = lambda c: c.tokens[0].startswith("t")  # noqa: E731
    assert sum(map(is_top, explain)) == 10  # half from the top, half from the sample
    sample_peaks = [c.peak for c in explain if not is_top(c)]
    assert max(sample_peaks) >= 47 and min(sample_peaks) <= 14  # the sample's top and bottom quarter bins
    assert any(map(is_top, score)) and not all(map(is_top, score))
    assert min(c.peak for c in score) <= 14 and max(c.peak for c in score) >= 97
    assert [c.peak for c in explain] == sorted((c.peak for c in explain), reverse=True)
    again = split_examples(top, sample, n_explain=20, n_score=20, seed=0)
    assert again == (explain, score)
    assert split_examples(top, sample, n_explain=20, n_score=20, seed=1) != (explain, score)


def test_split_never_puts_one_window_on_both_sides():
    top = ranked("t", [10.0 - i for i in range(6)])
    sample = [Context(list(c.tokens), list(c.acts)) for c in top[::2]] + ranked("s", [3.0, 2.0, 1.0])
    for seed in range(5):
        explain, score = split_examples(top, sample, n_explain=4, n_score=5, seed=seed)
        keys = lambda cs: {(tuple(c.tokens), tuple(c.acts)) for c in cs}  # noqa: E731
        assert keys(explain).isdisjoint(keys(score))
        assert len(explain) + len(score) == 9 and len(keys(explain) | keys(score)) == 9  # 6 + 3 distinct


def test_split_shrinks_in_proportion_and_makes_up_a_short_source():
    explain, score = split_examples(ranked("t", [5, 4, 3]), ranked("s", [2, 1]), n_explain=10, n_score=10, seed=0)
    assert (len(explain), len(score)) == (3, 2)
    explain, score = split_examples(ranked("t", [9, 8, 7, 6, 5, 4]), [], n_explain=4, n_score=2, seed=0)
    assert len(explain) == 4 and len(score) == 2  # no sample: all from the top
    with pytest.raises(ValueError):
        split_examples([], [], n_explain=-1, n_score=2, seed=0)


def test_held_out_holds_two_lists():
    held = HeldOut(activating=[Context(["a"], [1.0])])
    assert held.non_activating == [] and held.activating[0].peak == 1.0
