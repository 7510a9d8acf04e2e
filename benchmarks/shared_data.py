"""The real third-party data beside the repository (``../shared/data``, or ``$JUMPSCOPE_SHARED_DATA``).

Benchmarks read it from there, never from a copy in the repository, verify each file's sha256
before use, and skip cleanly (exit 0 with a message) where it is absent.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SHA256 = {
    "stories260k/stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "stories260k/tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
    "text/tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    "text/tinystories_cased.txt": "727e8b228375be3075114c20729c93ed6e81ae5d8fe7faf7cb54b304f0322d70",
    "text/tinystories_lower.txt": "30c6f2fac206d82e76b80dbbede28f6b5415c8d8571dde6bfd8226ab41744a2c",
    "text/wikitext2_test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "text/wikitext2_valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "text/gutenberg/pg11.txt": "89a0ec3297622e5cadd32a68311c7d08a5948444274f21dd12d151672f2a0730",
    "text/gutenberg/pg1342.txt": "8e997d42a86479d91bd1da3015e51bf3902bc84c3074e6d5de64777b8ea5fa46",
    "text/gutenberg/pg16.txt": "8c05f64c65671afa71cc83322255dbae93ed96f80baa9158160abf420b9e87a0",
    "text/gutenberg/pg1661.txt": "67475446cbaa516d8cd21d5569438c2c5450f763b7d5d17173cd3089c0cfc02d",
    "text/gutenberg/pg174.txt": "0b2e2444e0d6cb698528cf69c4e876cfddd307afea798706e27556d3f1f59011",
    "text/gutenberg/pg236.txt": "c1e5c3c49f588f3050ea15f242fadfffbc1198b27bfb239ad52777cc57473160",
    "text/gutenberg/pg2701.txt": "2975c3faf22ded4b19716486bdee4e24999f6ee9dc36c227ab624faaf154af14",
    "text/gutenberg/pg345.txt": "e9a145c513b63acde80fbf65458431c22419b9302df21f43ff811d754699c3fe",
    "text/gutenberg/pg5200.txt": "cc31cb672d11d6bd4a175ec7ff9788b8a6af8415786099a130b879001cc37f00",
    "text/gutenberg/pg98.txt": "5d1ba49aa66841d2ef97f50f6ff172052fb8de4c442335c03dcce5c44de30419",
}


def data_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("JUMPSCOPE_SHARED_DATA", default))


def verified(*relative: str) -> list[Path] | str:
    """The absolute paths of these files after checking their sha256, or a message saying why not
    (absent folder or file: a skip; wrong checksum: raises, since the data is then not what we think)."""
    data = data_dir()
    paths = []
    for rel in relative:
        path = data / rel
        if not path.is_file():
            return f"shared data file {path} not found (set JUMPSCOPE_SHARED_DATA)"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != SHA256[rel]:
            raise SystemExit(f"ERROR: {path}: sha256 {digest} != expected {SHA256[rel]}")
        paths.append(path)
    return paths


def available(names, setups: dict):
    """``(name, setup, paths)`` for each named setup whose ``setup["files"]`` are present and verified;
    prints a SKIP line for the others."""
    for name in names:
        setup = setups[name]
        paths = verified(*setup["files"])
        if isinstance(paths, str):
            print(f"SKIP {name}: {paths}")
            continue
        yield name, setup, paths


GUTENBERG = tuple(rel for rel in SHA256 if rel.startswith("text/gutenberg/"))
WIKITEXT = ("text/wikitext2_valid.txt", "text/wikitext2_test.txt")
STORIES260K = ("stories260k/stories260K.bin", "stories260k/tok512.bin")


def timing_parser(doc: str, repeats_help: str):
    """A speed benchmark's parser (its docstring's first line as description) with --threads and
    --repeats."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help=repeats_help)
    return parser


def real_model_parser(doc: str, resumed: str, report_only: str, models: tuple[str, ...] = ("stories", "minilm")):
    """The parser of a benchmark on the real models in ../shared/data, with --models (default and
    choices ``models``), --quick, --threads, --resume and --report-only."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(models), choices=list(models))
    parser.add_argument("--quick", action="store_true", help="a tenth of the token budget (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help=f"continue interrupted {resumed} from their checkpoints")
    parser.add_argument("--report-only", action="store_true", help=report_only)
    return parser
