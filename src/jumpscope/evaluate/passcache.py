"""The clean and ablation passes of an evaluation, kept beside the run and reused.

They depend only on the model, the held-out text and (an ablation) the replaced sites, so every
SAE evaluated at those sites on that text shares them: within a run, and in later ``eval`` calls.

- ``clean-<key>.safetensors``: the clean pass: ``values`` at the scored predictions (the LM head's
  input, model dtype; sentence embeddings for an encoder), ``targets``, ``per_batch`` counts and
  the summed cross-entropy ``total``. A few MB (n x d), never n x vocab: a model whose logits need
  more than its head is not cached.
- ``ablation-<key>.safetensors``: the summed measure of one ablation of one set of sites.

The key is the sha256 of the model name, dtype and a sample of its weights, the token ids and masks and the measure
settings; the full key travels in the file's metadata and is compared on read, with names, shapes,
dtypes, counts and finiteness. A missing, corrupt or mismatched file is recomputed and rewritten
(atomically: a crash never leaves half a file).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..errors import CacheError
from ..models.harvest import unpack_batch
from ..safeio import read_safetensors, read_safetensors_metadata, write_safetensors

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class CleanPass:
    """The clean model's outputs at the scored predictions (or sequences), one tensor per batch."""

    values: list[Tensor]
    targets: list[Tensor] | None
    total: float

    @property
    def count(self) -> int:
        return sum(v.shape[0] for v in self.values)


def text_digest(batches: Iterable[Any]) -> str:
    """sha256 of the batches' token ids and masks (shapes included)."""
    digest = hashlib.sha256()
    for batch in batches:
        for tensor in unpack_batch(batch):
            if tensor is not None:
                digest.update(repr(tuple(tensor.shape)).encode())
                digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def weights_digest(model: torch.nn.Module, per_tensor: int = 64) -> str:
    """sha256 of a strided sample of every parameter: the same name with other weights (a
    randomised model, an edited checkpoint) never reads another's passes."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor]
        digest.update(name.encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


class PassCache:
    """Clean and ablation passes of ``model_name`` on one held-out text, in ``directory``."""

    def __init__(self, directory: str | Path, model_name: str, model: torch.nn.Module, kind: str, text: str):
        self.directory = Path(directory)
        self.base = {"version": VERSION, "model": model_name, "dtype": str(next(model.parameters()).dtype),
                     "weights": weights_digest(model), "kind": kind, "text": text}

    def _key(self, what: str, settings: Mapping[str, Any]) -> tuple[Path, str]:
        key = json.dumps({**self.base, "what": what, **settings}, sort_keys=True)
        return self.directory / f"{what}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors", key

    def _read(self, what: str, settings: Mapping[str, Any], names: set[str]) -> tuple[Path, dict[str, Tensor]] | None:
        path, key = self._key(what, settings)
        if not path.exists():
            return None
        try:
            if read_safetensors_metadata(path, CacheError).get("key") != key:
                raise CacheError(f"{path} was written for other settings")
            tensors = read_safetensors(path, CacheError)
            if set(tensors) != names:
                raise CacheError(f"{path} holds {sorted(tensors)}, expected {sorted(names)}")
            if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors.values()):
                raise CacheError(f"{path} holds NaN or infinite values")
        except (CacheError, OSError) as problem:
            log.warning("ignoring the evaluation cache %s (%s); recomputing", path.name, problem)
            return None
        return path, tensors

    def _write(self, what: str, settings: Mapping[str, Any], tensors: dict[str, Tensor]) -> None:
        path, key = self._key(what, settings)
        try:
            write_safetensors(path, tensors, metadata={"key": key})
        except OSError as problem:  # a read-only run folder costs the reuse, not the evaluation
            log.warning("cannot write the evaluation cache %s (%s)", path, problem)

    def clean(self, settings: Mapping[str, Any], per_batch: list[int], width: int | None,
              dtype: torch.dtype) -> CleanPass | None:
        """The cached clean pass, if one matches ``per_batch`` counts, ``width`` and ``dtype``."""
        causal = self.base["kind"] == "causal_lm"
        found = self._read("clean", settings, {"values", "per_batch", "total"} | ({"targets"} if causal else set()))
        if found is None:
            return None
        path, t = found
        values, n = t["values"], sum(per_batch)
        problem = None
        if t["per_batch"].tolist() != per_batch or values.dim() != 2 or values.shape[0] != n:
            problem = "counts that do not match the text"
        elif (width is not None and values.shape[1] != width) or values.dtype != dtype:
            problem = f"values {tuple(values.shape)} {values.dtype}, not width {width} {dtype}"
        elif causal and (t["targets"].shape != (n,) or t["targets"].dtype != torch.int64):
            problem = "targets of the wrong shape"
        if problem:
            log.warning("ignoring the evaluation cache %s (%s); recomputing", path.name, problem)
            return None
        targets = list(t["targets"].split(per_batch)) if causal else None
        return CleanPass(list(values.split(per_batch)), targets, float(t["total"].item()))

    def save_clean(self, settings: Mapping[str, Any], clean: CleanPass) -> None:
        tensors = {"values": torch.cat([v.cpu() for v in clean.values]),
                   "per_batch": torch.tensor([v.shape[0] for v in clean.values], dtype=torch.int64),
                   "total": torch.tensor([clean.total], dtype=torch.float64)}
        if clean.targets is not None:
            tensors["targets"] = torch.cat([t.cpu() for t in clean.targets]).to(torch.int64)
        self._write("clean", settings, tensors)

    def total(self, settings: Mapping[str, Any]) -> float | None:
        """A cached ablation's summed measure."""
        found = self._read("ablation", settings, {"total"})
        if found is None:
            return None
        if found[1]["total"].shape != (1,):
            log.warning("ignoring the evaluation cache %s (a total of the wrong shape); recomputing", found[0].name)
            return None
        return float(found[1]["total"].item())

    def save_total(self, settings: Mapping[str, Any], total: float) -> None:
        self._write("ablation", settings, {"total": torch.tensor([total], dtype=torch.float64)})
