"""The measured part of ``jumpscope steer``: prompts, concept words, conditions and the report.

Conditions: ``unsteered`` (no interventions), ``steered`` (the interventions given, the found
latents' ablation included) and, with ``control='random'``, ``control``: the same interventions
with every Steer replaced by its random-direction control (:func:`random_control`, same norm and
alpha). Each is measured by :func:`jumpscope.steer.measure.compare_generations`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from ..analysis.logit_lens import logit_lens
from ..analysis.records import token_strings
from ..errors import ConfigError
from ..safeio import read_bytes
from ..sae.base import SAE
from ..steer.interventions import Ablate, Clamp, Intervention, Steer, describe, random_control
from ..steer.measure import compare_generations, example_words, words_of
from ..steer.report import display_text, measures_table, side_by_side

__all__ = ["lens_words", "read_prompts", "read_found", "choose_concept_words", "control_edits", "measure_steering",
           "format_steer"]

MAX_FILE_BYTES = 64 << 20


def _read_text(path: str, what: str) -> str:
    try:
        return read_bytes(Path(path).expanduser(), MAX_FILE_BYTES, ConfigError).decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None


def read_prompts(prompt: Sequence[str], prompts_file: str | None) -> list[str]:
    """``--prompt`` values, then the non-blank lines of ``--prompts FILE``."""
    found = list(prompt)
    if prompts_file:
        lines = [line.strip() for line in _read_text(prompts_file, "prompts").splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"prompts file {prompts_file} has no prompts (expected one per line)")
        found += lines
    return found


def read_found(path: str, top: int) -> tuple[list[int], list[str], str]:
    """The top ``top`` latents of a ``jumpscope find --out`` JSON file, the tokens their examples
    peak on (concept words), and a description."""
    try:
        search = json.loads(_read_text(path, "find result"))
        latents = [(int(m["latent"]), m.get("examples") or []) for m in search["latents"][:top]]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is not a 'jumpscope find --out' JSON file ({error})") from None
    if len(latents) < top:
        raise ConfigError(f"{path} lists {len(latents)} latents; ablate_found asks for {top}")
    words = example_words([example for _, examples in latents for example in examples])
    return [latent for latent, _ in latents], words, f"examples of latents {', '.join(str(i) for i, _ in latents)}"


def lens_words(sae: SAE, model: Any, latent: int, tokenizer: Any = None, n: int = 10) -> list[str]:
    """The concept words a latent's logit lens suggests: its ``n`` most promoted tokens, stripped,
    without the ones that are no word (punctuation, bytes, empty) and without repeats."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the logit-lens concept words need the model's tokenizer")
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent {latent} is out of range for an SAE with {sae.cfg.d_sae} latents")
    # only W_dec is read: lens one row instead of every latent
    lens = logit_lens(_OneRow(sae.W_dec.detach()[latent:latent + 1]), model, n=n)  # type: ignore[arg-type]
    strings = token_strings(tokenizer)
    return words_of(strings[t] for t in lens.promoted_ids[0].tolist())


class _OneRow:
    """Stands in for an SAE where only ``W_dec`` is read (the logit lens of one latent)."""

    def __init__(self, W_dec: Tensor):
        self.W_dec = W_dec


def choose_concept_words(given: str | None, edits: Sequence[Intervention], sae: SAE, loaded: Any, lens_top: int,
                         found_words: Sequence[str] = (), found_source: str = "") -> tuple[list[str], str]:
    """The concept words and where they came from: the given comma-separated list; else the found
    latents' example tokens; else the logit lens of the first steered (then clamped, then
    ablated) latent."""
    if given is not None:
        words = [w.strip() for w in given.split(",") if w.strip()]
        if not words:
            raise ConfigError("concept_words: give comma-separated words, e.g. cat,dog")
        return words, "given (--concept-words)"
    if found_words:
        return list(found_words), f"{found_source} (the tokens their top examples peak on)"
    kinds = [[e.latent for e in edits if isinstance(e, Steer)], [e.latent for e in edits if isinstance(e, Clamp)],
             [i for e in edits if isinstance(e, Ablate) for i in e.latents]]
    latent = next((group[0] for group in kinds if group), None)
    if latent is None:
        raise ConfigError("no latent to take concept words from; give --concept-words")
    words = lens_words(sae, loaded, latent, loaded.tokenizer, n=lens_top)
    if not words:
        raise ConfigError(f"latent {latent}'s top {lens_top} logit-lens tokens hold no word; give --concept-words")
    return words, f"logit lens of latent {latent} (words among its top {lens_top} promoted tokens)"


def control_edits(sae: SAE, edits: Sequence[Intervention], seed: int) -> list[Intervention]:
    """``edits`` with each Steer replaced by its random-direction control."""
    if not any(isinstance(e, Steer) for e in edits):
        raise ConfigError("control='random' needs a steered latent (--steer LATENT:ALPHA) to mirror")
    return [random_control(sae, e, seed + e.latent) if isinstance(e, Steer) else e for e in edits]


def measure_steering(loaded: Any, sae: SAE, site: str, prompts: Sequence[str], edits: Sequence[Intervention],
                     words: Sequence[str], *, control: str = "none", samples: int = 1, seed: int = 0,
                     **settings: Any) -> dict[str, Any]:
    """Generate and measure every condition; JSON-ready results (``settings``: generation options
    of :func:`compare_generations`)."""
    conditions: dict[str, tuple[str, Any]] = {"unsteered": ("none", None),
                                              "steered": (describe(edits), {site: (sae, list(edits))})}
    if control == "random":
        mirrored = control_edits(sae, edits, seed)
        conditions["control"] = (describe(mirrored), {site: (sae, mirrored)})
    results = compare_generations(loaded, loaded.tokenizer, prompts, conditions, words, samples=samples, seed=seed,
                                  **settings)
    out = {name: result.to_dict() for name, result in results.items()}
    base = out["unsteered"]["loss"]
    for result in out.values():
        result["fluency_cost"] = result["loss"] - base if not math.isnan(base) else math.nan
    norms = {str(e.latent): float(sae.W_dec.detach()[e.latent].float().norm()) for e in edits if isinstance(e, Steer)}
    return {"prompts": list(prompts), "samples": samples, "seed": seed, "concept_words": list(words),
            "decoder_norms": norms, "conditions": out}


def format_steer(results: dict[str, Any], width: int) -> str:
    """The text report: header lines, generations side by side per prompt and sample, the measures."""
    lines = list(results.get("header", []))
    conditions = results["conditions"]
    names = list(conditions)
    for index, prompt in enumerate(results["prompts"]):
        rows = [[g for g in conditions[name]["generations"] if g["prompt"] == index] for name in names]
        for sample, generations in enumerate(zip(*rows)):
            title = f"prompt: {display_text(prompt)}" + (f" (seed {generations[0]['seed']})"
                                                          if results["samples"] > 1 else "")
            lines += ["", title, side_by_side([(name, g["text"]) for name, g in zip(names, generations)], width)]
    lines += ["", f"concept words ({results['concept_source']}): {', '.join(results['concept_words'])}", "",
              measures_table(conditions),
              "", "loss: mean next-token NLL of the generated text under the model without interventions; "
                  "fluency cost: loss minus the unsteered text's."]
    return "\n".join(lines)
