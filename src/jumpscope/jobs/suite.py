"""``jumpscope suite``: a Gemma-Scope-style release for any model in one run.

An SAE for every chosen layer x site (``resid_post``, ``attn_z``, ``mlp_out``; optionally a
transcoder ``mlp_in -> mlp_out`` per layer) x sparsity level, all trained together: one forward
pass per batch feeds every site, and all SAEs at a site share that site's activation rows (the
shuffle buffer holds one copy per site, never one per SAE), so memory grows with the SAEs'
parameters and optimiser state, not with their number times the activations.

Output follows the public release layout, one folder per SAE with our native files and a Gemma
Scope ``params.npz`` side by side (where the architecture has one)::

    {out}/{res,att,mlp,transcoder}/layer_{L}/width_{W}/average_l0_{N}/   N = measured held-out L0
    {out}/index.json, index.md      every SAE: layer, site, width, target, L0, FVU, delta loss, dead
    {out}/training/                 checkpoint and log (resumable with --resume)

The "canonical" SAE of each (layer, site, width) is the one whose L0 is nearest ``canonical_l0``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..activations import ActivationConfig, ActivationSource
from ..errors import ConfigError, check_positive
from ..evaluate.downstream import MAIN_MEASURE
from ..evaluate.heldout import evaluate_saes
from ..formats import save as save_format
from ..models.sites import parse_site
from ..sae import SAE, build, config_class
from ..sae.metrics import dead_label
from ..safeio import write_text
from .common import (TrainingJobConfig, check_arch, check_sparsity_fits, job_record, start_training_job,
                     train_on_activations)
from .train import transcoder_target

RELEASE_NAMES = {"resid_post": "res", "attn_z": "att", "mlp_out": "mlp", "mlp_in": "transcoder"}


@dataclass
class SuiteConfig(TrainingJobConfig):
    """What the suite covers and where it goes."""

    layers: tuple[int, ...] = ()
    """Layers to cover; empty: every layer of the model."""

    sites: tuple[str, ...] = ("resid_post", "attn_z", "mlp_out")
    """Site kinds per layer (one SAE each per level)."""

    transcoders: bool = False
    """Also train a transcoder per layer that reads mlp_in and predicts mlp_out."""

    arch: str = "jumprelu"
    """Architecture of every SAE: one that aims at an L0 (jumprelu, topk, batchtopk)."""

    l0: tuple[float, ...] = (20.0, 50.0, 100.0)
    """Requested L0 levels (JumpReLU target L0, or k)."""

    width: int | None = None
    """Latents per SAE; None: 8 x the site's width."""

    canonical_l0: float = 100.0
    """The canonical SAE of a (layer, site, width) is the one with L0 nearest this."""

    # This job's own defaults; the help text is TrainingJobConfig's.
    out: str = "runs/suite"
    eval_tokens: int = 8_192

    def __post_init__(self) -> None:
        check_arch(self.arch, "suite")
        names = {f.name for f in dataclasses.fields(config_class(self.arch))}
        if not {"target_l0", "k"} & names:
            raise ConfigError(f"a suite needs an architecture that aims at an L0 (jumprelu, topk, batchtopk), "
                              f"not {self.arch!r}")
        if not self.l0 or any(level <= 0 for level in self.l0):
            raise ConfigError("give one or more positive --l0 levels")
        if not self.sites and not self.transcoders:
            raise ConfigError("give at least one site kind (--sites) or --transcoders")
        unknown = [kind for kind in self.sites if kind not in RELEASE_NAMES]
        if unknown:
            raise ConfigError(f"unknown sites {unknown}; choose from {', '.join(RELEASE_NAMES)}")
        check_positive(self, "width", "tokens", "eval_tokens", "canonical_l0")
        check_positive(self, "layers", zero_ok=True)
        check_sparsity_fits(self.width, l0=self.l0)


