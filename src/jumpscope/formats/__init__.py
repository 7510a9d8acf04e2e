"""SAE file formats, all round-trip exact and none unpickling.

- ``native``: jumpscope's folder (cfg.json + sae.safetensors [+ feature_density.safetensors]).
- ``gemma_scope``: Gemma Scope's params.npz (a JumpReLU SAE on raw activations, SPEC 4).
- ``saelens``: SAELens's folder (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]).

``load(path)`` tells them apart by the files present; ``save(sae, path, format=...)`` writes one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..sae.base import SAE
from .gemma_scope import load_gemma_scope, read_gemma_scope, save_gemma_scope
from .native import load_density, load_native, read_config, read_metadata, save_native
from .saelens import load_saelens, load_saelens_sparsity, read_saelens_config, save_saelens

FORMATS = ("native", "gemma_scope", "saelens")

_MARKERS = {"native": ("cfg.json", "sae.safetensors"), "saelens": ("cfg.json", "sae_weights.safetensors"),
            "gemma_scope": ("params.npz",)}


def format_name(format: str) -> str:
    """Canonical format name; spellings such as 'gemma-scope' or 'GemmaScope' are accepted."""
    name = format.lower().replace("-", "_")
    name = {"gemmascope": "gemma_scope", "sae_lens": "saelens"}.get(name, name)
    if name not in FORMATS:
        raise ValueError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")
    return name


def detect_format(path: str | Path) -> str:
    """"native", "gemma_scope" or "saelens", from the files at ``path`` (a folder, or a .npz file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no SAE at {path}: it does not exist")
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        raise ValueError(f"cannot tell the SAE format of the file {path}: only a Gemma Scope .npz is read as a "
                         "single file; other formats are folders")
    present = sorted(entry.name for entry in path.iterdir())
    found = [name for name, files in _MARKERS.items() if all((path / file).is_file() for file in files)]
    if len(found) == 1:
        return found[0]
    what = "several formats' files" if found else "no known SAE files"
    raise ValueError(f"cannot tell the SAE format of {path}: {what} (found: {present or 'nothing'}); expected "
                     "native (cfg.json + sae.safetensors), SAELens (cfg.json + sae_weights.safetensors) or "
                     "Gemma Scope (params.npz)")


def load(path: str | Path, device: str | torch.device = "cpu", format: str | None = None, **options: Any) -> SAE:
    """Load an SAE in any format (detected when ``format`` is None). ``options`` go to the
    format's loader: Gemma Scope config fields (``model=``, ``site=``); SAELens
    ``norm_scaling_factor=``."""
    format = detect_format(path) if format is None else format_name(format)
    if format == "native":
        if options:
            raise TypeError(f"the native loader takes no options, got {sorted(options)}")
        return load_native(path, device=device)
    if format == "gemma_scope":
        return load_gemma_scope(path, **options).to(device)
    if format == "saelens":
        return load_saelens(path, device=device, **options)
    raise ValueError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")


def save(sae: SAE, path: str | Path, format: str = "native", **options: Any) -> Path:
    """Write ``sae`` in ``format``; returns what was written (the folder, or the .npz file).
    ``options``: ``density=``/``metadata=`` for native and SAELens."""
    format = format_name(format)
    if format == "native":
        return save_native(sae, path, **options)
    if format == "gemma_scope":
        if options:
            raise TypeError(f"the Gemma Scope writer takes no options, got {sorted(options)}")
        return save_gemma_scope(sae, path)
    if format == "saelens":
        return save_saelens(sae, path, **options)
    raise ValueError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")


__all__ = ["FORMATS", "detect_format", "load", "save", "save_native", "load_native", "load_density", "read_metadata",
           "read_config", "save_gemma_scope", "load_gemma_scope", "read_gemma_scope", "save_saelens", "load_saelens",
           "load_saelens_sparsity", "read_saelens_config"]
