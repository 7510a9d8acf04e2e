"""``jumpscope jsae``: train Jacobian SAE pairs around one layer's MLP, then measure them.

Harvests ``layers.L.mlp_in`` and ``layers.L.mlp_out`` in one pass (or from ``--cache``), trains one
pair per lambda with the ordinary trainer (checkpoints, resume, torchrun), and writes the two SAEs
as ordinary TopK folders (``lambda_X/input/``, ``lambda_X/output/``) with ``summary.json`` /
``summary.md``: the Jacobian's sparsity on held-out tokens at the true MLP input and at the input
SAE's reconstruction (fraction of |J| above 0.005 / 0.01 / 0.015 / 0.02 and mean |J|, beside the
out/in scale ratio that raw |J| scales with), and each SAE's L0, FVU and the model's own measure
with it spliced in. ``--controls none init redraw`` repeats it on randomly re-initialised copies of
the model (the paper's control and ours, :mod:`jumpscope.models.randomize`), one folder each, and
draws the trade-off curves of all of them on one plot.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..activations import ActivationConfig, ActivationSource
from ..errors import ConfigError, check_positive
from ..evaluate.heldout import evaluate_saes, evaluation_windows, results_table
from ..formats import save as save_format
from ..jacobian import (JacobianSAE, JacobianSAEConfig, classify_response, jacobian_sparsity, latent_response,
                        mlp_function)
from ..jacobian.report import DOWNSTREAM, sweep_plot, tradeoff_plot
from ..models.harvest import harvest
from ..models.randomize import CONTROLS, Control, randomize_model
from ..safeio import write_text
from ..sae.base import StepContext
from .common import (JobStart, TrainingJobConfig, check_sparsity_fits, job_record, start_training_job,
                     train_on_activations)

THRESHOLDS = (0.005, 0.01, 0.015, 0.02)


@dataclass
class JsaeJobConfig(TrainingJobConfig):
    """Which MLP, how sparse, which recipe and controls, and where the results go."""

    layer: int | None = None
    """The layer whose MLP the pairs sit around; None: the middle layer."""

    k: int = 32
    """Active latents per token in each SAE."""

    width: int | None = None
    """Latents per SAE; None: 8 x d_model."""

    jacobian_coefficients: tuple[float, ...] = ()
    """lambda, the weight of mean |J|: one pair per value, all trained on the same batches (0: the
    same pair without the penalty; several values give the trade-off curves). None given: one pair
    at the authors' rule 0.5 k^2 / d_model."""

    recipe: Literal["paper", "normalised"] = "paper"
    """'paper': the authors' reference settings (JacobianSAEConfig.preset('paper'): raw units,
    per-element MSE, Adam 5e-4, no AuxK, no b_dec subtraction, encoder = decoder^T); 'normalised':
    both sides scaled to E||x||^2 = 1 on our TopK recipe (AuxK, b_dec subtracted, summed MSE)."""

    jacobian_point: Literal["input", "reconstruction"] = "input"
    """Where the penalty linearises the MLP: the true input, detached (the reference's), or the
    input SAE's reconstruction (moves with training). The measures report both points."""

    controls: tuple[Control, ...] = ("none",)
    """Models to train on: 'none' (the model itself), 'init' (every weight matrix redrawn from
    N(0, 0.8/sqrt(d_model)), the reference's TransformerLens control), 'redraw' (each matrix at its
    own std). Several: one folder each under --out and trade-off curves of all on one plot."""

    warmup_fraction: float = 0.05
    """lambda rises linearly from 0 over this fraction of the steps."""

    # This job's own defaults; the help text is TrainingJobConfig's.
    out: str = "runs/jsae"
    eval_tokens: int = 8_192

    def __post_init__(self) -> None:
        if any(c < 0 for c in self.jacobian_coefficients):
            raise ConfigError("every jacobian_coefficient must be >= 0")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if not self.controls or any(c not in CONTROLS for c in self.controls):
            raise ConfigError(f"controls must be one or more of {', '.join(CONTROLS)}, got {' '.join(self.controls)}")
        if len(set(self.controls)) != len(self.controls):
            raise ConfigError(f"controls repeat a model: {' '.join(self.controls)}")
        if self.recipe not in ("paper", "normalised"):
            raise ConfigError(f"recipe must be 'paper' or 'normalised', got {self.recipe!r}")
        check_positive(self, "k", "width", "tokens", "eval_tokens")
        check_positive(self, "layer", zero_ok=True)
        check_sparsity_fits(self.width, k=self.k)