def suite_sites(suite: SuiteConfig, model: Any) -> list[tuple[int, str]]:
    """(layer, site kind) pairs, each checked against the model (clear errors for bad ones)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layers = list(suite.layers) or list(range(n_layers or 0))
    if not layers:
        raise ValueError("cannot tell how many layers the model has; give --layers")
    kinds = list(suite.sites) + (["mlp_in"] if suite.transcoders else [])
    pairs = []
    for layer in layers:
        for kind in kinds:
            parse_site(f"layers.{layer}.{kind}", model)  # raises: layer out of range, site the model lacks
            pairs.append((layer, kind))
    return pairs


def build_suite(suite: SuiteConfig, source: ActivationSource, pairs: list[tuple[int, str]],
                sae_fields: dict[str, Any]) -> dict[str, SAE]:
    knob = "k" if "k" in {f.name for f in dataclasses.fields(config_class(suite.arch))} else "target_l0"
    saes = {}
    for layer, kind in pairs:
        site = f"layers.{layer}.{kind}"
        d_in = source.site_dims[site]
        for level in suite.l0:
            fields: dict[str, Any] = {"d_in": d_in, "d_sae": suite.width or 8 * d_in, "site": site,
                                      "model": source.loaded.name, knob: int(level) if knob == "k" else float(level)}
            if kind == "mlp_in":
                target = transcoder_target(site)
                fields.update(target_site=target, d_out=source.site_dims[target], apply_b_dec_to_input=False)
            saes[f"layer_{layer}.{RELEASE_NAMES[kind]}.l0_{level:g}"] = build(suite.arch, **fields, **sae_fields)
    return saes


def write_release(out: Path, saes: dict[str, SAE], results: dict[str, dict], suite: SuiteConfig,
                  kind: str) -> list[dict[str, Any]]:
    """Move each trained SAE into the release layout, add params.npz, and return the index rows."""
    rows, taken = [], set()
    for name, sae in saes.items():
        layer, release, _ = name.split(".", 2)
        held = results[name]
        folder = out / release / layer / f"width_{sae.cfg.d_sae}" / f"average_l0_{round(held['l0'])}"
        while folder in taken:  # two levels landing on the same rounded L0
            folder = folder.with_name(folder.name + "_b")
        taken.add(folder)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out / "training" / name, folder)
        try:
            save_format(sae, folder / "params.npz", format="gemma_scope")
            npz = "params.npz"
        except ValueError:  # e.g. TopK has no Gemma Scope form
            npz = None
        rows.append({"layer": int(layer.split("_")[1]), "site": sae.cfg.target_site or sae.cfg.site,
                     "release": release, "width": sae.cfg.d_sae, "target": sae.cfg.to_dict().get(
                         "target_l0", sae.cfg.to_dict().get("k")), "l0": held["l0"], "fvu": held["fvu"],
                     MAIN_MEASURE[kind]: held[MAIN_MEASURE[kind]], "dead_fraction": held["dead_fraction"],
                     "n_tokens": held["n_tokens"],
                     "path": str(folder.relative_to(out)), "params_npz": npz})
    for row in rows:
        group = [r for r in rows if (r["layer"], r["release"], r["width"]) == (row["layer"], row["release"], row["width"])]
        row["canonical"] = row is min(group, key=lambda r: abs(r["l0"] - suite.canonical_l0))
    return rows


def index_table(rows: list[dict[str, Any]], kind: str) -> str:
    measure = MAIN_MEASURE[kind]
    lines = [f"| layer | site | width | target | L0 | FVU | {measure} | dead | canonical | path |",
             "|" + " --- |" * 10]
    for r in sorted(rows, key=lambda r: (r["layer"], r["release"], r["width"], r["l0"])):
        lines.append(f"| {r['layer']} | {r['site']} | {r['width']} | {r['target']:g} | {r['l0']:.1f} | "
                     f"{r['fvu']:.4f} | {r[measure]:.4f} | {r['dead_fraction']:.3f} | "
                     f"{'yes' if r['canonical'] else ''} | {r['path']} |")
    sizes = sorted({r["n_tokens"] for r in rows})  # every SAE sees the same held-out text
    lines += ["", f"dead: the fraction of latents that never fired, {' / '.join(dead_label(n) for n in sizes)} "
                  "of held-out text"]
    return "\n".join(lines) + "\n"


def run_suite(suite: SuiteConfig, activations: ActivationConfig | None = None,
              sae_fields: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Train, evaluate and lay out the suite; returns the index rows and the Markdown table."""
    started = time.time()
    out = Path(suite.out)
    start = start_training_job(suite, activations, out / "training")
    pairs = suite_sites(suite, start.loaded.model)
    sites = [f"layers.{layer}.{kind}" for layer, kind in pairs]
    sites += [transcoder_target(site) for site in sites if site.endswith(".mlp_in")]
    source = start.source(sites)
    saes = build_suite(suite, source, pairs, sae_fields or {})
    trainer, trained = train_on_activations(saes, source, suite, start)
    main = trainer.processes.is_main  # under torchrun every process evaluates its share; the main one writes
    results = evaluate_saes(source, trained, suite.eval_tokens, ablations=suite.ablations,
                            progress=trainer.cfg.progress and main, cache_dir=out / "eval_cache")
    if not main:
        return [], ""
    kind = source.loaded.kind
    rows = write_release(out, trained, results, suite, kind)
    table = index_table(rows, kind)
    write_text(out / "index.json", json.dumps({"suite": job_record(suite), "source": source.manifest(),
                                               "seconds": time.time() - started, "saes": rows}, indent=2))
    write_text(out / "index.md", f"# SAE suite: {source.loaded.name}\n\n{table}")
    return rows, table
