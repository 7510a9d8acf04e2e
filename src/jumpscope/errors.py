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

__all__ = ["JumpscopeError", "FormatError", "CacheError", "ConfigError"]


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
