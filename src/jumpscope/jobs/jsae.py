"""``jumpscope jsae``: train a Jacobian SAE pair around one layer's MLP, then measure it.

Harvests ``layers.L.mlp_in`` and ``layers.L.mlp_out`` in one pass (or from ``--cache``), trains
the pair with the ordinary trainer (checkpoints, resume, torchrun), and writes the two SAEs as
ordinary TopK folders (``input/``, ``output/``) with ``summary.json`` / ``summary.md``: the
Jacobian's sparsity on held-out tokens (fraction of |J| above 0.005 / 0.01 / 0.02), and each SAE's
L0, FVU and the model's own measure with it spliced in. ``--randomize-model`` trains the same
pair on a randomly re-initialised copy of the model: the paper's control.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..formats import save as save_format
from ..jacobian import JacobianSAE, JacobianSAEConfig, jacobian_sparsity, mlp_function
from ..models.harvest import harvest
from ..models.loading import load_model
from ..safeio import write_text
from ..sae.base import StepContext
from ..train import Trainer, TrainerConfig
from ..train.trainer import resolve_device
from .activations import ActivationConfig, ActivationSource
from .evaluate import evaluate_saes, evaluation_windows, results_table


@dataclass
class JsaeJobConfig:
    """Which MLP, how sparse, and where the results go."""

    layer: int | None = None
    """The layer whose MLP the pair sits around; None: the middle layer."""

    k: int = 32
    """Active latents per token in each SAE."""

    width: int | None = None
    """Latents per SAE; None: 8 x d_model."""

    jacobian_coefficient: float = 1.0
    """lambda, the weight of mean |J| (0 trains the same pair without the Jacobian penalty)."""

    warmup_fraction: float = 0.05
    """lambda rises linearly from 0 over this fraction of the steps."""

    randomize_model: bool = False
    """Train on a randomly re-initialised copy of the model (the control)."""

    tokens: int = 300_000
    """Activation vectors to train on."""

    out: str = "runs/jsae"
    """Output folder."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    resume: bool = False
    """Continue the run in --out from its last checkpoint."""

    eval_tokens: int = 8_192
    """Held-out tokens for the Jacobian sparsity and the spliced measures."""

    def __post_init__(self) -> None:
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every matrix from a normal with that matrix's own standard deviation (vectors such as
    norm weights and biases are kept), so activations keep their scale but no learned structure."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        if parameter.dim() >= 2:
            std = parameter.float().std().item()
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@torch.no_grad()
def held_out_jacobian_sparsity(pair: JacobianSAE, source: ActivationSource, eval_tokens: int,
                               scale: float = 1.0) -> dict[str, float]:
    """Fraction of |J| entries above each threshold over held-out tokens. The folded pair gives J in
    raw units; ``scale`` = input scale / output scale turns it back into the units it was trained
    in (normalised activations), where the paper's thresholds apply."""
    site = pair.cfg.site
    fractions: dict[float, float] = {}
    count = 0
    for chunk in harvest(source.loaded.model, evaluation_windows(source, eval_tokens), [site]):
        x = chunk[site].to(pair.W_enc.device)
        J, _ = pair.jacobian(x, StepContext())
        for threshold, fraction in jacobian_sparsity(J * scale).items():
            fractions[threshold] = fractions.get(threshold, 0.0) + fraction * x.shape[0]
        count += x.shape[0]
    return {f"jacobian_above_{threshold:g}": total / count for threshold, total in fractions.items()}


def run_jsae(job: JsaeJobConfig, activations: ActivationConfig | None = None,
             trainer_fields: dict[str, Any] | None = None, sae_fields: dict[str, Any] | None = None
             ) -> tuple[dict[str, Any], str]:
    """Train and measure the pair; returns the summary and its Markdown table."""
    started = time.time()
    activations = activations or ActivationConfig()
    device = str(resolve_device(job.device))
    loaded = load_model(activations.model, dtype=activations.dtype, device=device,
                        allow_network=activations.allow_network)
    if job.randomize_model:
        randomize_weights(loaded.model)
    layer = job.layer if job.layer is not None else loaded.model.config.num_hidden_layers // 2
    mlp = mlp_function(loaded.model, layer)  # clear errors: layer out of range, not an MLP, not covered
    sites = (f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out")
    source = ActivationSource(activations, sites, device=device, loaded=loaded)
    d_in = source.site_dims[sites[0]]
    if source.site_dims[sites[1]] != d_in:
        raise ValueError(f"the MLP's input ({d_in}) and output ({source.site_dims[sites[1]]}) widths differ")
    trainer_fields = dict(trainer_fields or {})
    batch_size = trainer_fields.get("batch_size", TrainerConfig.batch_size)
    warmup = math.ceil(job.warmup_fraction * job.tokens / batch_size)
    cfg = JacobianSAEConfig(**{"d_in": d_in, "d_sae": job.width or 8 * d_in, "k": job.k, "site": sites[0],
                               "output_site": sites[1], "model": source.loaded.name,
                               "jacobian_coefficient": job.jacobian_coefficient,
                               "sparsity_warmup_steps": warmup, **(sae_fields or {})})
    pair = JacobianSAE(cfg).attach_mlp(mlp)
    out = Path(job.out)
    trainer_cfg = TrainerConfig(**{**trainer_fields, "total_tokens": job.tokens, "out_dir": str(out / "training"),
                                   "device": device})
    trainer = Trainer({"pair": pair}, trainer_cfg, inputs={"pair": sites})
    trained = trainer.fit(source.training_stream(job.tokens, trainer_cfg.batch_size), resume=job.resume)["pair"]
    if not trainer.dist.is_main:  # under torchrun one process measures and writes
        return {}, ""
    trained.attach_mlp(mlp)
    inner, outer = trained.split()
    for name, sae in (("input", inner), ("output", outer)):
        save_format(sae, out / name, format="native")
    results = evaluate_saes(source, {"input": inner, "output": outer}, job.eval_tokens,
                            progress=trainer_cfg.progress)
    sparsity = held_out_jacobian_sparsity(trained, source, job.eval_tokens,
                                          trainer.input_scales["pair"] / trainer.output_scales["pair"])
    summary = {"job": dataclasses.asdict(job), "source": source.manifest(), "layer": layer, "mlp": mlp.kind,
               "activation": mlp.activation, "jacobian": sparsity, "held_out": results,
               "training_window": trainer.final_summary(), "seconds": time.time() - started}
    cells = " / ".join(f"{value:.4f}" for value in sparsity.values())
    table = (f"# Jacobian SAE pair, {source.loaded.name} layer {layer} ({mlp.kind} MLP, {mlp.activation})"
             f"{' (randomised model)' if job.randomize_model else ''}\n\n"
             f"lambda {job.jacobian_coefficient:g}, k {job.k}, d_sae {cfg.d_sae}, {job.tokens:,} tokens\n\n"
             f"fraction of |J| above 0.005 / 0.01 / 0.02 on held-out tokens (normalised units): {cells}\n\n"
             + results_table(results, source.loaded.kind))
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_text(out / "summary.md", table)
    return summary, table

