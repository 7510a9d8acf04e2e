"""An on-disk activation cache: sharded safetensors files and a JSON manifest.

Layout of a cache folder::

    manifest.json              format, version, model, corpus, context size, sites and dims,
                               dtype, shard_rows, each shard's file/rows/bytes/sha256,
                               total_tokens, metadata (the creation settings), complete
    shard_00000.safetensors    one tensor per site, [rows, d_site], rows aligned across sites;
    shard_00001.safetensors    header metadata names the shard index
    ...

Every shard holds ``shard_rows`` rows except possibly the last. Shards and the manifest are
written atomically (temp file, fsync, rename) and the manifest is rewritten after each shard, so a
crash leaves a valid *incomplete* cache. Reopening a :class:`CacheWriter` with the same settings
continues after the last complete shard: the producer skips ``writer.tokens_done`` rows of its
input (:func:`jumpscope.data.batch.skip_rows`) and the result is byte-identical to an
uninterrupted write. :class:`CacheReader` checks the manifest and each shard's sha256 as it reads.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..errors import CacheError
from ..safeio import atomic_write, check_regular_file, read_json, read_safetensors, short, to_json, write_text
from .batch import skip_rows
from .buffer import ShuffleBuffer

FORMAT = "jumpscope-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHARD = re.compile(r"shard_\d+\.safetensors")
_TEMP = re.compile(r"\.(shard_\d+\.safetensors|manifest\.json)\..*\.tmp")
_SETTINGS = ("model", "corpus", "context_size", "sites", "dtype", "shard_rows", "metadata")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 << 20  # about 400,000 shards
MAX_WIDTH = 2**31


def dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unsupported cache dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return name


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder`` holds a finished cache (its manifest says complete)."""
    try:
        return read_json(Path(folder) / MANIFEST, CacheError, MAX_MANIFEST_BYTES).get("complete") is True
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _check_chunk(chunk: Mapping[str, Tensor], sites: Mapping[str, int]) -> int:
    if not isinstance(chunk, Mapping):
        raise TypeError(f"cache chunks must be dicts {{site: Tensor [rows, d]}}, got {type(chunk).__name__}")
    if set(chunk) != set(sites):
        raise ValueError(f"chunk sites {sorted(chunk)} differ from the cache's sites {sorted(sites)}")
    shapes = {site: tuple(chunk[site].shape) for site in sites}
    bad = {s: shape for s, shape in shapes.items() if len(shape) != 2 or shape[1] != sites[s]}
    if bad:
        raise ValueError(f"chunk tensors must be [rows, d_site] with d_site = {dict(sites)}; got {bad}")
    if len({shape[0] for shape in shapes.values()}) != 1:
        raise ValueError(f"rows are not aligned across sites: {shapes}")
    return next(iter(shapes.values()))[0]


