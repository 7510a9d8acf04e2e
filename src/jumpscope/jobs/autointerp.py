"""``jumpscope autointerp``: explain every latent with an LLM, score the explanations, show them.

1. Examples: reused from a ``jumpscope dashboard`` folder (``--examples``), or collected by a scan
   of the corpus (the SAE's training corpus by default, as the dashboard does). With
   ``--controls N`` the same scan also collects N random-direction "latents" (thresholds set on
   the site's activations so they fire as often as the SAE's median live latent), explained and
   scored the same way: a score means something only above theirs.
2. The backend: any OpenAI-compatible chat endpoint (``--base-url``; key from ``--api-key-env``)
   or a local transformers chat model (default: SmolLM2-135M-Instruct, offline), behind an
   on-disk cache of every request and reply (a re-run costs nothing).
3. Per latent: explanation, detection, fuzzing, simulation (:mod:`jumpscope.explain.pipeline`),
   appended to ``results.jsonl`` as each finishes; ``--resume`` skips recorded latents. The
   requests and tokens the run will cost are printed before it starts (``--dry-run`` stops there).
4. Outputs: ``explanations.json`` / ``.csv``, ``summary.json`` / ``summary.md`` (scores of the
   SAE's latents against the controls), Neuronpedia's bulk layout under ``neuronpedia/``, and the
   explanations on the dashboard's pages and index when the examples came from one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..activations import ActivationConfig, ActivationSource
from ..analysis import token_strings
from ..analysis.examples import ExamplesConfig, collect_examples
from ..analysis.records import LatentExamples
from ..dashboard.site import write_explanations
from ..device import resolve_device
from ..errors import ConfigError, check_positive
from ..explain.client import CachedBackend, OpenAICompatibleBackend
from ..explain.controls import RandomDirections, WithControls
from ..explain.export import SCORE_COLUMNS, score_summary, write_neuronpedia, write_tables
from ..explain.local import TransformersChatBackend
from ..explain.pipeline import AutointerpConfig, estimate, latent_tasks, run_latents
from ..formats.loading import load_saes, model_of
from ..models.harvest import harvest
from ..models.loading import load_model
from ..safeio import write_text
from .dashboard import dashboard_activations


@dataclass
class AutointerpJobConfig:
    """Which SAE and latents, which LLM, and where the results go."""

    sae: str = ""
    """An SAE folder or file in any supported format."""

    examples: str | None = None
    """A `jumpscope dashboard` output folder (or its examples/ folder) to reuse; None: scan the corpus."""

    latents: tuple[int, ...] = ()
    """Latent ids to explain; none given: the first --max-latents latents that fired."""

    max_latents: int = 100
    """Latents explained when --latents is not given (0: every latent that fired)."""

    controls: int = 0
    """Random-direction control latents, explained and scored like the SAE's (0: none)."""

    llm: str = "smollm2"
    """The explainer and scorer: a model name for --base-url's server, else a local model
    (`smollm2`, a folder or file `jumpscope` loads)."""

    base_url: str | None = None
    """An OpenAI-compatible chat-completions endpoint (e.g. http://127.0.0.1:8000/v1 for vLLM or
    llama.cpp's server, http://127.0.0.1:11434/v1 for Ollama, https://api.openai.com/v1); None: local."""

    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the endpoint's API key (unset: no key is sent)."""

    concurrency: int = 4
    """Requests in flight at once (HTTP), and latents explained at once."""

    timeout: float = 60.0
    """Seconds before an HTTP request is abandoned (then retried)."""

    max_retries: int = 5
    """Retries of a request on 429, 5xx, timeouts and malformed replies (with backoff)."""

    local_batch_size: int = 8
    """Requests generated together by a local model."""

    model: str | None = None
    """The model the SAE reads; None: the model its config records."""

    site: str | None = None
    """Hook site for an SAE whose file does not record one."""

    tokens: int = 200_000
    """Tokens to scan for examples (when not reusing a dashboard's)."""

    out: str = "runs/autointerp"
    """Output folder: results.jsonl, explanations.json/.csv, summary, neuronpedia/, llm_cache/."""

    resume: bool = False
    """Skip the latents results.jsonl already holds (replies already cached are never asked again)."""

    dry_run: bool = False
    """Print the requests and tokens the run would cost, then stop."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    progress: bool = True
    """Show progress bars on stderr."""

    autointerp: AutointerpConfig = field(default_factory=AutointerpConfig)
    """How explanations are written and scored."""

    def __post_init__(self) -> None:
        check_positive(self, "concurrency", "timeout", "tokens", "local_batch_size")
        check_positive(self, "max_latents", "controls", "max_retries", zero_ok=True)
        if any(latent < 0 for latent in self.latents):
            raise ConfigError(f"latent ids must be >= 0, got {min(self.latents)}")


def make_backend(job: AutointerpJobConfig, device: str):
    """The backend the job names, behind the on-disk cache in ``out/llm_cache``."""
    if job.base_url:
        inner = OpenAICompatibleBackend(base_url=job.base_url, model=job.llm, api_key_env=job.api_key_env,
                                        timeout_s=job.timeout, max_concurrency=job.concurrency,
                                        max_retries=job.max_retries)
    else:
        inner = TransformersChatBackend(load_model(job.llm, device=device), batch_size=job.local_batch_size)
    return CachedBackend(inner, Path(job.out) / "llm_cache")


@torch.no_grad()
def calibrated_controls(sae: Any, source: ActivationSource, count: int, seed: int) -> RandomDirections:
    """``count`` random directions firing as often as the SAE's median live latent on a sample of windows."""
    windows = []
    for batch in source.windows(split="all"):
        windows.append(batch)
        if sum(len(b[0]) for b in windows) * source.context_size >= 16_384:
            break
    rows = torch.cat([chunk[sae.cfg.site] for chunk in harvest(source.loaded.model, windows, [sae.cfg.site])])
    rows = rows.to(sae.W_enc.device, sae.W_enc.dtype)
    density = (sae.encode(rows) > 0).float().mean(0)
    alive = density[density > 0]
    target = float(alive.median()) if alive.numel() else 0.01
    controls = RandomDirections(sae.cfg.d_in, count, sae.cfg.site, seed=seed).to(sae.W_enc.device)
    return controls.calibrate(rows, min(max(target, 1e-4), 0.5))


