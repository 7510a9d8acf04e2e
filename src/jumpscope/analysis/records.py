"""What the analysis of an SAE's latents produces, in one place: the records the dashboard renders.

:class:`LatentExamples` is what streaming a corpus through model + SAE finds for every latent (top
contexts, a random sample of activating contexts, density, an activation histogram);
:class:`LogitLens` is what each latent's decoder direction does to the next-token logits.
Both save to and load from safetensors + JSON only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..safeio import read_json, read_safetensors, write_safetensors, write_text

PAD_TOKEN = -1
"""Token id in a context window where the window runs past the start or end of its sequence."""


@dataclass
class LatentExamples:
    """Per latent: its top-activating contexts, a uniform sample of its activating contexts, its
    firing density and a histogram of its non-zero activations. Latents are rows; an example is a
    window of ``width`` tokens with the latent's peak at index ``peak_offset``."""

    top_values: Tensor
    """[d_sae, n_top] float32: the peak activation of each top example, descending; 0 past the
    latent's last example (a latent that fired in fewer contexts)."""

    top_tokens: Tensor
    """[d_sae, n_top, width] int32: token ids of each top example's window (PAD_TOKEN outside the
    sequence or past the last example)."""

    top_acts: Tensor
    """[d_sae, n_top, width] float32: the latent's activation on each token of the window."""

    sample_values: Tensor
    """[d_sae, n_sample] float32: a uniform random sample of the latent's activating contexts
    (peak > 0), sorted by peak activation, descending (lower quantiles for the dashboard)."""

    sample_tokens: Tensor
    """[d_sae, n_sample, width] int32, as top_tokens."""

    sample_acts: Tensor
    """[d_sae, n_sample, width] float32, as top_acts."""

    fire_count: Tensor
    """[d_sae] int64: tokens on which the latent was > 0."""

    hist_edges: Tensor
    """[n_bins + 1] float32: log10(activation) bin edges, shared by every latent."""

    hist_counts: Tensor
    """[d_sae, n_bins] int64: each latent's non-zero activations per log10 bin (values below the
    first edge count in the first bin, above the last in the last)."""

    n_tokens: int
    """Tokens scanned (the denominator of the density)."""

    peak_offset: int
    """Index of the peak token within each example window."""

    meta: dict[str, Any] = field(default_factory=dict)
    """Where it came from: model, site, SAE, corpus, settings."""

    random_tokens: Tensor | None = None
    """[n_random, width] int32: windows from a uniform random sample of all windows (None in
    records written before they were kept)."""

    random_peaks: Tensor | None = None
    """[n_random, d_sae] float32: each latent's peak over each random window (0: it did not fire
    there, so the window is one of its non-activating contexts)."""

    @property
    def d_sae(self) -> int:
        return int(self.top_values.shape[0])

    @property
    def density(self) -> Tensor:
        """[d_sae] float64: fraction of scanned tokens on which each latent fired."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name) for name in TENSOR_FIELDS + OPTIONAL_FIELDS if getattr(self, name) is not None}
        write_safetensors(path / "examples.safetensors", tensors)
        write_text(path / "examples.json", json.dumps({"n_tokens": self.n_tokens, "peak_offset": self.peak_offset,
                                                         "meta": self.meta}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "LatentExamples":
        path = Path(path)
        info = read_json(path / "examples.json")
        tensors = read_safetensors(path / "examples.safetensors")
        missing = [name for name in TENSOR_FIELDS if name not in tensors]
        if missing:
            raise ValueError(f"{path / 'examples.safetensors'} lacks {', '.join(missing)}")
        examples = cls(**{name: tensors[name] for name in TENSOR_FIELDS},
                       **{name: tensors.get(name) for name in OPTIONAL_FIELDS}, n_tokens=int(info["n_tokens"]),
                       peak_offset=int(info["peak_offset"]), meta=info.get("meta", {}))
        check_examples_shape(examples)
        return examples


TENSOR_FIELDS = ("top_values", "top_tokens", "top_acts", "sample_values", "sample_tokens", "sample_acts",
                 "fire_count", "hist_edges", "hist_counts")
OPTIONAL_FIELDS = ("random_tokens", "random_peaks")


@dataclass
class LogitLens:
    """Per latent: the tokens its decoder direction promotes and suppresses through the unembedding
    (W_dec[i] @ W_U, after the final norm's elementwise weight where the model has one)."""

    promoted_ids: Tensor
    """[d_sae, n] int64: token ids with the largest logit change, descending."""

    promoted_values: Tensor
    """[d_sae, n] float32: their logit changes."""

    suppressed_ids: Tensor
    """[d_sae, n] int64: token ids with the most negative logit change, most negative first."""

    suppressed_values: Tensor
    """[d_sae, n] float32: their logit changes."""

    def save(self, path: str | Path) -> None:
        write_safetensors(path, {name: getattr(self, name) for name in LENS_FIELDS})

    @classmethod
    def load(cls, path: str | Path) -> "LogitLens":
        tensors = read_safetensors(path)
        missing = [name for name in LENS_FIELDS if name not in tensors]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}")
        return cls(**{name: tensors[name] for name in LENS_FIELDS})


