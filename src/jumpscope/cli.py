"""The ``jumpscope`` command line.

Each subcommand is a function ``run(args) -> int`` registered with :func:`command`, together
with a function that adds its arguments to its parser. Every error is one line on stderr,
``jumpscope: error: <message>``: those a user can cause (a careless option, a missing or corrupt
file, an architecture a format cannot represent) exit with status 2, anything unexpected (a bug)
with status 1 and a request to report it; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .config_cli import field_table
from .errors import JumpscopeError

__all__ = ["main", "build_parser", "command", "COMMANDS"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Decorator registering ``run(args) -> int`` as subcommand ``name``; ``help`` is its
    one-line description, ``configure(parser)`` adds its arguments."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, configure, run)
        return run

    return register


# -- archs -----------------------------------------------------------------------------------------
def add_archs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="an architecture: show its config fields and presets")


def _summary(cls: type) -> str:
    text = " ".join((cls.__doc__ or "").split())
    return text.split(". ")[0].rstrip(".") + "." if text else ""


@command("archs", "List the SAE architectures, or show one's config fields and presets.", add_archs_arguments)
def archs(args: argparse.Namespace) -> int:
    from .sae import architectures, config_class

    if args.name is None:
        names = architectures()
        width = max(map(len, names), default=0)
        for name in names:
            print(f"{name:<{width}}  {_summary(config_class(name))}")
        return 0
    cls = config_class(args.name)
    print(f"{args.name} ({cls.__name__})")
    print(textwrap.fill(" ".join((cls.__doc__ or "").split()), 88))
    print("\nconfig fields:")
    for name, type_, default, doc in field_table(cls):
        print(f"  {name}: {type_} = {default}")
        print(textwrap.fill(doc or "(undocumented)", 88, initial_indent=" " * 6, subsequent_indent=" " * 6))
    presets = getattr(cls, "presets", {}) or {}
    if presets:
        print(f"\npresets ({cls.__name__}.preset(name, **overrides)):")
        for preset, values in presets.items():
            settings = ", ".join(f"{key}={value!r}" for key, value in values.items())
            print(textwrap.fill(f"{preset}: {settings}", 88, initial_indent="  ", subsequent_indent=" " * 6))
    return 0


# -- info ------------------------------------------------------------------------------------------
SAE_SOURCES = ("an SAE folder or file (native, SAELens, sparsify, Gemma Scope params.npz) or an SAE on the Hugging "
               "Face hub as hf://owner/name/path (e.g. hf://google/gemma-scope-2b-pt-res/layer_20/width_16k/"
               "average_l0_71)")


def add_network_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-network", action="store_true",
                        help="download an hf:// SAE that is not in the local Hugging Face cache")


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help=SAE_SOURCES)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    add_network_argument(parser)


def _existing(path: str) -> Path | str:
    from .formats import hub

    if hub.is_hub_reference(path):
        return path
    if not Path(path).exists():
        raise FileNotFoundError(f"no SAE at {path}: no such file or folder")
    return Path(path)


@command("info", "Print an SAE's architecture, sizes, model, site and metadata.", add_info_arguments)
def info(args: argparse.Namespace) -> int:
    from . import formats
    from .formats import native

    path = _existing(args.path)
    fmt = formats.detect_format(path, allow_network=args.allow_network)
    sae = formats.load(path, format=fmt, allow_network=args.allow_network)
    cfg = sae.cfg
    report: dict[str, Any] = {
        "path": str(path), "format": fmt, "architecture": sae.architecture, "d_in": cfg.d_in,
        "d_sae": cfg.d_sae, "d_out": cfg.d_output, "model": cfg.model, "site": cfg.site,
        "parameters": sum(p.numel() for p in sae.parameters()),
        "metadata": native.read_metadata(path) if fmt == "native" and isinstance(path, Path) else
        getattr(sae, "source", None) or {},
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for key, value in report.items():
        if key != "metadata":
            print(f"{key + ':':<14}{'-' if value is None else value}")
    print("metadata:" + ("" if report["metadata"] else "     -"))
    for key, value in report["metadata"].items():
        print(f"  {key}: {value if isinstance(value, str) else json.dumps(value, default=str)}")
    return 0


# -- convert ---------------------------------------------------------------------------------------
def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from .formats import FORMATS as FORMAT_NAMES

    parser.add_argument("src", help="the SAE to read (its format is detected unless --from is given): " + SAE_SOURCES)
    parser.add_argument("dst", help="where to write it")
    parser.add_argument("--to", required=True, choices=FORMAT_NAMES, help="the format to write")
    parser.add_argument("--from", dest="from_format", choices=FORMAT_NAMES, help="the format of SRC")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    add_network_argument(parser)


@command("convert", "Convert an SAE between the native, Gemma Scope and SAELens formats.", add_convert_arguments)
def convert(args: argparse.Namespace) -> int:
    from . import formats

    src = _existing(args.src)
    dst = Path(args.dst)
    if dst.exists() and not args.force and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists; pass --force to overwrite it")
    sae = formats.load(src, format=args.from_format, allow_network=args.allow_network)
    written = formats.save(sae, dst, format=args.to)
    print(f"wrote {sae.architecture} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) "
          f"as {args.to} to {written or dst}")
    return 0


# -- main ------------------------------------------------------------------------------------------
# Errors a user can cause: the message says what to change. ValueError, TypeError and OSError are
# kept for the builtins' own messages (a missing file, an unknown option of a library call).
USER_ERRORS = (JumpscopeError, ValueError, TypeError, OSError)
REPORT = "rerun with --debug for the traceback, and please report it"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``jumpscope: error: <message>`` and exit status 2 (no usage
    block), like every other error of the command line. Subcommand parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"jumpscope: error: {_one_line(message)}\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def error_line(error: BaseException) -> tuple[str, int]:
    """The one line ``main`` prints for ``error`` and the exit status: 2 for an error a user can
    cause, 1 for anything else (named by its type, with a request to report it)."""
    message = _one_line(error)
    if isinstance(error, USER_ERRORS):
        return f"jumpscope: error: {message or type(error).__name__}", 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch.cuda's
        return (f"jumpscope: error: out of memory ({type(error).__name__}{': ' + message if message else ''}); "
                "try a smaller --batch-size, --model-batch-size or --shuffle-buffer-tokens"), 1
    if isinstance(error, RecursionError):
        return f"jumpscope: error: RecursionError: {message}; {REPORT}", 1
    return f"jumpscope: error: {type(error).__name__}: {message or '(no message)'} (unexpected; {REPORT})", 1


def _warning_line(message: Warning | str, category: type, *args: Any, **kwargs: Any) -> None:
    print(f"jumpscope: warning: {_one_line(message)}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="jumpscope", description="Train, evaluate and use JumpReLU sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"jumpscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(sub)
        sub.set_defaults(run=cmd.run, parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 an unexpected error, 2 usage or
    input error, 130 interrupted) and never raises SystemExit. Every error is one line on stderr;
    with ``--debug`` it is raised instead. Without a subcommand it prints the help and returns 0."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "run", None) is None:
            parser.print_help()
            return 0
        try:
            with warnings.catch_warnings():
                if not args.debug:  # a library warning is one line too, without the source line
                    warnings.showwarning = _warning_line
                return int(args.run(args) or 0)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print("jumpscope: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - every error becomes one line (--debug: the traceback)
            if args.debug:
                raise
            line, status = error_line(error)
            print(line, file=sys.stderr)
            return status
    except SystemExit as exit_:
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1

from . import cli_dashboard, cli_eval, cli_jsae, cli_suite, cli_sweep, cli_train, cli_steer, cli_serve  # noqa: E402,F401  (register their commands)
