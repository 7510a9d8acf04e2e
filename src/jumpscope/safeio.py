"""Safe file helpers shared by formats and checkpoints: atomic writes, reads with clear errors.

Nothing here unpickles: tensors go through safetensors, configs through JSON.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` on a temp file in ``path``'s folder, fsync it, then move it onto
    ``path`` with ``os.replace`` (atomic), so a crash mid-write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort: not every platform can open a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def to_json(value: dict[str, Any], what: str) -> str:
    """JSON text of ``value``, checked before any file is written (so a bad value leaves the
    folder as it was)."""
    try:
        return json.dumps(value, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot write {what}: the config/metadata is not plain finite JSON ({error})") from None


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/infinite float (at any depth) replaced by None (JSON null)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def write_text(path: str | Path, text: str) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (detached, on CPU, contiguous, no shared storage)."""
    plain = {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}
    atomic_write(path, lambda temp: save_file(plain, temp, metadata=metadata))


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (on CPU); a truncated or corrupt file is a ValueError
    naming the file, not a raw safetensors traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is truncated or not a valid safetensors file ({error})") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty if it has none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is truncated or not a valid safetensors file ({error})") from None


def check_finite(tensors: dict[str, Tensor], source: str | Path) -> None:
    """Refuse NaN or infinite values in any floating tensor."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s)")


def check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], source: str | Path) -> None:
    """Exact key set and shapes against the tensors an SAE of this config holds."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    wrong = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(value.shape)})"
             for name, value in expected.items() if tensors[name].shape != value.shape]
    if wrong:
        raise ValueError(f"{source}: wrong tensor shapes: {', '.join(wrong)}")

