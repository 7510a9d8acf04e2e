"""JumpReLU SAE (Rajamanoharan et al. 2024; SPEC section 1).

f = z * H(z - theta) with one threshold per latent, trained through two straight-through
estimators with the rectangle kernel. The L0 step is applied to the PRE-activation z (applying
it to the post-JumpReLU output gives latents just below threshold no sparsity gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from . import kernels, mixed
from .base import SAE, InputScaling, LossOutput, SAEConfig, StepContext, reconstruction_error
from .calibrate import l0_factor, mean_l0
from .cpu_ops import column_kth_smallest, kept_above
from .recipes import ADAM_RECIPE, FIXED_LR, TunedSignDescentRecipe
from .registry import register


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1 for -1/2 < u < 1/2, else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_threshold(grad: Tensor, threshold: Tensor) -> Tensor:
    # The threshold gradient is summed over every batch dimension (a kernel density estimate).
    return grad.reshape(-1, grad.shape[-1]).sum(0).reshape(threshold.shape)


class _JumpReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_z = grad_out * (z > threshold).to(z.dtype)  # no straight-through term on z
        grad_theta = -(threshold / eps) * rectangle((z - threshold) / eps) * grad_out
        return grad_z, _sum_to_threshold(grad_theta, threshold), None


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * rectangle((z - threshold) / eps) * grad_out
        return None, _sum_to_threshold(grad_theta, threshold), None  # dH/dz := 0


def jumprelu(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU with the straight-through threshold gradient of SPEC 1."""
    return _JumpReLUFunction.apply(z, threshold, bandwidth)


