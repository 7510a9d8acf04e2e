"""A Jacobian SAE pair (SPEC 5): TopK SAEs on an MLP's input and output, trained together with a
penalty on the Jacobian between their active latents, so each output latent is computed from few
input latents.

The pair is one module the ordinary trainer trains as a transcoder-shaped SAE: it reads the
``mlp_in`` batch entry and takes ``mlp_out`` as its target (the MLP output of the ORIGINAL input,
which the output SAE reconstructs). Its loss is MSE_in + MSE_out (+ each TopK's AuxK) +
lambda * mean |J|, the Jacobian taken from the input SAE's active latents, through its decoder,
the MLP (at the reconstructed input, in raw units) and the output SAE's encoder, to the output
SAE's active latents on that MLP output; lambda warms up with the trainer's sparsity warm-up.
:meth:`JacobianSAE.split` gives the two ordinary TopK SAEs (for files, evaluation, splicing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..sae.base import InputScaling, LossOutput, StepContext
from ..sae.registry import register
from ..sae.topk import TopKSAE, TopKSAEConfig
from .jacobian import jacobian_active
from .mlp import MLPFunction


@dataclass
class JacobianSAEConfig(TopKSAEConfig):
    """A Jacobian SAE pair around one MLP: TopK input and output SAEs of the same width and k."""

    k: int = 32
    """Active latents per token in each SAE (the paper's 32)."""

    jacobian_coefficient: float = 1.0
    """lambda, the weight of mean |J| (about 1 for small models; warmed up by sparsity_warmup_steps)."""

    input_scaling: InputScaling = "unit_mean_sq_norm"
    """E||x||^2 = 1 on both sides, so the two MSEs are on the scale of FVU and lambda ~ 1 weighs
    mean|J| against them as the paper intends (TopK's default sqrt(d_in) norm makes the MSEs d_in
    times larger and the Jacobian term negligible)."""

    output_site: str | None = None
    """The MLP output site the output SAE reads (e.g. layers.3.mlp_out; ``site`` is the mlp_in)."""

    # The pair needs the MLP it sits around, which only its own job attaches.
    trains_alone: ClassVar[bool] = False
    own_job_hint: ClassVar[str] = "a Jacobian SAE pair trains around an MLP with `jumpscope jsae`"

    nonnegative_fields: ClassVar[tuple[str, ...]] = TopKSAEConfig.nonnegative_fields + ("jacobian_coefficient",)


@register("jsae")
class JacobianSAE(TopKSAE):
    """The input SAE is this module's own TopK weights; ``output`` is the output SAE."""

    config_class = JacobianSAEConfig
    cfg: JacobianSAEConfig

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

    def jacobian(self, x: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(J [N, k, k] at inputs ``x`` in the units of ``ctx``, the active input and output latents
        [N, k] it is taken over, and the reconstructed MLP input in raw units [N, d_in])."""
        if self.mlp is None:
            raise RuntimeError("the Jacobian SAE has no MLP attached: call attach_mlp(mlp_function(model, layer))")
        latents = self.encode(x)
        in_active = latents.topk(self.cfg.k, dim=-1).indices
        x_raw = self.decode(latents) * ctx.input_scale
        y_scaled = self.mlp.to(x_raw.dtype)(x_raw) / ctx.output_scale
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
        J = self.jacobian(x, ctx)[0]
        jacobian = ctx.sparsity_scale * self.cfg.jacobian_coefficient * J.abs().mean()
        terms = {"mse_in": inner.terms["mse"], "mse": outer.terms["mse"], "jacobian": jacobian}
        terms.update({f"{name}_in": value for name, value in inner.terms.items() if name != "mse"})
        terms.update({f"{name}_out": value for name, value in outer.terms.items() if name != "mse"})
        # The trainer's metrics describe the output side (the target); dead latents the input side.
        return LossOutput(inner.loss + outer.loss + jacobian, terms, inner.feature_acts, outer.reconstruction)

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
