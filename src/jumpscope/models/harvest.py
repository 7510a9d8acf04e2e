"""One forward pass -> activations at many sites, stopping the forward once all are captured.

``Harvester(model, sites).activations(input_ids)`` hooks every requested site (forward hooks for
outputs, forward pre-hooks for inputs, reading ``hidden_states`` whether it arrives positionally or
as a keyword), runs the model once under ``torch.inference_mode`` and raises a private exception
from the hook that completes the set, so nothing after the last needed module runs (for ``embed``
the first layer never runs; no final norm or LM head runs unless a ``module:`` site asks for it).
Hooks are registered for one call and removed in a ``finally``, also when the forward fails.

``harvest(model, batches, sites)`` streams ``{site: Tensor [n, d]}``: tokens flattened, only the
``train_mask`` positions kept (BOS/EOS/pad excluded by ``jumpscope.data.tokens``), float32 on CPU by
default. Sites requested together come from the same forward and the same mask, so their rows are
aligned: ``("layers.3.mlp_in", "layers.3.mlp_out")`` gives transcoder (input, target) pairs.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .hookpoints import first_input, first_output, unwrap
from .sites import Site, parse_site, resolve_module

__all__ = ["Harvester", "harvest"]


class _StopForward(BaseException):
    """Raised by a hook once every site is captured; BaseException so no ``except Exception`` eats it."""


class Harvester:
    """Capture ``sites`` (names, see :mod:`jumpscope.models.sites`) of ``model`` in one early-stopped forward."""

    def __init__(self, model: Any, sites: Sequence[str]):
        if isinstance(sites, str):
            sites = [sites]
        if not sites:
            raise ValueError("Harvester needs at least one site")
        self.model = unwrap(model)
        self.sites: list[Site] = [parse_site(s, self.model) for s in dict.fromkeys(sites)]
        # group sites by hook point: (module path, reads) -> site names
        self._points: dict[tuple[str, str], list[str]] = {}
        for site in self.sites:
            self._points.setdefault((site.module, site.reads), []).append(site.name)
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._extra = {"use_cache": False} if "use_cache" in params else {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def activations(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """``{site: Tensor [B, T, d]}`` (model dtype and device) from one forward over ``input_ids [B, T]``."""
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
            attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
        device = self._device()
        kwargs = dict(self._extra, input_ids=input_ids.to(device))
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(device=device, dtype=torch.long)
        captured: dict[str, Tensor] = {}
        need = len(self.sites)

        def store(names: list[str], value: Any, where: str) -> None:
            if not isinstance(value, Tensor):
                raise RuntimeError(f"{', '.join(names)}: {where} is a {type(value).__name__}, not a tensor")
            fresh = [n for n in names if n not in captured]  # a module called twice keeps its first call
            if fresh:
                with torch.inference_mode(False):  # a copy that is an ordinary tensor, usable with autograd later
                    copy = value.detach().clone()
            for n in fresh:
                captured[n] = copy
            if fresh and len(captured) == need:
                raise _StopForward

        handles = []
        try:
            for (path, reads), names in self._points.items():
                module = resolve_module(self.model, next(s for s in self.sites if s.name == names[0]))
                where = f"the {reads} of {path or 'the model'}"
                if reads == "input":
                    def pre_hook(mod, args, kw, names=names, where=where):
                        store(names, first_input(mod, args, kw), where)
                    handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
                else:
                    def hook(mod, args, output, names=names, where=where):
                        store(names, first_output(output), where)
                    handles.append(module.register_forward_hook(hook))
            with torch.inference_mode():
                try:
                    self.model(**kwargs)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        missing = [s.name for s in self.sites if s.name not in captured]
        if missing:
            raise RuntimeError(f"the forward pass finished without reaching site(s) {', '.join(missing)} "
                               "(a module: site whose module is never called?)")
        return {s.name: captured[s.name] for s in self.sites}


def _fields(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch["train_mask"], batch.get("attention_mask")
    if hasattr(batch, "input_ids") and hasattr(batch, "train_mask"):  # e.g. data.tokens.TokenWindow
        return batch.input_ids, batch.train_mask, getattr(batch, "attention_mask", None)
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise ValueError("each batch must be (input_ids, train_mask[, attention_mask]), a mapping with those keys, "
                     f"or an object with those attributes; got {type(batch).__name__}")


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(input_ids [B, T], train_mask [B, T] bool, attention_mask [B, T] bool or None)`` of a batch
    given as a tuple, a mapping or a window object (1-D tensors are one sequence)."""
    input_ids, train_mask, attention_mask = _fields(batch)
    if input_ids.dim() == 1:
        input_ids, train_mask = input_ids.unsqueeze(0), train_mask.reshape(1, -1)
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if train_mask.shape != input_ids.shape:
        raise ValueError(f"train_mask shape {tuple(train_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    return input_ids, train_mask.bool(), None if attention_mask is None else attention_mask.bool()


def harvest(model: Any, batches: Iterable[Any], sites: Sequence[str], *, dtype: torch.dtype | None = torch.float32,
            device: str | torch.device = "cpu") -> Iterator[dict[str, Tensor]]:
    """Yield ``{site: Tensor [n, d]}`` per batch: the rows at ``train_mask`` (and ``attention_mask``) positions.

    ``batches`` yields ``(input_ids [B, T], train_mask [B, T][, attention_mask [B, T]])`` (1-D
    tensors are one sequence). Rows are in token order, the same rows for every site. ``dtype=None``
    keeps the model's dtype; ``device`` is where the rows go (CPU by default).
    """
    harvester = Harvester(model, sites)
    for batch in batches:
        input_ids, train_mask, attention_mask = unpack_batch(batch)
        keep = train_mask if attention_mask is None else train_mask & attention_mask
        acts = harvester.activations(input_ids, attention_mask)
        B, T = input_ids.shape
        out = {}
        for name, a in acts.items():
            if a.shape[:2] != (B, T):
                raise RuntimeError(f"{name}: activation shape {tuple(a.shape)} does not start with the "
                                   f"batch's [B, T] = [{B}, {T}]; cannot flatten tokens")
            rows = a.reshape(B * T, -1)[keep.reshape(-1).to(a.device)]
            out[name] = rows.to(device=device, dtype=dtype or rows.dtype)
        yield out
