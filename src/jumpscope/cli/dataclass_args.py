"""Command-line options generated from dataclass configs and their attribute docstrings.

A config field documents itself with a string literal on the line(s) right after it::

    @dataclass
    class Config:
        lr: float = 1e-3
        '''Adam learning rate.'''

:func:`add_dataclass_arguments` turns every field into a ``--kebab-case`` option whose help is
that docstring, :func:`dataclass_from_args` builds the instance back from the parsed namespace,
and :func:`dataclass_from_args_or_exit` reports the config's own validation errors as an
argparse error (one line, exit status 2). Standard library only.

A field whose type is itself a dataclass is *nested*: its fields become options of their own
(no extra prefix), in place or, with :func:`add_nested_arguments`, in a group of their own, and
are rebuilt into its instance. The fields the outer config fills itself are listed in the field's
metadata, ``dataclasses.field(default_factory=Inner, metadata={"exclude": ("name", ...)})``, and
are no options.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable, Iterable, Literal, Union

__all__ = ["field_docs", "add_dataclass_arguments", "add_nested_arguments", "dataclass_from_args",
           "dataclass_from_args_or_exit", "config_error_message", "field_table", "type_name", "option_name"]


# -- attribute docstrings ------------------------------------------------------------------------
def field_docs(cls: type) -> dict[str, str]:
    """``{attribute: docstring}`` of a dataclass and its dataclass bases, each docstring as one
    whitespace-collapsed paragraph. A subclass that re-declares a field without a docstring keeps
    its base's; one that re-declares it with a docstring replaces it."""
    return dict(_field_docs(cls))


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object and dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def _own_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):  # no source (built dynamically, frozen, REPL)
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    docs = {}
    for statement, following in zip(node.body, node.body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


# -- types -----------------------------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``X | None``, else ``(tp, False)``."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return tp, False


def type_name(tp: Any) -> str:
    """A readable name of an annotation: ``float | None``, ``'l0' | 'tanh'``, ``tuple[int, ...]``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(tp))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # accept 1e6 for an int, not 1.5
        if not value.is_integer():
            raise
        return int(value)


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(text)


_int.__name__, _bool.__name__ = "int", "bool"  # argparse names the type in "invalid int value"
_SCALARS: dict[Any, Callable[[str], Any]] = {int: _int, float: float, str: str, bool: _bool}


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _literal(values: tuple[Any, ...]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:  # a non-match is returned as is, for argparse's "invalid choice"
        return next((v for v in values if str(v) == text), text)

    parse.__name__ = "choice"
    return parse


def _argument_spec(tp: Any) -> dict[str, Any] | None:
    """``add_argument`` keywords for an annotation, or None when it has no command-line form."""
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if inner is bool and not optional:
        return {"action": argparse.BooleanOptionalAction}
    if inner in _SCALARS:
        convert, metavar = _SCALARS[inner], inner.__name__.upper()
        return {"type": _or_none(convert), "metavar": metavar + "|none"} if optional else \
            {"type": convert, "metavar": metavar}
    if origin is Literal:
        values = typing.get_args(inner)
        names = [str(v) for v in values] + (["none"] if optional else [])
        convert = _or_none(_literal(values)) if optional else _literal(values)
        return {"type": convert, "choices": [*values, *([None] if optional else [])],
                "metavar": "{" + ",".join(names) + "}"}
    if origin in (tuple, list) and not optional:
        args = typing.get_args(inner)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            element, nargs = args[0], "+"
        elif origin is tuple and args and all(a is args[0] for a in args):
            element, nargs = args[0], len(args)
        elif origin is list and len(args) == 1:
            element, nargs = args[0], "+"
        else:
            return None
        if element in (int, float, str):
            return {"type": _SCALARS[element], "nargs": nargs, "metavar": element.__name__.upper()}
        if typing.get_origin(element) is Literal:
            values = typing.get_args(element)
            return {"type": _literal(values), "nargs": nargs, "choices": list(values),
                    "metavar": "{" + ",".join(map(str, values)) + "}"}
    return None


# -- options ---------------------------------------------------------------------------------------
def option_name(name: str, prefix: str = "") -> str:
    """``--{prefix}{name with '-' for '_'}``."""
    return "--" + prefix + name.replace("_", "-")


def _dest(name: str, prefix: str) -> str:
    return prefix.replace("-", "_") + name


def _format_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) if value else "none given"
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _nested(cls: type) -> dict[str, tuple[dataclasses.Field, type]]:
    """``{name: (field, its dataclass type)}`` of the nested (dataclass-typed) init fields of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)
            if f.init and isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])}


def add_nested_arguments(parser: argparse.ArgumentParser | Any, cls: type, name: str, *, prefix: str = "") -> None:
    """The options of nested field ``name`` of ``cls``: one per field of its dataclass except those
    its metadata ``exclude`` names (the outer config fills them), same names as the inner class's
    own options would have. Their defaults are those of the field's default instance."""
    try:
        f, inner = _nested(cls)[name]
    except KeyError:
        raise ValueError(f"{cls.__name__}.{name} is not a nested dataclass field") from None
    default = _field_default(f)
    if default is dataclasses.MISSING:  # its options are optional, like every option of a nested config
        raise TypeError(f"nested field {cls.__name__}.{name} needs a default")
    excluded = set(f.metadata.get("exclude", ()))
    # The default instance may differ from the class's defaults: show and use its values.
    defaults = {g.name: getattr(default, g.name) for g in dataclasses.fields(inner)
                if g.init and g.name not in excluded and getattr(default, g.name) != _field_default(g)}
    add_dataclass_arguments(parser, inner, prefix=prefix, exclude=excluded, defaults=defaults)