@torch.no_grad()
def held_out_mlp_inputs(source: ActivationSource, site: str, eval_tokens: int) -> list[Tensor]:
    """The MLP-input rows of the held-out batches (framing tokens such as BOS are never rows),
    harvested once for every pair's measures."""
    return [chunk[site] for chunk in harvest(source.loaded.model, evaluation_windows(source, eval_tokens), [site])]


@torch.no_grad()
def held_out_jacobian(pair: JacobianSAE, rows: list[Tensor], scale: float = 1.0) -> dict[str, Any]:
    """|J| measures over held-out MLP inputs ``rows`` (raw units) at both linearisation points:
    ``{"at_input": {...}, "at_reconstruction": {...}, "out_in_scale_ratio": b / a}``, each point
    with the fraction of entries above every threshold and ``mean_abs``. The folded pair gives J
    in raw units; ``scale`` (input scale / output scale) turns it into the units it trained in.
    b / a: the RMS norm of the MLP output over that of its input (raw |J| scales with it)."""
    sums: dict[str, dict[str, float]] = {"at_input": {}, "at_reconstruction": {}}
    count, in_sq, out_sq = 0, 0.0, 0.0
    for x in rows:
        x = x.to(pair.W_enc.device)
        in_sq += float(x.double().pow(2).sum())
        out_sq += float(pair.mlp.to(x.dtype)(x).double().pow(2).sum())
        for point in ("input", "reconstruction"):
            J = pair.jacobian(x, StepContext(), point=point)[0] * scale
            measures = {f"above_{t:g}": f for t, f in jacobian_sparsity(J, THRESHOLDS).items()}
            measures["mean_abs"] = float(J.abs().mean())
            into = sums[f"at_{point}"]
            for name, value in measures.items():
                into[name] = into.get(name, 0.0) + value * x.shape[0]
        count += x.shape[0]
    result: dict[str, Any] = {point: {name: total / count for name, total in values.items()}
                              for point, values in sums.items()}
    result["out_in_scale_ratio"] = math.sqrt(out_sq / max(in_sq, 1e-30))
    return result


@torch.no_grad()
def strongest_functions(pair: JacobianSAE, x: Tensor, count: int = 8, points: int = 25) -> list[dict[str, Any]]:
    """The ``count`` largest |J| entries over MLP inputs ``x``, each with the scalar function from
    its input latent to its output latent at that token (the input latent swept from 0 to twice
    its value, the others fixed; the output latent after ReLU), classified."""
    x = x.to(pair.W_enc.device)
    # at the reconstruction, where every latent has its own value: each curve passes through it
    J, in_active, out_active, x_hat = pair.jacobian(x, StepContext(), point="reconstruction")
    latents = pair.encode(x)
    output = pair.output
    bias = output.b_enc - output.b_dec @ output.W_enc if output.cfg.apply_b_dec_to_input else output.b_enc
    found = []
    for flat in J.abs().flatten().topk(min(count, J.numel())).indices.tolist():
        token, j, i = flat // (J.shape[1] * J.shape[2]), (flat // J.shape[2]) % J.shape[1], flat % J.shape[2]
        in_latent, out_latent = int(in_active[token, i]), int(out_active[token, j])
        base = float(latents[token, in_latent])
        values = torch.linspace(0.0, 2.0 * base, points)
        response = torch.relu(latent_response(pair.mlp, pair.W_dec, output.W_enc, x_hat[token], in_latent, out_latent,
                                              values, base_value=base, out_bias=bias))
        found.append({"token": token, "input_latent": in_latent, "output_latent": out_latent,
                      "jacobian": float(J[token, j, i]), "shape": classify_response(values, response)})
    return found


