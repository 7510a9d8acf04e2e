"""Prompts for automated interpretability and tolerant parsers of the replies.

Four tasks, in the style of OpenAI's explainer/simulator and EleutherAI's delphi:

* explanation: the explainer sees numbered contexts with the latent's firing tokens marked
  ``<<like this>>`` and their activations scaled 0-10, and answers with one short phrase;
* detection and fuzzing (:mod:`jumpscope.explain.detection_prompts`): does a context contain
  what the explanation describes; are its marked tokens the ones it describes;
* simulation: the scorer sees one context's tokens, one per line, and answers one line per token,
  ``token<TAB>value`` with value an integer 0-10 (expected values from logprobs where given).

Every parser returns None for a reply it cannot use; the scorer counts those as failed.
Contexts are shown as numbered blocks::

    Example 1:
    <the context's text>

so a test double can read them back out of the prompt.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

from torch import Tensor

from ..analysis.records import PAD_TOKEN
from .backend import ChatMessage, ChatReply, ChatRequest, TokenLogprobs

__all__ = ["Context", "contexts_from_examples", "scaled_activation", "format_context", "explanation_request",
           "parse_explanation", "simulation_request", "parse_simulation", "MAX_EXPLANATION_CHARS"]

MAX_EXPLANATION_CHARS = 300
"""Longest explanation kept: a 'short phrase' that runs on is a paragraph of reasoning."""


@dataclass
class Context:
    """One token window: display strings (PAD positions removed) and the latent's activation on
    each (all zeros for a non-activating context)."""

    tokens: list[str]
    acts: list[float]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise ValueError(f"Context has {len(self.tokens)} tokens but {len(self.acts)} activations")

    @property
    def peak(self) -> float:
        """The largest activation in the window (0.0 for an empty or non-activating one)."""
        return max(self.acts, default=0.0)


def contexts_from_examples(token_ids: Tensor, acts: Tensor | None, token_strings: Sequence[str], *,
                           activating: bool | None = True) -> list[Context]:
    """Contexts from ``[n, width]`` token ids and activations (as in LatentExamples' top_/sample_
    tensors; ``acts=None`` means all zeros, for random windows). PAD_TOKEN positions are dropped,
    and so are rows that are entirely PAD. ``activating`` says which rows to keep: True only rows
    whose peak is > 0 (a top or sample slot past the latent's last example is all PAD or all 0),
    False only rows whose peak is 0 (non-activating contexts), None every row with a token."""
    ids = token_ids.detach().cpu().long().tolist()
    values = [[0.0] * len(row) for row in ids] if acts is None else acts.detach().cpu().double().tolist()
    if len(values) != len(ids) or any(len(a) != len(i) for a, i in zip(values, ids)):
        raise ValueError(f"token_ids {tuple(token_ids.shape)} and acts {tuple(acts.shape)} differ in shape")
    out = []
    for row_ids, row_acts in zip(ids, values):
        kept = [(i, float(a)) for i, a in zip(row_ids, row_acts) if i != PAD_TOKEN]
        if not kept:
            continue
        peak = max(a for _, a in kept)
        if (activating is True and not peak > 0) or (activating is False and peak > 0):
            continue
        bad = [i for i, _ in kept if not 0 <= i < len(token_strings)]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the {len(token_strings)} token strings "
                             "(a different tokenizer's vocabulary?)")
        out.append(Context([token_strings[i] for i, _ in kept], [a for _, a in kept]))
    return out


def scaled_activation(act: float, max_act: float) -> int:
    """``act`` on the 0-10 scale where ``max_act`` is 10, rounded half up. A firing token (act > 0)
    gets at least 1, so every marked token shows a non-zero value."""
    if not act > 0 or not max_act > 0:
        return 0
    return int(min(10, max(1, math.floor(10 * act / max_act + 0.5))))


def format_context(ctx: Context, *, mark: bool = True, max_act: float | None = None,
                   show_values: bool = False) -> str:
    """The context's text (token strings joined; they carry their own spaces), each token with
    act > 0 wrapped as ``<<token>>`` when ``mark``. With ``show_values`` a line follows listing
    each firing token (JSON-quoted, so spaces and newlines show) with its activation on the 0-10
    scale of ``max_act`` (default: this context's peak)."""
    text = "".join(f"<<{t}>>" if mark and a > 0 else t for t, a in zip(ctx.tokens, ctx.acts))
    if show_values:
        scale = ctx.peak if max_act is None else max_act
        values = [f"{json.dumps(t, ensure_ascii=False)} {scaled_activation(a, scale)}"
                  for t, a in zip(ctx.tokens, ctx.acts) if a > 0]
        text += "\nActivations: " + (", ".join(values) if values else "none")
    return text


def numbered(texts: Sequence[str]) -> str:
    return "\n\n".join(f"Example {i}:\n{text}" for i, text in enumerate(texts, 1))


def request(system: str, user: str, *, max_tokens: int, top_logprobs: int = 0) -> ChatRequest:
    return ChatRequest(messages=(ChatMessage("system", system), ChatMessage("user", user)),
                       max_tokens=max_tokens, temperature=0.0, top_logprobs=top_logprobs)


# ---------------------------------------------------------------------------------------------
# Explanation

EXPLAIN_SYSTEM = (
    "You are studying one feature (a latent unit) of a language model. You will see numbered text "
    "examples in which the feature is active. In each example the tokens on which the feature fires "
    "are marked like <<this>>, and the line after each example gives every marked token's activation "
    "on a 0-10 scale (10 = the strongest activation among these examples).\n\n"
    "Find what the marked tokens have in common: a word or set of words, a concept, a grammatical "
    "role, a pattern in the surrounding text. Weigh the strongest activations most.\n\n"
    "Answer with one short phrase describing what the feature detects, for example: "
    "\"the word 'not' after a modal verb\" or \"closing brackets in code\". "
    "No preamble, no reasoning, no list: only the phrase.")


def explanation_request(contexts: Sequence[Context], *, max_tokens: int = 120) -> ChatRequest:
    """Ask for an explanation of the latent that fires as marked in ``contexts`` (values on the
    0-10 scale of the largest activation among them)."""
    max_act = max((c.peak for c in contexts), default=0.0)
    body = numbered([format_context(c, mark=True, max_act=max_act, show_values=True) for c in contexts])
    user = (f"{body}\n\nWhat do the marked tokens in these {len(contexts)} examples have in common? "
            "Answer with one short phrase.")
    return request(EXPLAIN_SYSTEM, user, max_tokens=max_tokens)


_LABEL = re.compile(r"^(?:\*\*)?(?:final\s+|short\s+)?(?:explanation|answer|feature|description|phrase)"
                    r"(?:\*\*)?\s*[:\-]\s*(?:\*\*(?=\s|$))?", re.I)
# a restatement of the question before the answer, as small models write: 'The marked tokens in these
# 12 examples have a common feature: ...', 'What they have in common is ...'
_PREAMBLE = re.compile(r"^.{0,100}?\b(?:have|has|share|shares)\s+(?:in\s+common|a\s+common\s+"
                       r"(?:feature|theme|pattern|property|trait))(?:\s+(?:is|are))?\s*(?:[:,-]|\bthat\b)\s*(?=\S)",
                       re.I)
_WRAPPERS = (("**", "**"), ("*", "*"), ("`", "`"), ('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"))


def _clean_phrase(line: str) -> str:
    line = re.sub(r"^(?:[-*•>#]+\s+)", "", line.strip())  # a bullet or heading marker
    for _ in range(4):  # '**Explanation:** "foo"' needs several rounds of label and wrapper stripping
        before = line
        line = _LABEL.sub("", line.strip()).strip()  # '**Explanation:**', '**Explanation**:', 'Answer -'
        line = _PREAMBLE.sub("", line).strip()
        for left, right in _WRAPPERS:
            # only a matching pair: "the word 'not'" must keep its closing quote
            if len(line) >= len(left) + len(right) and line.startswith(left) and line.endswith(right):
                line = line[len(left):len(line) - len(right)].strip()
        if line == before:
            break
    return line.strip()


def parse_explanation(text: str | None) -> str | None:
    """The explanation in a reply: the first non-empty line once code fences, a label such as
    'Explanation:', a restatement of the question ('The marked tokens have a common feature:'),
    bullet markers and surrounding quotes or markdown are stripped; a line ending
    in ':' that has more lines after it is taken for a preamble ('Here is my explanation:') and
    skipped. Capped at MAX_EXPLANATION_CHARS; None when nothing is left."""
    if not text:
        return None
    lines = [line.strip() for line in strip_fences(text).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        phrase = _clean_phrase(line)
        if not phrase or (line.endswith(":") and i + 1 < len(lines)):
            continue
        return phrase[:MAX_EXPLANATION_CHARS].rstrip() or None
    return None


def strip_fences(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("```"))


def split_items(body: str) -> list[str]:
    return [item.strip().strip("'\"").lower() for item in re.split(r"[,;\s]+", body.strip()) if item.strip()]


# ---------------------------------------------------------------------------------------------
# Simulation: one value 0-10 per token

SIMULATION_SYSTEM = (
    "You are predicting how strongly one feature of a language model activates on each token of a "
    "text, given an explanation of what the feature detects. Activations are integers from 0 (not "
    "active) to 10 (as strong as the feature gets); on most tokens the feature is usually 0.\n\n"
    "You will get the explanation and the text's tokens, one per line (a newline inside a token is "
    "shown as \\n and a tab as \\t). Output exactly one line per token, in the same order: the token "
    "exactly as shown, a tab character, then its activation as an integer from 0 to 10. "
    "Nothing else: no header, no commentary.")


def show_token(token: str) -> str:
    """A token on one line of the simulation prompt: newlines, tabs and carriage returns escaped,
    so one line is one token and the tab before the value is the only real tab."""
    return token.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def simulation_request(explanation: str, ctx: Context) -> ChatRequest:
    """Ask for the latent's activation (0-10) on each token of ``ctx``, one 'token<TAB>value' line
    per token, with the top 5 logprobs of every reply token (expected values where given)."""
    n = len(ctx.tokens)
    tokens = "\n".join(show_token(t) for t in ctx.tokens)
    user = (f"Explanation: {explanation}\n\nTokens ({n}):\n{tokens}\n\n"
            f"Output {n} lines, one per token in order, each: the token, a tab, its activation (0-10).")
    return request(SIMULATION_SYSTEM, user, max_tokens=8 * n + 32, top_logprobs=5)


_VALUE_AFTER_TAB = re.compile(r"\t\s*(\d{1,2})\s*$")
_VALUE_AT_END = re.compile(r"(?:^|(?<=[^\d.]))(\d{1,2})\s*$")


def _value_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character span of the value on every answer line. Lines with a tab are the
    answer when there are any (a prose line such as 'Total: 5' then cannot count); otherwise every
    line that ends in a number ('cat 3', 'cat: 3')."""
    tabbed, plain, offset = [], [], 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        if not body.strip().startswith("```"):
            if (m := _VALUE_AFTER_TAB.search(body)) is not None:
                tabbed.append((offset + m.start(1), offset + m.end(1)))
            elif "\t" not in body and (m := _VALUE_AT_END.search(body)) is not None:
                plain.append((offset + m.start(1), offset + m.end(1)))
        offset += len(line)
    return tabbed or plain


def _expected_value(logprobs: Sequence[TokenLogprobs], starts: list[int], span: tuple[int, int],
                    text: str) -> float | None:
    """Expected value over the 0-10 alternatives at the reply token that holds the value at
    ``span``, or None where that token holds more than the number (a tokenizer that splits '10'
    into '1', '0' gives no distribution over whole values there)."""
    k = next((i for i in range(len(logprobs)) if starts[i] <= span[0] < starts[i] + len(logprobs[i].token)), None)
    if k is None or logprobs[k].token.strip() != text[span[0]:span[1]]:
        return None
    top = dict(logprobs[k].top)
    top.setdefault(logprobs[k].token, logprobs[k].logprob)
    probs = [0.0] * 11
    for alternative, logprob in top.items():
        word = alternative.strip()
        if word.isdigit() and int(word) <= 10 and math.isfinite(logprob):
            probs[int(word)] += math.exp(logprob)  # ' 3' and '3' are the same value
    total = sum(probs)
    return sum(v * p for v, p in enumerate(probs)) / total if total > 0 else None


def parse_simulation(reply: ChatReply | None, n_tokens: int) -> list[float] | None:
    """One predicted activation (0-10) per token from a simulation reply, or None (failed request,
    no readable values, or not exactly ``n_tokens`` of them). Where the reply has logprobs, each
    value is the expected value over the 0-10 alternatives at its position (renormalised over
    those alternatives); otherwise, or where a value spans several reply tokens, the integer as
    written. A JSON list of n integers is accepted too. Values above 10 count as 10."""
    if reply is None or reply.text is None:
        return None
    text = strip_fences(reply.text)
    spans = _value_spans(text)
    if len(spans) == n_tokens and n_tokens > 0:
        values = [float(min(10, int(text[a:b]))) for a, b in spans]
    else:
        values = None
        for body in re.findall(r"\[([^\[\]]*)\]", text):
            items = split_items(body)
            if len(items) == n_tokens and n_tokens > 0 and all(item.isdigit() for item in items):
                values = [float(min(10, int(item))) for item in items]
                break
        if values is None:
            return None
    if reply.logprobs:
        # the logprobs' own text, which a backend may render slightly differently from reply.text
        lp_text = "".join(t.token for t in reply.logprobs)
        lp_spans = _value_spans(lp_text)
        if len(lp_spans) == n_tokens:
            starts, pos = [], 0
            for t in reply.logprobs:
                starts.append(pos)
                pos += len(t.token)
            for i, span in enumerate(lp_spans):
                expected = _expected_value(reply.logprobs, starts, span, lp_text)
                if expected is not None:
                    values[i] = expected
    return values
