"""Scoring an explanation of a latent on held-out contexts the explainer never saw.

* :func:`split_examples` draws the explainer's contexts and the scoring contexts, disjoint, both
  spread over quantiles of peak activation (the field's practice: not only the top examples).
* :func:`detection_score`: can a scorer, given the explanation, tell activating contexts from
  non-activating ones? Balanced accuracy (mean of true-positive and true-negative rates).
* :func:`fuzzing_score`: can it tell correctly marked activating contexts from ones whose marks
  were moved to other tokens? Balanced accuracy.
* With one context per request and token logprobs, both also report the AUC of the scorer's
  log-odds of '1' over '0' (threshold-free: a small scorer biased towards one answer scores 0.5
  accuracy yet can still rank the contexts).
* :func:`simulation_score`: can it predict the activation on every token? Pearson correlation of
  predicted and true activations over all tokens.

Every scorer sends all its requests in one ``backend.complete`` call (a backend may run them
concurrently) and counts a reply it cannot use (text None, or unparsable) as failed, never fatal.
A score means something only above the same score for explanations of random directions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .backend import Backend, ChatReply, ChatRequest
from .detection_prompts import detection_request, fuzzing_request, judgement_margin, parse_detection, parse_fuzzing
from .prompts import Context, parse_simulation, simulation_request

__all__ = ["HeldOut", "split_examples", "detection_score", "fuzzing_score", "simulation_score", "pearson",
           "misplace_marks", "auc"]


@dataclass
class HeldOut:
    """One latent's scoring contexts, never shown to the explainer."""

    activating: list[Context] = field(default_factory=list)
    """Contexts where the latent fires (across quantiles of peak activation)."""

    non_activating: list[Context] = field(default_factory=list)
    """Contexts where it does not fire at all (acts all zero)."""


def _key(ctx: Context) -> tuple:
    return tuple(ctx.tokens), tuple(ctx.acts)


