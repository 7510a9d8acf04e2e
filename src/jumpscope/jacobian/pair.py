"""A Jacobian SAE pair (SPEC 5): TopK SAEs on an MLP's input and output, trained together with a
penalty on the Jacobian between their active latents, so each output latent is computed from few
input latents.

The pair is one module the ordinary trainer trains as a transcoder-shaped SAE: it reads the
``mlp_in`` batch entry and takes ``mlp_out`` as its target (the MLP output of the ORIGINAL input,
which the output SAE reconstructs). Its loss is MSE_in + MSE_out (+ each TopK's AuxK) +
lambda * mean |J|; lambda warms up with the trainer's sparsity warm-up.

Where the MLP is linearised (``jacobian_point``) follows the authors' reference code by default:
at the TRUE MLP input x, a point nothing trains (no gradient flows through it), with the output
active set from the output SAE's encoding of MLP(x) (the target). The penalty's gradient then
reaches what the reference's does: the input SAE's decoder and the output SAE's encoder.
``"reconstruction"`` linearises at x_hat = decode(encode(x)) instead, undetached: the penalty then
also moves the input SAE's encoder, through the MLP's second derivative, and can lower |J| by
moving the point rather than by sparsifying the computation (kept to compare the two).
:meth:`JacobianSAE.split` gives the two ordinary TopK SAEs (for files, evaluation, splicing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..sae.base import InputScaling, LossOutput, StepContext
from ..sae.recipes import FIXED_LR
from ..sae.registry import register
from ..sae.topk import TopKSAE, TopKSAEConfig
from .jacobian import jacobian_active
from .mlp import MLPFunction


@dataclass
class JacobianSAEConfig(TopKSAEConfig):
    """A Jacobian SAE pair around one MLP: TopK input and output SAEs of the same width and k."""

    k: int = 32
    """Active latents per token in each SAE (the paper's 32)."""

    lr: float = 5e-3
    """Sign-descent step size at lr_reference_width latents: the pair keeps sparsify's width rule
    (its recipe was measured with it, on E||x||^2 = 1 inputs where TopK's run-length and input-width
    rules were not measured)."""

    lr_reference_width: int | None = 16_384
    """lr * sqrt(16384 / d_sae)."""

    lr_reference_steps: int | None = None
    """No run-length rule."""

    lr_reference_d_in: int | None = None
    """No input-width rule."""

    jacobian_coefficient: float | None = None
    """lambda, the weight of mean |J| (warmed up by sparsity_warmup_steps); None: the authors' rule
    0.5 k^2 / d_in (1 for Pythia-70m's k 32 at d_model 512, 0.5 for Pythia-410m's 1024)."""

    jacobian_point: Literal["input", "reconstruction"] = "input"
    """Where the MLP is linearised: at the true input x with no gradient through it (the
    reference's), or at the input SAE's reconstruction, undetached (see the module docstring)."""

    mse_per_element: bool = False
    """Average each SAE's squared error over its d_in features (torch's mse_loss, as the reference
    does) instead of summing them (our SAEs' convention, SPEC 1); sets the MSEs' weight against lambda."""

    input_scaling: InputScaling = "unit_mean_sq_norm"
    """E||x||^2 = 1 on both sides, so the two MSEs are on the scale of FVU and lambda weighs mean|J|
    in normalised units (preset 'paper': raw activations, the reference's units)."""

    output_site: str | None = None
    """The MLP output site the output SAE reads (e.g. layers.3.mlp_out; ``site`` is the mlp_in)."""

    # The pair needs the MLP it sits around, which only its own job attaches.
    trains_alone: ClassVar[bool] = False
    own_job_hint: ClassVar[str] = "a Jacobian SAE pair trains around an MLP with `jumpscope jsae`"

    nonnegative_fields: ClassVar[tuple[str, ...]] = TopKSAEConfig.nonnegative_fields + ("jacobian_coefficient",)

    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # Farnik et al. 2025's reference code (jacobian-saes, runners/train.py and
        # training_sae_pair.py): raw activations, per-element MSE, no AuxK, b_dec neither
        # subtracted nor data-initialised, encoder = decoder^T, Adam 5e-4 with a 1% warm-up and a
        # 20% decay, J at the true MLP input. (The reference trains on BOS rows too; ours never do.)
        "paper": dict(optimizer="adam", lr=5e-4, **FIXED_LR, adam_beta1=0.9, adam_beta2=0.999,
                      lr_warmup_steps=0.01, lr_decay_fraction=0.2, encoder_init_scale=1.0, input_scaling="none",
                      mse_per_element=True, aux_coefficient=0.0, apply_b_dec_to_input=False, b_dec_init="zeros",
                      jacobian_point="input"),
    }

    def __post_init__(self) -> None:
        if self.jacobian_coefficient is None and isinstance(self.k, int) and isinstance(self.d_in, int) and self.d_in > 0:
            self.jacobian_coefficient = 0.5 * self.k * self.k / self.d_in
        super().__post_init__()
        if self.jacobian_point not in ("input", "reconstruction"):
            raise ValueError(f"jacobian_point must be 'input' or 'reconstruction', got {self.jacobian_point!r}")


