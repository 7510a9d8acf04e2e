"""Concept search: rank an SAE's latents by how well they separate two sets of texts.

Every text is framed the way training windows are (``[BOS] body`` or ``[CLS] body [SEP]``, see
:func:`jumpscope.data.tokens.framing`), run through the model up to the SAE's site (a batch of
texts padded to the longest, with an attention mask) and encoded by the SAE. A text's **score**
for a latent is the latent's **maximum over the text's ordinary tokens**: padding and special
tokens (BOS/EOS/CLS/SEP/PAD, the tokenizer's ``all_special_ids``) never count. The max, not the
mean, because a concept often shows in one or two tokens of a sentence ("the *otter* swam"),
and a mean would dilute it by the sentence's length; the mean over ordinary tokens is reported
too.

Per latent: the mean score on each side, their difference, the share of texts where it fires, and
the AUROC of the scores, positive vs negative: the probability that a random positive text
scores above a random negative one, ties counting one half. It is computed exactly from ranks
(Mann-Whitney U / (n_pos n_neg), tied scores get their average rank), for all latents at once.
AUROC 1: every positive text scores above every negative one; 0.5: no separation (a latent that
never fires on either side); near 0: the latent marks the negative side (swap the sets to rank
those first).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from ..data.tokens import framing
from ..models.harvest import Harvester
from ..models.loading import LoadedModel
from ..sae.base import SAE
from .records import token_strings

__all__ = ["TextScores", "LatentMatch", "ConceptSearch", "auroc", "score_texts", "rank_latents",
           "find_concept", "SORT_KEYS"]

SORT_KEYS = ("auroc", "diff")
SNIPPET_BEFORE, SNIPPET_AFTER = 8, 4  # tokens of context shown around an example's peak


@dataclass
class TextScores:
    """The latents of a set of texts, each over its ordinary tokens."""

    max: Tensor
    """[n_texts, d_sae] float32: each latent's maximum over the text's ordinary tokens (the score)."""
    mean: Tensor
    """[n_texts, d_sae] float32: each latent's mean over the text's ordinary tokens."""
    peak: Tensor
    """[n_texts, d_sae] long: position in ``ids`` where the maximum is (one of them, on ties)."""
    ids: list[list[int]]
    """Token ids of every text as the model saw it, framing included."""
    ordinary: list[list[bool]]
    """Per text and position: True for an ordinary token (not framing, special or padding)."""


def auroc(positive: Tensor, negative: Tensor) -> Tensor:
    """Exact AUROC per column: P(positive score > negative score) + P(equal) / 2.

    ``positive`` [n_pos, k], ``negative`` [n_neg, k]; returns float64 [k]. Mann-Whitney U from
    the ranks of the pooled scores, tied scores sharing their average rank, all columns at once.
    """
    if positive.dim() == 1:
        return auroc(positive[:, None], negative[:, None])[0]
    n_pos, n_neg = positive.shape[0], negative.shape[0]
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative score")
    pooled = torch.cat([positive, negative]).to(torch.float64)
    values, order = pooled.sort(dim=0, stable=True)
    n = pooled.shape[0]
    position = torch.arange(n, dtype=torch.float64, device=pooled.device)[:, None].expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    # first and last sorted position of every value's run of ties, carried along the run
    first = torch.where(starts, position, torch.zeros_like(position)).cummax(dim=0).values
    last = torch.where(ends, position, torch.full_like(position, n)).flip(0).cummin(dim=0).values.flip(0)
    ranks = (first + last) / 2 + 1  # 1-based average rank of the tie group
    rank_sum = (ranks * (order < n_pos)).sum(dim=0)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    ids.update(framing(tokenizer).special_ids)  # BOS/EOS/PAD/CLS/SEP even when not in all_special_ids
    return ids


def _encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> tuple[list[list[int]], list[list[bool]]]:
    """Token ids framed as in training (body truncated to ``max_tokens``) and their ordinary-token masks."""
    frame, special = framing(tokenizer), _special_ids(tokenizer)
    bodies = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                       return_token_type_ids=False, verbose=False)["input_ids"]
    ids, ordinary = [], []
    for body in bodies:
        row = ([frame.first] if frame.first is not None else []) + list(body[:max_tokens])
        row += [frame.last] if frame.last is not None else []
        ids.append(row)
        ordinary.append([i not in special for i in row])
    return ids, ordinary


@torch.no_grad()
def score_texts(model: Any, tokenizer: Any, sae: SAE, texts: Sequence[str], *, site: str | None = None,
                batch_size: int = 8, max_tokens: int = 128, what: str = "text") -> TextScores:
    """Every text's per-latent max and mean over its ordinary tokens (see the module docstring).

    ``model`` is a LoadedModel or an ``nn.Module``; the SAE runs where it is (move it to the
    model's device first). ``what`` names the set in errors ("positive text").
    """
    model = model.model if isinstance(model, LoadedModel) else model  # not getattr: HF LMs have a .model too
    harvester = Harvester(model, [site or sae.cfg.site])
    name = harvester.names[0]
    ids, ordinary = _encode_texts(tokenizer, texts, max_tokens)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max(map(len, ids), default=0) > limit:
        raise ValueError(f"max_tokens {max_tokens} plus the framing tokens exceeds the model's {limit} positions; "
                         f"use max_tokens <= {limit - 2}")
    for i, (text, mask) in enumerate(zip(texts, ordinary)):
        if not any(mask):
            raise ValueError(f"{what} {i + 1} has no ordinary tokens: {text[:60]!r}")
    pad = framing(tokenizer).pad
    param = next(sae.parameters())
    maxes, means, peaks = [], [], []
    for start in range(0, len(ids), batch_size):
        rows, masks = ids[start:start + batch_size], ordinary[start:start + batch_size]
        width = max(map(len, rows))
        # right padding: with the attention mask, real tokens see exactly what they would alone
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
        keep = torch.tensor([m + [False] * (width - len(m)) for m in masks], device=param.device)
        acts = harvester.activations(input_ids, attention)[name]
        latents = sae.encode(acts.to(device=param.device, dtype=param.dtype)).float()  # [B, T, d_sae]
        mask = keep[..., None]
        best, where = latents.masked_fill(~mask, float("-inf")).max(dim=1)
        maxes.append(best.cpu())
        peaks.append(where.cpu())
        means.append(((latents * mask).sum(dim=1) / keep.sum(dim=1, keepdim=True)).cpu())
    return TextScores(torch.cat(maxes), torch.cat(means), torch.cat(peaks), ids, ordinary)


@dataclass
class LatentMatch:
    """One latent of the ranking."""

    rank: int
    latent: int
    auroc: float
    mean_positive: float
    """Mean over the positive texts of the text's score (max over its tokens)."""
    mean_negative: float
    diff: float
    """mean_positive - mean_negative."""
    token_mean_positive: float
    """Mean over the positive texts of the latent's mean over the text's tokens."""
    token_mean_negative: float
    fires_positive: float
    """Share of positive texts where the latent fires (score > 0)."""
    fires_negative: float
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The positive texts where it fires most: index, activation, peak token, snippet, text."""


@dataclass
class ConceptSearch:
    """The result of :func:`find_concept`: the top latents and how they were scored."""

    site: str
    n_positive: int
    n_negative: int
    d_sae: int
    sort: str
    latents: list[LatentMatch]
    score: str = "max over each text's ordinary tokens (special tokens and padding excluded)"
    meta: dict[str, Any] = field(default_factory=dict)
    """Where the scores came from (the SAE, the model), for the JSON output."""

    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, **{k: v for k, v in asdict(self).items() if k != "meta"}}

    def table(self, snippet_width: int = 60) -> str:
        """A plain-text table: rank, latent, AUROC, mean+ / mean-, diff, top token and snippet."""
        header = f"{'rank':>4}  {'latent':>7}  {'AUROC':>6}  {'mean+':>8}  {'mean-':>8}  {'diff':>8}  top example"
        lines = [f"{self.n_positive} positive vs {self.n_negative} negative texts at {self.site}, "
                 f"{self.d_sae:,} latents; score: {self.score}; sorted by {self.sort}", header]
        for m in self.latents:
            top = m.examples[0] if m.examples else None
            example = f"{top['token']!r}: {top['snippet']}" if top else "(fires on no positive text)"
            if len(example) > snippet_width:
                example = example[:snippet_width - 1] + "\u2026"
            lines.append(f"{m.rank:>4}  {m.latent:>7}  {m.auroc:>6.3f}  {m.mean_positive:>8.3g}  "
                         f"{m.mean_negative:>8.3g}  {m.diff:>8.3g}  {example}")
        return "\n".join(lines)


def _clean(text: str) -> str:
    return " ".join(text.split())


def _examples(scores: TextScores, texts: Sequence[str], latent: int, strings: list[str],
              n_examples: int) -> list[dict[str, Any]]:
    column = scores.max[:, latent]
    order = column.argsort(descending=True, stable=True)[:n_examples]
    out = []
    for i in order.tolist():
        value = float(column[i])
        if value <= 0:
            break
        ids, ordinary, peak = scores.ids[i], scores.ordinary[i], int(scores.peak[i, latent])
        shown = [j for j in range(max(0, peak - SNIPPET_BEFORE), min(len(ids), peak + SNIPPET_AFTER + 1))
                 if ordinary[j]]
        token = strings[ids[peak]]
        marked = token[:len(token) - len(token.lstrip())] + f"[[{token.strip()}]]"  # keep the word's space
        snippet = "".join(marked if j == peak else strings[ids[j]] for j in shown)
        out.append({"text": i, "activation": value, "token": token.strip(), "snippet": _clean(snippet),
                    "full_text": texts[i]})
    return out


def rank_latents(positive: TextScores, negative: TextScores, *, top: int = 20,
                 sort: Literal["auroc", "diff"] = "auroc") -> tuple[Tensor, dict[str, Tensor]]:
    """``(latent ids of the ``top`` best, {statistic: Tensor [d_sae]})``. ``auroc`` sorts by AUROC
    and breaks its ties by diff; ``diff`` by the difference of mean scores."""
    if sort not in SORT_KEYS:
        raise ValueError(f"unknown sort {sort!r}; use {' or '.join(SORT_KEYS)}")
    stats = {"auroc": auroc(positive.max, negative.max).float(),
             "mean_positive": positive.max.mean(0), "mean_negative": negative.max.mean(0),
             "token_mean_positive": positive.mean.mean(0), "token_mean_negative": negative.mean.mean(0),
             "fires_positive": (positive.max > 0).float().mean(0), "fires_negative": (negative.max > 0).float().mean(0)}
    stats["diff"] = stats["mean_positive"] - stats["mean_negative"]
    # two stable sorts: by the tie-breaker first, then by the key
    order = stats["diff"].argsort(descending=True, stable=True)
    if sort == "auroc":
        order = order[stats["auroc"][order].argsort(descending=True, stable=True)]
    return order[:top], stats


def find_concept(model: Any, sae: SAE, positive: Sequence[str], negative: Sequence[str], *, tokenizer: Any = None,
                 site: str | None = None, top: int = 20, sort: Literal["auroc", "diff"] = "auroc",
                 batch_size: int = 8, max_tokens: int = 128, n_examples: int = 3) -> ConceptSearch:
    """Rank ``sae``'s latents by how well they separate ``positive`` from ``negative`` texts.

    ``model`` is a LoadedModel (its tokenizer is used) or an ``nn.Module`` with ``tokenizer``
    given; ``site`` defaults to the SAE's. Returns the ``top`` latents (see :class:`ConceptSearch`).
    """
    if tokenizer is None and isinstance(model, LoadedModel):
        tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("concept search needs the model's tokenizer; this model has none")
    for what, texts in (("positive", positive), ("negative", negative)):
        if len(texts) < 2:
            raise ValueError(f"need at least 2 {what} texts, got {len(texts)}")
    site = site or sae.cfg.site
    kwargs = dict(site=site, batch_size=batch_size, max_tokens=max_tokens)
    pos = score_texts(model, tokenizer, sae, positive, what="positive text", **kwargs)
    neg = score_texts(model, tokenizer, sae, negative, what="negative text", **kwargs)
    chosen, stats = rank_latents(pos, neg, top=top, sort=sort)
    strings = token_strings(tokenizer)
    matches = [LatentMatch(rank=r + 1, latent=int(i), **{k: float(v[i]) for k, v in stats.items()},
                           examples=_examples(pos, positive, int(i), strings, n_examples))
               for r, i in enumerate(chosen.tolist())]
    return ConceptSearch(site=site, n_positive=len(positive), n_negative=len(negative), d_sae=sae.cfg.d_sae,
                         sort=sort, latents=matches)
