"""The shared base of every SAE architecture.

Layout (SPEC notation, the layout of Gemma Scope and SAELens): ``W_enc`` is ``(d_in, d_sae)``,
``W_dec`` is ``(d_sae, d_out)``, ``b_enc`` is ``(d_sae,)``, ``b_dec`` is ``(d_out,)``. ``d_out``
equals ``d_in`` except for transcoders.

An architecture file subclasses :class:`SAEConfig` and :class:`SAE`, implements ``encode``,
``loss`` and (optionally) ``export``/``init_from_data``, and registers itself by name. The
trainer talks to SAEs only through the methods defined here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..errors import check_positive
from .entries import sparse_decode
from .step import LossOutput, StepContext


InputScaling = Literal["unit_mean_sq_norm", "sqrt_d_in_norm", "none"]


@dataclass
class SAEConfig:
    """Fields every architecture shares. Subclasses add their own and may change defaults."""

    d_in: int
    """Width of the activations the encoder reads."""

    d_sae: int
    """Number of latents (dictionary size)."""

    d_out: int | None = None
    """Width the decoder predicts, as stored in cfg.json; None: d_in (code reads d_output)."""

    seed: int = 0
    """Seed of the parameter initialisation."""

    input_scaling: InputScaling = "unit_mean_sq_norm"
    """How the trainer rescales inputs (folded back into the saved weights): 'unit_mean_sq_norm'
    E||x||^2 = 1 (JumpReLU paper), 'sqrt_d_in_norm' E||x|| = sqrt(d_in) (Anthropic, TopK), 'none'."""

    normalize_decoder: bool = True
    """Keep every decoder row at unit norm (project out the parallel gradient, renormalise)."""

    apply_b_dec_to_input: bool = False
    """Subtract b_dec from x before the encoder (not for transcoders: their b_dec is an output)."""

    b_dec_init: Literal["zeros", "mean"] = "zeros"
    """Initial decoder bias: zeros, or the mean of the initialisation sample (ordinary SAEs only),
    which spares the first thousands of steps learning the activations' mean."""

    optimizer: Literal["adam", "signsgd_schedulefree"] = "adam"
    """'adam', or 'signsgd_schedulefree': sign descent with schedule-free averaging (sparsify's
    recipe; needs no warm-up or decay, the saved weights are the average of the iterates)."""

    encoder_init_scale: float = 1.0
    """W_enc = this times W_dec^T (unit rows) at initialisation; sparsify's init is about 1/sqrt(3)."""

    lr: float = 2e-4
    """Peak learning rate (at the end of warm-up); see lr_reference_width."""

    lr_reference_width: int | None = None
    """When set, lr applies at this width and other widths use lr * sqrt(lr_reference_width /
    d_sae) (sparsify's rule: wider dictionaries take smaller steps). None: lr as given."""

    lr_reference_steps: int | None = None
    """When set, lr applies to a run of this many optimiser steps, and a run of T steps uses
    lr * sqrt(lr_reference_steps / T), T taken within [lr_reference_steps / 4, 4 *
    lr_reference_steps] (schedule-free averaging's step size for a horizon T goes as 1/sqrt(T);
    outside that range the rule is not measured). None: lr whatever the run's length."""

    lr_reference_d_in: int | None = None
    """When set, lr applies at this input width and d_in inputs use lr * sqrt(lr_reference_d_in /
    d_in): a sign step moves every weight by lr, and the weights of a unit-norm row are about
    1/sqrt(d_in), so the same lr changes a row relatively sqrt(d_in) times more (measured on
    stories260K's 64 features: benchmarks/README.md, "The input-width factor"). None: lr whatever d_in."""

    schedule_free_beta: float = 0.95
    """Schedule-free momentum: gradients are taken at beta * average + (1 - beta) * latest iterate."""

    schedule_free_average_power: float = 0.0
    """r of schedule-free averaging: step t's iterate weighs t^r in the average (0: uniform)."""

    adam_beta1: float = 0.9
    """Adam beta1."""

    adam_beta2: float = 0.999
    """Adam beta2."""

    adam_eps: float = 1e-8
    """Adam epsilon."""

    lr_warmup_steps: float = 100
    """Linear learning-rate warm-up from 0: a number of steps (>= 1) or, below 1, a fraction of
    the run (0.05: the first 5% of the steps)."""

    lr_decay_fraction: float = 0.2
    """Fraction of the run at its end over which the learning rate decays linearly to 0."""

    sparsity_warmup_steps: float = 0
    """How long the sparsity coefficient rises linearly from 0 to its value: steps (>= 1), a
    fraction of the run (below 1), or the whole run (negative)."""

    grad_clip_norm: float | None = None
    """Clip the gradient's global norm to this value; None disables clipping."""

    model: str | None = None
    """The model whose activations this SAE reads (metadata; set by harvesting code)."""

    site: str | None = None
    """The hook site it reads, e.g. 'layers.3.resid_post' (metadata)."""

    target_site: str | None = None
    """A transcoder's output site: it reads ``site`` (e.g. layers.3.mlp_in) and predicts this one
    (e.g. layers.3.mlp_out), and is spliced in here. None: an ordinary SAE reconstructing ``site``."""

    skip_connection: bool = False
    """Add a learned linear skip x @ W_skip to the prediction (transcoders), so the latents only
    model what a linear map of the input misses."""

    architecture: ClassVar[str] = ""
    # False for an architecture the generic training jobs (train, sweep, suite) cannot train on
    # their own, e.g. one that needs a model part beside its activations; own_job_hint says what does.
    trains_alone: ClassVar[bool] = True
    own_job_hint: ClassVar[str] = ""
    # Numeric fields that must be > 0, and those that must be >= 0: checked for every
    # architecture in __post_init__, so an architecture file only declares them.
    positive_fields: ClassVar[tuple[str, ...]] = ()
    nonnegative_fields: ClassVar[tuple[str, ...]] = ()
    # Fields that change how the SAE computes, not what it computes (a resumed run may differ).
    runtime_fields: ClassVar[tuple[str, ...]] = ()
    # Fields a training job sets itself from the data and its generic options (--width, --site,
    # --target-l0, ...), so they are not --sae-FIELD options; an architecture adds its sparsity fields.
    job_fields: ClassVar[tuple[str, ...]] = ("d_in", "d_sae", "d_out", "site", "target_site", "skip_connection",
                                             "model")
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def preset(cls, name: str, **fields: Any) -> "SAEConfig":
        """A config from a named recipe (``cls.presets``), with ``fields`` overriding it."""
        if name not in cls.presets:
            known = ", ".join(sorted(cls.presets)) or "none"
            raise ValueError(f"unknown {cls.architecture!r} preset {name!r}; known: {known}")
        return cls.from_dict({**cls.presets[name], **fields})

    @property
    def d_output(self) -> int:
        """The width the decoder predicts, always an int: ``d_out`` when set (a transcoder's
        output site), else ``d_in``. ``d_out`` is the stored field (None for ordinary SAEs)."""
        return self.d_in if self.d_out is None else self.d_out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.architecture!r} config fields: {unknown}")
        return cls(**values)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_out is not None and self.d_out <= 0:
            raise ValueError(f"d_out must be a positive integer, got {self.d_out!r}")
        check_positive(self, "encoder_init_scale", "lr_reference_width", "lr_reference_steps", "lr_reference_d_in",
                       *self.positive_fields)
        check_positive(self, "schedule_free_average_power", *self.nonnegative_fields, zero_ok=True)
        if self.input_scaling not in ("unit_mean_sq_norm", "sqrt_d_in_norm", "none"):
            raise ValueError(f"unknown input_scaling {self.input_scaling!r}")
        if self.optimizer not in ("adam", "signsgd_schedulefree"):
            raise ValueError(f"optimizer must be 'adam' or 'signsgd_schedulefree', got {self.optimizer!r}")
        if not 0 < self.schedule_free_beta < 1:
            raise ValueError(f"schedule_free_beta must be in (0, 1), got {self.schedule_free_beta}")
        if self.b_dec_init not in ("zeros", "mean"):
            raise ValueError(f"b_dec_init must be 'zeros' or 'mean', got {self.b_dec_init!r}")
        if self.apply_b_dec_to_input and (self.d_output != self.d_in or self.target_site):
            raise ValueError("apply_b_dec_to_input is for SAEs (b_dec lives in input space); set it to False for "
                             "a transcoder")