@register("jsae")
class JacobianSAE(TopKSAE):
    """The input SAE is this module's own TopK weights; ``output`` is the output SAE."""

    config_class = JacobianSAEConfig
    cfg: JacobianSAEConfig
    refits_decoder = False  # W_dec reconstructs mlp_in (not the target) and carries the Jacobian penalty

    def __init__(self, cfg: JacobianSAEConfig):
        super().__init__(cfg)
        if cfg.d_out is not None or cfg.target_site is not None:
            raise ValueError("a Jacobian SAE pair's input SAE reconstructs its input: leave d_out and target_site "
                             "unset (the MLP output is output_site, of the same width)")
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TopKSAEConfig)}
        self.output = TopKSAE(TopKSAEConfig(**{**fields, "seed": cfg.seed + 1, "site": cfg.output_site}))
        self.register_buffer("output_initialised", torch.zeros((), dtype=torch.bool))
        self.mlp: MLPFunction | None = None

    def attach_mlp(self, mlp: MLPFunction) -> "JacobianSAE":
        """The MLP the pair sits around (frozen tensors; not saved with the pair)."""
        if mlp.d_model != self.cfg.d_in:
            raise ValueError(f"the MLP reads width {mlp.d_model}, the pair's input SAE d_in={self.cfg.d_in}")
        self.mlp = mlp.to(self.W_enc.device)
        return self

    def _apply(self, fn, recurse=True):
        """``.to(device)`` and the like move the attached MLP with the pair (it is no submodule)."""
        super()._apply(fn, recurse)
        if getattr(self, "mlp", None) is not None:
            self.mlp = self.mlp.to(self.W_enc.device)
        return self

    def jacobian(self, x: Tensor, ctx: StepContext, *, point: str | None = None,
                 target: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(J [N, k, k] in the units of ``ctx``, the active input and output latents [N, k] it is
        taken over, and the MLP input it linearises at, raw units [N, d_in]).

        ``point``: "input" (the true input ``x``, detached) or "reconstruction" (default: the
        config's ``jacobian_point``). ``target``: the output SAE's input MLP(x) when the caller has
        it (training); otherwise computed. Input active set: the input SAE's top k on ``x``; output
        active set: the output SAE's top k on the MLP output at that point."""
        if self.mlp is None:
            raise RuntimeError("the Jacobian SAE has no MLP attached: call attach_mlp(mlp_function(model, layer))")
        point = point or self.cfg.jacobian_point
        if point not in ("input", "reconstruction"):
            raise ValueError(f"point must be 'input' or 'reconstruction', got {point!r}")
        with torch.no_grad():
            in_active = self.pre_activation(x).topk(self.cfg.k, dim=-1).indices
        mlp = self.mlp.to(x.dtype)
        if point == "input":
            x_raw = (x * ctx.input_scale).detach()
            y_scaled = target.detach() if target is not None else mlp(x_raw) / ctx.output_scale
        else:
            x_raw = self.decode(self.encode(x)) * ctx.input_scale
            y_scaled = mlp(x_raw) / ctx.output_scale
        with torch.no_grad():
            out_active = self.output.pre_activation(y_scaled).topk(self.cfg.k, dim=-1).indices
        J = jacobian_active(self.mlp, self.W_dec, x_raw, in_active, self.output.W_enc, out_active,
                            ctx.input_scale, ctx.output_scale)
        return J, in_active, out_active, x_raw

    def loss(self, x: Tensor, ctx: StepContext, target: Tensor | None = None) -> LossOutput:
        if target is None:
            raise ValueError("a Jacobian SAE trains on (mlp_in, mlp_out) pairs: route a target to it")
        if not bool(self.output_initialised):
            with torch.no_grad():  # the output SAE's data-dependent init, on its first batch
                self.output.init_from_data(target)
                self.output_initialised.fill_(True)
        inner = super().loss(x, ctx)
        outer = self.output.loss(target, dataclasses.replace(ctx, dead_mask=None))
        per_feature = 1.0 / self.cfg.d_in if self.cfg.mse_per_element else 1.0
        J = self.jacobian(x, ctx, target=target)[0]
        jacobian = ctx.sparsity_scale * self.cfg.jacobian_coefficient * J.abs().mean()
        terms = {"mse_in": inner.terms["mse"] * per_feature, "mse": outer.terms["mse"] * per_feature,
                 "jacobian": jacobian}
        terms.update({f"{name}_in": value for name, value in inner.terms.items() if name != "mse"})
        terms.update({f"{name}_out": value for name, value in outer.terms.items() if name != "mse"})
        # The trainer's metrics describe the output side (the target); dead latents the input side.
        return LossOutput(sum(terms.values()), terms, inner.acts, outer.reconstruction)

    # -- what the trainer does to every SAE, done to both ----------------------------------------
    def remove_parallel_decoder_grad(self) -> None:
        super().remove_parallel_decoder_grad()
        self.output.remove_parallel_decoder_grad()

    def normalize_decoder_rows(self) -> None:
        super().normalize_decoder_rows()
        self.output.normalize_decoder_rows()

    def after_step(self) -> None:
        super().after_step()
        self.output.after_step()

    @torch.no_grad()
    def fold_scaling(self, input_scale: float, output_scale: float | None = None) -> None:
        super().fold_scaling(input_scale)
        self.output.fold_scaling(input_scale if output_scale is None else output_scale)

    def split(self) -> tuple[TopKSAE, TopKSAE]:
        """The input and output SAEs as ordinary TopK SAEs (copies) at their own sites."""
        fields = {f.name: getattr(self.cfg, f.name) for f in dataclasses.fields(TopKSAEConfig)}
        inner = TopKSAE(TopKSAEConfig(**fields))
        state = {key: value for key, value in self.state_dict().items()
                 if not key.startswith("output.") and key != "output_initialised"}
        inner.load_state_dict(state)
        outer = TopKSAE(self.output.cfg)
        outer.load_state_dict(self.output.state_dict())
        return inner.to(self.W_enc.device), outer.to(self.W_enc.device)
