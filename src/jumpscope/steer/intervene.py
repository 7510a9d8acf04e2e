"""Apply interventions on SAE latents while a model runs, ``model.generate`` included.

    with intervene(model, {"layers.2.resid_post": (sae, [Steer(12, 8.0), Ablate([3, 4])])}):
        model.generate(...)

Each site's activation is replaced through :func:`jumpscope.models.splice.replace_sites`, so the
hooks are the same as splicing's and are removed on exit, also when the block raises. A hook acts
on whatever positions pass through: the whole prompt on the first forward and, with a KV cache,
only the new token on each later one.

``positions`` says which token positions are edited:

- ``"all"`` (default): every position;
- ``"new"``: only positions after the prompt, the prompt being what the first forward pass inside
  the block reads (so use one block per generation, as :func:`generate_with` does);
- an int ``start``: only absolute positions ``>= start`` (e.g. 1 to leave BOS alone).

A position's absolute index is the forward's offset plus its index in the call, so "new" and
``start`` work with and without a KV cache. The offset is the length of the KV cache the call is
given, whatever its keyword (transformers has passed it as ``past_key_values`` and, since 5.x
``generate``, as ``cache``), else the call's ``cache_position`` or ``position_ids``. Where a
call uses a cache but none of these says where it starts, the block raises instead of editing
the wrong positions (or silently none).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from ..models.hookpoints import unwrap
from ..models.splice import Transform, at_positions, check_sae_fits, replace_sites
from ..sae.base import SAE
from .interventions import Intervention, check_interventions, site_transform

__all__ = ["intervene", "Positions", "SiteInterventions"]

Positions = Union[Literal["all", "new"], int]
SiteInterventions = Mapping[str, tuple[SAE, Sequence[Intervention]]]


def _check_positions(positions: Positions) -> None:
    if positions in ("all", "new"):
        return
    if isinstance(positions, bool) or not isinstance(positions, int) or positions < 0:
        raise ValueError(f"positions must be 'all', 'new' or a start position >= 0, got {positions!r}")


def site_transforms(model: Any, interventions: SiteInterventions) -> dict[str, Transform]:
    """One activation transform per site that has interventions, after checking every input."""
    if not isinstance(interventions, Mapping):
        raise TypeError("interventions are a mapping {site: (sae, [Steer/Clamp/Ablate, ...])}, "
                        f"got {type(interventions).__name__}")
    transforms = {}
    parameter = next(unwrap(model).parameters(), None)
    for site, entry in interventions.items():
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise TypeError(f"interventions[{site!r}] must be (sae, [Steer/Clamp/Ablate, ...]), got {entry!r}")
        sae, edits = entry
        edits = [edits] if not isinstance(edits, (list, tuple)) else list(edits)
        check_interventions(sae, edits, site)
        check_sae_fits(sae, site, model)  # unknown sites and width mismatches, before any hook is placed
        if parameter is not None and sae.W_dec.device != parameter.device:
            raise ValueError(f"the SAE at {site!r} is on {sae.W_dec.device} but the model on {parameter.device}; "
                             "move it first (sae.to(device))")
        if edits:  # a site without edits keeps its activation exactly: no hook at all
            transforms[site] = site_transform(sae, edits)
    return transforms


class _PositionTracker:
    """Remembers where the current forward pass starts (its KV-cache length) and, for "new", how
    long the prompt was, so that site hooks can edit absolute positions >= start only."""

    def __init__(self, positions: Positions):
        self.start: int | None = None if positions == "new" else int(positions)
        self.offset: int | None = 0

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.offset = forward_offset(kwargs)

    def mask(self, x: Tensor) -> Tensor:
        """[batch, seq] bool: the positions of ``x`` ([batch, seq, d]) to edit."""
        if x.dim() != 3:
            raise ValueError(f"positions='new' or a start position needs [batch, seq, d] activations, "
                             f"got shape {tuple(x.shape)}")
        if self.offset is None:
            raise RuntimeError("positions='new' or a start position: this forward uses a KV cache but passes "
                               "neither the cache, cache_position nor position_ids in a form jumpscope reads, "
                               "so its absolute positions are unknown; use positions='all' or generate with "
                               "use_cache=False")
        if self.start is None:  # the first forward in the block reads the prompt
            self.start = self.offset + x.shape[1]
        elif self.offset == 0 and x.shape[1] < self.start:
            # Without a cache every later forward re-reads the prompt, so a shorter one at offset 0
            # is a cached step whose offset went unseen: editing nothing would be a silent no-op.
            raise RuntimeError(f"positions='new': a forward read {x.shape[1]} token(s) at offset 0 after a "
                               f"{self.start}-token prompt, so it uses a KV cache that jumpscope cannot "
                               "read; use positions='all' or generate with use_cache=False")
        absolute = self.offset + torch.arange(x.shape[1], device=x.device)
        return (absolute >= self.start).expand(x.shape[0], -1)

    def wrap(self, transform: Transform, site: str) -> Transform:
        def masked(x: Tensor) -> Tensor:
            mask = self.mask(x)
            return at_positions(transform, mask, site)(x) if mask.any() else x

        return masked


def _cache_seq_length(cache: Any) -> int | None:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)) and cache[0] \
            and isinstance(cache[0][0], Tensor):  # legacy: (key, value) per layer, [batch, heads, seq, dim]
        return int(cache[0][0].shape[-2])
    return None


def forward_offset(kwargs: Mapping[str, Any]) -> int | None:
    """The absolute position of the first token a model forward reads, from its keyword arguments:
    the length of its KV cache (a cache object under any keyword, e.g. ``past_key_values`` or
    ``cache``; a legacy tuple under those two), else its ``cache_position``, else its
    ``position_ids`` (unpadded here); 0 for a call without a cache; None where a cache is in use
    but nothing says how long it is."""
    uses_cache = False
    for name, value in kwargs.items():
        if name in ("past_key_values", "cache") or hasattr(value, "get_seq_length"):
            if value is None:
                continue
            uses_cache = True
            length = _cache_seq_length(value)
            if length is not None:
                return length
    for name in ("cache_position", "position_ids"):
        position = kwargs.get(name)
        if isinstance(position, Tensor) and position.numel():
            return int(position.reshape(-1, position.shape[-1])[:, 0].min())
    return None if uses_cache else 0


@contextlib.contextmanager
def intervene(model: Any, interventions: SiteInterventions, *, positions: Positions = "all") -> Iterator[None]:
    """Apply ``interventions`` ({site: (sae, [Steer, Clamp, Ablate, ...])}) to every forward pass
    of ``model`` (an ``nn.Module`` or a LoadedModel) inside the block; see the module docstring."""
    _check_positions(positions)
    transforms = site_transforms(model, interventions)
    if positions == "all" or not transforms:
        with replace_sites(model, transforms):
            yield
        return
    tracker = _PositionTracker(positions)
    handle = unwrap(model).register_forward_pre_hook(tracker.before_forward, with_kwargs=True)
    try:
        with replace_sites(model, {site: tracker.wrap(t, site) for site, t in transforms.items()}):
            yield
    finally:
        handle.remove()
