"""Held-out evaluation of SAEs, with the model in the loop.

For each SAE: the core metrics (L0, FVU, MSE, cosine, dead and >10%-frequency fractions, the
log10 feature-density histogram) on held-out activations, without the norm outliers training
drops (``outlier_norm_factor``; ``fvu_all_rows`` / ``mse_all_rows`` keep them, ``outlier_rows``
counts them), and the model's own measures with the
SAE spliced in (delta LM loss, KL, CE loss recovered against zero and mean ablation for causal
LMs; the embedding distance for encoders; see :mod:`jumpscope.evaluate.downstream`). Training,
sweeps, suites and ``jumpscope eval`` share :func:`evaluate_saes`, so their numbers are comparable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..activations import ActivationSource
from ..activations.source import inlier_mask
from ..models.harvest import harvest
from ..models.splice import check_sae_fits
from ..sae import SAE
from ..sae.metrics import StreamingMetrics, dead_label, dead_sample_warning
from .downstream import ABLATIONS, Share, parse_ablations, spliced_measures
from .passcache import PassCache, text_digest

__all__ = ["TOGETHER", "evaluation_windows", "replaced_site", "evaluate_saes", "warn_small_dead_sample",
           "dead_column", "results_table"]

log = logging.getLogger(__name__)
TOGETHER = "all together"


def evaluation_windows(source: ActivationSource, eval_tokens: int) -> list:
    """Held-out batches of context windows (never trained on): ``eval_tokens`` rounded up to whole
    windows (a partial window would change what its tokens see; at most one window more), the
    last batch cut to the windows needed. Logs one line when that is not exactly ``eval_tokens``."""
    wanted = max(1, -(-eval_tokens // source.context_size))
    batches, have = [], 0
    for batch in source.windows(split="heldout"):
        take = min(len(batch[0]), wanted - have)
        batches.append(tuple(part[:take] for part in batch))
        have += take
        if have == wanted:
            break
    if not batches:
        raise ValueError("the corpus has no held-out context windows to evaluate on; use a larger corpus")
    tokens = have * source.context_size
    if tokens != eval_tokens:
        why = "the corpus has no more held-out text" if have < wanted else "whole context windows"
        log.warning("evaluating on %s held-out tokens (%d window%s of %d), not --eval-tokens %s: %s",
                    f"{tokens:,}", have, "s" * (have != 1), source.context_size, f"{eval_tokens:,}", why)
    return batches


def replaced_site(sae: SAE) -> str:
    """Where an SAE splices in: its own site, or a transcoder's output site."""
    return sae.cfg.target_site or sae.cfg.site


