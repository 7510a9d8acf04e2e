"""Synthetic activations from a known sparse dictionary in superposition (a ground-truth benchmark).

``n_features`` unit-norm directions live in ``d_in`` dimensions (more features than dimensions,
so they cannot be orthogonal). Each activation vector is a sparse nonnegative combination of
them, plus an optional constant offset and isotropic noise::

    x = sum_i c_i * d_i + offset + noise,   c_i = fire_i * magnitude_i >= 0

Features fire with a Zipf-like spread of probabilities (a few common, many rare), some fire in
correlated groups (a group leader drags its members along), and the expected number of active
features per vector is exactly ``true_l0``. An SAE trained on this data can be scored against
the truth with :func:`feature_recovery`: how well its decoder rows match the true directions.

Everything is deterministic from seeds: the dictionary and statistics from
``SyntheticConfig.seed``, and batch ``i`` of a stream from (config seed, stream seed, i), so a
stream can be replayed (a resumed training run sees the same data in the same order) and any
one batch can be regenerated on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import Tensor

MagnitudeDistribution = Literal["exponential", "half_normal", "uniform"]


@dataclass
class SyntheticConfig:
    """What the synthetic activations look like. The defaults are a small superposition problem."""

    d_in: int = 64
    """Width of the activation vectors."""

    n_features: int = 512
    """Number of true features (dictionary directions); more than d_in means superposition."""

    true_l0: float = 8.0
    """Expected number of active features per vector (exact in expectation, counting the
    extra firings that correlation groups cause)."""

    zipf_exponent: float = 1.0
    """Base firing probability of the feature of rank r is proportional to r ** -zipf_exponent
    (ranks are assigned to features at random); 0 gives every feature the same probability."""

    max_firing_probability: float = 0.5
    """Cap on any feature's base firing probability (the probabilities are rescaled after
    capping so that the expected L0 stays true_l0)."""

    n_groups: int = 16
    """Number of correlated groups. Each has one leader and group_size - 1 members, all
    distinct features chosen at random; 0 makes every feature fire independently."""

    group_size: int = 4
    """Features per correlated group, the leader included (at least 2)."""

    cofire_probability: float = 0.8
    """When a group's leader fires, each member fires with this probability (in addition to
    firing on its own at its base rate)."""

    magnitude_distribution: MagnitudeDistribution = "exponential"
    """Distribution of an active feature's coefficient, scaled to mean 1 before the per-feature
    scale: 'exponential' (Exp(1)), 'half_normal' (|N(0,1)| * sqrt(pi/2)) or 'uniform' (U(0, 2))."""

    magnitude_spread: float = 0.0
    """Standard deviation of the log of each feature's mean magnitude (0: every feature has mean
    magnitude 1). The per-feature means are normalised to average 1."""

    mean_offset_norm: float = 0.0
    """Norm of a constant offset (random direction) added to every vector, like the mean of a
    residual stream; 0 disables it."""

    noise_std: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every coordinate; 0 disables it."""

    seed: int = 0
    """Seed of the dictionary, the firing probabilities, the groups, the magnitudes' scales and
    the offset. Batch streams have their own seed on top of it."""

    def __post_init__(self) -> None:
        for name in ("d_in", "n_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.max_firing_probability <= 1:
            raise ValueError(f"max_firing_probability must lie in (0, 1], got {self.max_firing_probability}")
        if self.true_l0 <= 0:
            raise ValueError(f"true_l0 must be > 0, got {self.true_l0}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.n_groups < 0:
            raise ValueError(f"n_groups must be >= 0, got {self.n_groups}")
        if self.n_groups and self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 when there are groups, got {self.group_size}")
        if self.n_groups * self.group_size > self.n_features:
            raise ValueError(f"{self.n_groups} groups of {self.group_size} need more than the "
                             f"{self.n_features} features")
        if not 0 <= self.cofire_probability <= 1:
            raise ValueError(f"cofire_probability must lie in [0, 1], got {self.cofire_probability}")
        if self.magnitude_distribution not in ("exponential", "half_normal", "uniform"):
            raise ValueError(f"unknown magnitude_distribution {self.magnitude_distribution!r}")
        for name in ("magnitude_spread", "mean_offset_norm", "noise_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _derived_seed(*entropy: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers (numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(e) & 0xFFFF_FFFF_FFFF_FFFF for e in entropy]).generate_state(1, np.uint64)
    return int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF


class SyntheticActivations:
    """A sparse dictionary in superposition and a sampler of activations from it.

    Attributes (all CPU tensors): ``dictionary`` (n_features, d_in), unit rows;
    ``base_probabilities`` (n_features,), each feature's own firing probability;
    ``firing_probabilities`` (n_features,), the marginal probability including group co-firing;
    ``leaders`` (n_groups,) and ``members`` (n_groups, group_size - 1), feature indices;
    ``magnitude_scales`` (n_features,); ``offset`` (d_in,).
    """

    _STRUCTURE, _STREAM = 0, 1  # seed-domain tags

    def __init__(self, cfg: SyntheticConfig | None = None, **fields: Any):
        if cfg is not None and fields:
            raise TypeError("pass either a SyntheticConfig or config fields, not both")
        self.cfg = cfg if cfg is not None else SyntheticConfig(**fields)
        cfg = self.cfg
        g = torch.Generator().manual_seed(_derived_seed(cfg.seed, self._STRUCTURE))
        directions = torch.randn(cfg.n_features, cfg.d_in, generator=g, dtype=torch.float64)
        self._dictionary = (directions / directions.norm(dim=1, keepdim=True)).float()

        ranks = torch.randperm(cfg.n_features, generator=g).double() + 1.0
        weights = ranks.pow(-cfg.zipf_exponent)
        self._weights = weights / weights.sum()

        order = torch.randperm(cfg.n_features, generator=g)
        per_group = cfg.group_size - 1 if cfg.n_groups else 0
        self.leaders = order[:cfg.n_groups].clone()
        self.members = order[cfg.n_groups:cfg.n_groups * (1 + per_group)].reshape(cfg.n_groups, per_group).clone()

        log_scale = torch.randn(cfg.n_features, generator=g, dtype=torch.float64) * cfg.magnitude_spread
        scales = log_scale.exp()
        self.magnitude_scales = (scales / scales.mean()).float()

        offset = torch.randn(cfg.d_in, generator=g, dtype=torch.float64)
        self.offset = (offset / offset.norm() * cfg.mean_offset_norm).float()

        base = self._solve_base_probabilities()
        self.base_probabilities = base.float()
        self.firing_probabilities = self._marginals(base).float()

    # -- statistics ------------------------------------------------------------------------------
    def _marginals(self, base: Tensor) -> Tensor:
        """Marginal firing probability of every feature given the base probabilities."""
        marginal = base.clone()
        if self.cfg.n_groups:
            dragged = self.cfg.cofire_probability * base[self.leaders]  # P(member fires via its leader)
            own = base[self.members]
            marginal[self.members] = 1.0 - (1.0 - dragged[:, None]) * (1.0 - own)
        return marginal

    def _solve_base_probabilities(self) -> Tensor:
        """Base probabilities min(s * w_i, cap) with s chosen (bisection) so that the expected L0,
        group co-firing included, equals true_l0."""
        cfg = self.cfg
        cap = cfg.max_firing_probability

        def expected_l0(s: float) -> float:
            return self._marginals((s * self._weights).clamp(max=cap)).sum().item()

        high = cap / self._weights.min().item()  # every feature at the cap
        if expected_l0(high) < cfg.true_l0:
            raise ValueError(f"true_l0={cfg.true_l0} is unreachable: with max_firing_probability={cap} at most "
                             f"{expected_l0(high):.3g} features can be active on average")
        low = 0.0
        for _ in range(200):
            mid = 0.5 * (low + high)
            if expected_l0(mid) < cfg.true_l0:
                low = mid
            else:
                high = mid
        return (0.5 * (low + high) * self._weights).clamp(max=cap)

    @property
    def dictionary(self) -> Tensor:
        """The true feature directions, (n_features, d_in), unit-norm rows."""
        return self._dictionary

    @property
    def expected_l0(self) -> float:
        """Expected number of active features per vector (equals cfg.true_l0)."""
        return self.firing_probabilities.double().sum().item()

    # -- sampling --------------------------------------------------------------------------------
    def _sample_active(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """The active (row, feature, coefficient) triples of ``n`` vectors, in row-major order."""
        cfg = self.cfg
        fire = torch.rand(n, cfg.n_features, generator=generator) < self.base_probabilities
        if cfg.n_groups:
            # Leaders are in no group, so this reads their own firing only. Members are dragged
            # along per (vector, firing leader) with probability cofire_probability each.
            lead_rows, lead_groups = fire[:, self.leaders].nonzero(as_tuple=True)
            dragged = torch.rand(lead_rows.numel(), self.members.shape[1], generator=generator) \
                < cfg.cofire_probability
            pairs, slots = dragged.nonzero(as_tuple=True)
            fire[lead_rows[pairs], self.members[lead_groups[pairs], slots]] = True
        rows, cols = fire.nonzero(as_tuple=True)
        count = rows.numel()
        if cfg.magnitude_distribution == "exponential":
            magnitude = torch.rand(count, generator=generator).clamp_min_(1e-12).log_().neg_()
        elif cfg.magnitude_distribution == "half_normal":
            magnitude = torch.randn(count, generator=generator).abs_().mul_(float(np.sqrt(np.pi / 2)))
        else:
            magnitude = torch.rand(count, generator=generator).mul_(2.0)
        return rows, cols, magnitude * self.magnitude_scales[cols]

    def sample(self, n: int, generator: torch.Generator, return_codes: bool = False) -> Any:
        """``n`` activation vectors (n, d_in) float32; with ``return_codes`` also their true
        codes (n, n_features), zero where a feature is off and positive where it is on."""
        rows, cols, values = self._sample_active(n, generator)
        x = self.offset.expand(n, -1).clone()
        x.index_add_(0, rows, self._dictionary[cols] * values[:, None])
        if self.cfg.noise_std:
            x.add_(torch.randn(n, self.cfg.d_in, generator=generator), alpha=self.cfg.noise_std)
        if not return_codes:
            return x
        codes = torch.zeros(n, self.cfg.n_features)
        codes[rows, cols] = values
        return x, codes

    def sample_codes(self, n: int, generator: torch.Generator) -> Tensor:
        """True codes (n, n_features) of ``n`` vectors (the same draws as ``sample``)."""
        return self.sample(n, generator, return_codes=True)[1]

    def batch(self, index: int, batch_size: int, seed: int = 0) -> Tensor:
        """Batch ``index`` of the stream ``seed``: the same tensor whenever it is asked for."""
        g = torch.Generator().manual_seed(_derived_seed(self.cfg.seed, self._STREAM, seed, index))
        return self.sample(batch_size, g)

    def batches(self, batch_size: int, n_batches: int | None = None, seed: int = 0) -> "SyntheticBatches":
        """A re-iterable stream of ``n_batches`` float32 tensors [batch_size, d_in] (endless
        when None). Every iteration yields the same tensors in the same order."""
        return SyntheticBatches(self, batch_size, n_batches, seed)


class SyntheticBatches:
    """A replayable stream of synthetic activation batches: ``iter()`` starts it afresh."""

    def __init__(self, source: SyntheticActivations, batch_size: int, n_batches: int | None, seed: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if n_batches is not None and n_batches < 0:
            raise ValueError(f"n_batches must be >= 0 or None, got {n_batches}")
        self.source, self.batch_size, self.n_batches, self.seed = source, batch_size, n_batches, seed

    def __iter__(self) -> Iterator[Tensor]:
        index = 0
        while self.n_batches is None or index < self.n_batches:
            yield self.source.batch(index, self.batch_size, self.seed)
            index += 1

    def __len__(self) -> int:
        if self.n_batches is None:
            raise TypeError("an endless synthetic stream has no length")
        return self.n_batches


def feature_recovery(decoder_rows: Tensor, dictionary: Tensor) -> dict[str, Any]:
    """How well learned directions ``decoder_rows`` (n, d) recover the true ``dictionary`` (F, d).

    For every true feature, the largest cosine similarity to any learned row (signed: a row
    pointing the opposite way does not recover a feature whose coefficients are nonnegative).
    Returns ``mean_max_cos`` (the mean over true features), ``frac_above_0.9`` and
    ``frac_above_0.8`` (fractions of true features recovered at those cosines), and
    ``per_feature_max_cos`` (an (F,) tensor). Invariant to the order and positive scale of the
    rows; zero rows recover nothing.
    """
    if decoder_rows.dim() != 2 or dictionary.dim() != 2 or decoder_rows.shape[1] != dictionary.shape[1]:
        raise ValueError(f"need (n, d) decoder rows and an (F, d) dictionary, got {tuple(decoder_rows.shape)} "
                         f"and {tuple(dictionary.shape)}")
    learned = decoder_rows.detach().double().cpu()
    true = dictionary.detach().double().cpu()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-30)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-30)
    best = (true @ learned.T).max(dim=1).values
    return {
        "mean_max_cos": best.mean().item(),
        "frac_above_0.9": (best > 0.9).double().mean().item(),
        "frac_above_0.8": (best > 0.8).double().mean().item(),
        "per_feature_max_cos": best.float(),
    }
