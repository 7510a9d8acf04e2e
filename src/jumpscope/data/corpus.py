"""Text corpora for harvesting activations: each is a deterministic, re-iterable stream of documents.

One entry point, :func:`open_corpus`, takes a spec string:

* ``"builtin"``: needs nothing. The docstrings of the installed Python standard library (modules,
  classes, functions, methods) plus the reference-manual topics of ``pydoc_data.topics``.
* a path: a ``.txt``, ``.jsonl`` or ``.parquet`` file, or a folder of them (recursive, sorted;
  hidden files and folders skipped), or a folder written by ``datasets.save_to_disk``.
* a glob pattern (``data/**/*.jsonl``): the matches in sorted order, folders expanded.
* ``"hf:NAME[:CONFIG][:SPLIT]"``: a Hugging Face dataset (needs ``pip install datasets``), offline
  unless ``allow_network=True``.
* several of these joined by commas (``books/,wiki.txt``): a mixture, their documents taken in
  turn, one from each, until every source runs out.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import JumpscopeError
from .builtin_corpus import builtin_entries, python_version

SUFFIXES = (".txt", ".jsonl", ".parquet")
ACCEPTED = ("accepted corpus specs: 'builtin' (Python stdlib docstrings, needs nothing); a path to a "
            ".txt, .jsonl or .parquet file or to a folder of them; a glob pattern such as "
            "'data/**/*.jsonl'; 'hf:NAME[:CONFIG][:SPLIT]' (needs `pip install datasets`); a "
            "folder written by datasets.save_to_disk; or several of these joined by commas (a mixture)")


OPTIONS = ("txt_split", "text_field", "encoding", "encoding_errors", "allow_network", "split", "cache_dir")


class CorpusError(JumpscopeError, ValueError):
    """A corpus spec that cannot be opened, or a document source that cannot be read."""


@dataclass(frozen=True)
class Corpus:
    """A named, re-iterable stream of documents (str). Iterating twice yields the same documents."""

    name: str
    """Identifies the source in manifests (``builtin:python-3.11.7``, ``files:/abs/path``, ``hf:...``)."""
    _make: Callable[[], Iterator[str]] = field(repr=False, compare=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._make())


def _interleave(corpora: list[Corpus]) -> Iterator[str]:
    """One document from each corpus in turn; exhausted ones drop out."""
    streams = [iter(corpus) for corpus in corpora]
    while streams:
        alive = []
        for stream in streams:
            document = next(stream, None)
            if document is not None:
                alive.append(stream)
                yield document
        streams = alive


def open_corpus(spec: str, **options: Any) -> Corpus:
    """Open ``spec`` (see the module docstring). Options, where they apply:

    ``txt_split``: ``"file"`` (default, one document per .txt file), ``"paragraph"`` (split on blank
    lines) or ``"line"``; ``text_field`` (default ``"text"``) for jsonl / parquet / HF rows;
    ``encoding`` (default utf-8) and ``encoding_errors`` (``"strict"``, the default: an undecodable
    byte is an error naming the file and byte offset; ``"replace"``: read as U+FFFD) for .txt and
    .jsonl files; ``allow_network`` and ``split`` for HF datasets; ``cache_dir``
    (``False`` for no disk cache) for ``"builtin"``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CorpusError(f"corpus spec must be a non-empty string, got {spec!r}; {ACCEPTED}")
    if unknown := sorted(set(options) - set(OPTIONS)):
        raise TypeError(f"unknown corpus option(s) {unknown}; accepted: {', '.join(OPTIONS)}")
    if options.get("txt_split", "file") not in ("file", "paragraph", "line"):
        raise CorpusError(f"txt_split must be 'file', 'paragraph' or 'line', got {options['txt_split']!r}")
    if options.get("encoding_errors", "strict") not in ("strict", "replace"):
        raise CorpusError(f"encoding_errors must be 'strict' or 'replace', got {options['encoding_errors']!r}")
    try:
        codecs.lookup(options.get("encoding", "utf-8"))
    except LookupError:
        raise CorpusError(f"unknown encoding {options['encoding']!r}; e.g. utf-8, latin-1, cp1252") from None
    if "," in spec and not Path(spec).expanduser().exists():
        parts = [open_corpus(part.strip(), **options) for part in spec.split(",") if part.strip()]
        return Corpus(",".join(part.name for part in parts), lambda: _interleave(parts))
    if spec == "builtin":
        entries = builtin_entries(cache_dir=options.get("cache_dir"))
        return Corpus(f"builtin:python-{python_version()}", lambda: (text for _, text in entries))
    if spec.startswith("hf:"):
        return _hf_corpus(spec, **options)
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = _expand(sorted(glob.glob(str(path), recursive=True)))
        if not files:
            raise CorpusError(f"glob {spec!r} matches no {'/'.join(SUFFIXES)} files; {ACCEPTED}")
    elif path.is_dir() and _is_saved_dataset(path):
        return _hf_corpus(spec, _local=path, **options)
    elif path.is_dir():
        files = _expand([str(path)])
        if not files:
            raise CorpusError(f"folder {str(path)!r} holds no {'/'.join(SUFFIXES)} files; {ACCEPTED}")
    elif path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise CorpusError(f"unsupported file type {path.suffix!r} for {str(path)!r}; {ACCEPTED}")
        files = [path]
    else:
        raise CorpusError(f"unknown corpus spec {spec!r} (not 'builtin', 'hf:...', an existing path "
                          f"or a glob); {ACCEPTED}")
    if any(f.suffix.lower() == ".parquet" for f in files) and importlib.util.find_spec("pyarrow") is None:
        raise CorpusError(f"reading .parquet files ({spec!r}) needs pyarrow, which is not installed: "
                          f"pip install pyarrow")
    return Corpus(f"files:{path.absolute()}", lambda: _read_files(files, options))