def examples_folder(path: str) -> tuple[Path, Path | None]:
    """(the examples folder, the dashboard folder around it or None) of --examples."""
    folder = Path(path)
    if (folder / "examples" / "examples.json").is_file():
        return folder / "examples", folder
    if (folder / "examples.json").is_file():
        dashboard = folder.parent if (folder.parent / "data" / "meta.js").is_file() else None
        return folder, dashboard
    raise FileNotFoundError(f"{folder} holds no examples (examples/examples.json): give a `jumpscope dashboard` "
                            "output folder")


def chosen_latents(job: AutointerpJobConfig, examples: LatentExamples, d_sae: int) -> list[int]:
    if job.latents:
        bad = [latent for latent in job.latents if latent >= d_sae]
        if bad:
            raise ConfigError(f"latent {bad[0]} is out of range: the SAE has {d_sae} latents")
        return list(dict.fromkeys(job.latents))
    alive = [latent for latent in range(d_sae) if int(examples.fire_count[latent]) > 0]
    return alive[:job.max_latents] if job.max_latents else alive


def run_autointerp(job: AutointerpJobConfig, activations: ActivationConfig | None = None, *,
                   corpus_given: bool | None = None) -> dict[str, Any]:
    """Collect (or reuse) examples, explain and score the latents, write every output."""
    started = time.time()
    out = Path(job.out)
    if job.autointerp.batch_size is None:  # one question at a time for a small local model
        job = dataclasses.replace(job, autointerp=dataclasses.replace(job.autointerp,
                                                                      batch_size=10 if job.base_url else 1))
    corpus_given = activations is not None if corpus_given is None else corpus_given
    activations = activations or ActivationConfig()
    name, sae = next(iter(load_saes([job.sae], job.site, activations.allow_network).items()))
    if sae.cfg.target_site:
        raise ValueError(f"{job.sae} is a transcoder; autointerp explains an ordinary SAE's latents")
    device = str(resolve_device(job.device))
    dashboard = None
    if job.examples:
        folder, dashboard = examples_folder(job.examples)
        reused = LatentExamples.load(folder)
        if reused.d_sae != sae.cfg.d_sae:
            raise ValueError(f"{folder} holds examples of {reused.d_sae} latents, the SAE has {sae.cfg.d_sae}")
    activations = dashboard_activations(_as_dashboard(job), activations, {}, corpus_given)
    activations = dataclasses.replace(activations, model=model_of(job.model, {name: sae}))
    source = ActivationSource(activations, [sae.cfg.site], device=device)
    sae = sae.to(device)
    vocab = token_strings(source.loaded.tokenizer)
    scan_cfg = ExamplesConfig(seed=job.autointerp.seed)
    kinds: dict[int, str] = {}
    scanned = None
    if job.controls or not job.examples:
        controls = calibrated_controls(sae, source, job.controls, job.autointerp.seed) if job.controls else None
        module = sae if controls is None else (controls if job.examples else WithControls(sae, controls))
        scanned = collect_examples(source.loaded.model, module, source.windows(split="all"), scan_cfg,
                                   max_tokens=job.tokens if not job.examples else reused.n_tokens,
                                   state_dir=out / "scan_state", resume=job.resume, progress=job.progress,
                                   meta={"sae": job.sae, "model": source.loaded.name})
        scanned.save(out / "examples")
    examples = reused if job.examples else scanned
    latents = chosen_latents(job, examples, sae.cfg.d_sae)
    tasks = latent_tasks(examples, latents, vocab, job.autointerp)
    if job.controls:
        offset = 0 if job.examples else sae.cfg.d_sae
        control_ids = list(range(offset, offset + job.controls))
        kinds = {latent: "control" for latent in control_ids}
        control_tasks = latent_tasks(scanned, control_ids, vocab, job.autointerp, kinds)
        for task in control_tasks:
            task.latent -= offset  # control ids count from 0 in the results
        tasks += control_tasks
    cost = estimate(tasks, job.autointerp)
    print(f"autointerp: {cost['latents']} latents ({sum(t.kind == 'control' for t in tasks)} controls): at most "
          f"{cost['requests']:,} requests, about {cost['prompt_tokens']:,} prompt and at most "
          f"{cost['completion_tokens']:,} completion tokens (cached replies cost nothing)", file=sys.stderr)
    if job.dry_run:
        return {"estimate": cost, "latents": len(tasks)}
    backend = make_backend(job, device)
    if not job.resume and (out / "results.jsonl").exists():  # a fresh run: every latent again (from the cache)
        (out / "results.jsonl").unlink()
    parallel = job.concurrency if job.base_url else 1
    bar = tqdm(total=len(tasks), unit="latent", desc="autointerp", disable=not job.progress, dynamic_ncols=True)
    records = run_latents(backend, tasks, job.autointerp, out / "results.jsonl", parallel=parallel,
                          on_record=lambda _: bar.update())
    bar.close()
    write_tables(records, out)
    scores = score_summary(records)
    source_id = f"{sae.cfg.site}-jumpscope-{sae.cfg.architecture}-{sae.cfg.d_sae}"
    neuronpedia = write_neuronpedia(records, examples, vocab, out / "neuronpedia",
                                    model_id=Path(source.loaded.name).name, source_id=source_id,
                                    explainer=backend.identity)
    if dashboard is not None:
        write_explanations(dashboard, [r for r in records if r["kind"] == "sae"])
    summary = {"job": dataclasses.asdict(job), "sae": name, "explainer": backend.identity, "estimate": cost,
               "scores": scores, "cache": getattr(backend, "stats", {}), "neuronpedia": str(neuronpedia),
               "dashboard": None if dashboard is None else str(dashboard), "seconds": time.time() - started}
    write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False))
    write_text(out / "summary.md", summary_markdown(summary))
    return summary


