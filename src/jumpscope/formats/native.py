"""jumpscope's own folder format: exact round trips of every registered architecture.

A folder holds

- ``cfg.json``: ``{"format_version": 1, "architecture": name, "config": cfg.to_dict(),
  "jumpscope_version": ..., "metadata": {...}}`` (metadata: e.g. input_scale, tokens_trained);
- ``sae.safetensors``: the SAE's ``state_dict`` exactly as stored (float32, contiguous);
- optionally ``feature_density.safetensors``: ``firing_counts`` (int64, (d_sae,)) and
  ``n_tokens`` (int64 scalar), the firing statistics of an evaluation sample.

Every file is written atomically (temp file in the folder, fsync, ``os.replace``); the weights
first and ``cfg.json`` last. Loading validates everything and never unpickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import __version__
from ..errors import FormatError
from ..sae import registry
from ..sae.base import SAE, SAEConfig
from ..sae.validation import check_field_values
from ..safeio import (check_finite, check_header, check_tensors, finite_or_none, read_json, read_safetensors, short,
                      to_json, write_safetensors, write_text)

FORMAT_VERSION = 1
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
DENSITY_FILE = "feature_density.safetensors"


def save_native(sae: SAE, folder: str | Path, *, density: dict[str, Any] | None = None,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` (its state_dict as stored, not exported) to ``folder``; returns the folder.

    ``density``: ``{"firing_counts": int64 tensor (d_sae,), "n_tokens": int}`` or None (a stale
    density file from an earlier save is then removed). ``metadata``: plain JSON values; NaN or
    infinite floats in it are written as null (JSON has no NaN)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    name = sae.architecture
    registry.get_class(name)  # an unregistered class cannot be loaded back
    if density is not None:
        counts, n_tokens = check_density(density, sae.cfg.d_sae, "density")
    document = {"format_version": FORMAT_VERSION, "architecture": name, "config": sae.cfg.to_dict(),
                "jumpscope_version": __version__, "metadata": finite_or_none(dict(metadata or {}))}
    text = to_json(document, folder / CONFIG_FILE)
    write_safetensors(folder / WEIGHTS_FILE, sae.state_dict())
    if density is not None:
        write_safetensors(folder / DENSITY_FILE, {"firing_counts": counts,
                                                  "n_tokens": torch.tensor(n_tokens, dtype=torch.int64)})
    else:
        (folder / DENSITY_FILE).unlink(missing_ok=True)
    write_text(folder / CONFIG_FILE, text)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """The validated ``cfg.json`` of a native folder (architecture known, config a dict)."""
    folder = existing_sae_folder(folder)
    path = folder / CONFIG_FILE
    document = read_json(path)
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError(f"{path}: missing or invalid format_version {short(version)}")
    if version > FORMAT_VERSION:
        raise FormatError(f"{path}: format_version {version} was written by a newer jumpscope "
                         f"(this one reads up to {FORMAT_VERSION}); upgrade jumpscope")
    name = document.get("architecture")
    if not isinstance(name, str):
        raise FormatError(f"{path}: missing or invalid 'architecture' {short(name)}")
    if name not in registry.architectures():
        raise FormatError(f"{path}: unknown SAE architecture {short(name)}; known: {', '.join(registry.architectures())}")
    if not isinstance(document.get("config"), dict):
        raise FormatError(f"{path}: 'config' must be a JSON object")
    if not isinstance(document.get("metadata", {}), dict):
        raise FormatError(f"{path}: 'metadata' must be a JSON object")
    return document


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The ``metadata`` dict saved with the SAE (e.g. input_scale, tokens_trained)."""
    return dict(read_config(folder).get("metadata", {}))


def build_config(name: str, values: dict[str, Any], source: str | Path) -> SAEConfig:
    """``config_class(name).from_dict(values)`` with errors that name the file."""
    cls = registry.config_class(name)
    try:
        check_field_values(cls, values)  # types first: the config's own checks assume them
        return cls.from_dict(values)
    except (TypeError, ValueError, OverflowError) as error:
        raise FormatError(f"{source}: invalid {name!r} config ({' '.join(str(error).split())[:300]})") from None


