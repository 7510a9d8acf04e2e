"""Safe file helpers shared by formats and checkpoints: atomic writes, reads with clear errors.

Nothing here unpickles: tensors go through safetensors, configs through JSON. Readers take the
error class to raise (FormatError for SAE files, CacheError for activation caches); a file that
does not exist is a FileNotFoundError, anything else wrong with it (not a regular file, too
large, corrupt, deeply nested) is that class, with a one-line message naming the file.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .errors import FormatError

# A config or manifest larger than this is refused before it is read (real ones are kilobytes).
MAX_JSON_BYTES = 8 << 20


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


def check_regular_file(path: str | Path, error: type[Exception] = FormatError) -> int:
    """The size of ``path`` if it is a regular file (symlinks followed); a FileNotFoundError if it
    does not exist, ``error`` if it is anything else (a FIFO would block a reader forever, a
    device such as /dev/zero never ends)."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing {path.name} in {path.parent}") from None
    except (OSError, ValueError) as problem:  # ValueError: an embedded null byte
        raise error(f"{path}: cannot read it ({one_line(problem)})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
        raise error(f"{path} is not a regular file (it is {kind})")
    return info.st_size


def read_bytes(path: str | Path, limit: int, error: type[Exception] = FormatError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (checked before reading, and again
    while reading, in case it grows)."""
    path = Path(path)
    size = check_regular_file(path, error)
    if size > limit:
        raise error(f"{path} is {size} bytes, more than the {limit} bytes such a file may have; refused")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the check, open does not block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise error(f"{path} is not a regular file")
            data = handle.read(limit + 1)
    except OSError as problem:
        raise error(f"{path}: cannot read it ({one_line(problem)})") from None
    if len(data) > limit:
        raise error(f"{path} is more than the {limit} bytes such a file may have; refused")
    return data


def read_json(path: str | Path, error: type[Exception] = FormatError, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``path``; a missing file is a FileNotFoundError, a file that is not a
    regular file, larger than ``limit``, not JSON, nested too deeply or not an object is
    ``error`` naming the file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    data = read_bytes(path, limit, error)
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise error(f"{path} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError, MemoryError) as problem:  # ValueError: also huge int literals
        raise error(f"{path} is not valid JSON ({one_line(problem)})") from None
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def safetensors_header(path: str | Path, error: type[Exception] = FormatError) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` from a safetensors file's header, without reading any tensor
    data, so declared shapes can be checked before anything is allocated."""
    path = Path(path)
    check_regular_file(path, error)
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {}
            for name in handle.keys():
                part = handle.get_slice(name)
                found[name] = (tuple(int(n) for n in part.get_shape()), str(part.get_dtype()))
            return found
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as problem:
        raise error(f"{path} is truncated or not a valid safetensors file ({one_line(problem)})") from None


def check_header(path: str | Path, expected: dict[str, tuple[int, ...]], error: type[Exception] = FormatError) -> None:
    """The header of ``path`` lists exactly ``expected``'s names with its shapes (nothing loaded)."""
    header = safetensors_header(path, error)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise error(f"{path}: weights do not match the config: missing keys {missing}, unexpected keys {unexpected}")
    wrong = [f"{name} {header[name][0]} (expected {tuple(shape)})" for name, shape in expected.items()
             if header[name][0] != tuple(shape)]
    if wrong:
        raise error(f"{path}: wrong tensor shapes: {', '.join(wrong)}")


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors atomically (detached, on CPU, contiguous, no shared storage)."""
    plain = {name: value.detach().to("cpu").contiguous().clone() for name, value in tensors.items()}
    atomic_write(path, lambda temp: save_file(plain, temp, metadata=metadata))


def read_safetensors(path: str | Path, error: type[Exception] = FormatError) -> dict[str, Tensor]:
    """Every tensor of a safetensors file (on CPU); a truncated or corrupt file is ``error``
    naming the file, not a raw safetensors traceback."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    check_regular_file(path, error)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as problem:
        raise error(f"{path} is truncated or not a valid safetensors file ({one_line(problem)})") from None


def read_safetensors_metadata(path: str | Path, error: type[Exception] = FormatError) -> dict[str, str]:
    """The string metadata of a safetensors file's header (empty if it has none)."""
    check_regular_file(path, error)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as problem:
        raise error(f"{path} is truncated or not a valid safetensors file ({one_line(problem)})") from None


def check_finite(tensors: dict[str, Tensor], source: str | Path) -> None:
    """Refuse NaN or infinite values in any floating tensor."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise FormatError(f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s)")


def check_tensors(tensors: dict[str, Tensor], expected: dict[str, Tensor], source: str | Path) -> None:
    """Exact key set and shapes against the tensors an SAE of this config holds."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{source}: weights do not match the config: missing keys {missing}, "
                          f"unexpected keys {unexpected}")
    wrong = [f"{name} {tuple(tensors[name].shape)} (expected {tuple(value.shape)})"
             for name, value in expected.items() if tensors[name].shape != value.shape]
    if wrong:
        raise FormatError(f"{source}: wrong tensor shapes: {', '.join(wrong)}")


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for messages about hostile values."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # ValueError: an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """An error (or text) as one line of at most ``limit`` characters (None: whole)."""
    text = " ".join(str(error).split())[:limit]
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")


def cache_root() -> Path:
    """Where jumpscope keeps caches it can rebuild (the built-in corpus, converted GGUF models):
    ``$JUMPSCOPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/jumpscope``, else ``~/.cache/jumpscope``."""
    if os.environ.get("JUMPSCOPE_CACHE_DIR"):
        return Path(os.environ["JUMPSCOPE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jumpscope"