def _as_dashboard(job: AutointerpJobConfig) -> Any:
    """The fields of ``job`` the dashboard's corpus lookup reads."""
    from .dashboard import DashboardJobConfig

    return DashboardJobConfig(sae=job.sae, model=job.model, site=job.site, tokens=job.tokens, out=job.out)


def summary_markdown(summary: dict[str, Any]) -> str:
    shown = [column for column, _, _ in SCORE_COLUMNS
             if any(entry[column]["mean"] is not None for entry in summary["scores"].values())
             or column in ("detection", "fuzzing", "simulation")]
    lines = [f"# Autointerp: {summary['sae']}", "", f"explainer and scorer: `{summary['explainer']}`", "",
             "| latents | explained | skipped | " + " | ".join(c.replace("_", " ") for c in shown)
             + " | s / latent | tokens / latent |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in shown) + " | ---: | ---: |"]

    def cell(score: dict[str, Any]) -> str:
        if score["mean"] is None:
            return "-"
        error = f" ± {score['stderr']:.3f}" if score["stderr"] is not None else ""
        return f"{score['mean']:.3f}{error} (n {score['n']})"

    for kind, entry in summary["scores"].items():
        lines.append(f"| {'SAE' if kind == 'sae' else 'random-direction controls'} ({entry['latents']}) | "
                     f"{entry['explained']} | {entry['skipped']} | " + " | ".join(cell(entry[c]) for c in shown)
                     + f" | {entry['seconds_per_latent']:.1f} | {entry['tokens_per_latent']:.0f} |")
    lines += ["", "Detection and fuzzing: balanced accuracy (chance 0.5); their AUC (one context per request, "
              "from the scorer's log-odds of 1 over 0; chance 0.5); simulation: correlation of predicted "
              "and true activations (chance 0). Mean ± standard error over latents."]
    return "\n".join(lines) + "\n"
