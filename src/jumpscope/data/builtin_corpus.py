"""The ``builtin`` corpus: docstrings of the installed Python standard library.

Only the standard library is imported here: the extraction loads this file by path in a fresh
``python -S`` interpreter, so nothing imported or patched in the calling process changes the result.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator


# Never imported: GUIs, modules that print or open a browser, test suites, distutils (replaced by
# setuptools' copy when that is installed), lib2to3 (may write grammar pickles next to itself) and
# readline/rlcompleter (touch the terminal).
_SKIP = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "tests",
                   "idle_test", "lib2to3", "distutils", "readline", "rlcompleter"})
_MEMORY: dict[str, list[tuple[str, str]]] = {}
last_extraction_seconds: float | None = None
"""Wall time of the last builtin extraction in this process (None: none ran, the cache answered)."""


def builtin_entries(cache_dir: str | Path | None | bool = None, *, refresh: bool = False,
                    isolated: bool = True) -> list[tuple[str, str]]:
    """The builtin corpus as sorted ``(qualified name, text)`` pairs, deduplicated on text.

    Cached in memory, and on disk as JSON (atomic write) under ``cache_dir`` (default
    ``$JUMPSCOPE_CACHE_DIR`` or ``$XDG_CACHE_HOME/jumpscope`` or ``~/.cache/jumpscope``; ``False``:
    no disk cache), keyed by the exact Python build and this file's content. ``isolated`` runs the extraction in a fresh
    ``python -S`` (hash seed 0) so nothing already imported or patched here can change the result,
    and none of the imports land in this process.
    """
    global last_extraction_seconds
    key = hashlib.sha256(f"{sys.version}|{sys.platform}|{sys.base_prefix}".encode()
                         + Path(__file__).read_bytes()).hexdigest()[:16]  # this code changes: a new key
    if not refresh and key in _MEMORY:
        return _MEMORY[key]
    file = None
    if cache_dir is not False:
        from jumpscope.safeio import cache_root  # lazy, like atomic_write below: this module runs standalone too

        root = Path(cache_dir) if cache_dir else cache_root()
        file = root / f"builtin-corpus-py{python_version()}-{key}.json"
        if not refresh and file.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                data = json.loads(file.read_text(encoding="utf-8"))
                if data["key"] == key:
                    _MEMORY[key] = [(q, t) for q, t in data["entries"]]
                    return _MEMORY[key]
    start = time.perf_counter()
    entries = _extract_isolated() if isolated and sys.executable else extract_builtin()
    last_extraction_seconds = time.perf_counter() - start
    _MEMORY[key] = entries
    if file is not None:
        payload = json.dumps({"key": key, "python": sys.version, "entries": entries}, ensure_ascii=False)
        with contextlib.suppress(OSError):  # a cache that cannot be written is only slower next time
            from jumpscope.safeio import atomic_write
            atomic_write(file, lambda temp: Path(temp).write_text(payload, encoding="utf-8"))
    return entries


def python_version() -> str:
    """The running Python's X.Y.Z: the builtin corpus differs between versions, so it names it."""
    return ".".join(map(str, sys.version_info[:3]))


