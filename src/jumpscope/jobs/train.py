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
from pathlib import Path
from typing import Any

from ..activations import ActivationConfig, ActivationSource, default_site
from ..errors import ConfigError, check_positive
from ..evaluate.downstream import MAIN_MEASURE
from ..evaluate.heldout import evaluate_saes, results_table
from ..sae import SAE, build, config_class
from ..safeio import write_text
from .common import (TrainingJobConfig, check_arch, check_sparsity_fits, job_record, start_training_job,
                     train_on_activations)

log = logging.getLogger(__name__)
DEFAULT_L0 = 32


@dataclass
class TrainJobConfig(TrainingJobConfig):
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

    transcoder: bool = False
    """Train transcoders: each --site must be an MLP input (layers.L.mlp_in, default: the middle
    layer's), and its transcoder predicts the same layer's mlp_out (jumprelu or topk)."""

    skip_connection: bool = False
    """Give transcoders a learned linear skip connection (x @ W_skip added to the prediction)."""

    def __post_init__(self) -> None:
        check_arch(self.arch, "train")
        check_positive(self, "width", "tokens", "eval_tokens", "target_l0", "k")
        check_positive(self, "l0_coefficient", zero_ok=True)
        check_sparsity_fits(self.width, target_l0=self.target_l0, k=self.k)
        cls = config_class(self.arch)
        if self.preset is not None and self.preset not in cls.presets:
            raise ConfigError(f"unknown {self.arch} preset {self.preset!r}; known: "
                              f"{', '.join(sorted(cls.presets)) or 'none'}")
        sparsity_fields(cls, self)  # a sparsity option the architecture has no use for
        if self.skip_connection and not self.transcoder:
            raise ConfigError("--skip-connection is for transcoders (--transcoder)")
        if self.transcoder:
            for site in self.site:
                transcoder_target(site)


def sparsity_fields(cls: type, job: TrainJobConfig) -> dict[str, Any]:
    """Map the generic sparsity options onto the fields an architecture has."""
    names = {f.name for f in dataclasses.fields(cls)}
    k = job.k if job.k is not None else (int(job.target_l0) if job.target_l0 is not None else None)
    if "k" in names:
        if job.l0_coefficient is not None:
            raise ConfigError(f"{cls.architecture} is controlled by --k / --target-l0, not --l0-coefficient")
        return {"k": k if k is not None else DEFAULT_L0}
    if job.k is not None:
        raise ConfigError(f"{cls.architecture} has no k; use --target-l0 or --l0-coefficient")
    coefficient = "l0_coefficient" if "l0_coefficient" in names else "l1_coefficient"
    if job.l0_coefficient is not None:
        return {coefficient: job.l0_coefficient}
    if "target_l0" in names:
        return {"target_l0": job.target_l0 if job.target_l0 is not None else DEFAULT_L0}
    if job.target_l0 is not None:
        raise ConfigError(f"{cls.architecture} cannot aim at an L0 directly: use --l0-coefficient "
                          "(or jumprelu / topk / batchtopk for a target L0)")
    return {}


def transcoder_target(site: str) -> str:
    """The output site a transcoder reading ``site`` predicts (layers.L.mlp_in -> layers.L.mlp_out)."""
    if not site.startswith("layers.") or not site.endswith(".mlp_in"):
        raise ConfigError(f"a transcoder reads an MLP's input: give --site layers.L.mlp_in, not {site!r}")
    return site[: -len("mlp_in")] + "mlp_out"


def job_sites(job: TrainJobConfig, loaded: Any) -> tuple[list[str], dict[str, str]]:
    """(sites to harvest, {input site: target site} for transcoders)."""
    inputs = list(job.site) or ([default_site(loaded).replace("resid_post", "mlp_in")] if job.transcoder else [])
    targets = {site: transcoder_target(site) for site in inputs} if job.transcoder else {}
    return inputs + [t for t in targets.values() if t not in inputs], targets


def build_saes(job: TrainJobConfig, source: ActivationSource, sae_fields: dict[str, Any],
               targets: dict[str, str] | None = None) -> dict[str, SAE]:
    """One SAE per harvested site (a transcoder per input site when ``targets`` maps them)."""
    cls = config_class(job.arch)
    saes = {}
    for site, d_in in source.site_dims.items():
        if targets and site not in targets:
            continue  # a transcoder's target site: harvested, not trained on
        fields = {"d_in": d_in, "d_sae": job.width or 8 * d_in, "site": site, "model": source.loaded.name,
                  **sparsity_fields(cls, job)}
        if targets:
            fields.update(target_site=targets[site], d_out=source.site_dims[targets[site]],
                          apply_b_dec_to_input=False, skip_connection=job.skip_connection)
        fields.update(sae_fields)
        cfg = cls.preset(job.preset, **fields) if job.preset else cls.from_dict(fields)
        saes[f"{site}-transcoder" if targets else site] = build(cfg)
    return saes


def write_summary(out: Path, job: TrainJobConfig, source: ActivationSource, results: dict[str, dict],
                  training: dict[str, dict], seconds: float, trainer: dict[str, Any] | None = None) -> str:
    text = (f"# {job.arch} SAEs on {source.loaded.name}\n\ncorpus {source.corpus.name}, {job.tokens:,} training "
            f"tokens, held-out evaluation on {next(iter(results.values()))['n_tokens']:,} tokens, {seconds:.0f} s\n\n"
            + results_table(results, source.loaded.kind))
    write_text(out / "summary.md", text)
    write_text(out / "summary.json", json.dumps({"job": job_record(job), "source": source.manifest(),
                                                 "main_measure": MAIN_MEASURE[source.loaded.kind], "seconds": seconds,
                                                 "trainer": trainer, "held_out": results, "training_window": training},
                                                indent=2, default=str))
    return text


def run_train(job: TrainJobConfig, activations: ActivationConfig | None = None,
              sae_fields: dict[str, Any] | None = None) -> tuple[dict[str, SAE], str]:
    """Run the whole job; returns the trained SAEs (keyed by site) and the summary table."""
    started = time.time()
    out = Path(job.out)
    start = start_training_job(job, activations, out)
    sites, targets = job_sites(job, start.loaded)
    source = start.source(sites)
    saes = build_saes(job, source, sae_fields or {}, targets)
    trainer, trained = train_on_activations(saes, source, job, start)
    main = trainer.processes.is_main  # under torchrun every process evaluates its share; the main one writes
    results = evaluate_saes(source, trained, job.eval_tokens, ablations=job.ablations,
                            progress=trainer.cfg.progress and main, cache_dir=out / "eval_cache")
    if not main:
        return trained, ""
    return trained, write_summary(out, job, source, results, trainer.final_summary(), time.time() - started,
                                  {**dataclasses.asdict(trainer.cfg), "bf16_selection": trainer.bf16_selection})
