"""The dashboard's data: LatentExamples / LogitLens tensors turned into compact JSON-ready payloads.

No Python loop runs per token: activations are rounded and sparsified by tensor ops over all
latents at once, each shard's tensors become lists with one ``.tolist()``, and Python only loops
over latents (to slice out each one's used examples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from ..analysis.records import PAD_TOKEN, LatentExamples, LogitLens, check_examples_shape

DENSE_THRESHOLD = 0.1
"""A latent that fires on more than this fraction of tokens is marked dense."""

SIGNIFICANT_DIGITS = 3
N_PEAK_TOKENS = 3
"""Most frequent peak tokens of the top examples listed in the index."""

N_INDEX_PROMOTED = 5
"""Logit-lens promoted tokens listed in the index."""

# Exact float64 powers of ten (10**k for k <= 22 is exactly representable), indexed by k.
_POWERS_OF_TEN = torch.tensor([float(10**k) for k in range(40)], dtype=torch.float64)


def round_significant(values: Tensor, digits: int = SIGNIFICANT_DIGITS) -> Tensor:
    """``values`` rounded to ``digits`` significant digits, as float64 whose shortest repr is the
    rounded decimal (``0.123``, not ``0.12300000000000001``): the integer mantissa is divided (or
    multiplied) by an exact power of ten, so the result is the double nearest to that decimal."""
    x = values.detach().to("cpu", torch.float64)
    magnitude = torch.where(x != 0, x.abs(), torch.ones_like(x))
    exponent = torch.floor(torch.log10(magnitude))
    shift = (digits - 1 - exponent).clamp(-(len(_POWERS_OF_TEN) - 1), len(_POWERS_OF_TEN) - 1).long()
    power = _POWERS_OF_TEN[shift.abs()]
    scale_up = shift >= 0
    mantissa = torch.round(torch.where(scale_up, x * power, x / power))
    return torch.where(scale_up, mantissa / power, mantissa * power)


def check_inputs(examples: LatentExamples, vocab: list[str], logit_lens: LogitLens | None) -> None:
    """Raise ValueError with a clear message when the inputs cannot make a consistent dashboard."""
    check_examples_shape(examples)
    if examples.d_sae == 0:
        raise ValueError("LatentExamples has no latents: nothing to show")
    for name in ("top_values", "top_acts", "sample_values", "sample_acts", "hist_edges"):
        if not bool(torch.isfinite(getattr(examples, name)).all()):
            raise ValueError(f"LatentExamples.{name} holds NaN or infinite values")
    if logit_lens is not None:
        for name in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values"):
            rows = getattr(logit_lens, name).shape[0]
            if rows != examples.d_sae:
                raise ValueError(f"LogitLens.{name} has {rows} latents but LatentExamples has {examples.d_sae}: "
                                 "they must come from the same SAE")
        for name in ("promoted_values", "suppressed_values"):
            if not bool(torch.isfinite(getattr(logit_lens, name)).all()):
                raise ValueError(f"LogitLens.{name} holds NaN or infinite values")
    for tensor in (examples.top_tokens, examples.sample_tokens):
        if tensor.numel() and int(tensor.min()) < PAD_TOKEN:
            raise ValueError(f"token id {int(tensor.min())} in an example window is negative (only PAD_TOKEN = "
                             f"{PAD_TOKEN} may be)")
        if tensor.numel() and int(tensor.max()) >= len(vocab):
            raise ValueError(f"token id {int(tensor.max())} is used but the vocabulary has only {len(vocab)} "
                             "strings: pass the token strings of the tokenizer the examples came from")
    # The logit lens may name ids past the vocabulary: models pad their unembedding (Pythia: 50304
    # rows for 50277 tokens). The pages show those as ⟨id⟩.
    if logit_lens is not None:
        for tensor in (logit_lens.promoted_ids, logit_lens.suppressed_ids):
            if tensor.numel() and int(tensor.min()) < 0:
                raise ValueError(f"LogitLens token id {int(tensor.min())} is negative")


def token_tensors(examples: LatentExamples, logit_lens: LogitLens | None) -> list[Tensor]:
    """Every tensor of token ids the dashboard shows."""
    tensors = [examples.top_tokens, examples.sample_tokens]
    if logit_lens is not None:
        tensors += [logit_lens.promoted_ids, logit_lens.suppressed_ids]
    return tensors


def vocab_payload(examples: LatentExamples, vocab: list[str], logit_lens: LogitLens | None) -> dict[str, str]:
    """``{token id: display string}`` for the ids the dashboard uses (JSON keys are strings); ids
    must be checked by :func:`check_inputs` first."""
    # A scatter into a presence mask is linear, unlike torch.unique's sort over ~10M ids; slot 0
    # takes PAD_TOKEN (-1).
    present = torch.zeros(len(vocab) + 1, dtype=torch.bool)
    for tensor in token_tensors(examples, logit_lens):
        ids = tensor.reshape(-1).to("cpu", torch.int64)
        present[ids[ids < len(vocab)] + 1] = True
    ids = present[1:].nonzero().flatten().tolist()
    return {str(i): str(vocab[i]) for i in ids}


def max_activation(examples: LatentExamples) -> Tensor:
    """[d_sae] float64: each latent's largest activation seen in any example (0 for dead latents);
    the colour scale of its token highlights."""
    candidates = [examples.top_values.amax(1) if examples.top_values.shape[1] else None,
                  examples.top_acts.flatten(1).amax(1) if examples.top_acts[0].numel() else None,
                  examples.sample_acts.flatten(1).amax(1) if examples.sample_acts[0].numel() else None]
    found = [c.to("cpu", torch.float64) for c in candidates if c is not None]
    if not found:
        return torch.zeros(examples.d_sae, dtype=torch.float64)
    return torch.stack(found).amax(0).clamp(min=0)


def example_counts(values: Tensor) -> Tensor:
    """[d_sae] int64: used example slots per latent (values are sorted descending, 0 when unused)."""
    return (values > 0).sum(1)


def frequent_peak_tokens(examples: LatentExamples, n: int = N_PEAK_TOKENS) -> list[list[int]]:
    """Per latent, up to ``n`` distinct token ids most often at the peak of its top examples (ties
    go to the token of the stronger example)."""
    peaks = examples.top_tokens[:, :, examples.peak_offset].to("cpu", torch.int64)
    slots = peaks.shape[1]
    if slots == 0:
        return [[] for _ in range(examples.d_sae)]
    valid = (examples.top_values.to("cpu") > 0) & (peaks != PAD_TOKEN)
    same = (peaks[:, :, None] == peaks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    count = same.sum(-1)  # how often each slot's token appears among the latent's valid peaks
    earlier = torch.ones(slots, slots, dtype=torch.bool).tril(-1)
    first = valid & ~(same & earlier).any(-1)  # keep one slot per distinct token
    position = torch.arange(slots, 0, -1)  # earlier (stronger) examples win ties
    score = torch.where(first, count * (slots + 1) + position, torch.zeros_like(count))
    best_score, best_slot = score.topk(min(n, slots), dim=1)
    best = torch.where(best_score > 0, peaks.gather(1, best_slot), torch.full_like(best_slot, PAD_TOKEN))
    return [[token for token in row if token != PAD_TOKEN] for row in best.tolist()]


def summary_payload(examples: LatentExamples, logit_lens: LogitLens | None, max_act: Tensor) -> dict[str, Any]:
    """What the index shows per latent, as columns (the latent id is the position)."""
    promoted = None
    if logit_lens is not None:
        promoted = logit_lens.promoted_ids[:, :N_INDEX_PROMOTED].to("cpu", torch.int64).tolist()
    return {"fire_count": examples.fire_count.to("cpu", torch.int64).tolist(),
            "max_act": round_significant(max_act).tolist(),
            "peak_tokens": frequent_peak_tokens(examples),
            "promoted": promoted}


def meta_payload(examples: LatentExamples, title: str, shard_size: int, has_logit_lens: bool) -> dict[str, Any]:
    """Facts every page needs: sizes, the shared histogram edges, where the data came from."""
    return {"title": title, "d_sae": examples.d_sae, "n_tokens": int(examples.n_tokens),
            "shard_size": shard_size, "n_shards": shard_count(examples.d_sae, shard_size),
            "peak_offset": examples.peak_offset, "width": int(examples.top_tokens.shape[-1]),
            "dense_threshold": DENSE_THRESHOLD, "hist_edges": round_significant(examples.hist_edges).tolist(),
            "has_logit_lens": has_logit_lens, "source": examples.meta}


def shard_count(d_sae: int, shard_size: int) -> int:
    return (d_sae + shard_size - 1) // shard_size


@dataclass
class SparseActs:
    """The non-zero window activations of every latent's used example slots, flattened in latent
    order: latent i's are ``positions[offsets[i]:offsets[i + 1]]`` (slot * width + token) and the
    matching ``values`` (rounded). Most activations in a window are 0, so this is far smaller, and
    faster to write, than the dense windows."""

    positions: Tensor
    values: Tensor
    offsets: Tensor

    @classmethod
    def of(cls, acts: Tensor, n_used: Tensor) -> "SparseActs":
        """From ``acts`` [latents, slots, width], keeping each latent's first ``n_used`` slots."""
        latents, slots, _ = acts.shape
        acts = acts.to("cpu")
        used = (torch.arange(slots)[None, :] < n_used[:, None])[:, :, None]
        nonzero = ((acts != 0) & used).reshape(latents, -1)
        offsets = torch.zeros(latents + 1, dtype=torch.int64)
        offsets[1:] = nonzero.sum(1).cumsum(0)
        # nonzero() and boolean indexing both go row-major, so entries come grouped by latent.
        return cls(nonzero.nonzero()[:, 1], round_significant(acts.reshape(latents, -1)[nonzero]), offsets)

    def lists(self, lo: int, hi: int) -> tuple[list[list[int]], list[list[float]]]:
        """Per latent lo..hi-1: its positions and values as lists (one .tolist() per shard)."""
        offsets = self.offsets[lo:hi + 1].tolist()
        base = offsets[0]
        positions = self.positions[base:offsets[-1]].tolist()
        values = self.values[base:offsets[-1]].tolist()
        spans = [(start - base, stop - base) for start, stop in zip(offsets, offsets[1:])]
        return [positions[a:b] for a, b in spans], [values[a:b] for a, b in spans]


