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

A position's absolute index is the forward's offset (the length of the KV cache it is given,
read from the call's ``past_key_values`` or ``cache_position``) plus its index in the call, so
"new" and ``start`` work with and without a KV cache.
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
        self.offset = 0

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.offset = _cache_length(kwargs)

    def mask(self, x: Tensor) -> Tensor:
        """[batch, seq] bool: the positions of ``x`` ([batch, seq, d]) to edit."""
        if x.dim() != 3:
            raise ValueError(f"positions='new' or a start position needs [batch, seq, d] activations, "
                             f"got shape {tuple(x.shape)}")
        if self.start is None:  # the first forward in the block reads the prompt
            self.start = self.offset + x.shape[1]
        absolute = self.offset + torch.arange(x.shape[1], device=x.device)
        return (absolute >= self.start).expand(x.shape[0], -1)

    def wrap(self, transform: Transform, site: str) -> Transform:
        def masked(x: Tensor) -> Tensor:
            mask = self.mask(x)
            return at_positions(transform, mask, site)(x) if mask.any() else x

        return masked


def _cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache passed to this forward (0 without one)."""
    cache = kwargs.get("past_key_values")
    if cache is not None:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:  # legacy (k, v) per layer
            return int(cache[0][0].shape[-2])
    position = kwargs.get("cache_position")
    if isinstance(position, Tensor) and position.numel():
        return int(position.reshape(-1)[0])
    return 0


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