def _expand(paths: list[str]) -> list[Path]:
    """Files among ``paths`` plus the supported files under folders among them, sorted, hidden skipped."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)]
            out += sorted(found, key=lambda f: f.relative_to(p).as_posix())
        elif p.is_file() and p.suffix.lower() in SUFFIXES:
            out.append(p)
    return out


def _read_files(files: list[Path], options: dict[str, Any]) -> Iterator[str]:
    field_ = options.get("text_field", "text")
    encoding, errors = options.get("encoding", "utf-8"), options.get("encoding_errors", "strict")
    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix == ".txt":
                yield from _read_txt(path, options.get("txt_split", "file"), encoding, errors)
            elif suffix == ".jsonl":
                yield from _read_jsonl(path, field_, encoding, errors)
            else:
                yield from _read_parquet(path, field_)
        except UnicodeDecodeError as err:
            raise _decode_error(path, encoding, err) from None


def _decode_error(path: Path, encoding: str, err: UnicodeDecodeError) -> CorpusError:
    """The error for an undecodable byte: the file, the byte and its offset in the file, and the
    options that read it anyway."""
    offset, byte = _first_bad_byte(path, encoding)
    where = f"byte 0x{byte:02x} at offset {offset:,}" if offset is not None else err.reason
    return CorpusError(f"{path}: not valid {encoding} text ({where}); give its encoding with --encoding "
                       f"(e.g. --encoding latin-1 or cp1252), or --encoding-errors replace to read such bytes as "
                       f"U+FFFD")


def _first_bad_byte(path: Path, encoding: str) -> tuple[int | None, int]:
    """(offset, value) of the first byte of ``path`` that ``encoding`` cannot decode, found by
    decoding the file again in blocks (a decode error's own position is relative to whatever
    block the reader happened to decode)."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    start = 0
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            pending = decoder.getstate()[0]  # undecoded bytes kept from the previous block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                data = pending + block
                return start - len(pending) + err.start, data[err.start]
            start += len(block)
        pending = decoder.getstate()[0]
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:  # a sequence cut off by the end of the file
            return start - len(pending) + err.start, pending[err.start]
    return None, 0


def _read_txt(path: Path, split: str, encoding: str, errors: str = "strict") -> Iterator[str]:
    text = path.read_text(encoding=encoding, errors=errors)
    if split == "file":
        parts = [text]
    elif split == "paragraph":
        parts = re.split(r"\n[ \t\r\f\v]*\n", text)
    else:
        parts = text.splitlines()
    for part in parts:  # whitespace-only documents carry nothing to tokenize
        if part.strip():
            yield part if split == "file" else part.strip()


def _read_jsonl(path: Path, text_field: str, encoding: str, errors: str = "strict") -> Iterator[str]:
    with open(path, encoding=encoding, errors=errors) as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict) or text_field not in row:
                what = f"fields {sorted(row)}" if isinstance(row, dict) else f"a {type(row).__name__}"
                raise CorpusError(f"{path}:{lineno}: no field {text_field!r} (the line holds {what}); "
                                  f"choose the field with text_field=...")
            if not isinstance(row[text_field], str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is a "
                                  f"{type(row[text_field]).__name__}, not a string")
            yield row[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); "
                          f"choose it with text_field=...")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text)


# ---------------------------------------------------------------- Hugging Face datasets

def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _hf_corpus(spec: str, _local: Path | None = None, *, text_field: str = "text", split: str | None = None,
               allow_network: bool = False, **_: Any) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"corpus {spec!r} needs the Hugging Face 'datasets' package, which is not "
                          f"installed: pip install datasets") from None
    if _local is not None:
        ds = datasets.load_from_disk(str(_local))
        name = f"hf-disk:{_local.resolve()}"
    else:
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise CorpusError(f"bad Hugging Face spec {spec!r}: expected 'hf:NAME[:CONFIG][:SPLIT]'")
        dname, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        split = parts[2] if len(parts) > 2 and parts[2] else (split or "train")
        name = f"hf:{dname}:{config or ''}:{split}"
        if allow_network:
            ds = datasets.load_dataset(dname, config, split=split, streaming=True)
        else:
            try:
                with _hf_offline(datasets):
                    ds = datasets.load_dataset(dname, config, split=split)
            except Exception as err:
                raise CorpusError(f"could not load {spec!r} offline ({type(err).__name__}: {err}); it must "
                                  f"be in the local Hugging Face cache, or pass allow_network=True to stream "
                                  f"it from the hub") from err
    if isinstance(ds, (datasets.DatasetDict, dict)):
        splits = sorted(ds)
        chosen = split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if chosen not in splits:
            raise CorpusError(f"{spec!r} holds splits {splits}; choose one with split=...")
        ds, name = ds[chosen], f"{name}:{chosen}"
    columns = getattr(ds, "column_names", None)
    if columns is not None and text_field not in columns:
        raise CorpusError(f"{spec!r} has no column {text_field!r} (columns: {columns}); choose it with text_field=...")
    return Corpus(name, lambda: (row[text_field] for row in ds if row[text_field]))


@contextlib.contextmanager
def _hf_offline(datasets: Any) -> Iterator[None]:
    """HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 semantics for the duration of a load, restored after:
    the environment (read at import) and the module flags that the libraries check at call time."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    env = {k: os.environ.get(k) for k in names}
    flags = [(m, k, getattr(m, k)) for m in (datasets.config, sys.modules.get("huggingface_hub.constants"))
             for k in names if m is not None and hasattr(m, k)]
    try:
        os.environ.update(dict.fromkeys(names, "1"))
        for module, k, _ in flags:
            setattr(module, k, True)
        yield
    finally:
        for module, k, value in flags:
            setattr(module, k, value)
        for k, v in env.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