class CacheWriter:
    """Write activation chunks into a cache folder, one shard per ``shard_rows`` rows.

    ``model``, ``corpus`` and ``context_size`` default to the same keys of ``metadata``. Use as a
    context manager (an exception leaves the cache incomplete and resumable) or call ``close()``.
    """

    def __init__(self, folder: str | Path, sites: Mapping[str, int], dtype: torch.dtype | str = "float32",
                 shard_rows: int = 65536, metadata: Mapping[str, Any] | None = None, *, model: str | None = None,
                 corpus: str | None = None, context_size: int | None = None, overwrite: bool = False):
        self.folder = Path(folder)
        if not sites or not all(isinstance(s, str) and s and int(d) > 0 for s, d in sites.items()):
            raise ValueError(f"sites must map non-empty names to positive widths, got {dict(sites)}")
        if int(shard_rows) < 1:
            raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
        meta = json.loads(to_json(dict(metadata or {}), "cache metadata"))
        self.sites = {site: int(width) for site, width in sites.items()}
        self.dtype, self.shard_rows = DTYPES[dtype_name(dtype)], int(shard_rows)
        settings = {"model": meta.get("model") if model is None else model,
                    "corpus": meta.get("corpus") if corpus is None else corpus,
                    "context_size": meta.get("context_size") if context_size is None else context_size,
                    "sites": self.sites, "dtype": dtype_name(dtype), "shard_rows": self.shard_rows, "metadata": meta}
        settings = json.loads(to_json(settings, "cache settings"))
        self._pending: list[dict[str, Tensor]] = []
        self._pending_rows, self._closed = 0, False
        if (self.folder / MANIFEST).exists() and not overwrite:
            self.manifest = self._resume(settings)
        else:
            self.manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **settings, "shards": [],
                             "total_tokens": 0, "complete": False}
        self._clean(everything=overwrite)
        self._save_manifest()

    def _resume(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The manifest of the incomplete cache in the folder, if it was written with ``settings``."""
        path = self.folder / MANIFEST
        try:
            old = read_json(path, CacheError, MAX_MANIFEST_BYTES)
            _validate(old, path)
        except ValueError as error:
            raise CacheError(f"{error}; pass overwrite=True to write the cache again") from None
        if old["complete"]:
            raise FileExistsError(f"{self.folder} already holds a complete activation cache "
                                  f"({old['total_tokens']} tokens); pass overwrite=True to write it again")
        differ = [key for key in _SETTINGS if old.get(key) != settings[key]]
        if differ:
            detail = "; ".join(f"{key}: cache has {old.get(key)!r}, now {settings[key]!r}" for key in differ)
            raise CacheError(f"cannot resume the incomplete cache in {self.folder}: its settings differ ({detail}). "
                             "Resume with the same settings, or pass overwrite=True to start again")
        for index, shard in enumerate(old["shards"]):
            shard_path = self.folder / shard["file"]
            if not shard_path.is_file() or shard_path.stat().st_size != shard["bytes"]:
                raise CacheError(f"cannot resume {self.folder}: shard {index} ({shard['file']}) is missing or has "
                                 "the wrong size; pass overwrite=True to start again")
        return old

    @property
    def tokens_done(self) -> int:
        """Rows safely stored in complete shards (on a resumed cache: how many input rows to skip)."""
        return int(self.manifest["total_tokens"])

    def write(self, chunk: Mapping[str, Tensor]) -> None:
        if self._closed:
            raise RuntimeError(f"the cache writer for {self.folder} is closed")
        rows = _check_chunk(chunk, self.sites)
        if rows == 0:
            return
        self._pending.append({site: chunk[site].detach().to("cpu", self.dtype) for site in self.sites})
        self._pending_rows += rows
        while self._pending_rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        """Write the last (possibly short) shard and mark the cache complete."""
        if self._closed:
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        self.manifest["complete"] = True
        self._save_manifest()
        self._closed = True

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:  # leave the cache incomplete: the complete shards stay, the pending rows are dropped
            self._closed = True
            self._pending, self._pending_rows = [], 0

    def _flush(self, rows: int) -> None:
        self._record(self._store(*self._take(rows)))

    def _take(self, rows: int) -> tuple[int, dict[str, Tensor]]:
        """(the next shard's index, its first ``rows`` pending rows), removed from the pending ones."""
        joined = {site: torch.cat([part[site] for part in self._pending]) for site in self.sites}
        shard = {site: value[:rows].contiguous() for site, value in joined.items()}
        rest = {site: value[rows:] for site, value in joined.items()}
        self._pending_rows -= rows
        self._pending = [rest] if self._pending_rows else []
        return len(self.manifest["shards"]), shard

    def _store(self, index: int, shard: dict[str, Tensor]) -> dict[str, Any]:
        """Write shard ``index``; its manifest entry."""
        name = f"shard_{index:05d}.safetensors"
        # one metadata key only: safetensors orders several keys arbitrarily, and the bytes (and
        # sha256) of a resumed write must equal those of an uninterrupted one
        data = safetensors_bytes(shard, metadata={"shard_index": str(index)})
        atomic_write(self.folder / name, lambda temp: Path(temp).write_bytes(data))
        return {"file": name, "rows": next(iter(shard.values())).shape[0], "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest()}

    def _record(self, entry: dict[str, Any]) -> None:
        self.manifest["shards"].append(entry)
        self.manifest["total_tokens"] += entry["rows"]
        self._save_manifest()

    def _save_manifest(self) -> None:
        write_text(self.folder / MANIFEST, to_json(self.manifest, "the cache manifest"))

    def _clean(self, everything: bool) -> None:
        """Remove temp files and shards the manifest does not list (all shards when overwriting)."""
        listed = {shard["file"] for shard in self.manifest["shards"]}
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            stray_shard = _SHARD.fullmatch(path.name) and (everything or path.name not in listed)
            if path.is_file() and (stray_shard or _TEMP.fullmatch(path.name)):
                path.unlink()


def _validate(manifest: dict[str, Any], path: Path) -> None:
    """Check the whole manifest before any of it is used (types, sizes, each shard's name, rows, bytes
    against its rows, widths and dtype, checksum); a CacheError naming the file lists what is wrong."""
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a jumpscope activation cache manifest (format {short(manifest.get('format'))})")
    if manifest.get("format_version") != FORMAT_VERSION or isinstance(manifest.get("format_version"), bool):
        raise CacheError(f"{path}: unsupported cache format version {short(manifest.get('format_version'))} "
                         f"(this jumpscope reads version {FORMAT_VERSION})")
    problems = []
    sites = manifest.get("sites")
    if not isinstance(sites, dict) or not sites or not all(
            isinstance(name, str) and name and _positive(d, MAX_WIDTH) for name, d in sites.items()):
        problems.append(f"sites must map names to positive widths, got {short(sites)}")
        sites = None
    dtype = manifest.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        problems.append(f"dtype must be one of {sorted(DTYPES)}, got {short(dtype)}")
        dtype = None
    shard_rows = manifest.get("shard_rows")
    if not _positive(shard_rows):
        problems.append(f"shard_rows must be a positive integer, got {short(shard_rows)}")
        shard_rows = None
    if not isinstance(manifest.get("metadata", {}), (dict, type(None))):
        problems.append(f"metadata must be an object, got {short(manifest.get('metadata'))}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and set(s) == {"file", "rows", "bytes", "sha256"}
                                               for s in shards):
        problems.append("shards must be a list of {file, rows, bytes, sha256}")
    else:
        problems += _shard_problems(shards, sites, dtype, shard_rows)
        total = manifest.get("total_tokens")
        if not problems and (isinstance(total, bool) or total != sum(s["rows"] for s in shards)):
            problems.append(f"total_tokens {short(total)} is not the sum of the shards' rows")
    if not isinstance(manifest.get("complete"), bool):
        problems.append("complete must be true or false")
    if problems:
        raise CacheError(f"{path} is not a valid cache manifest: {'; '.join(problems[:5])}")


def _shard_problems(shards: list[dict[str, Any]], sites: dict[str, int] | None, dtype: str | None,
                    shard_rows: int | None) -> list[str]:
    for index, shard in enumerate(shards):
        name, rows, size, digest = shard["file"], shard["rows"], shard["bytes"], shard["sha256"]
        what = f"shard {index}"
        if not isinstance(name, str) or not _SHARD.fullmatch(name):
            return ["shard file names must look like shard_NNNNN.safetensors (no folders), "
                    f"got {short(name)} for {what}"]
        if name != f"shard_{index:05d}.safetensors":  # also refuses a shard listed twice
            return [f"{what} must be shard_{index:05d}.safetensors, got {name}"]
        if not _positive(rows):
            return [f"{what} ({name}): rows must be a positive integer, got {short(rows)}"]
        if shard_rows is not None and (rows > shard_rows or (rows != shard_rows and index < len(shards) - 1)):
            return [f"{what} ({name}) has {rows} rows; every shard holds shard_rows={shard_rows} but the last, "
                    "which holds at most that"]
        if not _positive(size):
            return [f"{what} ({name}): bytes must be a positive integer, got {short(size)}"]
        if sites is not None and dtype is not None:
            data = rows * sum(sites.values()) * DTYPES[dtype].itemsize
            header = size - 8 - data  # safetensors: 8-byte length, JSON header, then the data
            if not 0 < header <= 1024 + sum(6 * len(site) + 160 for site in sites):
                return [f"{what} ({name}): {size} bytes cannot hold {rows} rows of {dtype} sites {dict(sites)} "
                        f"({data} bytes of data)"]
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return [f"{what} ({name}): sha256 must be 64 lowercase hex digits, got {short(digest)}"]
    return []


def _positive(value: Any, limit: int | None = None) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value > 0
            and (limit is None or value <= limit))


class CacheReader:
    """Read a cache folder written by :class:`CacheWriter`; ``len(reader)`` is its token count."""

    def __init__(self, folder: str | Path, allow_incomplete: bool = False):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise FileNotFoundError(f"no activation cache at {self.folder}: the folder does not exist")
        if not self.folder.is_dir():
            raise CacheError(f"no activation cache at {self.folder}: it is not a folder")
        path = self.folder / MANIFEST
        manifest = read_json(path, CacheError, MAX_MANIFEST_BYTES)
        _validate(manifest, path)
        if not manifest["complete"] and not allow_incomplete:
            raise CacheError(f"{self.folder} is an incomplete activation cache ({len(manifest['shards'])} shards, "
                             f"{manifest['total_tokens']} tokens: its writer was interrupted); resume the writer, "
                             "or pass allow_incomplete=True to read the complete shards")
        for index, entry in enumerate(manifest["shards"]):  # sizes on disk now, checksums as shards are read
            self._shard_path(index, entry)
        self.manifest = manifest
        self.sites: dict[str, int] = dict(manifest["sites"])
        self.dtype = DTYPES[manifest["dtype"]]
        self.shards: list[dict[str, Any]] = manifest["shards"]
        self.metadata: dict[str, Any] = manifest.get("metadata") or {}
        self._verified: dict[int, tuple[int, int, int]] = {}  # shard -> (size, mtime, inode) hashed OK

    @property
    def total_tokens(self) -> int:
        return int(self.manifest["total_tokens"])

    def __len__(self) -> int:
        return self.total_tokens

    def read_shard(self, index: int, dtype: torch.dtype | None = torch.float32) -> dict[str, Tensor]:
        """Every site of shard ``index``, after checking its sha256 (``dtype=None``: as stored)."""
        entry = self.shards[index]
        path = self._shard_path(index, entry)
        where = f"activation cache {self.folder}: shard {index} ({entry['file']})"
        stat = path.stat()  # an unchanged file is not hashed again (a third of a pass's reading time)
        identity = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        if self._verified.get(index) != identity:
            digest = _sha256(path)
            if digest != entry["sha256"]:
                raise CacheError(f"{where} is corrupt: its sha256 checksum does not match the manifest "
                                 f"(expected {entry['sha256']}, got {digest}); write the cache again")
            self._verified[index] = identity
        tensors = read_safetensors(path, CacheError)
        expected = {site: (entry["rows"], width) for site, width in self.sites.items()}
        found = {site: tuple(value.shape) for site, value in tensors.items()}
        if found != expected or any(value.dtype != self.dtype for value in tensors.values()):
            raise CacheError(f"{where} does not match the manifest: expected {expected} in {self.dtype}, "
                             f"found {found} in {sorted({str(v.dtype) for v in tensors.values()})}")
        return {site: tensors[site] if dtype is None else tensors[site].to(dtype) for site in self.sites}

    def _shard_path(self, index: int, entry: dict[str, Any]) -> Path:
        """The shard's path, once it is known to be a regular file of the size the manifest says."""
        path = self.folder / entry["file"]
        where = f"activation cache {self.folder}: shard {index} ({entry['file']})"
        if not path.exists() and not path.is_symlink():
            raise FileNotFoundError(f"{where} is missing; the cache is damaged, write it again")
        size = check_regular_file(path, CacheError)  # a FIFO would block the checksum forever
        if size != entry["bytes"]:
            raise CacheError(f"{where} is corrupt: it is {size} bytes, the manifest says {entry['bytes']}; "
                             "write the cache again")
        return path

    def shard_order(self, shuffle_shards: bool = False, seed: int = 0) -> list[int]:
        if not shuffle_shards:
            return list(range(len(self.shards)))
        return torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(int(seed))).tolist()

    def iterate(self, site: str | None = None, sites: Sequence[str] | None = None, *, shuffle_shards: bool = False,
                seed: int = 0, buffer_rows: int = 0, batch_size: int | None = None, start_row: int = 0,
                dtype: torch.dtype | None = torch.float32) -> Iterator[Any]:
        """The cache's rows, in shard order (or shards shuffled by ``seed``), optionally through a
        :class:`ShuffleBuffer` of ``buffer_rows`` rows emitting ``batch_size``-row batches (seeded by
        ``seed``), without their first ``start_row`` rows. Items are dicts of every site; with
        ``site=`` tensors of that site; with ``sites=`` tuples in that order (e.g. ``(input, target)``).
        ``dtype``: converted to on the way out (None: as stored)."""
        if site is not None and sites is not None:
            raise ValueError("pass site= (tensors) or sites= (tuples), not both")
        chosen = [site] if site is not None else list(sites) if sites is not None else list(self.sites)
        unknown = [name for name in chosen if name not in self.sites]
        if unknown or not chosen:
            raise KeyError(f"sites {unknown or chosen} are not in the cache {self.folder}; it holds {list(self.sites)}")
        if buffer_rows and not batch_size:
            raise ValueError("a shuffle buffer (buffer_rows) needs a batch_size")
        if int(start_row) < 0:
            raise ValueError(f"start_row must be at least 0, got {start_row}")
        order = self.shard_order(shuffle_shards, seed)
        if buffer_rows:
            stream = skip_rows(ShuffleBuffer(self._chunks(order, chosen, 0), buffer_rows, batch_size, seed), start_row)
        else:
            stream = self._chunks(order, chosen, int(start_row))
        return self._convert(stream, site, sites, dtype)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self.iterate()

    def _chunks(self, order: list[int], chosen: list[str], start_row: int) -> Iterator[dict[str, Tensor]]:
        for index in order:
            rows = self.shards[index]["rows"]
            if start_row >= rows:  # skipped without reading
                start_row -= rows
                continue
            shard = self.read_shard(index, dtype=None)
            yield {name: shard[name][start_row:] for name in chosen}
            start_row = 0

    @staticmethod
    def _convert(stream: Iterator[dict[str, Tensor]], site: str | None, sites: Sequence[str] | None,
                 dtype: torch.dtype | None) -> Iterator[Any]:
        for item in stream:
            if dtype is not None:
                item = {name: value.to(dtype) for name, value in item.items()}
            yield item[site] if site is not None else tuple(item[n] for n in sites) if sites is not None else item
