"""``jumpscope train``: text in, trained SAEs out, with a held-out evaluation.

One SAE per requested site, all fed by the same forward passes. The output folder holds one
native SAE folder per site, ``train_log.jsonl``, the resumable checkpoint, ``summary.json`` and
``summary.md`` (L0, FVU, dead fraction and the model's own downstream measure on held-out text).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from ..evaluate.downstream import downstream_each
from ..models.harvest import harvest
from ..sae import SAE, build, config_class
from ..sae.metrics import StreamingMetrics
from ..train import Trainer, TrainerConfig
from ..train.trainer import resolve_device
from .activations import ActivationConfig, ActivationSource

log = logging.getLogger(__name__)
DEFAULT_L0 = 32


@dataclass
class TrainJobConfig:
    """What to train and where to put it."""

    site: tuple[str, ...] = ()
    """Hook sites, e.g. layers.3.resid_post (one SAE each); empty: the middle layer's resid_post."""

    arch: str = "jumprelu"
    """SAE architecture: jumprelu, relu, gated, topk, batchtopk."""

    width: int | None = None
    """Number of latents (d_sae); None: 8 x d_in."""

    target_l0: float | None = None
    """Requested L0 (JumpReLU target, or k for TopK / BatchTopK). Default when no other sparsity
    option is given: 32."""

    l0_coefficient: float | None = None
    """Sparsity coefficient instead of a target (JumpReLU lambda, or the L1 coefficient of ReLU /
    Gated)."""

    k: int | None = None
    """Active latents per token for TopK / BatchTopK (same as --target-l0 for them)."""

    preset: str | None = None
    """A named recipe of the architecture (e.g. jumprelu 'paper' or 'tanh')."""

    tokens: int = 300_000
    """Activation vectors to train on."""

    out: str = "runs/train"
    """Output folder."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    resume: bool = False
    """Continue the run in --out from its last checkpoint (a finished run is only re-evaluated;
    with no checkpoint the run starts fresh)."""

    eval_tokens: int = 16_384
    """Held-out tokens for the final summary (metrics and the downstream measure)."""


def sparsity_fields(cls: type, job: TrainJobConfig) -> dict[str, Any]:
    """Map the generic sparsity options onto the fields an architecture has."""
    names = {f.name for f in dataclasses.fields(cls)}
    k = job.k if job.k is not None else (int(job.target_l0) if job.target_l0 is not None else None)
    if "k" in names:
        if job.l0_coefficient is not None:
            raise ValueError(f"{cls.architecture} is controlled by --k / --target-l0, not --l0-coefficient")
        return {"k": k if k is not None else DEFAULT_L0}
    if job.k is not None:
        raise ValueError(f"{cls.architecture} has no k; use --target-l0 or --l0-coefficient")
    coefficient = "l0_coefficient" if "l0_coefficient" in names else "l1_coefficient"
    if job.l0_coefficient is not None:
        return {coefficient: job.l0_coefficient}
    if "target_l0" in names:
        return {"target_l0": job.target_l0 if job.target_l0 is not None else DEFAULT_L0}
    if job.target_l0 is not None:
        raise ValueError(f"{cls.architecture} cannot aim at an L0 directly: use --l0-coefficient "
                         "(or jumprelu / topk / batchtopk for a target L0)")
    return {}


def build_saes(job: TrainJobConfig, source: ActivationSource, sae_fields: dict[str, Any]) -> dict[str, SAE]:
    cls = config_class(job.arch)
    saes = {}
    for site, d_in in source.site_dims.items():
        fields = {"d_in": d_in, "d_sae": job.width or 8 * d_in, "site": site, "model": source.loaded.name,
                  **sparsity_fields(cls, job), **sae_fields}
        cfg = cls.preset(job.preset, **fields) if job.preset else cls.from_dict(fields)
        saes[site] = build(cfg)
    return saes


def evaluate_saes(source: ActivationSource, saes: dict[str, SAE], eval_tokens: int) -> dict[str, dict[str, Any]]:
    """Held-out L0 / FVU / dead fraction per SAE, and the downstream measure with each spliced in."""
    metrics = {site: StreamingMetrics(sae.cfg.d_sae, sae.cfg.d_output) for site, sae in saes.items()}
    windows = list(islice(source.windows(evaluation=True), max(1, eval_tokens // (
        source.context_size * source.cfg.model_batch_size))))
    if not windows:
        raise ValueError("the corpus has no held-out documents to evaluate on; use a larger corpus")
    with torch.inference_mode():
        for chunk in harvest(source.loaded.model, windows, list(saes)):
            for site, sae in saes.items():
                x = chunk[site].to(sae.W_enc.device)
                acts = sae.encode(x)
                metrics[site].update(x, sae.decode(acts), acts)
    measures = downstream_each(source.loaded.model, source.loaded.kind, windows,
                               {site: {site: sae} for site, sae in saes.items()})
    return {site: {**metrics[site].compute(), **measures[site]} for site in saes}


def write_summary(out: Path, job: TrainJobConfig, source: ActivationSource, results: dict[str, dict],
                  training: dict[str, dict], seconds: float) -> str:
    measure = "delta_lm_loss" if source.loaded.kind == "causal_lm" else "embedding_1_minus_cosine"
    lines = [f"# {job.arch} SAEs on {source.loaded.name}", "",
             f"corpus {source.corpus.name}, {job.tokens:,} training tokens, held-out evaluation on "
             f"{next(iter(results.values()))['n_tokens']:,} tokens, {seconds:.0f} s", "",
             f"| site | d_sae | L0 | FVU | dead fraction | {measure} |", "| --- | --- | --- | --- | --- | --- |"]
    for site, row in results.items():
        lines.append(f"| {site} | {row['d_sae']} | {row['l0']:.1f} | {row['fvu']:.4f} | "
                     f"{row['dead_fraction']:.3f} | {row[measure]:.4f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"job": dataclasses.asdict(job), "source": source.manifest(),
                                                  "seconds": seconds, "held_out": results,
                                                  "training_window": training}, indent=2))
    return text


def run_train(job: TrainJobConfig, activations: ActivationConfig | None = None,
              trainer_fields: dict[str, Any] | None = None, sae_fields: dict[str, Any] | None = None
              ) -> tuple[dict[str, SAE], str]:
    """Run the whole job; returns the trained SAEs (keyed by site) and the summary table."""
    started = time.time()
    activations = activations or ActivationConfig()
    device = str(resolve_device(job.device))
    source = ActivationSource(activations, job.site, device=device)
    saes = build_saes(job, source, sae_fields or {})
    out = Path(job.out)
    trainer_cfg = TrainerConfig(**{**(trainer_fields or {}), "total_tokens": job.tokens, "out_dir": str(out),
                                   "device": device})
    trainer = Trainer(saes, trainer_cfg)
    trained = trainer.fit(source.training_stream(job.tokens, trainer_cfg.batch_size), resume=job.resume)
    results = evaluate_saes(source, trained, job.eval_tokens)
    for site, sae in trained.items():
        results[site]["d_sae"] = sae.cfg.d_sae
    return trained, write_summary(out, job, source, results, trainer.final_summary(), time.time() - started)