def evaluate_saes(source: ActivationSource, saes: Mapping[str, SAE], eval_tokens: int, *,
                  ablations: Sequence[str] = ABLATIONS, together: bool = False, progress: bool = True,
                  cache_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Held-out core metrics and spliced measures per SAE (keyed like ``saes``; each at its
    ``cfg.site``, a transcoder reading ``cfg.site`` and replacing ``cfg.target_site``).
    ``ablations``: as :func:`.downstream.parse_ablations` takes them. ``cache_dir`` keeps the
    clean and ablation passes for later evaluations of the same text (see :mod:`.passcache`).
    Under torchrun (``source.processes``) every process must call this: each runs the model on its
    share of the held-out windows, the sums are added up over the processes, and every process
    returns the same results (one process's, to float rounding)."""
    ablations = parse_ablations(ablations)
    share = Share(source.processes)
    model = source.loaded.model
    for name, sae in saes.items():
        if not sae.cfg.site:
            raise ValueError(f"SAE {name!r} records no hook site; give one (--site)")
        check_sae_fits(sae, replaced_site(sae), model)
    windows = evaluation_windows(source, eval_tokens)
    metrics = {name: StreamingMetrics(sae.cfg.d_sae, sae.cfg.d_output, sae.W_enc.device) for name, sae in saes.items()}
    all_rows = {name: StreamingMetrics(sae.cfg.d_sae, sae.cfg.d_output, sae.W_enc.device) for name, sae in saes.items()}
    sites = sorted({site for sae in saes.values() for site in (sae.cfg.site, sae.cfg.target_site) if site})
    factor, outliers = source.cfg.outlier_norm_factor, 0
    with torch.inference_mode():
        for chunk in harvest(model, share.mine(windows), sites):
            keep = inlier_mask(chunk, factor) if factor else None
            outliers += 0 if keep is None else int((~keep).sum())
            for name, sae in saes.items():
                x = chunk[sae.cfg.site].to(sae.W_enc.device, sae.W_enc.dtype)
                target = chunk[replaced_site(sae)].to(x.device, x.dtype)
                latents = sae.encode(x)
                reconstruction = sae.predict(x, latents)
                all_rows[name].update(target, reconstruction, latents)
                if keep is None or bool(keep.all()):
                    metrics[name].update(target, reconstruction, latents)
                elif bool(keep.any()):
                    kept = keep.to(x.device)
                    metrics[name].update(target[kept], reconstruction[kept], latents[kept])
    if share.world_size > 1:
        for table in (metrics, all_rows):
            for name, m in table.items():
                m.load_state_dict(share.sum({key: value.cpu() for key, value in m.state_dict().items()}))
        outliers = share.sum(outliers)
    groups = {name: {replaced_site(sae): sae} for name, sae in saes.items()}
    replaced = sorted({replaced_site(sae) for sae in saes.values()})
    if together and len(saes) > 1:
        if len(replaced) < len(saes):
            raise ValueError("--together needs SAEs at different sites; several of these share a site")
        groups[TOGETHER] = {replaced_site(sae): sae for sae in saes.values()}
    cache = None
    if cache_dir is not None and share.world_size == 1:  # the processes' shares are different texts
        cache = PassCache(cache_dir, source.loaded.name, model, source.loaded.kind, text_digest(windows))
    measures = spliced_measures(model, source.loaded.kind, windows, groups, ablations=ablations, progress=progress,
                                cache=cache, share=share)
    results = {}
    for name, sae in saes.items():
        where = sae.cfg.site if not sae.cfg.target_site else f"{sae.cfg.site} -> {sae.cfg.target_site}"
        everything = all_rows[name].compute()
        results[name] = {"architecture": sae.cfg.architecture, "site": where, "d_in": sae.cfg.d_in,
                         "d_sae": sae.cfg.d_sae, **metrics[name].compute(), "outlier_rows": outliers,
                         "outlier_norm_factor": factor, "fvu_all_rows": everything["fvu"],
                         "mse_all_rows": everything["mse"], **measures[name]}
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
    # a measure no row has (an ablation not asked for) gets no column, and a note under the table
    missing = [title for title, key in extra if "recovered" in key and not any(key in row for row in results.values())]
    extra = [(title, key) for title, key in extra if title not in missing]
    dead_title, per_cell = dead_column(results)
    # with norm outliers left out of FVU (training drops them), the FVU over every row stands beside it
    all_rows = [("FVU (all rows)", "fvu_all_rows")] if any(row.get("outlier_rows") for row in results.values()) else []
    columns = [("SAE", None), ("site", "site"), ("d_sae", "d_sae"), ("L0", "l0"), ("FVU", "fvu"), *all_rows,
               (dead_title, "dead_fraction"), (">10%", "dense_fraction")] + extra
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + " --- |" * len(columns)]
    for name, row in results.items():
        cells = [name] + [_cell(row.get(key), 1 if key == "l0" else 4) for _, key in columns[1:]]
        if per_cell and row.get("dead_fraction") is not None:
            cells[5 + len(all_rows)] += f" ({dead_label(row['n_tokens'])})"
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\n{', '.join(missing)}: not computed (--ablations)\n" if missing else ""
    outliers = {(row["outlier_rows"], row["outlier_norm_factor"]) for row in results.values() if row.get("outlier_rows")}
    for count, factor in sorted(outliers):
        note += (f"\nFVU, L0 and dead leave out {count:,} held-out rows above {factor:g}x their batch's median norm, as "
                 "training does (--outlier-norm-factor); FVU (all rows) counts them\n")
    return "\n".join(lines) + "\n" + note
