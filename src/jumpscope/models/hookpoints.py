"""Reading and replacing a module's first input or output from hooks, whatever the calling
convention (positional or ``hidden_states=`` keyword; tensor, tuple or ModelOutput return).
Shared by harvesting (read) and splicing / steering (replace)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` of a model or a :class:`~jumpscope.models.loading.LoadedModel`."""
    from .loading import LoadedModel  # local import: loading pulls in transformers' auto classes

    return model.model if isinstance(model, LoadedModel) else model


def first_param(module: nn.Module) -> str | None:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    return next((p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)), None)


def first_input(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    name = first_param(module)
    if name is not None and name in kwargs:
        return kwargs[name]
    raise RuntimeError(f"{type(module).__name__} was called without a positional input or a "
                       f"{name or 'first'}= keyword; cannot read its input")


def first_output(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    if isinstance(output, Mapping) and output:  # transformers ModelOutput
        return next(iter(output.values()))
    return output


def replace_first_input(module: nn.Module, args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    if args:
        return (value,) + tuple(args[1:]), kwargs
    name = first_param(module)
    if name is None or name not in kwargs:
        raise RuntimeError(f"cannot replace the input of {type(module).__name__}: no positional or keyword input")
    return args, {**kwargs, name: value}


def replace_first_output(output: Any, value: Tensor) -> Any:
    if isinstance(output, Tensor):
        return value
    if isinstance(output, tuple) and output:
        return (value,) + output[1:]
    if isinstance(output, list) and output:
        return [value] + output[1:]
    if isinstance(output, Mapping) and output:  # ModelOutput: replace its first field in place
        key = next(iter(output.keys()))
        output[key] = value
        return output
    raise RuntimeError(f"cannot replace a module output of type {type(output).__name__}")


def hook_replacement(module: nn.Module, reads: str, transform: Callable[[Tensor], Tensor]) -> RemovableHandle:
    """Register a hook that replaces the module's first input (``reads="input"``) or output with
    ``transform(value)``; returns the handle to remove it."""
    if reads == "input":
        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return replace_first_input(mod, args, kwargs, transform(first_input(mod, args, kwargs)))

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        return replace_first_output(output, transform(first_output(output)))

    return module.register_forward_hook(hook)
