"""``jumpscope jsae``: train a Jacobian SAE pair around one layer's MLP, then measure it.

Harvests ``layers.L.mlp_in`` and ``layers.L.mlp_out`` in one pass (or from ``--cache``), trains
the pair with the ordinary trainer (checkpoints, resume, torchrun), and writes the two SAEs as
ordinary TopK folders (``input/``, ``output/``) with ``summary.json`` / ``summary.md``: the
Jacobian's sparsity on held-out tokens (fraction of |J| above 0.005 / 0.01 / 0.02), and each SAE's
L0, FVU and the model's own measure with it spliced in. ``--randomize-model`` trains the same
pair on a randomly re-initialised copy of the model: the paper's control.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..activations import ActivationConfig, ActivationSource
from ..errors import ConfigError, check_positive
from ..evaluate.heldout import evaluate_saes, evaluation_windows, results_table
from ..formats import save as save_format
from ..jacobian import (JacobianSAE, JacobianSAEConfig, classify_response, jacobian_sparsity, latent_response,
                        mlp_function)
from ..models.harvest import harvest
from ..safeio import write_text
from ..sae.base import StepContext
from .common import TrainingJobConfig, check_sparsity_fits, job_record, start_training_job, train_on_activations


@dataclass
class JsaeJobConfig(TrainingJobConfig):
    """Which MLP, how sparse, and where the results go."""

    layer: int | None = None
    """The layer whose MLP the pair sits around; None: the middle layer."""

    k: int = 32
    """Active latents per token in each SAE."""

    width: int | None = None
    """Latents per SAE; None: 8 x d_model."""

    jacobian_coefficients: tuple[float, ...] = (1.0,)
    """lambda, the weight of mean |J|: one pair per value, all trained on the same batches (0: the
    same pair without the penalty). Several values also give the lambda sweep plot."""

    warmup_fraction: float = 0.05
    """lambda rises linearly from 0 over this fraction of the steps."""

    randomize_model: bool = False
    """Train on a randomly re-initialised copy of the model (the control)."""

    # This job's own defaults; the help text is TrainingJobConfig's.
    out: str = "runs/jsae"
    eval_tokens: int = 8_192

    def __post_init__(self) -> None:
        if not self.jacobian_coefficients or any(c < 0 for c in self.jacobian_coefficients):
            raise ConfigError("give one or more jacobian_coefficients >= 0")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        check_positive(self, "k", "width", "tokens", "eval_tokens")
        check_positive(self, "layer", zero_ok=True)
        check_sparsity_fits(self.width, k=self.k)


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
def held_out_mlp_inputs(source: ActivationSource, site: str, eval_tokens: int) -> list[Tensor]:
    """The MLP-input rows of the held-out batches, harvested once for every pair's measures."""
    return [chunk[site] for chunk in harvest(source.loaded.model, evaluation_windows(source, eval_tokens), [site])]


@torch.no_grad()
def held_out_jacobian_sparsity(pair: JacobianSAE, rows: list[Tensor], scale: float = 1.0) -> dict[str, float]:
    """Fraction of |J| entries above each threshold over held-out MLP inputs ``rows``. The folded
    pair gives J in raw units; ``scale`` = input scale / output scale turns it back into the units
    it was trained in (normalised activations), where the paper's thresholds apply."""
    fractions: dict[float, float] = {}
    count = 0
    for x in rows:
        x = x.to(pair.W_enc.device)
        J = pair.jacobian(x, StepContext())[0]
        for threshold, fraction in jacobian_sparsity(J * scale).items():
            fractions[threshold] = fractions.get(threshold, 0.0) + fraction * x.shape[0]
        count += x.shape[0]
    return {f"jacobian_above_{threshold:g}": total / count for threshold, total in fractions.items()}


@torch.no_grad()
def strongest_functions(pair: JacobianSAE, x: Tensor, count: int = 8, points: int = 25) -> list[dict[str, Any]]:
    """The ``count`` largest |J| entries over MLP inputs ``x``, each with the scalar function from
    its input latent to its output latent at that token (the input latent swept from 0 to twice
    its value, the others fixed; the output latent after ReLU), classified."""
    x = x.to(pair.W_enc.device)
    J, in_active, out_active, x_raw = pair.jacobian(x, StepContext())
    latents = pair.encode(x)
    output = pair.output
    bias = output.b_enc - output.b_dec @ output.W_enc if output.cfg.apply_b_dec_to_input else output.b_enc
    found = []
    for flat in J.abs().flatten().topk(min(count, J.numel())).indices.tolist():
        token, j, i = flat // (J.shape[1] * J.shape[2]), (flat // J.shape[2]) % J.shape[1], flat % J.shape[2]
        in_latent, out_latent = int(in_active[token, i]), int(out_active[token, j])
        base = float(latents[token, in_latent])
        values = torch.linspace(0.0, 2.0 * base, points)
        response = torch.relu(latent_response(pair.mlp, pair.W_dec, output.W_enc, x_raw[token], in_latent, out_latent,
                                              values, base_value=base, out_bias=bias))
        found.append({"token": token, "input_latent": in_latent, "output_latent": out_latent,
                      "jacobian": float(J[token, j, i]), "shape": classify_response(values, response)})
    return found