def _control_start(start: JobStart, control: str, out: Path, activations: ActivationConfig) -> JobStart:
    """The job start of one model: the loaded model itself, or a re-initialised copy of it, with
    its own training folder."""
    loaded = start.loaded
    if control != "none":
        if activations.cache:
            raise ConfigError(f"--controls {control}: an activation cache holds the trained model's activations; "
                              "drop --cache to train on a randomised model")
        loaded = dataclasses.replace(loaded, model=randomize_model(copy.deepcopy(loaded.model), control))
    return dataclasses.replace(start, loaded=loaded,
                               trainer=dataclasses.replace(start.trainer, out_dir=str(out / "training")))


def _pair_config(job: JsaeJobConfig, d_in: int, sites: tuple[str, str], model: str, coefficient: float | None,
                 warmup: int, sae_fields: dict[str, Any]) -> JacobianSAEConfig:
    fields = {"d_in": d_in, "d_sae": job.width or 8 * d_in, "k": job.k, "site": sites[0], "output_site": sites[1],
              "model": model, "jacobian_coefficient": coefficient, "sparsity_warmup_steps": warmup,
              "jacobian_point": job.jacobian_point, **sae_fields}
    return JacobianSAEConfig.preset("paper", **fields) if job.recipe == "paper" else JacobianSAEConfig(**fields)


