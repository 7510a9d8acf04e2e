"""Interventions on an SAE's latents, and the activation transform they make at one site.

Every intervention is an edit of the latent vector ``f = sae.encode(x)``, decoded linearly with the
SAE's error term kept (:func:`jumpscope.models.splice.reconstruct` with ``keep_error=True``):

- :class:`Steer` ``(latent, alpha)``: ``f[latent] += alpha``, i.e. ``x + alpha * W_dec[latent]``;
- :class:`Clamp` ``(latent, value)``: ``f[latent] = value``, i.e. ``x + (value - f[latent]) * W_dec[latent]``;
- :class:`Ablate` ``(latents)``: ``f[i] = 0``, i.e. ``x - sum_i f[i] * W_dec[i]``;
- :class:`SteerDirection` ``(vector, alpha)``: ``x + alpha * vector`` for any direction, not a
  latent's (e.g. :func:`random_control`, the control for a Steer). It adds to the output whatever
  the order, since it edits no latent.

Because every architecture decodes as ``f @ W_dec + b_dec`` (plus a skip term that does not depend
on ``f``), the output changes only along the edited latents' decoder rows; everything the SAE
fails to reconstruct stays. Edits apply in the order given, so ``[Clamp(5, 0.0), Steer(5, 2.0)]``
leaves latent 5 at 2. A site with steering only needs no encoder pass: its transform just adds
the steering vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from ..models.splice import LatentEdit, Transform, reconstruct
from ..sae.base import SAE

__all__ = ["Steer", "Clamp", "Ablate", "SteerDirection", "Intervention", "random_control", "check_interventions", "latent_edit", "steering_vector",
           "site_transform", "describe"]


def _check_latent(latent: object, what: str) -> None:
    if isinstance(latent, bool) or not isinstance(latent, int):
        raise TypeError(f"{what}: a latent index is an int, got {latent!r}")
    if latent < 0:
        raise ValueError(f"{what}: latent indices count from 0, got {latent}")


def _check_finite(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Steer:
    """Add ``alpha * W_dec[latent]`` to the activation (negative alpha steers away)."""

    latent: int
    """Index of the latent whose decoder direction is added."""

    alpha: float
    """How much of it, in the latent's activation units (its decoder row has unit norm when the
    SAE was trained with normalize_decoder)."""

    def __post_init__(self) -> None:
        _check_latent(self.latent, "Steer")
        object.__setattr__(self, "alpha", _check_finite(self.alpha, f"Steer({self.latent}) alpha"))


@dataclass(frozen=True)
class Clamp:
    """Set the latent to ``value`` wherever the intervention acts, whatever it was."""

    latent: int
    """Index of the latent to clamp."""

    value: float
    """The activation it gets: finite and >= 0 (the latents of every architecture are non-negative;
    to push against a direction use Steer with a negative alpha)."""

    def __post_init__(self) -> None:
        _check_latent(self.latent, "Clamp")
        value = _check_finite(self.value, f"Clamp({self.latent}) value")
        if value < 0:
            raise ValueError(f"Clamp({self.latent}) value must be >= 0 (SAE latents are non-negative), got {value}; "
                             "use Steer with a negative alpha to push against the latent's direction")
        object.__setattr__(self, "value", value)


@dataclass(frozen=True)
class Ablate:
    """Remove the latents' contribution (set them to 0), keeping the SAE's error term."""

    latents: tuple[int, ...]
    """Indices of the latents to remove (one int is accepted too)."""

    def __post_init__(self) -> None:
        latents = (self.latents,) if isinstance(self.latents, int) else tuple(self.latents)
        if not latents:
            raise ValueError("Ablate needs at least one latent")
        for latent in latents:
            _check_latent(latent, "Ablate")
        object.__setattr__(self, "latents", latents)


@dataclass(frozen=True, eq=False)
class SteerDirection:
    """Add ``alpha * vector`` to the activation: steering along a direction that is no latent's."""

    vector: Tensor
    """[d_in] direction added (any norm; it is used as given, not normalised)."""

    alpha: float
    """How much of it (negative steers away)."""

    label: str = "direction"
    """Name shown by :func:`describe`, e.g. 'random control of 12'."""

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor) or self.vector.dim() != 1 or not self.vector.numel():
            raise TypeError(f"SteerDirection: vector must be a 1-d tensor [d_in], got {self.vector!r}")
        if not bool(torch.isfinite(self.vector).all()):
            raise ValueError("SteerDirection: vector has non-finite values")
        object.__setattr__(self, "vector", self.vector.detach().float())
        object.__setattr__(self, "alpha", _check_finite(self.alpha, f"SteerDirection({self.label}) alpha"))


Intervention = Union[Steer, Clamp, Ablate, SteerDirection]