def sweep_plot(rows: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Reconstruction (FVU of each SAE) against the Jacobian's density, one point per lambda."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    dense = [row["jacobian"]["jacobian_above_0.01"] for row in rows.values()]
    for side, marker in (("input", "o"), ("output", "s")):
        ax.plot(dense, [row["held_out"][side]["fvu"] for row in rows.values()], marker=marker, label=f"{side} SAE")
    for name, row, x in zip(rows, rows.values(), dense):
        ax.annotate(name.replace("lambda_", "λ="), (x, row["held_out"]["output"]["fvu"]), fontsize=7)
    ax.set_xlabel("fraction of |J| > 0.01 (held out; lower is sparser)")
    ax.set_ylabel("FVU (held out)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_jsae(job: JsaeJobConfig, activations: ActivationConfig | None = None,
             sae_fields: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Train and measure the pairs; returns the summary and its Markdown report."""
    started = time.time()
    out = Path(job.out)
    start = start_training_job(job, activations, out / "training")
    loaded = start.loaded
    if job.randomize_model:
        randomize_weights(loaded.model)
    layer = job.layer if job.layer is not None else loaded.model.config.num_hidden_layers // 2
    mlp = mlp_function(loaded.model, layer)  # clear errors: layer out of range, not an MLP, not covered
    sites = (f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out")
    source = start.source(sites)
    d_in = source.site_dims[sites[0]]
    if source.site_dims[sites[1]] != d_in:
        raise ValueError(f"the MLP's input ({d_in}) and output ({source.site_dims[sites[1]]}) widths differ")
    warmup = math.ceil(job.warmup_fraction * job.tokens / job.trainer.batch_size)
    pairs = {}
    for coefficient in job.jacobian_coefficients:
        cfg = JacobianSAEConfig(**{"d_in": d_in, "d_sae": job.width or 8 * d_in, "k": job.k, "site": sites[0],
                                   "output_site": sites[1], "model": source.loaded.name,
                                   "jacobian_coefficient": coefficient, "sparsity_warmup_steps": warmup,
                                   **(sae_fields or {})})
        pairs[f"lambda_{coefficient:g}"] = JacobianSAE(cfg).attach_mlp(mlp)
    trainer, trained = train_on_activations(pairs, source, job, start, inputs={name: sites for name in pairs})
    if not trainer.processes.is_main:  # under torchrun one process measures and writes
        return {}, ""
    split = {}
    for name, pair in trained.items():
        pair.attach_mlp(mlp)
        for side, sae in zip(("input", "output"), pair.split()):
            save_format(sae, out / name / side, format="native")
            split[f"{name}/{side}"] = sae
    results = evaluate_saes(source, split, job.eval_tokens, ablations=job.ablations, progress=trainer.cfg.progress,
                            cache_dir=out / "eval_cache")
    held_out = held_out_mlp_inputs(source, sites[0], job.eval_tokens)
    rows = {}
    for name, pair in trained.items():
        scale = trainer.input_scales[name] / trainer.output_scales[name]
        rows[name] = {"jacobian_coefficient": pair.cfg.jacobian_coefficient,
                      "jacobian": held_out_jacobian_sparsity(pair, held_out, scale),
                      "held_out": {side: results[f"{name}/{side}"] for side in ("input", "output")},
                      "strongest_functions": strongest_functions(pair, held_out[0])}
    title = (f"{source.loaded.name} layer {layer} ({mlp.kind} MLP, {mlp.activation})"
             f"{' (randomised model)' if job.randomize_model else ''}")
    if len(rows) > 1:
        sweep_plot(rows, out / "lambda_sweep.png", f"Jacobian SAE lambda sweep: {title}")
    summary = {"job": job_record(job), "source": source.manifest(), "layer": layer, "mlp": mlp.kind,
               "activation": mlp.activation, "pairs": rows, "training_window": trainer.final_summary(),
               "seconds": time.time() - started}
    lines = [f"# Jacobian SAE pairs: {title}", "", f"k {job.k}, d_sae {next(iter(pairs.values())).cfg.d_sae}, "
             f"{job.tokens:,} tokens, held-out measures on {results[next(iter(split))]['n_tokens']:,} tokens", "",
             "| lambda | |J| > 0.005 | > 0.01 | > 0.02 | FVU in | FVU out | L0 in | L0 out | strongest |J| shapes |",
             "|" + " --- |" * 9]
    for name, row in rows.items():
        shapes = [f["shape"] for f in row["strongest_functions"]]
        counts = ", ".join(f"{shapes.count(kind)} {kind}" for kind in ("linear", "jumprelu-like", "other")
                           if kind in shapes)
        held = row["held_out"]
        lines.append(f"| {row['jacobian_coefficient']:g} | " + " | ".join(f"{v:.4f}" for v in row["jacobian"].values())
                     + f" | {held['input']['fvu']:.4f} | {held['output']['fvu']:.4f} | {held['input']['l0']:.1f} | "
                     f"{held['output']['l0']:.1f} | {counts} |")
    table = "\n".join(lines) + "\n\n" + results_table(results, source.loaded.kind)
    if len(rows) > 1:
        table += "\n![lambda sweep](lambda_sweep.png)\n"
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_text(out / "summary.md", table)
    return summary, table