def _run_model(job: JsaeJobConfig, start: JobStart, control: str, out: Path, layer: int,
               sae_fields: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """Train and measure every lambda's pair on one model (``control``); None on non-main processes."""
    mlp = mlp_function(start.loaded.model, layer)  # clear errors: layer out of range, not an MLP, not covered
    sites = (f"layers.{layer}.mlp_in", f"layers.{layer}.mlp_out")
    source = start.source(sites)
    d_in = source.site_dims[sites[0]]
    if source.site_dims[sites[1]] != d_in:
        raise ValueError(f"the MLP's input ({d_in}) and output ({source.site_dims[sites[1]]}) widths differ")
    warmup = math.ceil(job.warmup_fraction * job.tokens / job.trainer.batch_size)
    pairs = {}
    for coefficient in job.jacobian_coefficients or (None,):
        cfg = _pair_config(job, d_in, sites, source.loaded.name, coefficient, warmup, sae_fields)
        pairs[f"lambda_{cfg.jacobian_coefficient:g}"] = JacobianSAE(cfg).attach_mlp(mlp)
    trainer, trained = train_on_activations(pairs, source, job, start, inputs={name: sites for name in pairs})
    main = trainer.processes.is_main  # under torchrun every process evaluates its share; the main one measures
    split = {}
    for name, pair in trained.items():
        pair.attach_mlp(mlp)
        split.update({f"{name}/{side}": sae for side, sae in zip(("input", "output"), pair.split())})
    results = evaluate_saes(source, split, job.eval_tokens, ablations=job.ablations,
                            progress=trainer.cfg.progress and main, cache_dir=out / "eval_cache")
    if not main:
        return None
    for key, sae in split.items():
        save_format(sae, out / key, format="native")
    held_out = held_out_mlp_inputs(source, sites[0], job.eval_tokens)
    rows = {}
    for name, pair in trained.items():
        scale = trainer.input_scales[name] / trainer.output_scales[name]
        rows[name] = {"jacobian_coefficient": pair.cfg.jacobian_coefficient,
                      "jacobian": held_out_jacobian(pair, held_out, scale),
                      "held_out": {side: results[f"{name}/{side}"] for side in ("input", "output")},
                      "strongest_functions": strongest_functions(pair, held_out[0])}
    units = "raw" if job.recipe == "paper" else "normalised"
    title = (f"{source.loaded.name} layer {layer} ({mlp.kind} MLP, {mlp.activation})"
             f"{'' if control == 'none' else f', control {control!r}'}")
    if len(rows) > 1:
        sweep_plot(rows, out / "lambda_sweep.png", f"Jacobian SAE lambda sweep: {title}")
    summary = {"job": job_record(job), "control": control, "source": source.manifest(), "layer": layer,
               "mlp": mlp.kind, "activation": mlp.activation, "units": units, "kind": source.loaded.kind,
               "pairs": rows, "training_window": trainer.final_summary()}
    n_tokens = results[next(iter(split))]["n_tokens"]
    table = (f"# Jacobian SAE pairs: {title}\n\nrecipe {job.recipe} (J in {units} units), k {job.k}, d_sae "
             f"{next(iter(pairs.values())).cfg.d_sae}, {job.tokens:,} tokens, penalty at the {job.jacobian_point}; "
             f"held-out measures on {n_tokens:,} tokens\n\n" + jacobian_table({control: rows}) + "\n"
             + results_table(results, source.loaded.kind))
    if len(rows) > 1:
        table += "\n![lambda sweep](lambda_sweep.png)\n"
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_text(out / "summary.md", table)
    return summary, table


def jacobian_table(curves: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: per model and lambda, |J| at the true input and at the reconstruction, the out/in
    scale ratio beside them, each SAE's FVU and the shapes of the strongest functions."""
    lines = ["| model | lambda | out/in scale | |J|>0.005 | >0.01 | >0.02 | mean|J| | at recon.: >0.01 | mean|J| "
             "| FVU in | FVU out | L0 in | strongest |J| shapes |", "|" + " --- |" * 13]
    for control, rows in curves.items():
        for row in rows.values():
            shapes = [f["shape"] for f in row["strongest_functions"]]
            counts = ", ".join(f"{shapes.count(kind)} {kind}" for kind in ("linear", "jumprelu-like", "other")
                               if kind in shapes)
            at_x, at_hat, held = row["jacobian"]["at_input"], row["jacobian"]["at_reconstruction"], row["held_out"]
            lines.append(f"| {control} | {row['jacobian_coefficient']:g} | {row['jacobian']['out_in_scale_ratio']:.3f} | "
                         f"{at_x['above_0.005']:.4f} | {at_x['above_0.01']:.4f} | {at_x['above_0.02']:.4f} | "
                         f"{at_x['mean_abs']:.4g} | {at_hat['above_0.01']:.4f} | {at_hat['mean_abs']:.4g} | "
                         f"{held['input']['fvu']:.4f} | {held['output']['fvu']:.4f} | {held['input']['l0']:.1f} | "
                         f"{counts} |")
    return "\n".join(lines) + "\n"


def run_jsae(job: JsaeJobConfig, activations: ActivationConfig | None = None,
             sae_fields: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """Train and measure the pairs on every model of ``job.controls``; returns the summary and its
    Markdown report (one model: written to --out; several: one folder each, plus the trade-off
    curves and a combined report in --out)."""
    started = time.time()
    out = Path(job.out)
    activations = activations or ActivationConfig()
    several = len(job.controls) > 1
    start = start_training_job(job, activations, out / "training")
    layer = job.layer if job.layer is not None else start.loaded.model.config.num_hidden_layers // 2
    mlp_function(start.loaded.model, layer)  # a bad layer fails before any training
    reports: dict[str, tuple[dict[str, Any], str]] = {}
    for control in job.controls:
        folder = out / control if several else out
        done = _run_model(job, _control_start(start, control, folder, activations), control, folder, layer,
                          sae_fields or {})
        if done is None:
            return {}, ""
        reports[control] = done
    if not several:
        summary, table = reports[job.controls[0]]
        summary["seconds"] = time.time() - started
        write_text(out / "summary.json", json.dumps(summary, indent=2))
        return summary, table
    curves = {control: summary["pairs"] for control, (summary, _) in reports.items()}
    first = next(iter(reports.values()))[0]
    title = f"{Path(start.loaded.name).name} layer {layer} ({first['mlp']} MLP, {first['activation']}), J in {first['units']} units"
    tradeoff_plot(curves, out / "tradeoff.png", f"Jacobian SAEs, trained vs random: {title}", first["kind"])
    key = DOWNSTREAM.get(first["kind"], DOWNSTREAM["causal_lm"])[0]
    summary = {"job": job_record(job), "layer": layer, "units": first["units"], "downstream_key": key,
               "controls": {control: summary for control, (summary, _) in reports.items()},
               "seconds": time.time() - started}
    table = (f"# Jacobian SAEs, trained vs random: {title}\n\n" + jacobian_table(curves)
             + "\n![trade-off curves](tradeoff.png)\n\n"
             + "\n".join(f"- {control}: [{control}/summary.md]({control}/summary.md)" for control in reports) + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    write_text(out / "summary.md", table)
    return summary, table