class SAE(nn.Module):
    """Base module: ``encode``, ``decode``, ``forward``, ``loss``, decoder-norm helpers and
    the input-scale fold. Subclasses set ``config_class`` and implement ``encode``/``loss``."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    # Parameter or buffer names that scale linearly with the input / output when activations
    # are rescaled; fold_scaling multiplies them (threshold-like values and biases).
    input_scaled: ClassVar[tuple[str, ...]] = ("b_enc",)
    output_scaled: ClassVar[tuple[str, ...]] = ("b_dec",)
    # Architectures whose loss routes the target through split_skip (see there).
    supports_skip: ClassVar[bool] = False
    # Whether the trainer may refit W_dec by least squares on the codes (train/decoder_refit.py):
    # only where W_dec's one job is to map this SAE's codes onto its target.
    refits_decoder: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.W_dec = nn.Parameter(init_decoder(cfg.d_sae, cfg.d_output, generator))
        self.W_enc = nn.Parameter(cfg.encoder_init_scale * (
            self.W_dec.detach().T.clone().contiguous() if cfg.d_output == cfg.d_in
            else init_decoder(cfg.d_sae, cfg.d_in, generator).T.contiguous()))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_output))
        if cfg.skip_connection and not self.supports_skip:
            raise ValueError(f"the {cfg.architecture} architecture has no skip connection; use jumprelu or topk")
        self.W_skip = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_output)) if cfg.skip_connection else None

    @property
    def architecture(self) -> str:
        return self.config_class.architecture

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # -- inference -------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``f`` (..., d_sae) of raw inputs ``x`` (..., d_in)."""
        raise NotImplementedError

    def pre_activation(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``z`` (..., d_sae) of raw inputs ``x``."""
        self.check_input(x)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        flat = x.reshape(-1, x.shape[-1])  # the bias inside the product: no second pass over (n, d_sae)
        return torch.addmm(self.b_enc, flat, self.W_enc).reshape(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec``; outside training on the CPU through f's nonzero entries when it is
        sparse (sae/entries.py ``sparse_decode``: 13x faster at 8192 latents, 32 per token)."""
        product = sparse_decode(f, self.W_dec)
        return (f @ self.W_dec if product is None else product) + self.b_dec

    def predict(self, x: Tensor, latents: Tensor) -> Tensor:
        """The output for input ``x`` from its (possibly edited) ``latents``: the decoding, plus the
        skip connection's ``x @ W_skip`` where there is one."""
        out = self.decode(latents)
        return out if self.W_skip is None else out + x @ self.W_skip

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (the prediction of the output, for a transcoder)."""
        return self.predict(x, self.encode(x))

    def split_skip(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None]:
        """(what the latents must predict, the skip's prediction or None). With a skip connection
        the latents fit ``target - x @ W_skip``; autograd trains W_skip through that difference."""
        if self.W_skip is None:
            return target, None
        skip = x @ self.W_skip
        return target - skip, skip

    def save(self, path: Any, format: str = "native", **options: Any) -> Any:
        """Write this SAE: ``format`` is 'native', 'gemma-scope' (params.npz) or 'saelens'."""
        from ..formats import save  # formats import this module

        return save(self, path, format=format, **options)

    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"{self.architecture} SAE expects activations with last dimension "
                             f"d_in={self.cfg.d_in}, got shape {tuple(x.shape)}")

    # -- training --------------------------------------------------------------------------
    def loss(self, x: Tensor, ctx: StepContext, target: Tensor | None = None) -> LossOutput:
        """Training loss on a batch ``x`` (B, d_in); ``target`` (B, d_out) defaults to ``x``."""
        raise NotImplementedError

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent initialisation on a sample of (already scaled) inputs: here b_dec
        (``b_dec_init``); architectures extend it."""
        self.check_input(x)
        if self.cfg.b_dec_init == "mean" and self.cfg.d_out is None:
            self.b_dec.copy_(x.reshape(-1, self.cfg.d_in).mean(0).to(self.b_dec))

    def export_as_jumprelu(self, W_enc: Tensor, b_enc: Tensor, threshold: Tensor) -> "SAE":
        """The exactly equivalent JumpReLU SAE reading raw x (b_dec folded into b_enc when it is
        subtracted from the input), on this SAE's device, with its metadata."""
        from .jumprelu import jumprelu_from_weights  # jumprelu imports this module

        self.check_no_skip("exported")

        if self.cfg.apply_b_dec_to_input:
            b_enc = b_enc - self.b_dec @ W_enc
        return jumprelu_from_weights(
            W_enc.detach(), self.W_dec.detach(), b_enc.detach(), self.b_dec.detach(), threshold.detach(),
            model=self.cfg.model, site=self.cfg.site, input_scaling=self.cfg.input_scaling,
            normalize_decoder=self.cfg.normalize_decoder).to(self.W_enc.device)

    def export(self) -> "SAE":
        """The inference form (e.g. a Gated or BatchTopK SAE exports to a JumpReLU SAE)."""
        self.check_no_skip("exported")
        return self

    def check_no_skip(self, what: str) -> None:
        if self.W_skip is not None:
            raise ValueError(f"this {self.architecture} transcoder has a skip connection (W_skip), so it cannot be "
                             f"{what}: only the native format holds it (format='native')")

    def after_step(self) -> None:
        """Called after each optimiser step (e.g. to clamp thresholds). Default: nothing."""

    def calibrate(self, x: Tensor, ctx: StepContext) -> dict[str, float] | None:
        """After the last step, on the saved weights and training rows ``x`` (scaled): adjust what the
        run asked for (only unaveraged parameters and buffers). Returns what changed, or None."""
        return None

    def unit_decoder_rows_exactly(self) -> None:
        """After an averaging optimiser (an average of unit rows is not unit): unit decoder rows where
        the architecture compensates exactly. Default: nothing (a top-k choice would change)."""

    def unaveraged_parameters(self, batch_size: int | None = None,
                              total_steps: int | None = None) -> dict[str, Any] | None:
        """``{"params": [...], "lr_factor": f, "step": "rms" | "sign" | "signum"}``: parameters a controller
        steers (JumpReLU's thresholds), trained unaveraged; ``batch_size`` (rows per step) and
        ``total_steps`` (the run's length) may pick the step and its size."""
        return None

    def sparsity_coefficient(self) -> float | None:
        """The coefficient the sparsity warm-up multiplies, for logging; None if there is none."""
        return None

    @torch.no_grad()
    def fold_scaling(self, input_scale: float, output_scale: float | None = None) -> None:
        """Rewrite the weights so the SAE trained on ``x / input_scale`` takes raw ``x``.

        Encoder and decoder matrices stay as they are (their product with a scaled input is
        scaled); the biases and thresholds listed in ``input_scaled``/``output_scaled`` are
        multiplied, so ``f_raw = s * f`` and ``x_hat_raw = s * x_hat`` exactly (SPEC 1).
        """
        output_scale = input_scale if output_scale is None else output_scale
        if self.cfg.apply_b_dec_to_input and output_scale != input_scale:
            raise ValueError("cannot fold different input and output scales when b_dec is applied to the input")
        for names, scale in ((self.input_scaled, input_scale), (self.output_scaled, output_scale)):
            for name in names:
                getattr(self, name).mul_(scale)
        if output_scale != input_scale:  # transcoder: f is in input units, output is not
            self.W_dec.mul_(output_scale / input_scale)
            if self.W_skip is not None:
                self.W_skip.mul_(output_scale / input_scale)

    # -- decoder-norm constraint ------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Drop the gradient component parallel to each decoder row (keeps rows on the sphere)."""
        if not self.cfg.normalize_decoder or self.W_dec.grad is None:
            return
        rows = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        parallel = (self.W_dec.grad * rows).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * rows)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        if self.cfg.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def init_decoder(d_sae: int, d_out: int, generator: torch.Generator) -> Tensor:
    """Kaiming-uniform decoder, each row rescaled to unit norm (SPEC 1 recipe)."""
    bound = math.sqrt(6.0 / d_sae)  # kaiming_uniform with fan_in = d_sae, gain sqrt(2)
    weight = (torch.rand(d_sae, d_out, generator=generator) * 2 - 1) * bound
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reconstruction_error(target: Tensor, reconstruction: Tensor) -> Tensor:
    """Squared error summed over features, averaged over the batch (SPEC 1)."""
    return (reconstruction - target).pow(2).sum(dim=-1).mean()
