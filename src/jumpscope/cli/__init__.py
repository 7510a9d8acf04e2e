"""The ``jumpscope`` command line.

Each subcommand is a function ``run(args) -> int`` registered with :func:`command`, together
with a function that adds its arguments to its parser. Every error is one line on stderr,
``jumpscope: error: <message>``: those a user can cause (a careless option, a missing or corrupt
file, an architecture a format cannot represent) exit with status 2, anything unexpected (a bug)
with status 1 and a request to report it; ``--debug`` shows the traceback instead.

The package holds one module per command; ``common`` keeps the registry and the options several
commands share, ``dataclass_args`` turns config dataclasses into options. Importing this package
registers every command (the imports below), and nothing in it imports back from here.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any, Sequence

from .. import __version__
from ..errors import JumpscopeError
from ..safeio import one_line
# Each module registers its command; this order is the order of `jumpscope --help`.
from . import archs, info, convert, eval, refit, dashboard, train, jsae, suite, sweep, steer, serve, find, autointerp  # noqa: F401,E501
from .common import COMMANDS, Command, command

__all__ = ["main", "build_parser", "command", "Command", "COMMANDS"]


# Errors a user can cause: the message says what to change. ValueError, TypeError and OSError are
# kept for the builtins' own messages (a missing file, an unknown option of a library call).
USER_ERRORS = (JumpscopeError, ValueError, TypeError, OSError)
REPORT = "rerun with --debug for the traceback, and please report it"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``jumpscope: error: <message>`` and exit status 2 (no usage
    block), like every other error of the command line. Subcommand parsers are of this class too."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"jumpscope: error: {one_line(message, None)}\n")


def error_line(error: BaseException) -> tuple[str, int]:
    """The one line ``main`` prints for ``error`` and the exit status: 2 for an error a user can
    cause, 1 for anything else (named by its type, with a request to report it)."""
    message = one_line(str(error), None)  # empty for a bare exception: the type is named below
    if isinstance(error, USER_ERRORS):
        return f"jumpscope: error: {message or type(error).__name__}", 2
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch.cuda's
        return (f"jumpscope: error: out of memory ({type(error).__name__}{': ' + message if message else ''}); "
                "try a smaller --batch-size, --model-batch-size or --shuffle-buffer-tokens"), 1
    if isinstance(error, RecursionError):
        return f"jumpscope: error: RecursionError: {message}; {REPORT}", 1
    return f"jumpscope: error: {type(error).__name__}: {message or '(no message)'} (unexpected; {REPORT})", 1


def _warning_line(message: Warning | str, category: type, *args: Any, **kwargs: Any) -> None:
    print(f"jumpscope: warning: {one_line(message, None)}", file=sys.stderr)


@contextlib.contextmanager
def _logging_to_stderr(verbose: bool) -> Iterator[None]:
    """The library's log records as ``jumpscope: <message>`` lines on stderr while a command runs
    (warnings always, INFO with --verbose); the logger is left as it was found."""
    logger = logging.getLogger("jumpscope")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("jumpscope: %(message)s"))
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    level = logger.level
    if verbose and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="jumpscope", description="Train, evaluate and use JumpReLU sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"jumpscope {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show what the library logs as it works (resuming, calibrations, hints)")
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
            with warnings.catch_warnings(), _logging_to_stderr(args.verbose):
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