def build_checked(cfg: SAEConfig, weights: str | Path) -> SAE:
    """The SAE of ``cfg``, built only once the shapes in ``weights``' header match it: the sizes a
    config declares are not trusted to be allocated (a tiny cfg.json could ask for gigabytes)."""
    source = Path(weights).parent / CONFIG_FILE
    try:
        with torch.device("meta"):  # shapes and dtypes only, no memory
            expected = registry.build(cfg).state_dict()
    except (TypeError, ValueError, RuntimeError) as error:
        raise FormatError(f"{source}: invalid {cfg.architecture!r} config ({' '.join(str(error).split())[:300]})") from None
    check_header(weights, {name: tuple(value.shape) for name, value in expected.items()})
    return registry.build(cfg)


def load_state(sae: SAE, tensors: dict[str, Tensor], source: str | Path) -> SAE:
    """Validate ``tensors`` against ``sae``'s own (keys, shapes, dtypes, finiteness), load them."""
    expected = sae.state_dict()
    check_tensors(tensors, expected, source)
    wrong = [f"{name} {tensors[name].dtype} (expected {value.dtype})"
             for name, value in expected.items() if tensors[name].dtype != value.dtype]
    if wrong:
        raise FormatError(f"{source}: wrong tensor dtypes: {', '.join(wrong)}")
    check_finite(tensors, source)
    sae.load_state_dict(tensors, strict=True)
    return sae


def load_native(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE saved in ``folder``, on ``device``, with bit-identical tensors, in eval mode
    (inference: a BatchTopK SAE then encodes with its threshold; call ``.train()`` to train on)."""
    folder = existing_sae_folder(folder)
    document = read_config(folder)
    cfg = build_config(document["architecture"], document["config"], folder / CONFIG_FILE)
    if not (folder / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"missing {WEIGHTS_FILE} in {folder}")
    sae = build_checked(cfg, folder / WEIGHTS_FILE)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    return load_state(sae, tensors, folder / WEIGHTS_FILE).eval().to(device)


def load_density(folder: str | Path) -> dict[str, Any] | None:
    """``{"firing_counts": int64 (d_sae,), "n_tokens": int}``, or None when none was saved."""
    folder = existing_sae_folder(folder)
    path = folder / DENSITY_FILE
    if not path.exists():
        return None
    tensors = read_safetensors(path)
    if set(tensors) != {"firing_counts", "n_tokens"}:
        raise FormatError(f"{path}: expected keys ['firing_counts', 'n_tokens'], got {sorted(tensors)}")
    d_sae = None
    if (folder / CONFIG_FILE).exists():
        d_sae = read_config(folder)["config"].get("d_sae")
        d_sae = d_sae if isinstance(d_sae, int) and not isinstance(d_sae, bool) else None
    n_tokens = tensors["n_tokens"]
    if n_tokens.dtype != torch.int64 or n_tokens.numel() != 1:
        raise FormatError(f"{path}: n_tokens must be one int64, got {n_tokens.dtype} {tuple(n_tokens.shape)}")
    counts, total = check_density({"firing_counts": tensors["firing_counts"], "n_tokens": int(n_tokens.item())},
                                  d_sae, path, FormatError)
    return {"firing_counts": counts, "n_tokens": total}


def check_density(density: dict[str, Any], d_sae: int | None, source: Any,
                  error: type[Exception] = ValueError) -> tuple[Tensor, int]:
    """``density``'s (firing_counts on the CPU, n_tokens), once valid for ``d_sae`` latents; every
    format's density goes through here (``error`` is raised naming ``source`` otherwise)."""
    if not isinstance(density, dict) or set(density) != {"firing_counts", "n_tokens"}:
        keys = sorted(density) if isinstance(density, dict) else type(density).__name__
        raise error(f"{source}: density needs exactly 'firing_counts' and 'n_tokens', got {keys}")
    counts, n_tokens = density["firing_counts"], density["n_tokens"]
    if not isinstance(counts, Tensor) or counts.dtype != torch.int64 or counts.dim() != 1:
        raise error(f"{source}: firing_counts must be a 1-d int64 tensor")
    if d_sae is not None and counts.shape[0] != d_sae:
        raise error(f"{source}: firing_counts has {counts.shape[0]} entries, the SAE has d_sae={d_sae}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
        raise error(f"{source}: n_tokens must be a non-negative int, got {n_tokens!r}")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > n_tokens):
        raise error(f"{source}: firing_counts must lie in [0, n_tokens={n_tokens}]")
    return counts.detach().cpu(), n_tokens


def existing_sae_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, once it is known to be an existing folder (every format's SAE is one)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"SAE folder {folder} does not exist")
    if not folder.is_dir():
        raise FormatError(f"{folder} is not a folder (an SAE in this format is a folder)")
    return folder