LENS_FIELDS = ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")


def token_strings(tokenizer: Any) -> list[str]:
    """Display text of every token id: byte-level BPE markers (``Ġ``, ``Ċ``) and sentencepiece's
    ``▁`` become spaces and newlines, byte-fallback pieces ``<0x0A>`` become their character,
    WordPiece words get a leading space and lose the ``##`` of continuations. The
    strings are untrusted: whoever renders them must escape them."""
    size = len(tokenizer)
    pieces = ["" if piece is None else str(piece) for piece in tokenizer.convert_ids_to_tokens(list(range(size)))]
    # WordPiece (BERT, MiniLM) marks continuations with "##" and word starts with nothing
    wordpiece = sum(piece.startswith("##") for piece in pieces) > 0.05 * max(size, 1)
    out = []
    for piece in pieces:
        if wordpiece:
            out.append(piece[2:] if piece.startswith("##") else " " + piece)
            continue
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                piece = chr(int(piece[3:5], 16))
            except ValueError:
                pass
        out.append(piece.replace("Ġ", " ").replace("Ċ", "\n").replace("▁", " "))
    return out


def check_examples_shape(examples: LatentExamples) -> None:
    """Raise a clear error when the tensors of ``examples`` disagree on d_sae or window width."""
    d_sae, width = examples.d_sae, examples.top_tokens.shape[-1]
    for name in TENSOR_FIELDS:
        if name == "hist_edges":
            continue
        tensor = getattr(examples, name)
        if tensor.shape[0] != d_sae:
            raise ValueError(f"LatentExamples.{name} has {tensor.shape[0]} latents, top_values has {d_sae}")
        if name.endswith(("_tokens", "_acts")) and tensor.shape[-1] != width:
            raise ValueError(f"LatentExamples.{name} windows are {tensor.shape[-1]} wide, top_tokens' are {width}")
    if (examples.random_tokens is None) != (examples.random_peaks is None):
        raise ValueError("LatentExamples has random_tokens without random_peaks or the other way round")
    if examples.random_tokens is not None:
        n = examples.random_tokens.shape[0]
        if examples.random_tokens.dim() != 2 or examples.random_tokens.shape[1] != width:
            raise ValueError(f"LatentExamples.random_tokens must be [n_random, {width}], "
                             f"got {tuple(examples.random_tokens.shape)}")
        if tuple(examples.random_peaks.shape) != (n, d_sae):
            raise ValueError(f"LatentExamples.random_peaks must be [{n}, {d_sae}], got {tuple(examples.random_peaks.shape)}")
    if not 0 <= examples.peak_offset < width:
        raise ValueError(f"peak_offset {examples.peak_offset} is outside windows of width {width}")
    if examples.hist_counts.shape[1] + 1 != examples.hist_edges.shape[0]:
        raise ValueError("hist_counts needs one bin fewer than hist_edges has edges")


__all__ = ["LatentExamples", "LogitLens", "PAD_TOKEN", "token_strings", "check_examples_shape"]