def random_control(sae: SAE, steer: Steer, seed: int = 0) -> SteerDirection:
    """The random-direction control of ``steer``: a direction drawn uniformly on the sphere (seeded,
    on the CPU so any device gives the same one), scaled to the norm of ``W_dec[steer.latent]``,
    with the same alpha; so both add a vector of the same length and differ only in direction.
    Decoder rows are unit norm only for SAEs trained with normalize_decoder, hence the scaling."""
    check_interventions(sae, [steer])
    row = sae.W_dec.detach()[steer.latent].float()
    draw = torch.randn(row.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    vector = (draw / draw.norm() * row.norm().cpu()).to(row.device)
    return SteerDirection(vector, steer.alpha, f"random control of {steer.latent} (seed {seed})")


def _indices(edit: Intervention) -> tuple[int, ...]:
    return edit.latents if isinstance(edit, Ablate) else (edit.latent,)


def check_interventions(sae: SAE, edits: Sequence[Intervention], where: str = "") -> None:
    """Raise a clear error for an SAE these edits cannot act through, or a latent out of range."""
    at = f" at {where!r}" if where else ""
    if not isinstance(sae, SAE):
        raise TypeError(f"interventions{at} need a jumpscope SAE, got {type(sae).__name__}")
    if sae.cfg.target_site:
        raise ValueError(f"the SAE{at} is a transcoder ({sae.cfg.site} -> {sae.cfg.target_site}): its latents are "
                         "read from one site and written to another, so steering does not apply; use an SAE that "
                         "reconstructs the site it reads")
    for edit in edits:
        if isinstance(edit, SteerDirection):
            if edit.vector.shape[0] != sae.cfg.d_in:
                raise ValueError(f"SteerDirection({edit.label}){at}: vector has {edit.vector.shape[0]} values but "
                                 f"the site is {sae.cfg.d_in} wide")
            continue
        if not isinstance(edit, (Steer, Clamp, Ablate)):
            raise TypeError(f"unknown intervention{at}: {edit!r} (use Steer, Clamp, Ablate or SteerDirection)")
        for latent in _indices(edit):
            if latent >= sae.cfg.d_sae:
                raise ValueError(f"{edit}{at}: latent {latent} is out of range for an SAE with "
                                 f"{sae.cfg.d_sae} latents (0-{sae.cfg.d_sae - 1})")


def latent_edit(edits: Sequence[Intervention]) -> LatentEdit:
    """The edit of a ``[n, d_sae]`` latent tensor that applies ``edits`` in order."""

    def edit(latents: Tensor) -> Tensor:
        out = latents.clone()
        for change in edits:
            if isinstance(change, Steer):
                out[..., change.latent] += change.alpha
            elif isinstance(change, Clamp):
                out[..., change.latent] = change.value
            elif isinstance(change, Ablate):
                out[..., list(change.latents)] = 0.0
        return out

    return edit


def steering_vector(sae: SAE, edits: Sequence[Intervention]) -> Tensor:
    """``sum alpha * W_dec[latent]`` plus ``sum alpha * vector`` ([d_in], float32) of the Steer and
    SteerDirection edits (others are skipped)."""
    W_dec = sae.W_dec.detach()
    vector = torch.zeros(W_dec.shape[1], dtype=torch.float32, device=W_dec.device)
    for change in edits:
        if isinstance(change, Steer):
            vector += change.alpha * W_dec[change.latent].float()
        elif isinstance(change, SteerDirection):
            vector += change.alpha * change.vector.to(vector.device)
    return vector


def site_transform(sae: SAE, edits: Sequence[Intervention]) -> Transform:
    """``x -> x'``: the activation with ``edits`` applied through ``sae`` (any leading shape).
    Steering alone adds a fixed vector; otherwise the SAE encodes once and all edits apply."""
    check_interventions(sae, edits)
    if all(isinstance(change, (Steer, SteerDirection)) for change in edits):
        vector = steering_vector(sae, edits)

        def add(x: Tensor) -> Tensor:
            return x + vector.to(x.device, x.dtype)

        return add
    edit = latent_edit([change for change in edits if not isinstance(change, SteerDirection)])
    directions = [change for change in edits if isinstance(change, SteerDirection)]
    added = steering_vector(sae, directions) if directions else None

    def edited(x: Tensor) -> Tensor:
        out = reconstruct(sae, x, keep_error=True, edit=edit)
        return out if added is None else out + added.to(out.device, out.dtype)

    return edited


def describe(edits: Sequence[Intervention]) -> str:
    """A short readable list, e.g. ``steer 12 by +8, clamp 3 to 2, ablate 4, 5``."""
    parts = []
    for change in edits:
        if isinstance(change, Steer):
            parts.append(f"steer {change.latent} by {change.alpha:+g}")
        elif isinstance(change, Clamp):
            parts.append(f"clamp {change.latent} to {change.value:g}")
        elif isinstance(change, SteerDirection):
            parts.append(f"steer {change.label} by {change.alpha:+g}")
        else:
            parts.append("ablate " + ", ".join(map(str, change.latents)))
    return "; ".join(parts) or "none"