def step(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Heaviside H(z - threshold) whose gradient reaches only the threshold."""
    return _StepFunction.apply(z, threshold, bandwidth)


SIGN_STEP_MIN_ACTIVE = 16  # threshold_step="auto": sign steps from this many activations per latent per step
SIGN_STEP_FULL_BATCH, SIGN_STEP_REFERENCE_STEPS = 4096, 125  # smaller batches: travel as far as in 125 steps


@dataclass
class JumpReLUConfig(TunedSignDescentRecipe, SAEConfig):
    """JumpReLU SAE. Defaults are the fast recipe that reaches a requested L0 within a few
    million tokens; ``JumpReLUConfig.preset("paper", ...)`` gives the paper's recipe."""

    runtime_fields: ClassVar[tuple[str, ...]] = ("kernel",)
    job_fields: ClassVar[tuple[str, ...]] = SAEConfig.job_fields + ("target_l0", "l0_coefficient")

    input_scaling: InputScaling = "sqrt_d_in_norm"
    """E||x|| = sqrt(d_in): the scale on which sign descent's step sizes suit thresholds and
    biases (the paper's E||x||^2 = 1 is preset('paper') and preset('adam'))."""

    apply_b_dec_to_input: bool | None = None
    """Subtract b_dec (initialised at the input mean) before the encoder, as TopK and Gated do,
    so thresholds act on centred inputs (FVU 0.190 vs 0.204 at L0 32 in the recipe check).
    None: True for an SAE, False for a transcoder (its b_dec lives in output space)."""

    bandwidth: float = 0.02
    """Width eps of the rectangle kernel in the pseudo-derivatives (on the scaled inputs; the
    paper's 0.001 on E||x||^2 = 1 is about 0.02 on E||x|| = sqrt(d_in) at d_in 384)."""

    log_threshold: bool = False
    """Store log(theta) as the parameter (paper) instead of raw theta (trains faster under Adam)."""

    threshold_init: float = 0.02
    """Initial threshold when it is not initialised from data (on the scaled inputs)."""

    threshold_init_l0: float | None = None
    """Initialise each theta_i at the (1 - L0/d_sae) quantile of its pre-activation on a data
    sample so training starts at this L0. None: use target_l0 if set, else threshold_init."""

    b_dec_init: Literal["zeros", "mean"] = "mean"

    sparsity_loss: Literal["l0", "tanh"] = "l0"
    """'l0': lambda * ||f||_0 (paper); 'tanh': lambda * sum tanh(c |f_i| ||W_dec,i||) (Anthropic)."""

    l0_coefficient: float = 4.0
    """lambda, the sparsity coefficient (ignored under target_l0). On E||x|| = sqrt(d_in) the squared
    error is about d_in times its size on E||x||^2 = 1, where the paper's 0.01 applies."""

    target_l0: float | None = None
    """Drive the batch L0 to this value with target_l0_coefficient * (L0/target - 1)^2."""

    threshold_lr_factor: float | None = None
    """Under sign descent with target_l0 the unaveraged thresholds step this many times lr. None: 1,
    but sign steps under 4096 rows min(1, sqrt(125 / steps in the run)). MiniLM, target 32, batch
    1024, sign steps at 0.25x / 0.5x / 1x: 488 steps FVU 0.1653 / 0.1627 / 0.1681, 1953 steps 0.1405
    / 0.1451 / 0.1440; at batch 4096 1x ties or wins (width 8192, 122 steps: 0.1591 / 0.1628)."""

    calibrate_l0: bool = True
    """With target_l0: after the last step, scale every threshold by one factor so that the saved
    (averaged) SAE's mean L0 on a sample of the training rows is target_l0 (calibration_tokens);
    short runs end with the controller settling (the factor is logged). preset('paper'): off."""

    threshold_step: Literal["auto", "rms", "sign", "signum"] = "auto"
    """How those thresholds step: 'rms' (normalised by a running RMS of the gradient), 'sign',
    'signum' (sign of a 0.9 momentum) or 'auto': 'sign' where a step holds at least 16 activations
    of a latent on average (rows x target_l0 / d_sae), else 'rms' (a threshold moves only on steps
    with inputs in its kernel; with few, sign steps lose the L0). MiniLM, width 2048, 488 steps of
    1024, FVU sign (0.5x) / RMS: target 8 0.2844 / 0.2637, 16 0.2124 / 0.2122, 32 0.1627 / 0.1714."""

    target_l0_coefficient: float = 1000.0
    """Strength of the target-L0 penalty; under sign descent it must outweigh the squared error's pull
    on the thresholds: 10 left L0 at 52 for a target of 32, 300 and 1000 reached 32.5 and 32.2."""

    tanh_scale: float = 4.0
    """c in the tanh sparsity penalty."""

    pre_act_coefficient: float = 1e-4
    """lambda_P of the pre-activation penalty sum ReLU(theta_i - z_i) ||W_dec,i|| (0 = off): it
    revives latents whose threshold outgrew their inputs (synthetic benchmark, Adam: 0.32 -> 0.002
    dead). Under sign descent any lambda_P > 0 keeps every latent alive while it holds (1e-6 as 1e-4)."""

    pre_act_decay_fraction: float | None = 0.5
    """The pre-activation penalty falls linearly to 0 over this fraction of the run (None: held
    throughout, as Anthropic's). Latents form while it holds; then those that found nothing fall
    silent. MiniLM, 8192 latents, 488 steps of 4096: FVU 0.1273, 29% dead on held-out rows, against
    0.1447 / 0.1% held throughout, 0.1290 / 44% off (fractions 0.25 / 0.75: -0.4% / +7%); synthetic
    benchmark: 0.231 with 78% dead against 0.679 with none held throughout."""

    threshold_floor: float = 1e-6
    """Raw thresholds are clamped to at least this after each step (keeps theta > 0)."""

    kernel: kernels.Kernel = "auto"
    """Training kernel: 'dense' (the reference path), 'sparse' (decoder and backward over the active
    and threshold-window entries; sae/kernels.py; needs sparsity_loss='l0') or 'auto' (sparse at
    <= 10% active and d_sae >= 512 on CPU, 16384 on CUDA, 32768 under CUDA autocast)."""

    adam_beta1: float = 0.0
    """Adam's beta1 where Adam is chosen (preset('adam'), 'paper', 'tanh'): 0, as in the paper."""

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The Adam recipe that was the default before schedule-free sign descent.
        "adam": dict(ADAM_RECIPE, lr=3e-3, input_scaling="unit_mean_sq_norm", apply_b_dec_to_input=False,
                     bandwidth=0.001, threshold_init=0.001, l0_coefficient=0.01, target_l0_coefficient=10.0),
        # Rajamanoharan et al. 2024 / Gemma Scope, tuned for billions of tokens.
        "paper": dict(optimizer="adam", encoder_init_scale=1.0, **FIXED_LR, apply_b_dec_to_input=False,
                      l0_coefficient=0.01, target_l0_coefficient=10.0,
                      lr=7e-5, adam_beta1=0.0, adam_beta2=0.999, lr_warmup_steps=1000,
                      lr_decay_fraction=0.0, sparsity_warmup_steps=10_000, log_threshold=True,
                      threshold_init=0.001, bandwidth=0.001, input_scaling="unit_mean_sq_norm",
                      b_dec_init="zeros", pre_act_coefficient=0.0, calibrate_l0=False),
        # Anthropic's January 2025 variant (constants unverified, SPEC 1).
        "tanh": dict(optimizer="adam", encoder_init_scale=1.0, lr=3e-3, **FIXED_LR, lr_warmup_steps=100,
                     apply_b_dec_to_input=False, sparsity_loss="tanh", tanh_scale=4.0, pre_act_coefficient=3e-6,
                     pre_act_decay_fraction=None, input_scaling="sqrt_d_in_norm", bandwidth=2.0, threshold_init=0.1,
                     sparsity_warmup_steps=-1, lr_decay_fraction=0.2, grad_clip_norm=1.0,
                     normalize_decoder=False),
    }

    positive_fields: ClassVar[tuple[str, ...]] = ("bandwidth", "threshold_init", "threshold_lr_factor",
                                                  "pre_act_decay_fraction")

    def __post_init__(self) -> None:
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = self.d_out in (None, self.d_in) and not self.target_site
        super().__post_init__()
        for name in ("target_l0", "threshold_init_l0"):
            value = getattr(self, name)
            if value is not None and not 0 < value < self.d_sae:
                raise ValueError(f"{name} must lie in (0, d_sae={self.d_sae}), got {value}")
        if self.threshold_step not in ("auto", "rms", "sign", "signum"):
            raise ValueError(f"threshold_step must be 'auto', 'rms', 'sign' or 'signum', got {self.threshold_step!r}")
        if self.sparsity_loss not in ("l0", "tanh"):
            raise ValueError(f"sparsity_loss must be 'l0' or 'tanh', got {self.sparsity_loss!r}")
        if self.target_l0 is not None and self.sparsity_loss != "l0":
            raise ValueError("target_l0 needs sparsity_loss='l0'")
        kernels.check_kernel(self.kernel)
        if self.kernel == "sparse" and not self.sparse_supported:
            raise ValueError("kernel='sparse' needs sparsity_loss='l0'")

    @property
    def sparse_supported(self) -> bool:
        return self.sparsity_loss == "l0"


