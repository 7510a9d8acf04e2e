"""The library's documented error types.

Every error a user can cause (a bad file, a careless option, an unreadable corpus) is one of
these, with a one-line message that names the problem and, for files, the file. Each subclasses
the builtin a caller would already catch (``ValueError`` or ``OSError``), so older ``except``
clauses keep working; ``except JumpscopeError`` catches them all.

A file or folder that does not exist at all stays a ``FileNotFoundError`` (naming it); every
other problem with a file read (not a regular file, such as a FIFO or a device; too large;
corrupt; declaring sizes or nesting beyond bounds; a config value of the wrong type or range) is a
``FormatError`` (SAE files) or ``CacheError`` (activation caches), raised before anything large
is allocated.
"""

from __future__ import annotations

from typing import Any

__all__ = ["JumpscopeError", "FormatError", "CacheError", "ConfigError", "check_positive"]


class JumpscopeError(Exception):
    """Base of every error jumpscope raises on purpose."""


class FormatError(JumpscopeError, ValueError):
    """An SAE file or folder (any format) that is missing parts, corrupt, truncated, hostile
    (sizes or nesting beyond bounds) or inconsistent; the message names the file."""


class CacheError(JumpscopeError, ValueError):
    """An activation cache whose manifest or shards are missing, corrupt or inconsistent; the
    message names the file."""


class ConfigError(JumpscopeError, ValueError):
    """A config value or command-line option that is out of range, of the wrong type or
    unknown; raised before any model is loaded or any work is done."""


def check_positive(config: Any, *names: str, zero_ok: bool = False) -> None:
    """Raise :class:`ConfigError` naming the first field of ``config`` among ``names`` that is not
    > 0 (``zero_ok``: >= 0), e.g. ``width must be positive, got 0``. None passes (an unset
    optional field means "the default"), and so does each element of a tuple or list field.

    The check every config shares for counts and sizes; it lives here, at the bottom of the
    package, so configs of any stage can use it without importing the command line."""
    for name in names:
        value = getattr(config, name)
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if item is None or isinstance(item, bool):
                continue
            if not isinstance(item, (int, float)):
                raise ConfigError(f"{name} must be a number, got {item!r}")
            if item < 0 or (item == 0 and not zero_ok) or item != item:  # item != item: NaN
                raise ConfigError(f"{name} must be {'>= 0' if zero_ok else 'positive'}, got {item}")
