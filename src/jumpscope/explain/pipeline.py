"""Explain and score latents: the per-latent pipeline behind ``jumpscope autointerp``.

For each latent (an SAE's, or a random-direction control's) the examples a corpus scan collected
(:class:`~jumpscope.analysis.records.LatentExamples`) are split into the explainer's contexts and
held-out scoring contexts (:func:`~jumpscope.explain.scoring.split_examples`), non-activating
contexts are drawn from the scan's random windows where the latent did not fire, the backend
writes an explanation, and the chosen scorers grade it on the held-out contexts. Each latent's
record is appended to ``results.jsonl`` the moment it is done (so a killed run loses at most the
latents in flight, and ``resume`` skips the recorded ones); a failed or unparsable reply is counted
in the record, never fatal.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from ..analysis.records import LatentExamples
from ..errors import ConfigError, check_positive
from .backend import Backend, ChatReply, ChatRequest
from .prompts import Context, contexts_from_examples, explanation_request, parse_explanation
from .scoring import detection_score, fuzzing_score, simulation_score, split_examples

__all__ = ["AutointerpConfig", "LatentTask", "latent_tasks", "explain_latent", "run_latents", "read_results",
           "estimate", "Tally"]

Scorer = Literal["detection", "fuzzing", "simulation"]


@dataclass
class AutointerpConfig:
    """How many examples the explainer sees, how explanations are scored."""

    n_explain: int = 20
    """Contexts shown to the explainer, across quantiles (half from the top, half from a uniform
    sample of the latent's activating contexts)."""

    n_score: int = 10
    """Held-out activating contexts per latent for scoring (never shown to the explainer); as many
    non-activating ones join them for detection."""

    scorers: tuple[Scorer, ...] = ("detection", "fuzzing", "simulation")
    """Scorers to run: detection and fuzzing (balanced accuracy), simulation (correlation of
    predicted with true activations; expected values from token logprobs where the backend gives them)."""

    simulation_contexts: int = 6
    """Held-out contexts the simulation scores (half activating, half not): one request each."""

    batch_size: int | None = None
    """Contexts per detection / fuzzing request. None: 1 with a local model (a small model cannot
    answer a list in order, but answers one question, and its log-odds of 1 over 0 give an AUC
    too), 10 with a server."""

    min_contexts: int = 4
    """A latent with fewer activating contexts than this is skipped (too few to explain and score)."""

    explainer_max_tokens: int = 120
    """Most tokens in an explanation reply."""

    seed: int = 0
    """Seed of every split and shuffle (per latent: seed + latent id)."""

    @property
    def contexts_per_request(self) -> int:
        """``batch_size``, or 10 where it is None (the job sets it to 1 for a local model)."""
        return self.batch_size or 10

    def __post_init__(self) -> None:
        check_positive(self, "n_explain", "n_score", "min_contexts", "explainer_max_tokens")
        if self.batch_size is not None:
            check_positive(self, "batch_size")
        check_positive(self, "simulation_contexts", zero_ok=True)
        unknown = [s for s in self.scorers if s not in ("detection", "fuzzing", "simulation")]
        if unknown:
            raise ConfigError(f"unknown scorer {unknown[0]!r}; choose from detection, fuzzing, simulation")


@dataclass
class LatentTask:
    """One latent's contexts: what the explainer sees and the held-out ones it is scored on."""

    latent: int
    kind: str
    """'sae' or 'control' (a random direction)."""
    explain: list[Context] = field(default_factory=list)
    activating: list[Context] = field(default_factory=list)
    non_activating: list[Context] = field(default_factory=list)
    skipped: str | None = None
    """Why the latent cannot be explained (too few activating contexts), or None."""


def latent_tasks(examples: LatentExamples, latents: Sequence[int], token_strings: Sequence[str],
                 cfg: AutointerpConfig, kinds: dict[int, str] | None = None) -> list[LatentTask]:
    """The contexts of each latent in ``latents`` (row ids of ``examples``)."""
    if examples.random_tokens is None:
        raise ValueError("these examples hold no random windows (written before they were kept): scan the corpus "
                         "again (`jumpscope dashboard` or `jumpscope autointerp` without --examples)")
    tasks = []
    for latent in latents:
        kind = (kinds or {}).get(latent, "sae")
        top = contexts_from_examples(examples.top_tokens[latent], examples.top_acts[latent], token_strings)
        sample = contexts_from_examples(examples.sample_tokens[latent], examples.sample_acts[latent], token_strings)
        if len(top) + len(sample) < cfg.min_contexts:
            tasks.append(LatentTask(latent, kind, skipped=f"fired in {len(top) + len(sample)} collected contexts, "
                                                         f"fewer than {cfg.min_contexts}"))
            continue
        explain, score = split_examples(top, sample, n_explain=cfg.n_explain, n_score=cfg.n_score,
                                        seed=cfg.seed + latent)
        quiet = (examples.random_peaks[:, latent] <= 0).nonzero()[:, 0]
        rng = random.Random(cfg.seed + latent)
        chosen = sorted(rng.sample(quiet.tolist(), min(len(score), len(quiet))))
        non_activating = contexts_from_examples(examples.random_tokens[chosen], None, token_strings,
                                                activating=False) if chosen else []
        tasks.append(LatentTask(latent, kind, explain, score, non_activating))
    return tasks


class Tally:
    """A backend wrapper that counts what passes through it (per latent: wrap, run, read)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.counts = {"requests": 0, "cached": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
                       "logprobs": 0}

    @property
    def identity(self) -> str:
        return self.inner.identity

    def complete(self, requests: Sequence[ChatRequest]) -> list[ChatReply]:
        replies = self.inner.complete(requests)
        for reply in replies:
            self.counts["requests"] += 1
            self.counts["cached"] += reply.cached
            self.counts["failed"] += reply.text is None
            self.counts["prompt_tokens"] += reply.prompt_tokens
            self.counts["completion_tokens"] += reply.completion_tokens
            self.counts["logprobs"] += reply.logprobs is not None
        return replies


def explain_latent(backend: Backend, task: LatentTask, cfg: AutointerpConfig) -> dict[str, Any]:
    """Explain one latent and score the explanation; the record written to results.jsonl."""
    started = time.time()
    record: dict[str, Any] = {"latent": task.latent, "kind": task.kind, "explanation": None, "scores": {}}
    if task.skipped:
        return {**record, "skipped": task.skipped}
    tally = Tally(backend)
    reply = tally.complete([explanation_request(task.explain, max_tokens=cfg.explainer_max_tokens)])[0]
    explanation = parse_explanation(reply.text)
    record["explanation"] = explanation
    if explanation is None:
        record["error"] = reply.error or f"no explanation in the reply {str(reply.text)[:80]!r}"
    else:
        seed = cfg.seed + task.latent
        if "detection" in cfg.scorers:
            record["scores"]["detection"] = detection_score(tally, explanation, task.activating, task.non_activating,
                                                            batch_size=cfg.contexts_per_request, seed=seed)
        if "fuzzing" in cfg.scorers:
            record["scores"]["fuzzing"] = fuzzing_score(tally, explanation, task.activating,
                                                        batch_size=cfg.contexts_per_request, seed=seed)
        if "simulation" in cfg.scorers and cfg.simulation_contexts:
            half = math.ceil(cfg.simulation_contexts / 2)
            shown = task.activating[:half] + task.non_activating[:cfg.simulation_contexts - half]
            record["scores"]["simulation"] = simulation_score(tally, explanation, shown)
    record.update(n_explain=len(task.explain), n_activating=len(task.activating),
                  n_non_activating=len(task.non_activating), usage=tally.counts, seconds=time.time() - started)
    return record


def read_results(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """The records in a results.jsonl, keyed by (kind, latent); a torn last line (a killed run) is ignored."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    if not path.is_file():
        return found
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            found[(str(record["kind"]), int(record["latent"]))] = record
        except (ValueError, KeyError, TypeError):
            continue
    return found


def run_latents(backend: Backend, tasks: Sequence[LatentTask], cfg: AutointerpConfig, results: Path, *,
                parallel: int = 1, on_record: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Explain and score every task, ``parallel`` latents at a time, appending each record to
    ``results`` (JSON lines) as it finishes; tasks already recorded there are not run again."""
    done = read_results(results)
    todo = [task for task in tasks if (task.kind, task.latent) not in done]
    lock = threading.Lock()
    results.parent.mkdir(parents=True, exist_ok=True)
    if results.is_file() and results.stat().st_size:
        with results.open("rb") as existing:  # a killed run's torn last line must not swallow the next record
            existing.seek(-1, 2)
            torn = existing.read(1) != b"\n"
        if torn:
            with results.open("a", encoding="utf-8") as sink:
                sink.write("\n")
    with results.open("a", encoding="utf-8") as sink:
        def one(task: LatentTask) -> dict[str, Any]:
            record = explain_latent(backend, task, cfg)
            with lock:  # one whole line per record, flushed: a kill loses only latents in flight
                sink.write(json.dumps(record, allow_nan=False) + "\n")
                sink.flush()
                if on_record is not None:
                    on_record(record)
            return record

        if parallel <= 1:
            for task in todo:
                one(task)
        else:
            with ThreadPoolExecutor(max_workers=parallel) as pool:
                list(pool.map(one, todo))
    final = read_results(results)
    return [final[(task.kind, task.latent)] for task in tasks if (task.kind, task.latent) in final]


def estimate(tasks: Sequence[LatentTask], cfg: AutointerpConfig) -> dict[str, int]:
    """Requests and tokens the run will cost at most (prompt tokens estimated at 4 characters each)."""
    requests = prompt_chars = completion = 0
    for task in tasks:
        if task.skipped:
            continue
        explain = explanation_request(task.explain, max_tokens=cfg.explainer_max_tokens)
        requests += 1
        prompt_chars += sum(len(m.content) for m in explain.messages)
        completion += cfg.explainer_max_tokens
        shown_chars = sum(len("".join(c.tokens)) + 16 for c in task.activating + task.non_activating)
        size = cfg.contexts_per_request
        for scorer, batches in (("detection", math.ceil((len(task.activating) + len(task.non_activating)) / size)),
                                ("fuzzing", math.ceil(len(task.activating) / size))):
            if scorer in cfg.scorers:
                requests += batches
                prompt_chars += shown_chars + 600 * batches
                completion += (4 * size + 24 if size > 1 else 2) * batches
        if "simulation" in cfg.scorers:
            shown = min(cfg.simulation_contexts, len(task.activating) + len(task.non_activating))
            requests += shown
            prompt_chars += shown * 800
            completion += shown * 60
    return {"latents": sum(1 for task in tasks if not task.skipped), "requests": requests,
            "prompt_tokens": prompt_chars // 4, "completion_tokens": completion}