@register("jumprelu")
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    cfg: JumpReLUConfig
    supports_skip = True

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        initial = torch.full((cfg.d_sae,), float(cfg.threshold_init))
        if cfg.log_threshold:
            self.log_threshold = nn.Parameter(initial.log())
        else:
            self.threshold_raw = nn.Parameter(initial)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp() if self.cfg.log_threshold else self.threshold_raw

    @torch.no_grad()
    def set_threshold(self, values: Tensor) -> None:
        values = values.clamp_min(self.cfg.threshold_floor)
        if self.cfg.log_threshold:
            self.log_threshold.copy_(values.log())
        else:
            self.threshold_raw.copy_(values)

    def encode(self, x: Tensor) -> Tensor:
        return kept_above(self.pre_activation(x), self.threshold)

    def loss(self, x: Tensor, ctx: StepContext, target: Tensor | None = None) -> LossOutput:
        cfg = self.cfg
        target, skip = self.split_skip(x, x if target is None else target)
        threshold = self.threshold
        if cfg.sparse_supported and kernels.sparse_wanted(cfg.kernel, x.device, cfg.d_sae, None):
            out, pre = self._sparse_loss(x, threshold, target, ctx)
            if out is not None:
                return out.with_skip(skip)
        else:
            pre = self.pre_activation(x)
        acts = jumprelu(pre, threshold, cfg.bandwidth)
        recon = self.decode(acts)
        terms = {"mse": reconstruction_error(target, recon)}
        if cfg.sparsity_loss == "l0":
            sparsity = self._l0_penalty(step(pre, threshold, cfg.bandwidth).sum(-1).mean(), ctx)
        else:
            norms = self.W_dec.norm(dim=1)
            sparsity = cfg.l0_coefficient * torch.tanh(cfg.tanh_scale * acts.abs() * norms).sum(-1).mean()
        terms["sparsity"] = ctx.sparsity_scale * sparsity
        pre_act = self.pre_act_strength(ctx)
        if pre_act:
            terms["pre_act"] = pre_act * (torch.relu(threshold - pre) * self.W_dec.norm(dim=1)).sum(-1).mean()
        total = torch.stack(list(terms.values())).sum()
        return LossOutput(total, terms, acts, recon).with_skip(skip)

    def pre_act_strength(self, ctx: StepContext) -> float:
        """lambda_P at this point of the run: pre_act_coefficient, falling linearly to 0 at
        pre_act_decay_fraction of the run. The penalty sum_i ReLU(theta_i - z_i) ||W_dec,i|| pulls
        silent latents' pre-activations up to their thresholds."""
        cfg = self.cfg
        if cfg.pre_act_decay_fraction is None:
            return cfg.pre_act_coefficient
        return cfg.pre_act_coefficient * max(0.0, 1.0 - ctx.progress / cfg.pre_act_decay_fraction)

    def _l0_penalty(self, l0: Tensor, ctx: StepContext) -> Tensor:
        cfg = self.cfg
        if cfg.target_l0 is not None:
            if ctx.batch_mean is not None:  # the penalty is quadratic in the batch's L0: use the whole batch's
                l0 = ctx.batch_mean(l0)
            return cfg.target_l0_coefficient * (l0 / cfg.target_l0 - 1.0).pow(2)
        return cfg.l0_coefficient * l0

    def _sparse_loss(self, x: Tensor, threshold: Tensor, target: Tensor,
                     ctx: StepContext) -> tuple[LossOutput | None, Tensor | None]:
        """The same loss through sae/kernels.py: (output, None), or (None, the pre-activation)
        when 'auto' finds the batch too dense. Entries chosen on x_in @ W_enc (float32, b_enc added at
        the entries, its buffer then the dense feature_acts) or on bf16 pre-activations (sae/mixed.py)."""
        cfg = self.cfg
        self.check_input(x)
        flat_x = x.reshape(-1, cfg.d_in)
        x_in = flat_x - self.b_dec if cfg.apply_b_dec_to_input else flat_x
        pre_act = self.pre_act_strength(ctx)
        bf16 = mixed.wanted(ctx, x.device)
        entries, product = mixed.jumprelu_selection(x_in, self.W_enc, self.b_enc, threshold.detach(), cfg.bandwidth, bf16)
        z = None if product is None else product.detach()
        if cfg.kernel == "auto" and entries.rows.numel() > kernels.AUTO_MAX_DENSITY * x_in.shape[0] * cfg.d_sae:
            product = x_in @ self.W_enc if product is None else product
            return None, (product + self.b_enc).reshape(*x.shape[:-1], cfg.d_sae)
        recon, _, l0, acts, gap = kernels.sparse_sae(
            flat_x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, entries, theta=threshold, buffer=z,
            apply_b_dec_to_input=cfg.apply_b_dec_to_input, bandwidth=cfg.bandwidth,
            pre_act_gap=bool(pre_act), bf16_products=bf16)
        recon = recon.reshape(*target.shape[:-1], recon.shape[-1])
        terms = {"mse": reconstruction_error(target, recon),
                 "sparsity": ctx.sparsity_scale * self._l0_penalty(l0.mean(), ctx)}
        if pre_act:  # sum_b ReLU(theta_i - z_bi) per latent, from the kernel
            terms["pre_act"] = pre_act * (self.W_dec.norm(dim=1) * gap).sum() / x_in.shape[0]
        acts = acts.reshape(*x.shape[:-1], cfg.d_sae)
        return LossOutput(torch.stack(list(terms.values())).sum(), terms, acts, recon), None

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        super().init_from_data(x)
        l0 = self.cfg.threshold_init_l0 if self.cfg.threshold_init_l0 is not None else self.cfg.target_l0
        if l0 is None:
            return
        pre = self.pre_activation(x)
        rank = min(pre.shape[0], max(1, math.ceil((1.0 - l0 / self.cfg.d_sae) * pre.shape[0])))
        self.set_threshold(column_kth_smallest(pre, rank))

    @torch.no_grad()
    def unit_decoder_rows_exactly(self) -> None:
        # f_i * W_dec_i is unchanged when W_dec_i / n, and W_enc_i, b_enc_i, theta_i times n (n > 0)
        if not self.cfg.normalize_decoder:
            return
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        threshold = self.threshold * norms
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        self.set_threshold(threshold)

    def unaveraged_parameters(self, batch_size: int | None = None,
                              total_steps: int | None = None) -> dict[str, Any] | None:
        # the target-L0 penalty steers the latest thresholds; their average would miss the target
        cfg = self.cfg
        if cfg.target_l0 is None:
            return None
        step = cfg.threshold_step
        if step == "auto":
            enough = batch_size is not None and batch_size * cfg.target_l0 / cfg.d_sae >= SIGN_STEP_MIN_ACTIVE
            step = "sign" if enough else "rms"
        factor = cfg.threshold_lr_factor
        if factor is None:
            shrink = step == "sign" and total_steps and batch_size is not None and batch_size < SIGN_STEP_FULL_BATCH
            factor = min(1.0, math.sqrt(SIGN_STEP_REFERENCE_STEPS / total_steps)) if shrink else 1.0
        return {"params": [self.log_threshold if cfg.log_threshold else self.threshold_raw],
                "lr_factor": factor, "step": step}

    @torch.no_grad()
    def calibrate(self, x: Tensor, ctx: StepContext) -> dict[str, float] | None:
        """Every threshold times one factor so that the mean L0 on ``x`` is target_l0 (sae/calibrate.py)."""
        cfg = self.cfg
        if cfg.target_l0 is None or not cfg.calibrate_l0:
            return None
        flat = x.reshape(-1, cfg.d_in)
        factor, before = l0_factor(self.pre_activation, flat, self.threshold.detach().clone(), cfg.target_l0, ctx)
        self.set_threshold(self.threshold * factor)
        return {"l0_before": before, "l0_after": mean_l0(self.encode, flat, ctx, cfg.d_sae), "threshold_factor": factor}

    def after_step(self) -> None:
        if not self.cfg.log_threshold:
            with torch.no_grad():
                self.threshold_raw.clamp_(min=self.cfg.threshold_floor)

    def sparsity_coefficient(self) -> float | None:
        return self.cfg.target_l0_coefficient if self.cfg.target_l0 is not None else self.cfg.l0_coefficient

    @torch.no_grad()
    def fold_scaling(self, input_scale: float, output_scale: float | None = None) -> None:
        super().fold_scaling(input_scale, output_scale)
        self.set_threshold(self.threshold * input_scale)


def jumprelu_from_weights(W_enc: Tensor, W_dec: Tensor, b_enc: Tensor, b_dec: Tensor, threshold: Tensor,
                          **fields: Any) -> JumpReLUSAE:
    """An inference JumpReLU SAE holding exactly these weights (raw threshold, float32)."""
    d_in, d_sae = W_enc.shape
    if W_dec.shape[0] != d_sae or b_enc.shape != (d_sae,) or threshold.shape != (d_sae,) \
            or b_dec.shape != (W_dec.shape[1],):
        raise ValueError(
            f"inconsistent JumpReLU weight shapes: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
            f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}, threshold {tuple(threshold.shape)}")
    d_out = W_dec.shape[1]
    fields.setdefault("threshold_floor", 0.0)  # keep the given thresholds bit-exact (even 0)
    fields.setdefault("apply_b_dec_to_input", False)  # the weights given read raw x
    cfg = JumpReLUConfig(d_in=d_in, d_sae=d_sae, d_out=None if d_out == d_in else d_out, **fields)
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
        if cfg.log_threshold:
            sae.log_threshold.copy_(threshold.log())
        else:
            sae.threshold_raw.copy_(threshold)
    return sae
