"""``jumpscope eval``: the job's config and orchestration (load the SAEs, build the source,
evaluate, write the JSON and Markdown results). The evaluation itself is
:mod:`jumpscope.evaluate.heldout`, shared with training, sweeps and suites.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..activations import ActivationConfig, ActivationSource
from ..device import resolve_device
from ..errors import check_positive
from ..evaluate.downstream import ABLATIONS, MAIN_MEASURE, parse_ablations
from ..evaluate.heldout import evaluate_saes, results_table
from ..formats.loading import load_saes, model_of
from ..safeio import write_text


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
    """Held-out tokens to evaluate on (rounded up to whole context windows; at least one)."""

    ablations: tuple[str, ...] = ABLATIONS
    """Ablations that CE loss recovered is measured against: zero,mean, zero, mean or none (no
    CE-recovered columns; two model passes fewer per site)."""

    together: bool = False
    """Also splice all the SAEs in at once (they must sit at different sites)."""

    out: str = "eval.json"
    """JSON file for the results (a Markdown table goes beside it, same name, .md)."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    progress: bool = True
    """Show a progress bar on stderr."""

    eval_cache: bool = True
    """Keep the clean and ablation passes (they do not depend on the SAEs) in eval_cache/ beside
    --out and reuse them when the same model is evaluated again on the same text."""

    def __post_init__(self) -> None:
        check_positive(self, "eval_tokens")
        self.ablations = parse_ablations(self.ablations)


def run_eval(job: EvalJobConfig, activations: ActivationConfig | None = None) -> tuple[dict, str]:
    """Evaluate the job's SAEs; writes ``job.out`` (JSON) and the table beside it; returns both."""
    activations = activations or ActivationConfig()
    saes = load_saes(job.saes, job.site, activations.allow_network)
    activations = dataclasses.replace(activations, model=model_of(job.model, saes))
    device = resolve_device(job.device)
    sites = [site for sae in saes.values() for site in (sae.cfg.site, sae.cfg.target_site) if site]
    source = ActivationSource(activations, sites, device=str(device))
    saes = {name: sae.to(device) for name, sae in saes.items()}
    cache_dir = Path(job.out).parent / "eval_cache" if job.eval_cache else None
    results = evaluate_saes(source, saes, job.eval_tokens, ablations=job.ablations, together=job.together,
                            progress=job.progress, cache_dir=cache_dir)
    table = results_table(results, source.loaded.kind)
    out = Path(job.out)
    payload = json.dumps({"job": dataclasses.asdict(job), "source": source.manifest(),
                          "main_measure": MAIN_MEASURE[source.loaded.kind], "results": results}, indent=2)
    write_text(out, payload)
    write_text(out.with_suffix(".md"), table)
    return results, table