def shard_payloads(examples: LatentExamples, logit_lens: LogitLens | None, max_act: Tensor,
                   shard_size: int) -> Iterator[dict[str, Any]]:
    """One payload per shard of ``shard_size`` consecutive latents. Per latent: ``id``,
    ``fire_count``, ``max_act``, ``hist_counts``; for its used top and sample examples
    ``{top,sample}_values`` (peak activations), ``{top,sample}_tokens`` (the token windows) and the
    window activations sparsely as ``{top,sample}_act_at`` (flat positions, example * width +
    token) with ``{top,sample}_act`` (values); with a logit lens, ``promoted_ids``,
    ``promoted_values``, ``suppressed_ids``, ``suppressed_values``. Values are rounded to 3
    significant digits."""
    n_used = {"top": example_counts(examples.top_values), "sample": example_counts(examples.sample_values)}
    # The tensor work happens once over all latents (small per-shard ops cost more than they do).
    sparse = {kind: SparseActs.of(getattr(examples, f"{kind}_acts"), n_used[kind]) for kind in n_used}
    rounded_values = {kind: round_significant(getattr(examples, f"{kind}_values")) for kind in n_used}
    lens: dict[str, Tensor] = {}
    if logit_lens is not None:
        lens = {"promoted_ids": logit_lens.promoted_ids.to("cpu", torch.int64),
                "promoted_values": round_significant(logit_lens.promoted_values),
                "suppressed_ids": logit_lens.suppressed_ids.to("cpu", torch.int64),
                "suppressed_values": round_significant(logit_lens.suppressed_values)}
    max_rounded = round_significant(max_act)
    for shard in range(shard_count(examples.d_sae, shard_size)):
        lo, hi = shard * shard_size, min((shard + 1) * shard_size, examples.d_sae)
        # One .tolist() per tensor per shard; per latent, whole lists are only sliced.
        columns: dict[str, list[Any]] = {
            "fire_count": examples.fire_count[lo:hi].tolist(), "max_act": max_rounded[lo:hi].tolist(),
            "hist_counts": examples.hist_counts[lo:hi].tolist()}
        columns.update({name: tensor[lo:hi].tolist() for name, tensor in lens.items()})
        counts = {kind: used[lo:hi].tolist() for kind, used in n_used.items()}
        for kind in n_used:
            columns[f"{kind}_values"] = rounded_values[kind][lo:hi].tolist()
            columns[f"{kind}_tokens"] = getattr(examples, f"{kind}_tokens")[lo:hi].tolist()
            columns[f"{kind}_act_at"], columns[f"{kind}_act"] = sparse[kind].lists(lo, hi)
        latents = []
        for row in range(hi - lo):
            latent = {"id": lo + row}
            for name, column in columns.items():
                latent[name] = column[row]
            for kind in n_used:  # drop the unused example slots
                latent[f"{kind}_values"] = latent[f"{kind}_values"][:counts[kind][row]]
                latent[f"{kind}_tokens"] = latent[f"{kind}_tokens"][:counts[kind][row]]
            latents.append(latent)
        yield {"shard": shard, "first": lo, "latents": latents}
