"""``jumpscope steer``: generate from prompts with and without interventions on an SAE's latents.

The model defaults to the one the SAE records (``cfg.model``), as ``jumpscope eval`` does, and
the site to the SAE's ``cfg.site``. Interventions are given as text: ``--steer LATENT:ALPHA``,
``--clamp LATENT:VALUE``, ``--ablate LATENT[,LATENT...]``; they apply in that order per token:
ablations, then clamps, then steering.

Every run is measured (:mod:`.steer_measures`): how often concept words appear in the unsteered
and the steered generations (and in a random-direction control's, with ``control='random'``), and
the fluency cost, the steered text's loss under the plain model minus the unsteered text's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..device import resolve_device
from ..formats.loading import load_saes, model_of
from ..steer.generate import chat_prompt_ids
from ..steer.intervene import Positions
from ..steer.interventions import Ablate, Clamp, Intervention, Steer, describe
from .steer_measures import choose_concept_words, format_steer, measure_steering, read_found, read_prompts

__all__ = ["SteerJobConfig", "parse_interventions", "parse_positions", "run_steer", "steer_results"]


@dataclass
class SteerJobConfig:
    """What to generate, with which interventions, and how to print it."""

    sae: str
    """The SAE: a folder or file in any supported format, or hf://owner/name/path."""

    prompt: tuple[str, ...] = ()
    """Prompts to continue (one or more)."""

    steer: tuple[str, ...] = ()
    """LATENT:ALPHA items: add ALPHA times the latent's decoder direction (ALPHA may be negative)."""

    clamp: tuple[str, ...] = ()
    """LATENT:VALUE items: set the latent to VALUE (>= 0) at every edited position."""

    ablate: tuple[str, ...] = ()
    """LATENT[,LATENT...] items: remove these latents' contribution (the SAE's error term is kept)."""

    model: str | None = None
    """The model to run; None: the one the SAE was trained on (its config's 'model')."""

    site: str | None = None
    """Hook site to intervene at; None: the SAE's own (its config's 'site')."""

    chat: bool = False
    """Wrap each prompt in the model's chat template as a user turn, ready for the assistant's reply
    (refused when the tokenizer has none); off: the plain prompt after the document-start token
    the SAE's training windows start with."""

    positions: str = "all"
    """Which token positions are edited: 'all', 'new' (generated tokens only, not the prompt), or a
    start position N (positions >= N)."""

    max_new_tokens: int = 40
    """Tokens to generate per prompt."""

    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""

    seed: int = 0
    """Seed of the sampling (the same draws for the unsteered and the steered run); sample s of a
    prompt uses seed + s."""

    prompts: str | None = None
    """A file with one prompt per line (blank lines skipped), added after the --prompt values."""

    samples: int = 1
    """Generations per prompt and condition (seeds seed, seed + 1, ...; more than 1 needs
    temperature > 0), so concept rates are fractions over generations."""

    concept_words: str | None = None
    """Comma-separated words whose appearance measures the concept (whole words, any case); None:
    the words among the top logit-lens tokens of the first steered (else clamped, else ablated)
    latent, or with --found the tokens its latents' examples peak on."""

    lens_top: int = 10
    """Promoted logit-lens tokens read for the default concept words."""

    control: Literal["none", "random"] = "none"
    """'random': also generate with each steered latent's direction replaced by a random direction
    of the same norm (seeded by seed + latent) and the same alpha, and report it beside the steering."""

    found: str | None = None
    """A JSON file written by 'jumpscope find --out': with --ablate-found N, its top N latents are
    ablated and, without --concept-words, the tokens their examples peak on are the concept words."""

    ablate_found: int = 0
    """Ablate the top N latents of --found (0: none)."""

    width: int = 100
    """Characters per printed line (the two generations share it in columns)."""

    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', ..."""

    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""

    device_map: Literal["auto"] | None = None
    """'auto': spread a transformers model too large for one GPU over this machine's GPUs (the
    SAE runs on its site's layer's device); refused without CUDA. None: the model on --device."""

    allow_network: bool = False
    """Allow downloads from the Hugging Face hub (model and SAE)."""

    def __post_init__(self) -> None:
        if not (self.prompt or self.prompts):
            raise ValueError("give at least one prompt (--prompt or --prompts FILE)")
        if not (self.steer or self.clamp or self.ablate or self.ablate_found):
            raise ValueError("give at least one intervention: steer, clamp, ablate or ablate_found")
        if self.samples < 1:
            raise ValueError(f"samples must be positive, got {self.samples}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("several samples per prompt need temperature > 0 (greedy decoding repeats itself)")
        if self.lens_top < 1:
            raise ValueError(f"lens_top must be positive, got {self.lens_top}")
        if self.control not in ("none", "random"):
            raise ValueError(f"control must be 'none' or 'random', got {self.control!r}")
        if self.control == "random" and not self.steer:
            raise ValueError("control='random' mirrors steering: give --steer LATENT:ALPHA")
        if self.ablate_found < 0 or bool(self.ablate_found) != bool(self.found):
            raise ValueError("ablate_found N (> 0) and found FILE go together")
        parse_interventions(self.steer, self.clamp, self.ablate)
        parse_positions(self.positions)
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.width < 40:
            raise ValueError(f"width must be at least 40 characters, got {self.width}")


def _number(text: str, item: str, option: str, form: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{option} {item!r}: expected {form}, e.g. 12:8") from None


def _latent(text: str, item: str, option: str, form: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{option} {item!r}: expected {form} with an integer latent index") from None


def parse_interventions(steer: tuple[str, ...] = (), clamp: tuple[str, ...] = (),
                        ablate: tuple[str, ...] = ()) -> list[Intervention]:
    """``Ablate``s, then ``Clamp``s, then ``Steer``s from their text forms; errors name the item."""
    edits: list[Intervention] = []
    for item in ablate:
        latents = [part for part in item.split(",") if part.strip()]
        if not latents:
            raise ValueError(f"ablate {item!r}: expected LATENT[,LATENT...]")
        edits.append(Ablate(tuple(_latent(part, item, "ablate", "LATENT[,LATENT...]") for part in latents)))
    for option, items, make, form in (("clamp", clamp, Clamp, "LATENT:VALUE"), ("steer", steer, Steer, "LATENT:ALPHA")):
        for item in items:
            latent, sep, value = item.partition(":")
            if not sep:
                raise ValueError(f"{option} {item!r}: expected {form}, e.g. 12:8")
            edits.append(make(_latent(latent, item, option, form), _number(value, item, option, form)))
    return edits


def parse_positions(text: str) -> Positions:
    """'all', 'new' or a start position from its text form."""
    if text in ("all", "new"):
        return text  # type: ignore[return-value]
    try:
        start = int(text)
    except ValueError:
        raise ValueError(f"positions must be 'all', 'new' or a start position, got {text!r}") from None
    if start < 0:
        raise ValueError(f"positions: a start position is >= 0, got {start}")
    return start


def run_steer(job: SteerJobConfig) -> str:
    """Generate each prompt's continuation without and with the interventions; returns the report."""
    return format_steer(steer_results(job), job.width)


def steer_results(job: SteerJobConfig) -> dict[str, Any]:
    """Generate and measure every condition; JSON-ready results (see :func:`measure_steering`)."""
    from ..models.loading import load_model  # lazy: transformers loads only when steering runs

    name, sae = next(iter(load_saes([job.sae], job.site, job.allow_network).items()))
    site = sae.cfg.site
    model_spec = model_of(job.model, {name: sae})
    device = resolve_device(job.device)
    loaded = load_model(model_spec, dtype=job.dtype, device=device, allow_network=job.allow_network,
                        device_map=job.device_map)
    if loaded.kind != "causal_lm" or loaded.tokenizer is None:
        raise ValueError(f"{loaded.name}: steering generation needs a causal LM with a tokenizer "
                         f"(this is {'an encoder' if loaded.kind != 'causal_lm' else 'a model without tokenizer'})")
    sae = sae.to(device).eval()
    edits = parse_interventions(job.steer, job.clamp, job.ablate)
    found_latents, found_words, found_source = read_found(job.found, job.ablate_found) if job.found else ([], [], "")
    if found_latents:  # ablations come first, as parse_interventions orders them
        edits.insert(0, Ablate(tuple(found_latents)))
    prompts = read_prompts(job.prompt, job.prompts)
    if job.chat:
        chat_prompt_ids(loaded.tokenizer, "")  # no chat template: refuse before generating anything
    settings: dict[str, Any] = dict(max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                                    positions=parse_positions(job.positions), chat=job.chat)
    sampling = "greedy" if job.temperature == 0 else f"temperature {job.temperature:g}, seed {job.seed}"
    lines = [f"SAE {job.sae} ({sae.architecture}, {sae.cfg.d_sae} latents) at {site} of {loaded.name}",
             f"interventions: {describe(edits)} (positions: {job.positions}); {sampling}, "
             f"{job.max_new_tokens} new tokens" + (" (chat template)" if job.chat else "")]
    words, source = choose_concept_words(job.concept_words, edits, sae, loaded, job.lens_top, found_words,
                                         found_source)
    results = measure_steering(loaded, sae, site, prompts, edits, words, control=job.control, samples=job.samples,
                               seed=job.seed, **settings)
    return {"sae": job.sae, "model": loaded.name, "site": site, "interventions": describe(edits),
            "positions": job.positions, "sampling": sampling, "max_new_tokens": job.max_new_tokens,
            "chat": job.chat, "concept_source": source, "header": lines, **results}