def _spread(n: int, k: int, rng: random.Random) -> list[int]:
    """k indices into a list of n sorted by peak: one at random from each of k equal rank bins, so
    the picks span the list's quantiles (all n when k >= n)."""
    if k >= n:
        return list(range(n))
    return [rng.randrange(i * n // k, (i + 1) * n // k) for i in range(k)]


def split_examples(top: Sequence[Context], sample: Sequence[Context], *, n_explain: int, n_score: int,
                   seed: int) -> tuple[list[Context], list[Context]]:
    """(explainer contexts, scoring contexts), disjoint, each sorted by peak, descending.

    The explainer gets half (rounded up) from ``top`` and the rest from ``sample`` (the uniform
    sample), each drawn one per rank bin, so it sees strong and typical activations; a source
    short of its share is made up from the other. The scoring contexts are drawn one per rank bin
    from everything left (top and sample together, sorted by peak). A context in both ``top`` and
    ``sample`` (the same window sampled twice) counts once, so it cannot land on both sides. With
    fewer than n_explain + n_score contexts the two sizes shrink in proportion (the explainer's
    share rounded up). Deterministic for a seed."""
    if n_explain < 0 or n_score < 0:
        raise ValueError(f"n_explain and n_score must be >= 0, got {n_explain} and {n_score}")
    rng = random.Random(seed)
    seen: set[tuple] = set()
    tops: list[Context] = []
    samples: list[Context] = []
    for source, out in ((top, tops), (sample, samples)):
        for ctx in source:
            if _key(ctx) not in seen:
                seen.add(_key(ctx))
                out.append(ctx)
    by_peak = lambda c: -c.peak  # noqa: E731 - stable sort keeps the given order among equal peaks
    tops.sort(key=by_peak)
    samples.sort(key=by_peak)
    total = len(tops) + len(samples)
    want_e, want_s = n_explain, n_score
    if total < n_explain + n_score:
        want_e = min(n_explain, math.ceil(total * n_explain / (n_explain + n_score)))
        want_s = min(n_score, total - want_e)
    from_sample = min(len(samples), want_e // 2)
    from_top = min(len(tops), want_e - from_sample)
    from_sample = min(len(samples), want_e - from_top)  # make up a short top from the sample
    picked_top = set(_spread(len(tops), from_top, rng))
    picked_sample = set(_spread(len(samples), from_sample, rng))
    explain = [c for i, c in enumerate(tops) if i in picked_top] + \
              [c for i, c in enumerate(samples) if i in picked_sample]
    rest = [c for i, c in enumerate(tops) if i not in picked_top] + \
           [c for i, c in enumerate(samples) if i not in picked_sample]
    explain.sort(key=by_peak)
    rest.sort(key=by_peak)
    score = [rest[i] for i in _spread(len(rest), want_s, rng)]
    return explain, score


def _complete(backend: Backend, requests: list[ChatRequest]) -> list[ChatReply]:
    """All requests in one call; a backend that returns too few replies has failed the rest."""
    if not requests:
        return []
    replies = list(backend.complete(requests))[:len(requests)]
    return replies + [ChatReply(text=None, error="no reply")] * (len(requests) - len(replies))


def _balanced_batches(positives: list[Context], negatives: list[Context], batch_size: int,
                      rng: random.Random) -> list[list[tuple[Context, int]]]:
    """Batches of (context, label) mixing the two kinds half and half while both last (each kind
    shuffled, then interleaved), each batch shuffled so position says nothing about the label."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pos, neg = list(positives), list(negatives)
    rng.shuffle(pos)
    rng.shuffle(neg)
    merged: list[tuple[Context, int]] = []
    for i in range(max(len(pos), len(neg))):
        merged += [(pos[i], 1)] if i < len(pos) else []
        merged += [(neg[i], 0)] if i < len(neg) else []
    batches = [merged[i:i + batch_size] for i in range(0, len(merged), batch_size)]
    for batch in batches:
        rng.shuffle(batch)
    return batches


def auc(margins: Sequence[tuple[float, int]]) -> float | None:
    """Area under the ROC curve of (score, label) pairs: the chance that a random positive scores
    above a random negative, ties counting half; None without both labels."""
    positives = [m for m, label in margins if label]
    negatives = [m for m, label in margins if not label]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def _binary_score(backend: Backend, explanation: str, batches: list[list[tuple[Context, int]]],
                  make: Callable[[str, list[Context]], ChatRequest],
                  parse: Callable[[str | None, int], list[int] | None]) -> dict[str, Any]:
    requests = [make(explanation, [c for c, _ in batch]) for batch in batches]
    replies = _complete(backend, requests)
    counts = {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    failed = 0
    margins: list[tuple[float, int]] = []
    for batch, reply in zip(batches, replies):
        # one context per request: the log-odds of '1' over '0' decide where the backend gives them
        margin = judgement_margin(reply) if len(batch) == 1 else None
        answers = [int(margin > 0)] if margin is not None else parse(reply.text, len(batch))
        if answers is None:
            failed += 1
            continue
        if margin is not None:
            margins.append((margin, batch[0][1]))
        for (_, label), answer in zip(batch, answers):
            counts[("tp" if answer else "fn") if label else ("fp" if answer else "tn")] += 1
    positives, negatives = counts["tp"] + counts["fn"], counts["tn"] + counts["fp"]
    tpr = counts["tp"] / positives if positives else None
    tnr = counts["tn"] / negatives if negatives else None
    # balanced: a scorer that always answers the same scores 0.5 whatever the mix of kinds; with one
    # kind only (a latent that fires in every window has no negatives) accuracy says nothing: None
    accuracy = (tpr + tnr) / 2 if tpr is not None and tnr is not None else None
    return {"accuracy": accuracy, "n": positives + negatives, "failed": failed, "requests": len(requests),
            "tpr": tpr, "tnr": tnr, "auc": auc(margins)}


def detection_score(backend: Backend, explanation: str, activating: Sequence[Context],
                    non_activating: Sequence[Context], *, batch_size: int = 10, seed: int = 0) -> dict[str, Any]:
    """Detection: batches of ``batch_size`` unmarked contexts, activating and non-activating mixed
    half and half (deterministic for ``seed``), one request each. Returns
    ``{"accuracy": balanced accuracy over every parsed answer (None if none parsed), "n": contexts
    scored, "failed": requests without a usable reply, "requests", "tpr", "tnr"}``."""
    rng = random.Random(seed)
    batches = _balanced_batches(list(activating), list(non_activating), batch_size, rng)
    return _binary_score(backend, explanation, batches, detection_request, parse_detection)


def misplace_marks(ctx: Context, rng: random.Random) -> Context | None:
    """``ctx`` with its firing tokens' activations moved to as many other, non-firing positions
    (chosen at random), so it shows the same number of marks in the wrong places; None where there
    are no marks or too few non-firing positions to take them."""
    marked = [i for i, a in enumerate(ctx.acts) if a > 0]
    free = [i for i, a in enumerate(ctx.acts) if not a > 0]
    if not marked or len(free) < len(marked):
        return None
    acts = [0.0] * len(ctx.acts)
    for source, target in zip(marked, rng.sample(free, len(marked))):
        acts[target] = ctx.acts[source]
    return Context(list(ctx.tokens), acts)


def fuzzing_score(backend: Backend, explanation: str, activating: Sequence[Context], *, batch_size: int = 10,
                  seed: int = 0) -> dict[str, Any]:
    """Fuzzing: half of the activating contexts (chosen by ``seed``) are shown with their true
    marks, the other half with the same number of marks moved to non-firing positions; batches mix
    the two half and half. A context that cannot be misplaced (every token fires) is shown with
    true marks; one without marks is skipped. Returns the same dict as :func:`detection_score`
    (label 1: true marks)."""
    rng = random.Random(seed)
    usable = [c for c in activating if any(a > 0 for a in c.acts)]
    order = list(range(len(usable)))
    rng.shuffle(order)
    right: list[Context] = []
    wrong: list[Context] = []
    for i in order:
        moved = misplace_marks(usable[i], rng) if len(wrong) < len(usable) // 2 else None
        if moved is None:
            right.append(usable[i])
        else:
            wrong.append(moved)
    batches = _balanced_batches(right, wrong, batch_size, rng)
    return _binary_score(backend, explanation, batches, fuzzing_request, parse_fuzzing)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation of two equal-length sequences; 0.0 (not NaN) where either is constant
    (up to rounding) or there are fewer than two values: a prediction that does not vary
    explains nothing."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson needs equal lengths, got {x.size} and {y.size}")
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    sx, sy = float(np.sqrt((x * x).sum())), float(np.sqrt((y * y).sum()))
    # a relative floor: expected values from logprobs can differ by rounding noise alone
    if sx <= 1e-9 * (1.0 + float(np.abs(a).max())) or sy <= 1e-9 * (1.0 + float(np.abs(b).max())):
        return 0.0
    return float(np.clip((x * y).sum() / (sx * sy), -1.0, 1.0))


def simulation_score(backend: Backend, explanation: str, contexts: Sequence[Context]) -> dict[str, Any]:
    """Simulation: one request per context (activating and non-activating alike; contexts without
    tokens are skipped), all in one call. Returns ``{"correlation": Pearson correlation of the
    predicted and true activations over every token of every parsed context (None if none parsed;
    0.0 for a constant prediction), "n_contexts": contexts parsed, "failed": requests without a
    usable reply, "n_tokens": tokens in the correlation}``."""
    shown = [c for c in contexts if c.tokens]
    replies = _complete(backend, [simulation_request(explanation, c) for c in shown])
    predicted: list[float] = []
    true: list[float] = []
    parsed = failed = 0
    for ctx, reply in zip(shown, replies):
        values = parse_simulation(reply, len(ctx.tokens))
        if values is None:
            failed += 1
            continue
        parsed += 1
        predicted += values
        true += ctx.acts
    return {"correlation": pearson(true, predicted) if parsed else None, "n_contexts": parsed, "failed": failed,
            "n_tokens": len(true)}
