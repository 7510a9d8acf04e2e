"""``jumpscope eval``: SAEs on held-out text, with the model in the loop.

For each SAE: the core metrics (L0, FVU, MSE, cosine, dead and >10%-frequency fractions, the
log10 feature-density histogram) on held-out activations, and the model's own measures with the
SAE spliced in (delta LM loss, KL, CE loss recovered against zero and mean ablation for causal
LMs; the embedding distance for encoders; see :mod:`jumpscope.evaluate.downstream`). Training,
sweeps and this command share :func:`evaluate_saes`, so their numbers are comparable.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..config_cli import positive
from ..errors import ConfigError
from ..evaluate.downstream import ABLATIONS, MAIN_MEASURE, spliced_measures
from ..models.harvest import harvest
from ..models.splice import check_sae_fits
from ..sae import SAE
from ..sae.metrics import StreamingMetrics, dead_label, dead_sample_warning
from ..safeio import write_text
from .activations import ActivationConfig, ActivationSource

log = logging.getLogger(__name__)
TOGETHER = "all together"


@dataclass
class EvalJobConfig:
    """Which SAEs to evaluate, on what, and where the results go."""

    saes: tuple[str, ...] = ()
    """SAE folders or files in any supported format (native, SAELens, sparsify, Gemma Scope params.npz),
    or hf://owner/name/path references."""

    model: str | None = None
    """The model to splice into; None: the model the SAEs were trained on (their config's 'model')."""

    site: str | None = None
    """Hook site for SAEs whose file does not record one (e.g. Gemma Scope params.npz)."""

    eval_tokens: int = 16_384
    """Held-out tokens to evaluate on (whole context windows; at least one)."""

    ablations: tuple[str, ...] = ABLATIONS
    """Ablations that CE loss recovered is measured against: zero, mean."""

    together: bool = False
    """Also splice all the SAEs in at once (they must sit at different sites)."""

    out: str = "eval.json"
    """JSON file for the results (a Markdown table goes beside it, same name, .md)."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        positive(self, "eval_tokens")
        unknown = [a for a in self.ablations if a not in ABLATIONS]
        if unknown:
            raise ConfigError(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)}")


def evaluation_windows(source: ActivationSource, eval_tokens: int) -> list:
    """Held-out batches of context windows (never trained on) covering about ``eval_tokens``."""
    per_batch = source.context_size * source.cfg.model_batch_size
    windows = list(islice(source.windows(evaluation=True), max(1, -(-eval_tokens // per_batch))))
    if not windows:
        raise ValueError("the corpus has no held-out context windows to evaluate on; use a larger corpus")
    return windows


def replaced_site(sae: SAE) -> str:
    """Where an SAE splices in: its own site, or a transcoder's output site."""
    return sae.cfg.target_site or sae.cfg.site


def evaluate_saes(source: ActivationSource, saes: Mapping[str, SAE], eval_tokens: int, *,
                  ablations: tuple[str, ...] = ABLATIONS, together: bool = False,
                  progress: bool = True) -> dict[str, dict[str, Any]]:
    """Held-out core metrics and spliced measures per SAE (keyed like ``saes``; each at its
    ``cfg.site``, a transcoder reading ``cfg.site`` and replacing ``cfg.target_site``)."""
    model = source.loaded.model
    for name, sae in saes.items():
        if not sae.cfg.site:
            raise ValueError(f"SAE {name!r} records no hook site; give one (--site)")
        check_sae_fits(sae, replaced_site(sae), model)
    windows = evaluation_windows(source, eval_tokens)
    metrics = {name: StreamingMetrics(sae.cfg.d_sae, sae.cfg.d_output) for name, sae in saes.items()}
    sites = sorted({site for sae in saes.values() for site in (sae.cfg.site, sae.cfg.target_site) if site})
    with torch.inference_mode():
        for chunk in harvest(model, windows, sites):
            for name, sae in saes.items():
                x = chunk[sae.cfg.site].to(sae.W_enc.device, sae.W_enc.dtype)
                target = chunk[replaced_site(sae)].to(x.device, x.dtype)
                latents = sae.encode(x)
                metrics[name].update(target, sae.predict(x, latents), latents)
    groups = {name: {replaced_site(sae): sae} for name, sae in saes.items()}
    replaced = sorted({replaced_site(sae) for sae in saes.values()})
    if together and len(saes) > 1:
        if len(replaced) < len(saes):
            raise ValueError("--together needs SAEs at different sites; several of these share a site")
        groups[TOGETHER] = {replaced_site(sae): sae for sae in saes.values()}
    measures = spliced_measures(model, source.loaded.kind, windows, groups, ablations=ablations, progress=progress)
    results = {}
    for name, sae in saes.items():
        where = sae.cfg.site if not sae.cfg.target_site else f"{sae.cfg.site} -> {sae.cfg.target_site}"
        results[name] = {"architecture": sae.cfg.architecture, "site": where, "d_in": sae.cfg.d_in,
                         "d_sae": sae.cfg.d_sae, **metrics[name].compute(), **measures[name]}
    if TOGETHER in measures:
        results[TOGETHER] = {"site": ", ".join(replaced), **measures[TOGETHER]}
    warn_small_dead_sample(results)
    return results


