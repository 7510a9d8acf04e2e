"""``jumpscope sweep``: several sparsity levels of several architectures, one activation stream.

Every SAE of the sweep trains on the same batches (one model pass, or one read of the on-disk
cache, feeds them all), then each is evaluated on the same held-out text with the model in the
loop. The output folder holds one native SAE folder per point, ``sweep.json`` (every point's
settings and measures), PNG plots (L0 against the downstream measure, FVU and CE loss recovered,
one line per architecture; feature-density histograms per architecture) and ``report.md``, which
embeds them and tabulates the frontier at matched L0.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..activations import ActivationConfig
from ..errors import ConfigError, check_positive
from ..evaluate.downstream import MAIN_MEASURE
from ..evaluate.heldout import evaluate_saes
from ..evaluate.plots import write_plots
from ..evaluate.report import write_report
from ..sae import SAE, architectures, build, config_class
from ..safeio import write_text
from .common import TrainingJobConfig, check_sparsity_fits, job_record, start_training_job, train_on_activations

# Architectures that aim at an L0 take the sweep's L0 levels; the others an L1 coefficient.
L1_ARCHS = ("relu", "gated")


@dataclass
class SweepConfig(TrainingJobConfig):
    """Which architectures and sparsity levels to sweep, on what, and where the results go."""

    site: str | None = None
    """Hook site, e.g. layers.3.resid_post; None: the middle layer's resid_post."""

    archs: tuple[str, ...] = ("jumprelu", "topk", "batchtopk", "gated", "relu")
    """Architectures to train."""

    l0: tuple[float, ...] = (8.0, 16.0, 32.0, 64.0)
    """Requested L0 levels: JumpReLU's target L0, k for TopK and BatchTopK."""

    l1_coefficients: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    """L1 coefficients for ReLU and Gated SAEs, which cannot aim at an L0 (larger: sparser). Their
    measured L0 places them on the frontier."""

    width: int | None = None
    """Latents per SAE (d_sae), the same for every point; None: 8 x d_in."""

    # This job's own defaults; the help text is TrainingJobConfig's.
    out: str = "runs/sweep"

    def __post_init__(self) -> None:
        unknown = [a for a in self.archs if a not in architectures()]
        if unknown or not self.archs:
            raise ConfigError(f"unknown archs {unknown or '(none given)'}; choose from {', '.join(architectures())}")
        alone = [config_class(a) for a in self.archs if not config_class(a).trains_alone]
        if alone:
            raise ConfigError(f"{alone[0].own_job_hint}, not swept here")
        if any(level <= 0 for level in self.l0) or any(c < 0 for c in self.l1_coefficients):
            raise ConfigError("l0 levels must be positive and l1_coefficients non-negative")
        if any(a not in L1_ARCHS for a in self.archs) and not self.l0:
            raise ConfigError("give at least one --l0 level")
        if any(a in L1_ARCHS for a in self.archs) and not self.l1_coefficients:
            raise ConfigError("give at least one --l1-coefficients value for relu / gated")
        check_positive(self, "width", "tokens", "eval_tokens")
        check_sparsity_fits(self.width, l0=self.l0)


def _level_name(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def sweep_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """``{name, arch, knob, value, fields}`` of every SAE of the sweep, in a stable order."""
    points = []
    for arch in sweep.archs:
        names = {f.name for f in dataclasses.fields(config_class(arch))}
        if arch in L1_ARCHS or not ({"k", "target_l0"} & names):
            knob, values = "l1_coefficient", sweep.l1_coefficients
        else:
            knob, values = ("k" if "k" in names else "target_l0"), sweep.l0
        for value in values:
            value = int(value) if knob == "k" else float(value)
            points.append({"name": f"{arch}-{knob}_{_level_name(value)}", "arch": arch, "knob": knob,
                           "value": value, "fields": {knob: value}})
    return points


def build_sweep(sweep: SweepConfig, site: str, d_in: int, model_name: str,
                sae_fields: dict[str, Any] | None = None) -> dict[str, SAE]:
    saes = {}
    for point in sweep_points(sweep):
        own = {f.name for f in dataclasses.fields(config_class(point["arch"]))}
        extra = {key: value for key, value in (sae_fields or {}).items() if key in own}
        saes[point["name"]] = build(point["arch"], d_in=d_in, d_sae=sweep.width or 8 * d_in, site=site,
                                    model=model_name, **point["fields"], **extra)
    return saes


def run_sweep(sweep: SweepConfig, activations: ActivationConfig | None = None,
              sae_fields: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Train, evaluate, plot and report the sweep; returns the points and the report's text."""
    started = time.time()
    out = Path(sweep.out)
    start = start_training_job(sweep, activations, out)
    source = start.source([sweep.site] if sweep.site else [])
    site, d_in = next(iter(source.site_dims.items()))
    saes = build_sweep(sweep, site, d_in, source.loaded.name, sae_fields)
    trainer, trained = train_on_activations(saes, source, sweep, start)
    trained_seconds = time.time() - started
    main = trainer.processes.is_main  # under torchrun every process evaluates its share; the main one reports
    results = evaluate_saes(source, trained, sweep.eval_tokens, ablations=sweep.ablations,
                            progress=trainer.cfg.progress and main, cache_dir=out / "eval_cache")
    if not main:
        return [], ""
    training = trainer.final_summary()
    points = [{**point, "site": site, "held_out": results[point["name"]],
               "training_window": training.get(point["name"], {})} for point in sweep_points(sweep)]
    kind = source.loaded.kind
    payload = {"sweep": job_record(sweep), "source": source.manifest(), "kind": kind,
               "main_measure": MAIN_MEASURE[kind], "seconds": {"training": trained_seconds,
                                                              "total": time.time() - started},
               "points": points}
    write_text(out / "sweep.json", json.dumps(payload, indent=2))
    figures = write_plots(points, kind, out)
    report = write_report(payload, figures, out / "report.md")
    return points, report

