"""Detection and fuzzing prompts: one 0/1 judgement per context, and the tolerant parsers.

* detection: the scorer sees *unmarked* contexts and answers, for each, whether it contains what
  the explanation describes;
* fuzzing: the scorer sees *marked* contexts (in some the marks were moved to wrong tokens) and
  answers, for each, whether the marked tokens are the ones the explanation describes.

Several contexts per request (a strong model answers a JSON list of 0/1, one per context), or one
(``batch_size`` 1: the scorer answers a single digit, and where the backend gives token logprobs
the judgement is the log-odds of '1' against '0' at the answer's first token,
:func:`judgement_margin`). A small model cannot keep a list of 16 answers in order, but it can
answer one question; the margin also ranks contexts, so an AUC is measured beside the accuracy.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from .backend import ChatReply, ChatRequest
from .prompts import Context, split_items, strip_fences, format_context, numbered, request

__all__ = ["detection_request", "fuzzing_request", "parse_detection", "parse_fuzzing", "judgement_margin"]

DETECTION_SYSTEM = (
    "You are checking an explanation of a feature of a language model. You will get the explanation "
    "and some numbered text examples. Some examples contain what the explanation describes and some "
    "do not. For each example, in order, answer 1 if it contains what the explanation describes and "
    "0 if it does not.\n\n"
    "Answer with a JSON list of integers (0 or 1), exactly one per example, in the order of the "
    "examples, for example [1, 0, 0, 1]. Nothing else.")

FUZZING_SYSTEM = (
    "You are checking an explanation of a feature of a language model. You will get the explanation "
    "and some numbered text examples, each with some tokens marked like <<this>>. In some examples "
    "the marks sit on the tokens the explanation describes; in others they were moved onto unrelated "
    "tokens. For each example, in order, answer 1 if the marked tokens are ones the explanation "
    "describes and 0 if they are not.\n\n"
    "Answer with a JSON list of integers (0 or 1), exactly one per example, in the order of the "
    "examples, for example [1, 0, 0, 1]. Nothing else.")


ONE_EXAMPLE = ("There is exactly one example. Answer 1 if {question} and 0 if not. Answer with the single "
               "digit, nothing else.")


def _binary_request(system: str, question: str, explanation: str, texts: list[str]) -> ChatRequest:
    n = len(texts)
    if n == 1:
        system = system.split("\n\n")[0] + "\n\n" + ONE_EXAMPLE.format(question=question)
        user = f"Explanation: {explanation}\n\n{numbered(texts)}\n\nAnswer 1 or 0."
        return request(system, user, max_tokens=2, top_logprobs=5)
    user = (f"Explanation: {explanation}\n\n{numbered(texts)}\n\n"
            f"Answer with a JSON list of exactly {n} integers (0 or 1), one per example, in order.")
    return request(system, user, max_tokens=4 * n + 24)


def detection_request(explanation: str, contexts: Sequence[Context]) -> ChatRequest:
    """Ask which of ``contexts`` (shown unmarked) contain what ``explanation`` describes."""
    return _binary_request(DETECTION_SYSTEM, "the example contains what the explanation describes", explanation,
                           [format_context(c, mark=False) for c in contexts])


def fuzzing_request(explanation: str, contexts_with_marks: Sequence[Context]) -> ChatRequest:
    """Ask, for each context (shown with its act > 0 tokens marked), whether the marked tokens are
    the ones ``explanation`` describes."""
    return _binary_request(FUZZING_SYSTEM, "the marked tokens are ones the explanation describes", explanation,
                           [format_context(c, mark=True) for c in contexts_with_marks])


_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "y": 1, "n": 0}
_LINE = re.compile(r"^[\s\-*>]*(?:\*\*)?(?:example|ex\.?|text)?\s*#?(\d+)(?:\*\*)?\s*[:.)=\-]\s*(?:\*\*)?\s*"
                   r"(yes|no|true|false|1|0|y|n)\b", re.I | re.M)


def _as_labels(body: str, n: int) -> list[int] | None:
    items = split_items(body)
    if len(items) != n or any(item not in _WORDS for item in items):
        return None
    return [_WORDS[item] for item in items]


def _as_indices(body: str, n: int) -> list[int] | None:
    """1-based example numbers ('[2, 5]'): the examples that match. Numbers must be distinct and
    within 1..n, or the list is not an index list."""
    items = split_items(body)
    if not all(item.isdigit() for item in items):
        return None
    numbers = [int(item) for item in items]
    if len(set(numbers)) != len(numbers) or not all(1 <= k <= n for k in numbers):
        return None
    return [int(k in numbers) for k in range(1, n + 1)]


def _parse_binary(text: str | None, n: int) -> list[int] | None:
    if not text or n < 0:
        return None
    text = strip_fences(text)
    bodies = re.findall(r"\[([^\[\]]*)\]", text)
    # a full-length list of labels wins over everything: it is what the prompt asks for
    for body in bodies:
        if (labels := _as_labels(body, n)) is not None:
            return labels
    lines: dict[int, int] = {}
    for match in _LINE.finditer(text):
        k, label = int(match.group(1)), _WORDS[match.group(2).lower()]
        if lines.setdefault(k, label) != label:
            return None  # the same example answered both ways
    if lines:
        return [lines[k] for k in range(1, n + 1)] if set(lines) == set(range(1, n + 1)) else None
    for body in bodies:
        if (labels := _as_indices(body, n)) is not None:
            return labels
    # a bare answer: '1, 0, 1', '2, 5', 'none', possibly after 'Answer:'
    bare = re.sub(r"^\s*(?:answer|output|result)s?\s*[:\-]\s*", "", text.strip(), flags=re.I).strip().rstrip(".")
    if bare.lower() in {"none", "none of them"}:
        return [0] * n
    if bare and re.fullmatch(r"[\w\s,;'\"]+", bare):
        return _as_labels(bare, n) or _as_indices(bare, n)
    return None


def parse_detection(text: str | None, n: int) -> list[int] | None:
    """One 0/1 per example from a detection reply, or None. Accepted: a JSON list of n 0/1 or
    booleans (anywhere in the text, code fences and prose around it allowed); numbered lines
    ('1: yes', '2. no', 'Example 3: 1') covering 1..n; a list of the matching examples' 1-based
    numbers ('[2, 5]' or bare '2, 5'); a bare '1 0 1' or 'none'."""
    return _parse_binary(text, n)


def parse_fuzzing(text: str | None, n: int) -> list[int] | None:
    """One 0/1 per example from a fuzzing reply (1: the marks fit the explanation), or None;
    the same answer forms as :func:`parse_detection`."""
    return _parse_binary(text, n)




_YES, _NO = {"1", "yes", "true", "y"}, {"0", "no", "false", "n"}


def judgement_margin(reply: ChatReply | None) -> float | None:
    """log P('1') - log P('0') at the reply's first non-blank token, summing the top alternatives
    that spell each answer ('1', ' 1', 'Yes', ...), or None without logprobs or where neither
    answer is among them. Where only one is, the other's probability is taken as below the
    smallest one listed (a finite margin of the right sign)."""
    if reply is None or not reply.logprobs:
        return None
    position = next((t for t in reply.logprobs if t.token.strip()), None)
    if position is None:
        return None
    top = dict(position.top)
    top.setdefault(position.token, position.logprob)
    mass = {1: 0.0, 0: 0.0}
    for alternative, logprob in top.items():
        word = alternative.strip().lower()
        if math.isfinite(logprob) and (word in _YES or word in _NO):
            mass[1 if word in _YES else 0] += math.exp(logprob)
    if mass[1] == 0 and mass[0] == 0:
        return None
    floor = min(math.exp(v) for v in top.values() if math.isfinite(v)) / 2
    return math.log(max(mass[1], floor)) - math.log(max(mass[0], floor))
