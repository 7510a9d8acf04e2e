"""Measuring steering: how often concept words appear, and what the text costs in fluency.

Two measures per condition (unsteered, steered, a control, ablated, ...), over every generation:

- **concept rate** (:func:`concept_rate`): occurrences of the concept words as whole words,
  case-insensitively, counted per generation, per word and per generated token, and the fraction of
  generations with at least one;
- **loss** (:func:`continuation_loss`): the mean next-token NLL, in nats, of a generated continuation
  given its prompt *under the model without interventions*. The steered text's loss minus the
  unsteered text's is the **fluency cost** of steering: how much less likely the plain model finds
  what steering made it write.

:func:`compare_generations` generates every prompt ``samples`` times (seeds ``seed + s``, the same
for every condition, so conditions differ only by their interventions) and measures each condition.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..models.hookpoints import unwrap
from ..models.loading import LoadedModel
from .generate import _prompt_ids, generate_ids
from .intervene import Positions, SiteInterventions

__all__ = ["ConceptRate", "Generation", "Condition", "concept_pattern", "concept_rate", "continuation_loss",
           "example_words", "words_of", "compare_generations"]

_WORD = re.compile(r"\w+")


def concept_pattern(words: Sequence[str]) -> re.Pattern[str]:
    """A case-insensitive pattern matching any of ``words`` as a whole word: not inside a longer
    word ("cat" does not match "cats" or "concatenate"), but a word may hold spaces or punctuation."""
    cleaned = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)  # longest first
    if not cleaned:
        raise ValueError("no concept words (all empty)")
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, cleaned)) + r")(?!\w)", re.IGNORECASE)


@dataclass
class ConceptRate:
    """How often the concept words appear in a set of texts."""

    texts: int
    """Texts (generations) read."""
    with_concept: int
    """Texts with at least one concept word."""
    hits: int
    """Concept-word occurrences over all texts."""
    words: int
    """Words (runs of letters, digits or _) over all texts."""
    tokens: int | None = None
    """Generated tokens over all texts, where known."""

    @property
    def fraction(self) -> float:
        """Share of texts showing the concept."""
        return self.with_concept / self.texts if self.texts else math.nan

    @property
    def per_word(self) -> float:
        return self.hits / self.words if self.words else 0.0

    @property
    def per_token(self) -> float | None:
        return None if self.tokens is None else (self.hits / self.tokens if self.tokens else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction, "per_word": self.per_word, "per_token": self.per_token}


def concept_rate(texts: Sequence[str], words: Sequence[str], tokens: int | None = None) -> ConceptRate:
    """Count the concept ``words`` in ``texts`` (whole words, any case); ``tokens``: how many tokens
    the texts were generated in, for a per-token rate."""
    if isinstance(texts, str):
        raise TypeError("texts is a list of texts, got one string")
    pattern = concept_pattern(words)
    counts = [len(pattern.findall(text)) for text in texts]
    return ConceptRate(texts=len(texts), with_concept=sum(c > 0 for c in counts), hits=sum(counts),
                       words=sum(len(_WORD.findall(text)) for text in texts), tokens=tokens)


def _as_ids(ids: Tensor | Sequence[int], what: str) -> Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"{what} must be one sequence of token ids, got shape {tuple(ids.shape)}")
    return ids


@torch.no_grad()
def continuation_loss(model: Any, tokenizer: Any, prompt_ids: str | Tensor | Sequence[int],
                      continuation_ids: Tensor | Sequence[int]) -> float:
    """Mean next-token NLL (nats) of ``continuation_ids`` given ``prompt_ids`` under ``model`` as it
    is (call it outside any ``intervene`` block to score under the plain model). A text prompt is
    tokenised with ``tokenizer`` as generation does (BOS included). NaN for an empty continuation."""
    prompt = _as_ids(_prompt_ids(model, tokenizer, prompt_ids)[0] if isinstance(prompt_ids, str) else prompt_ids,
                     "prompt_ids")
    continuation = _as_ids(continuation_ids, "continuation_ids")
    if not prompt.numel():
        raise ValueError("continuation_loss needs a non-empty prompt (the first token has no prediction)")
    if not continuation.numel():
        return math.nan
    module = unwrap(model)
    device = next(module.parameters()).device
    ids = torch.cat([prompt, continuation.to(prompt.device)]).to(device)[None]
    logits = module(ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    # logits at position t predict token t + 1: the continuation is predicted from P - 1 to the second last
    predicted = logits[prompt.numel() - 1:-1]
    return float(torch.nn.functional.cross_entropy(predicted, ids[0, prompt.numel():]))


def example_words(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    """The concept words of a latent's top examples (``jumpscope find`` JSON): the tokens it peaks on."""
    return words_of(str(example.get("token", "")) for example in examples)


def words_of(candidates: Any) -> list[str]:
    out, seen = [], set()
    for word in candidates:
        word = word.strip()
        if _WORD.search(word) and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


@dataclass
class Generation:
    """One generated continuation and its measures."""

    prompt: int
    """Index of the prompt."""
    seed: int
    text: str
    tokens: int
    """Generated tokens."""
    loss: float
    """Mean NLL of the continuation under the plain model (nats)."""
    hits: int
    """Concept-word occurrences in ``text``."""


@dataclass
class Condition:
    """All generations of one condition (e.g. 'steered') and their totals."""

    name: str
    description: str
    generations: list[Generation] = field(default_factory=list)
    rate: ConceptRate | None = None

    @property
    def loss(self) -> float:
        """Mean NLL per generated token over all generations (token-weighted)."""
        scored = [(g.loss, g.tokens) for g in self.generations if g.tokens and not math.isnan(g.loss)]
        total = sum(n for _, n in scored)
        return sum(loss * n for loss, n in scored) / total if total else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "loss": self.loss,
                "concept": self.rate.to_dict() if self.rate else None,
                "generations": [asdict(g) for g in self.generations]}


def compare_generations(model: Any, tokenizer: Any, prompts: Sequence[str],
                        conditions: Mapping[str, tuple[str, SiteInterventions | None]], words: Sequence[str], *,
                        samples: int = 1, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
                        positions: Positions = "all", chat: bool = False) -> dict[str, Condition]:
    """Generate each prompt ``samples`` times per condition ({name: (description, interventions or
    None)}), with seeds ``seed + s`` shared by all conditions, and measure concept rate and loss
    (under the plain model) of every generation. ``chat``: prompts go through the chat template."""
    if tokenizer is None and isinstance(model, LoadedModel):
        tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("measuring generations needs a tokenizer")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if samples > 1 and temperature == 0:
        raise ValueError("several samples per prompt need temperature > 0 (greedy decoding repeats itself)")
    pattern = concept_pattern(words)
    results = {name: Condition(name, description) for name, (description, _) in conditions.items()}
    for index, prompt in enumerate(prompts):
        ids = _prompt_ids(model, tokenizer, prompt, chat)
        for sample in range(samples):
            for name, (_, interventions) in conditions.items():
                out = generate_ids(model, tokenizer, ids, interventions, max_new_tokens=max_new_tokens,
                                   temperature=temperature, seed=seed + sample, positions=positions)
                new = out[0, ids.shape[1]:]
                text = tokenizer.decode(new.tolist(), skip_special_tokens=True)
                results[name].generations.append(Generation(
                    prompt=index, seed=seed + sample, text=text, tokens=int(new.numel()),
                    loss=continuation_loss(model, tokenizer, ids[0], new), hits=len(pattern.findall(text))))
    for result in results.values():
        result.rate = concept_rate([g.text for g in result.generations], words,
                                   tokens=sum(g.tokens for g in result.generations))
    return results
