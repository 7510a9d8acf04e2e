"""``jumpscope dashboard``: max-activating examples, logit lens and a static site for one SAE.

Streams the corpus through the model and the SAE (:mod:`jumpscope.analysis.examples`), computes the
logit lens for causal LMs (:mod:`jumpscope.analysis.logit_lens`), and writes a static site
(:mod:`jumpscope.dashboard`) that opens from a file:// URL. The examples and the logit lens are
kept in the output folder (safetensors + JSON), and the streaming state is saved as it goes, so an
interrupted run continues with ``--resume``.

The text scanned defaults to the SAE's own training corpus, as the run that trained it recorded
it (``summary.json`` / ``index.json`` of the run folder, or ``corpus`` in the SAE's metadata),
else the built-in corpus, with a note.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
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
from ..safeio import read_json
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


_SPLIT_SUFFIX = re.compile(r"^(.*) \((paragraph|line)s\)$")  # how ActivationSource.manifest names a txt split


def corpus_spec(recorded: str) -> tuple[str, str]:
    """(corpus spec, txt_split) that reopen a corpus as a run's manifest names it
    (``builtin:python-3.x``, ``files:/abs/path``, ``hf:...``, mixtures joined by ',', and a
    ``" (paragraphs)"`` / ``" (lines)"`` suffix for the txt split)."""
    split = "file"
    if match := _SPLIT_SUFFIX.match(recorded):
        recorded, split = match.group(1), match.group(2)
    parts = []
    for part in recorded.split(","):
        part = "builtin" if part.startswith("builtin:") else part
        for prefix in ("files:", "hf-disk:"):
            part = part[len(prefix):] if part.startswith(prefix) else part
        parts.append(part)
    return ",".join(parts), split


def recorded_corpus(sae_ref: str, metadata: dict[str, Any] | None = None) -> tuple[str, str, str] | None:
    """(spec, txt_split, where it was found) of the corpus the SAE was trained on, or None: its
    metadata's 'corpus', else the 'source' manifest of the run folder around a local SAE folder."""
    candidates: list[tuple[Any, str]] = [((metadata or {}).get("corpus"), "the SAE's metadata")]
    folder = Path(sae_ref)
    if not sae_ref.startswith("hf://") and folder.exists():
        folder = folder if folder.is_dir() else folder.parent
        for run in (folder, folder.parent):  # train: out/<site>/; sweep and suite one level deeper at most
            for name in ("summary.json", "index.json"):
                path = run / name
                if path.is_file():
                    try:
                        source = read_json(path).get("source")
                    except Exception:  # an unreadable summary is no record
                        continue
                    candidates.append((source.get("corpus") if isinstance(source, dict) else None, str(path)))
    for corpus, where in candidates:
        if isinstance(corpus, str) and corpus.strip():
            return (*corpus_spec(corpus), where)
    return None


def dashboard_activations(job: DashboardJobConfig, activations: ActivationConfig, metadata: dict[str, Any],
                          corpus_given: bool) -> ActivationConfig:
    """``activations`` reading the SAE's training corpus unless a corpus was given; prints a note."""
    if corpus_given:
        return activations
    found = recorded_corpus(job.sae, metadata)
    if found is None:
        print(f"note: {job.sae} records no training corpus; scanning the built-in corpus (give --corpus to "
              "choose)", file=sys.stderr)
        return dataclasses.replace(activations, corpus="builtin")
    spec, split, where = found
    print(f"scanning the SAE's training corpus {spec} (recorded in {where}; --corpus to choose another)",
          file=sys.stderr)
    return dataclasses.replace(activations, corpus=spec, txt_split=split)


def site_layer(site: str, model: Any) -> dict[str, int]:
    """``{"layer": L, "n_layers": N}`` for a ``layers.L...`` site (for the logit lens note), else {}."""
    match = re.match(r"layers\.(\d+)\.", site)
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return {"layer": int(match.group(1)), "n_layers": n_layers} if match and isinstance(n_layers, int) else {}


def run_dashboard(job: DashboardJobConfig, activations: ActivationConfig | None = None,
                  examples_cfg: ExamplesConfig | None = None, progress: bool = True, *,
                  corpus_given: bool | None = None) -> dict[str, Any]:
    """Scan, compute the logit lens, write the site; returns a summary (also in ``out/summary.json``).
    ``corpus_given`` False (the default when ``activations`` is None) scans the SAE's recorded
    training corpus instead of ``activations.corpus``."""
    from ..dashboard import write_dashboard
    from ..formats.native import read_metadata

    started = time.time()
    progress = progress and job.progress
    corpus_given = activations is not None if corpus_given is None else corpus_given
    activations = activations or ActivationConfig()
    name, sae = next(iter(load_saes([job.sae], job.site, activations.allow_network).items()))
    if sae.cfg.target_site:
        raise ValueError(f"{job.sae} is a transcoder; dashboards show an ordinary SAE's latents")
    try:
        metadata = read_metadata(job.sae)
    except Exception:  # not a native folder: other formats record no corpus jumpscope can reopen
        metadata = {}
    activations = dashboard_activations(job, activations, metadata, corpus_given)
    activations = dataclasses.replace(activations, model=model_of(job.model, {name: sae}))
    device = str(resolve_device(job.device))
    source = ActivationSource(activations, [sae.cfg.site], device=device)
    sae = sae.to(device)
    out = Path(job.out)
    examples = collect_examples(
        source.loaded.model, sae, source.windows(split="all"), examples_cfg or ExamplesConfig(),
        max_tokens=job.tokens, state_dir=out / "state", resume=job.resume, progress=progress,
        meta={"sae": job.sae, "model": source.loaded.name, "corpus": source.manifest()["corpus"],
              **site_layer(sae.cfg.site, source.loaded.model)})
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