def _extract_isolated() -> list[tuple[str, str]]:
    code = ("import importlib.util as u,sys;s=u.spec_from_file_location('_jumpscope_corpus',sys.argv[1]);"
            "m=u.module_from_spec(s);sys.modules[s.name]=m;s.loader.exec_module(m);m._extract_to(sys.argv[2])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") or k == "PYTHONHOME"}
    env.update(PYTHONHASHSEED="0", PYTHONDONTWRITEBYTECODE="1", PYTHONIOENCODING="utf-8")
    with tempfile.TemporaryDirectory(prefix="jumpscope-builtin-") as tmp:
        out = Path(tmp) / "entries.json"
        proc = subprocess.run([sys.executable, "-S", "-c", code, __file__, str(out)], env=env, cwd=tmp,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.is_file():
            from .corpus import CorpusError  # not at the top: this file also runs outside the package

            raise CorpusError(f"builtin corpus extraction failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return [(q, t) for q, t in json.loads(out.read_text(encoding="utf-8"))]


def _extract_to(out: str) -> None:
    Path(out).write_text(json.dumps(extract_builtin(), ensure_ascii=False), encoding="utf-8")


def _skipped(name: str) -> bool:
    return any(part.startswith("_") or part in _SKIP for part in name.split("."))


def _import(name: str) -> Any | None:
    """Import quietly; None for modules that fail (or exit) on import."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def stdlib_modules() -> list[tuple[str, Any]]:
    """Public stdlib modules and submodules that import cleanly, as sorted ``(name, module)`` pairs."""
    found: dict[str, Any] = {}

    def visit(name: str) -> None:
        if _skipped(name) or name in found or (module := _import(name)) is None:
            return
        found[name] = module
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", None) or []), key=lambda i: i.name):
            visit(f"{name}.{info.name}")

    for top in sorted(sys.stdlib_module_names):
        visit(top)
    return sorted(found.items())


def _member_docs(prefix: str, obj: Any, seen: set[int]) -> Iterator[tuple[str, str]]:
    """(qualified name, own docstring) for ``obj`` (a class) and its own members, recursively."""
    for name, attr in sorted(vars(obj).items()):
        target = getattr(attr, "__func__", attr) if isinstance(attr, (classmethod, staticmethod)) else attr
        if inspect.isclass(target):
            if id(target) not in seen and str(getattr(target, "__qualname__", "")).startswith(
                    f"{obj.__qualname__}."):
                seen.add(id(target))
                yield f"{prefix}.{name}", target.__doc__
                yield from _member_docs(f"{prefix}.{name}", target, seen)
        elif inspect.isroutine(target) or inspect.isdatadescriptor(target):
            yield f"{prefix}.{name}", getattr(target, "__doc__", None)


def extract_builtin() -> list[tuple[str, str]]:
    """Extract the builtin corpus in this process (see :func:`builtin_entries`, which caches it).

    Module, class, function and method docstrings (each object's own, not inherited; objects
    documented under the public module that defines them, or that re-exports them from a private
    one), sorted by qualified name, then the ``pydoc_data.topics`` topics as ``topic:NAME``, sorted.
    Texts are ``inspect.cleandoc``-ed; empty ones dropped; repeated texts kept at first occurrence.
    """
    with warnings.catch_warnings():  # some attribute reads warn (typing.io is deprecated, ...)
        warnings.simplefilter("ignore")
        raw = _raw_docs()
    from pydoc_data.topics import topics
    raw += [(f"topic:{key}", topics[key]) for key in sorted(topics)]
    entries, texts = [], set()
    for qualname, doc in raw:
        text = inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""
        if text and text not in texts:
            texts.add(text)
            entries.append((qualname, text))
    return entries


def _raw_docs() -> list[tuple[str, Any]]:
    raw: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for modname, module in stdlib_modules():
        raw.append((modname, module.__doc__))
        for name, obj in sorted(vars(module).items()):
            try:  # an object whose attributes cannot be read is left out, whole
                owner = getattr(obj, "__module__", None)
                if id(obj) in seen or not (inspect.isclass(obj) or inspect.isroutine(obj)) or not isinstance(
                        owner, str) or (owner != modname and not owner.split(".")[-1].startswith("_")):
                    continue  # not a class or function, or documented under the public module defining it
                seen.add(id(obj))
                docs = [(f"{modname}.{name}", obj.__doc__)]
                if inspect.isclass(obj):
                    docs += _member_docs(f"{modname}.{name}", obj, seen)
            except Exception:
                continue
            raw += docs
    raw.sort(key=lambda e: (e[0], e[1] if isinstance(e[1], str) else ""))
    return raw
