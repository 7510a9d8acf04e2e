"""``jumpscope refit``: the decoder refit (:mod:`jumpscope.train.decoder_refit`) of SAEs already
trained, here or elsewhere (any format :func:`jumpscope.load` reads), on training rows of their
model; each refit SAE is written as a native folder, and both versions are evaluated on
held-out text, the model's own measure included, because a lower FVU need not mean a lower delta
LM loss (benchmarks/README.md, "Why a lower FVU can raise delta LM loss").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ..activations import ActivationConfig, ActivationSource
from ..device import resolve_device
from ..errors import check_positive
from ..evaluate.heldout import evaluate_saes, results_table
from ..formats.loading import load_saes, model_of
from ..formats.native import save_native
from ..safeio import write_text
from ..sae.base import SAE
from ..train.decoder_refit import refit_decoder
from ..train.refit_rows import memory_for_rows

log = logging.getLogger(__name__)
CHUNK_ROWS = 4096


@dataclass
class RefitJobConfig:
    """Which SAEs to refit, on how many training rows, and where the refit SAEs and results go."""

    saes: tuple[str, ...] = ()
    """SAE folders or files in any supported format (native, SAELens, sparsify, Gemma Scope params.npz),
    or hf://owner/name/path references."""

    model: str | None = None
    """The model whose activations the SAEs read; None: the model their config names."""

    site: str | None = None
    """Hook site for SAEs whose file does not record one (e.g. Gemma Scope params.npz)."""

    tokens: int = 524_288
    """Training rows (tokens) to refit on: the training windows (never the held-out ones), shuffled
    through the activation config's buffer, or read from its --cache. More rows, a better refit
    (MiniLM, width 8192: 131k / 262k / 500k rows -4% / -8% / -11% FVU); they are held in memory
    (at most half of what is free), 4 bytes per dimension per row."""

    ridge: float = 1e-2
    """Ridge toward each latent's current decoder row, as a fraction of the codes' mean squared
    activation: rarely firing and dead latents keep their rows."""

    out: str = "refit"
    """Folder for the refit SAEs (one native folder per SAE, named as loaded) and refit.json /
    refit.md (the evaluation of both versions)."""

    compare: bool = True
    """Evaluate each SAE as given and refit on held-out text (FVU, L0 and the model's own measure:
    delta LM loss for causal LMs, the sentence embedding's distance for encoders)."""

    eval_tokens: int = 16_384
    """Held-out tokens for the comparison."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    progress: bool = True
    """Show progress bars on stderr."""

    def __post_init__(self) -> None:
        check_positive(self, "tokens", "eval_tokens")
        if not self.ridge > 0:
            raise ValueError(f"ridge must be > 0, got {self.ridge}")


def affordable_rows(rows: int, widths: dict[str, int]) -> int:
    """``rows``, or fewer where half the free memory cannot hold that many float32 rows of ``widths``."""
    row_bytes = 4 * sum(widths.values())
    budget = memory_for_rows()
    if budget is None or rows * row_bytes <= budget:
        return rows
    fit = int(budget // row_bytes)
    if fit < CHUNK_ROWS:
        raise ValueError(f"{rows:,} rows of {sum(widths.values())} floats need {rows * row_bytes / 2**30:.1f} GiB and "
                         f"{2 * budget / 2**30:.1f} GiB is free: too little for a refit (free memory first)")
    log.warning("refit: %d rows need %.1f GiB and %.1f GiB is free: refitting on %d (half of it)", rows,
                rows * row_bytes / 2**30, 2 * budget / 2**30, fit)
    return fit


def training_rows(source: ActivationSource, sites: list[str], rows: int, progress: bool) -> dict[str, Tensor]:
    """``rows`` training rows of every site, on the host (the same tokens for every site)."""
    parts: dict[str, list[Tensor]] = {site: [] for site in sites}
    count = 0
    batch_rows = min(CHUNK_ROWS, rows, source.cfg.shuffle_buffer_tokens)  # a buffer holds whole batches
    for batch in source.training_stream(rows, batch_rows, progress=progress):
        for site in sites:
            parts[site].append(batch[site].detach().to("cpu", torch.float32))
        count += len(batch[sites[0]])
        if count >= rows:
            break
    if count == 0:
        raise ValueError("the text gave no training rows to refit on")
    if count < rows:
        log.warning("the text's training windows gave %d of the %d rows asked for: refitting on those", count, rows)
    return {site: torch.cat(chunks)[:rows] for site, chunks in parts.items()}


def _pairs(rows: dict[str, Tensor], sae: SAE, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    inputs = rows[sae.cfg.site]
    targets = rows[sae.cfg.target_site] if sae.cfg.target_site else inputs
    for start in range(0, len(inputs), CHUNK_ROWS):
        x = inputs[start:start + CHUNK_ROWS].to(device)
        yield x, (targets[start:start + CHUNK_ROWS].to(device) if sae.cfg.target_site else x)


def run_refit(job: RefitJobConfig, activations: ActivationConfig | None = None) -> dict:
    """Refit the job's SAEs, write them under ``job.out`` and (``job.compare``) evaluate both
    versions; returns ``{"refit": {name: note}, "results": {...}}``."""
    activations = activations or ActivationConfig()
    saes = load_saes(job.saes, job.site, activations.allow_network)
    out = Path(job.out)
    taken = [name for name in saes if (out / name).exists()]
    if taken:  # never overwrite: a refit SAE of an earlier run stays
        raise FileExistsError(f"{out / taken[0]} exists: choose another --out")
    activations = dataclasses.replace(activations, model=model_of(job.model, saes))
    device = resolve_device(job.device)
    sites = sorted({site for sae in saes.values() for site in (sae.cfg.site, sae.cfg.target_site) if site})
    if any(sae.cfg.site is None for sae in saes.values()):
        raise ValueError("an SAE records no site: give --site")
    source = ActivationSource(activations, sites, device=str(device))
    rows = training_rows(source, sites, affordable_rows(job.tokens, source.site_dims), job.progress)
    refit: dict[str, SAE] = {}
    notes: dict[str, dict] = {}
    for name, sae in saes.items():
        sae = sae.to(device)
        saes[name] = sae
        if not sae.refits_decoder:
            log.warning("%s: %s SAEs keep their decoder (it carries more than the reconstruction); skipped",
                        name, type(sae).__name__)
            continue
        new = copy.deepcopy(sae)
        note = refit_decoder(new, _pairs(rows, new, device), ridge=job.ridge, name=name)
        if not note:
            log.warning("%s: nothing was refit (no latent fired on the rows, or the system did not fit in memory)",
                        name)
            continue
        new.unit_decoder_rows_exactly()  # where the architecture compensates exactly (JumpReLU)
        notes[name] = note
        refit[name] = new
        save_native(new.cpu(), out / name, metadata={"decoder_refit": {**note, "ridge": job.ridge, "of": str(name)}})
        new.to(device)
        log.info("%s: refit on %d rows, FVU on them %.4f -> %.4f", name, int(note["refit_rows"]),
                 note["refit_fvu_before"], note["refit_fvu_after"])
    results = {}
    if job.compare and refit:
        both = {f"{name} (as given)": saes[name] for name in refit} | {f"{name} (refit)": sae for name, sae in refit.items()}
        results = evaluate_saes(source, both, job.eval_tokens, progress=job.progress, cache_dir=out / "eval_cache")
        write_text(out / "refit.md", results_table(results, source.loaded.kind))
    write_text(out / "refit.json", json.dumps({"job": dataclasses.asdict(job), "source": source.manifest(),
                                               "refit": notes, "results": results}, indent=2))
    return {"refit": notes, "results": results}