def warn_small_dead_sample(results: Mapping[str, Mapping[str, Any]]) -> None:
    """Log one warning when the held-out sample is too small for the dead fraction to mean much."""
    sizes = [row["n_tokens"] for row in results.values() if "n_tokens" in row]
    warning = dead_sample_warning(min(sizes)) if sizes else None
    if warning:
        log.warning(warning)


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def dead_column(results: Mapping[str, Mapping[str, Any]]) -> tuple[str, bool]:
    """The dead fraction's column title, naming the sample size (``dead on 16,384 tokens``) when
    every row shares it; else ``dead`` and True: each cell names its own."""
    sizes = {row["n_tokens"] for row in results.values() if "n_tokens" in row}
    return (dead_label(sizes.pop()), False) if len(sizes) == 1 else ("dead", True)


def results_table(results: Mapping[str, Mapping[str, Any]], kind: str) -> str:
    """A Markdown table: one row per SAE (and the together group)."""
    if kind == "causal_lm":
        extra = [("delta LM loss", "delta_lm_loss"), ("KL", "kl_div"), ("CE rec. (zero)", "ce_loss_recovered_zero"),
                 ("CE rec. (mean)", "ce_loss_recovered_mean")]
    else:
        extra = [("1 - cos(embedding)", "embedding_1_minus_cosine"),
                 ("recovered (zero)", "embedding_recovered_zero"), ("recovered (mean)", "embedding_recovered_mean")]
    dead_title, per_cell = dead_column(results)
    columns = [("SAE", None), ("site", "site"), ("d_sae", "d_sae"), ("L0", "l0"), ("FVU", "fvu"),
               (dead_title, "dead_fraction"), (">10%", "dense_fraction")] + extra
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for name, row in results.items():
        cells = [name] + [_cell(row.get(key), 1 if key == "l0" else 4) for _, key in columns[1:]]
        if per_cell and row.get("dead_fraction") is not None:
            cells[5] += f" ({dead_label(row['n_tokens'])})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_saes(paths: Sequence[str], site: str | None = None, allow_network: bool = False) -> dict[str, SAE]:
    """SAEs from folders, files or hf:// references, keyed by a readable name (the folder's name,
    made unique); ``site`` places SAEs whose file records none (or moves them)."""
    from .. import load

    if not paths:
        raise ValueError("give at least one SAE folder or file")
    saes: dict[str, SAE] = {}
    for path in paths:
        sae = load(path, allow_network=allow_network)
        if site and sae.cfg.target_site:
            raise ValueError(f"{path}: --site cannot move a transcoder (it reads {sae.cfg.site!r} and writes "
                             f"{sae.cfg.target_site!r})")
        if site:
            sae.cfg = dataclasses.replace(sae.cfg, site=site)
        if not sae.cfg.site:
            raise ValueError(f"{path}: the SAE records no hook site; give one with --site")
        name = Path(path).name if Path(path).is_dir() else Path(path).stem
        while name in saes:
            name = f"{name}'"
        saes[name] = sae.eval()
    return saes


def model_of(model: str | None, saes: Mapping[str, SAE]) -> str:
    """``model`` when given, else the one model the SAEs record they were trained on."""
    if model:
        return model
    recorded = {sae.cfg.model for sae in saes.values() if sae.cfg.model}
    if len(recorded) != 1:
        raise ValueError("the SAEs do not name one model they were trained on "
                         f"({', '.join(sorted(recorded)) or 'none recorded'}); give --model")
    return recorded.pop()


def run_eval(job: EvalJobConfig, activations: ActivationConfig | None = None) -> tuple[dict, str]:
    """Evaluate the job's SAEs; writes ``job.out`` (JSON) and the table beside it; returns both."""
    from ..train.trainer import resolve_device

    activations = activations or ActivationConfig()
    saes = load_saes(job.saes, job.site, activations.allow_network)
    activations = dataclasses.replace(activations, model=model_of(job.model, saes))
    device = resolve_device(job.device)
    sites = [site for sae in saes.values() for site in (sae.cfg.site, sae.cfg.target_site) if site]
    source = ActivationSource(activations, sites, device=str(device))
    saes = {name: sae.to(device) for name, sae in saes.items()}
    results = evaluate_saes(source, saes, job.eval_tokens, ablations=job.ablations, together=job.together,
                            progress=job.progress)
    table = results_table(results, source.loaded.kind)
    out = Path(job.out)
    payload = json.dumps({"job": dataclasses.asdict(job), "source": source.manifest(),
                          "main_measure": MAIN_MEASURE[source.loaded.kind], "results": results}, indent=2)
    write_text(out, payload)
    write_text(out.with_suffix(".md"), table)
    return results, table
