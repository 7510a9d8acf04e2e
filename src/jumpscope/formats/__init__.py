"""SAE file formats, all round-trip exact and none unpickling.

- ``native``: jumpscope's folder (cfg.json + sae.safetensors [+ feature_density.safetensors]).
- ``gemma_scope``: Gemma Scope's params.npz (a JumpReLU SAE on raw activations, SPEC 4).
- ``saelens``: SAELens's folder (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]).
- ``sparsify``: EleutherAI sparsify's folder (cfg.json + sae.safetensors), TopK SAEs.

``load(path)`` tells them apart by the files present, and native from sparsify (the same two
file names) by what cfg.json holds; ``save(sae, path, format=...)`` writes one. ``load`` also
reads SAEs on the Hugging Face hub (hub.py): ``load("owner/name", "path/in/repo")`` or
``load("hf://owner/name/path/in/repo")``, from the local cache unless ``allow_network=True``.
``load_saes`` (loading.py) loads several for a job, named and placed at a site.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError
from ..safeio import read_json, short
from ..sae.base import SAE
from . import hub
from .gemma_scope import load_gemma_scope, read_gemma_scope, save_gemma_scope
from .loading import load_saes, model_of
from .native import load_density, load_native, read_config, read_metadata, save_native
from .saelens import load_saelens, load_saelens_sparsity, read_saelens_config, save_saelens
from .sparsify import is_sparsify_config, load_sparsify, read_sparsify_config, save_sparsify

FORMATS = ("native", "gemma_scope", "saelens", "sparsify")

# native and sparsify share their file names (told apart by cfg.json's content, _native_or_sparsify)
_MARKERS = {"native": ("cfg.json", "sae.safetensors"), "saelens": ("cfg.json", "sae_weights.safetensors"),
            "gemma_scope": ("params.npz",)}


def format_name(format: str) -> str:
    """Canonical format name; spellings such as 'gemma-scope' or 'GemmaScope' are accepted."""
    name = format.lower().replace("-", "_")
    name = {"gemmascope": "gemma_scope", "sae_lens": "saelens"}.get(name, name)
    if name not in FORMATS:
        raise ValueError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")
    return name


def detect_format(path: str | Path, *, allow_network: bool = False) -> str:
    """"native", "gemma_scope", "saelens" or "sparsify", from the files at ``path`` (a folder, a
    .npz file, or an ``hf://`` reference, fetched as :func:`load` would)."""
    if hub.is_hub_reference(path):
        path = hub.fetch(hub.parse_hub_reference(path), allow_network=allow_network)
    path = Path(path)
    if not path.exists():
        hint = "" if path.is_absolute() else " (an SAE on the Hugging Face hub is hf://owner/name/path)"
        raise FileNotFoundError(f"no SAE at {path}: it does not exist{hint}")
    if not path.is_file() and not path.is_dir():  # never open a FIFO or device: it may block or never end
        raise FormatError(f"{path} is not a regular file or folder (a FIFO, device or socket); no SAE can be read from it")
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        raise FormatError(f"cannot tell the SAE format of the file {path}: only a Gemma Scope .npz is read as a "
                          "single file; other formats are folders")
    present = sorted(entry.name for entry in path.iterdir())
    # exists(), not is_file(): a marker that is a FIFO or a device is then refused by name by its reader
    found = [name for name, files in _MARKERS.items() if all((path / file).exists() for file in files)]
    if sorted(found) == ["gemma_scope", "native"] and _native_or_sparsify(path) == "native":
        return "native"  # a suite's release folder: our files with a params.npz export beside them
    if found == ["native"]:
        return _native_or_sparsify(path)
    if len(found) == 1:
        return found[0]
    what = "several formats' files" if found else "no known SAE files"
    raise FormatError(f"cannot tell the SAE format of {path}: {what} (found: "
                      f"{short(present, 300) if present else 'nothing'}); expected native or sparsify (cfg.json + "
                      "sae.safetensors), SAELens (cfg.json + sae_weights.safetensors) or Gemma Scope (params.npz)")


def _native_or_sparsify(folder: Path) -> str:
    document = read_json(folder / "cfg.json")
    if "architecture" in document and "config" in document:
        return "native"
    if is_sparsify_config(document):
        return "sparsify"
    raise FormatError(f"{folder / 'cfg.json'}: cfg.json + sae.safetensors is the layout of both jumpscope's native "
                      "format and EleutherAI sparsify's, but this cfg.json fits neither: native needs "
                      "'format_version', 'architecture' and 'config'; sparsify needs 'd_in', 'k' and 'num_latents' "
                      f"or 'expansion_factor', without 'architecture'; found keys {short(sorted(document), 200)}")


def load(path: str | Path, sae_id: str | None = None, device: str | torch.device = "cpu", format: str | None = None,
         *, allow_network: bool = False, revision: str | None = None, cache_dir: str | Path | None = None,
         **options: Any) -> SAE:
    """Load an SAE in any format (detected when ``format`` is None), in eval mode on ``device``.

    ``path``: a local folder or .npz file; a Hugging Face repository id with ``sae_id``, the path
    inside it (``load("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")``); or
    the same as one string, ``"hf://owner/name[@revision]/path"``. Hub files come from the local
    cache, downloaded first only when ``allow_network``; ``revision`` (branch, tag or commit) and
    ``cache_dir`` apply to them. A local folder with ``sae_id`` means ``path/sae_id``.
    ``device`` may still be passed second, as before (``load(path, "cuda")``).
    ``options`` go to the format's loader: ``model=``, ``site=``, ``target_site=`` (Gemma
    Scope, sparsify; they override what a hub path tells); SAELens ``norm_scaling_factor=``."""
    if sae_id is not None and _is_device(sae_id):
        if device != "cpu":
            raise TypeError(f"load() got two devices: {sae_id!r} and device={device!r}")
        device, sae_id = sae_id, None
    ref = hub.reference(path, sae_id, revision)
    if ref is None:
        if revision is not None or cache_dir is not None:
            raise TypeError("revision= and cache_dir= apply to SAEs on the Hugging Face hub only, "
                            f"and {os.fspath(path)!r} is a local path")
        return _load_local(Path(path) if sae_id is None else Path(path) / sae_id, device, format, options)
    local = hub.fetch(ref, allow_network=allow_network, cache_dir=cache_dir)
    format = detect_format(local) if format is None else format_name(format)
    info = hub.describe(ref, local)
    if format in ("gemma_scope", "sparsify"):  # what the repository's names tell, unless given
        options = {**{key: info[key] for key in ("model", "site", "target_site") if info.get(key)}, **options}
    return hub.annotate(_load_local(local, device, format, options), info)


def _load_local(path: Path, device: str | torch.device, format: str | None, options: dict[str, Any]) -> SAE:
    format = detect_format(path) if format is None else format_name(format)
    if format == "native":
        if options:
            raise TypeError(f"the native loader takes no options, got {sorted(options)}")
        return load_native(path, device=device)
    if format == "gemma_scope":
        return load_gemma_scope(path, **options).to(device)
    if format == "saelens":
        return load_saelens(path, device=device, **options)
    if format == "sparsify":
        return load_sparsify(path, device=device, **options)
    raise ValueError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")


def _is_device(value: Any) -> bool:
    """Whether ``load``'s second argument is a device (its place before hub paths existed)."""
    if isinstance(value, torch.device):
        return True
    if not isinstance(value, str) or "/" in value:
        return False
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


def save(sae: SAE, path: str | Path, format: str = "native", **options: Any) -> Path:
    """Write ``sae`` in ``format``; returns what was written (the folder, or the .npz file).
    ``options``: ``density=``/``metadata=`` for native and SAELens. A native save of an SAE
    loaded from the hub keeps ``sae.source`` in its metadata unless ``metadata=`` is given."""
    format = format_name(format)
    if format == "native":
        if isinstance(getattr(sae, "source", None), dict) and options.get("metadata") is None:
            options = {**options, "metadata": {"source": sae.source}}
        return save_native(sae, path, **options)
    if format == "gemma_scope":
        if options:
            raise TypeError(f"the Gemma Scope writer takes no options, got {sorted(options)}")
        return save_gemma_scope(sae, path)
    if format == "saelens":
        return save_saelens(sae, path, **options)
    if format == "sparsify":
        if options:
            raise TypeError(f"the sparsify writer takes no options, got {sorted(options)}")
        return save_sparsify(sae, path)
    raise ValueError(f"unknown SAE format {format!r}; known: {', '.join(FORMATS)}")


__all__ = ["FORMATS", "detect_format", "load", "save", "save_native", "load_native", "load_density", "read_metadata",
           "read_config", "save_gemma_scope", "load_gemma_scope", "read_gemma_scope", "save_saelens", "load_saelens",
           "load_saelens_sparsity", "read_saelens_config", "save_sparsify", "load_sparsify", "read_sparsify_config",
           "load_saes", "model_of"]