def add_dataclass_arguments(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                            exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add one ``--kebab-case`` option per init field of dataclass ``cls`` to a parser or group.

    Help is the field's docstring plus its default. Types: int, float, str, bool
    (``--flag/--no-flag``), ``X | None`` (the word ``none`` gives None), ``Literal`` (choices),
    tuples/lists of int/float/str (several values). A nested dataclass field adds its own fields'
    options in its place (see :func:`add_nested_arguments`; exclude it and call that to put them
    elsewhere). Fields of other types are skipped when they have a default; a required field of
    such a type must be listed in ``exclude``. Options not
    given on the command line are absent from the namespace, so the dataclass's own defaults (or
    ``defaults``, which override them, e.g. an architecture's) apply. ``prefix`` (e.g.
    ``"trainer-"``) goes in front of every option name and, with '_' for '-', every dest.
    """
    excluded, defaults = set(exclude), dict(defaults or {})
    unknown = sorted(set(defaults) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"defaults for unknown {cls.__name__} fields: {unknown}")
    hints, docs, nested = typing.get_type_hints(cls), field_docs(cls), _nested(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in excluded:
            continue
        if f.name in nested:
            add_nested_arguments(parser, cls, f.name, prefix=prefix)
            continue
        spec = _argument_spec(hints[f.name])
        default = defaults.get(f.name, _field_default(f))
        if spec is None:
            if default is dataclasses.MISSING:
                raise TypeError(f"required field {cls.__name__}.{f.name} of type {type_name(hints[f.name])} "
                                "has no command-line form; exclude it and pass it to dataclass_from_args")
            continue
        required = default is dataclasses.MISSING
        text = docs.get(f.name, "")
        text += " (required)" if required else f" (default: {_format_default(default)})"
        action = parser.add_argument(
            option_name(f.name, prefix), dest=_dest(f.name, prefix), required=required,
            default=argparse.SUPPRESS if required or f.name not in defaults else default, **spec)
        action.help = text.strip().replace("%", "%%")  # set after: BooleanOptionalAction edits help


def _values_from_args(cls: type, namespace: argparse.Namespace, prefix: str,
                      exclude: Iterable[str] = ()) -> dict[str, Any]:
    hints, values, excluded = typing.get_type_hints(cls), {}, set(exclude)
    for f in dataclasses.fields(cls):
        dest = _dest(f.name, prefix)
        if f.init and f.name not in excluded and hasattr(namespace, dest):
            value = getattr(namespace, dest)
            if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[f.name])[0]) is tuple:
                value = tuple(value)
            values[f.name] = value
    return values


def dataclass_from_args(cls: type, namespace: argparse.Namespace, *, prefix: str = "", **overrides: Any) -> Any:
    """``cls(**fields)`` from the options present in ``namespace`` (see
    :func:`add_dataclass_arguments`), with ``overrides`` taking precedence. A nested field is its
    default instance with the options of its fields given replaced; its override may be an
    instance, or a dict of its fields (e.g. those the outer config fills) to set on top."""
    nested = _nested(cls)
    values = _values_from_args(cls, namespace, prefix, exclude=nested)
    built = {}
    try:
        for name, (f, inner) in nested.items():
            extra = overrides.pop(name, {})
            if not isinstance(extra, dict):
                built[name] = extra
                continue
            given = {**_values_from_args(inner, namespace, prefix, exclude=f.metadata.get("exclude", ())), **extra}
            if given:
                default = _field_default(f)
                built[name] = inner(**given) if default is dataclasses.MISSING else \
                    dataclasses.replace(default, **given)
    except (ValueError, TypeError):
        if all(_field_default(f) is not dataclasses.MISSING for f, _ in nested.values()):
            cls(**{**values, **overrides})  # the outer config's own errors first: its options come first
        raise
    return cls(**{**values, **built, **overrides})


def config_error_message(cls: type, error: BaseException, *, prefix: str = "",
                         options: Iterable[str] | None = None) -> str:
    """``error`` on one line, followed by the options of the fields it names (among ``options``,
    when given), e.g. ``bandwidth must be > 0, got -1.0 (option --bandwidth)``."""
    message = " ".join(str(error).split()) or type(error).__name__
    known = None if options is None else set(options)
    nested = _nested(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in nested]
    for f, inner in nested.values():  # a nested config's errors name its fields' options
        names += [g.name for g in dataclasses.fields(inner) if g.name not in f.metadata.get("exclude", ())]
    named = [option_name(name, prefix) for name in dict.fromkeys(names)
             if re.search(rf"\b{re.escape(name)}\b", message)]
    named = [o for o in named if known is None or o in known]
    if named:
        message += f" (option{'s' if len(named) > 1 else ''} {', '.join(named)})"
    return message


def dataclass_from_args_or_exit(parser: argparse.ArgumentParser, cls: type, namespace: argparse.Namespace, *,
                                prefix: str = "", **overrides: Any) -> Any:
    """:func:`dataclass_from_args`, turning the config's ValueError/TypeError (its
    ``__post_init__`` validation) into ``parser.error``: a usage line, a one-line message naming
    the option, exit status 2."""
    try:
        return dataclass_from_args(cls, namespace, prefix=prefix, **overrides)
    except (ValueError, TypeError) as error:
        options = getattr(parser, "_option_string_actions", None)
        parser.error(config_error_message(cls, error, prefix=prefix, options=options))


def field_table(cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, docstring)`` of every field of dataclass ``cls``; the default is
    Python ``repr`` of the default, or ``"required"`` for a field without one."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _field_default(f)
        shown = "required" if default is dataclasses.MISSING else repr(default)
        rows.append((f.name, type_name(hints[f.name]), shown, docs.get(f.name, "")))
    return rows
