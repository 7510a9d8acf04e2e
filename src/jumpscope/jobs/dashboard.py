"""``jumpscope dashboard``: max-activating examples, logit lens and a static site for one SAE.

Streams the corpus through the model and the SAE (:mod:`jumpscope.analysis.examples`), computes the
logit lens for causal LMs (:mod:`jumpscope.analysis.logit_lens`), and writes a static site
(:mod:`jumpscope.dashboard`) that opens from a file:// URL. The examples and the logit lens are
kept in the output folder (safetensors + JSON), and the streaming state is saved as it goes, so an
interrupted run continues with ``--resume``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..activations import ActivationConfig, ActivationSource
from ..analysis import logit_lens, token_strings
from ..analysis.examples import ExamplesConfig, collect_examples, describe_density
from ..device import resolve_device
from ..errors import check_positive
from ..formats.loading import load_saes, model_of
from ..sae.metrics import dead_sample_warning
from ..safeio import write_text


@dataclass
class DashboardJobConfig:
    """Which SAE, over how much text, and where the site goes."""

    sae: str = ""
    """An SAE folder or file in any supported format, or an hf://owner/name/path reference."""

    model: str | None = None
    """The model to run; None: the model the SAE was trained on (its config's 'model')."""

    site: str | None = None
    """Hook site for an SAE whose file does not record one (e.g. Gemma Scope params.npz)."""

    tokens: int = 200_000
    """Tokens to scan for examples (the whole corpus if it is shorter)."""

    logit_lens_tokens: int = 10
    """Promoted and suppressed tokens shown per latent (causal LMs only)."""

    out: str = "runs/dashboard"
    """Output folder: index.html, latents/, data/, and the examples and logit lens as safetensors."""

    resume: bool = False
    """Continue an interrupted scan from the state saved in --out."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    title: str | None = None
    """Title of the site; None: the SAE, its site and the model."""

    progress: bool = True
    """Show progress bars (the scan, in tokens, and the site) on stderr."""

    def __post_init__(self) -> None:
        check_positive(self, "tokens")
        check_positive(self, "logit_lens_tokens", zero_ok=True)


def run_dashboard(job: DashboardJobConfig, activations: ActivationConfig | None = None,
                  examples_cfg: ExamplesConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Scan, compute the logit lens, write the site; returns a summary (also in ``out/summary.json``)."""
    from ..dashboard import write_dashboard

    started = time.time()
    progress = progress and job.progress
    activations = activations or ActivationConfig()
    name, sae = next(iter(load_saes([job.sae], job.site, activations.allow_network).items()))
    if sae.cfg.target_site:
        raise ValueError(f"{job.sae} is a transcoder; dashboards show an ordinary SAE's latents")
    activations = dataclasses.replace(activations, model=model_of(job.model, {name: sae}))
    device = str(resolve_device(job.device))
    source = ActivationSource(activations, [sae.cfg.site], device=device)
    sae = sae.to(device)
    out = Path(job.out)
    examples = collect_examples(
        source.loaded.model, sae, source.windows(split="all"), examples_cfg or ExamplesConfig(),
        max_tokens=job.tokens, state_dir=out / "state", resume=job.resume, progress=progress,
        meta={"sae": job.sae, "model": source.loaded.name, "corpus": source.manifest()["corpus"]})
    examples.save(out / "examples")
    if warning := dead_sample_warning(examples.n_tokens):
        logging.getLogger(__name__).warning(warning.replace("(--eval-tokens)", "(--tokens)"))
    lens = None
    if source.loaded.kind == "causal_lm" and job.logit_lens_tokens:
        lens = logit_lens(sae, source.loaded.model, job.logit_lens_tokens)
        lens.save(out / "logit_lens.safetensors")
    seconds_scan = time.time() - started
    where = f"{sae.cfg.site} of {source.loaded.name} ({sae.cfg.d_sae:,} latents)"
    title = job.title or (where if name == sae.cfg.site else f"{name}: {where}")
    index = write_dashboard(out, examples, token_strings(source.loaded.tokenizer), lens, title=title,
                            progress=progress)
    summary = {"job": dataclasses.asdict(job), "source": source.manifest(), "index": str(index),
               "n_tokens": examples.n_tokens, "d_sae": examples.d_sae, **describe_density(examples),
               "seconds": {"scan_and_logit_lens": seconds_scan, "total": time.time() - started}}
    write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary

