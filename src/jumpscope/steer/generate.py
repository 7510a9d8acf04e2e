"""Generate text from a causal LM with interventions on SAE latents (greedy or seeded sampling)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..data.tokens import encode_prompt, framing
from ..models.hookpoints import unwrap
from ..models.loading import LoadedModel
from .intervene import Positions, SiteInterventions, intervene

__all__ = ["chat_prompt_ids", "generate_ids", "generate_with", "prompt_ids"]


def _check_generation(max_new_tokens: int, temperature: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 is greedy), got {temperature!r}")


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """``prompt`` as one user turn of the model's chat template, ready for the assistant's answer,
    after the framing's first token (the document token SAE training windows start with) when the
    template does not already start with it."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'this model'} has no chat "
                         "template; drop --chat to use the prompt as plain text")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template spells its own specials
    first = framing(tokenizer).first
    return ids if first is None or ids[:1] == [first] else [first] + ids


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a text prompt, framed like training windows (:func:`jumpscope.data.tokens.framing`),
    or through the chat template with ``chat``."""
    return chat_prompt_ids(tokenizer, prompt) if chat else encode_prompt(tokenizer, prompt)


def _prompt_ids(model: Any, tokenizer: Any, prompt: str | Tensor, chat: bool = False) -> Tensor:
    device = next(unwrap(model).parameters()).device
    if isinstance(prompt, Tensor):
        ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
        return ids.to(device)
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; this model has none (pass token ids instead)")
    return torch.tensor([prompt_ids(tokenizer, prompt, chat)], dtype=torch.long, device=device)


@torch.no_grad()
def generate_ids(model: Any, tokenizer: Any, prompt: str | Tensor, interventions: SiteInterventions | None = None,
                 *, max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
                 positions: Positions = "all") -> Tensor:
    """Token ids ``[batch, prompt + new]`` generated with ``interventions`` in place.

    ``prompt``: text (tokenised with ``tokenizer`` and framed like training windows) or unpadded ids ``[seq]`` /
    ``[batch, seq]``. ``temperature`` 0 is greedy; above 0 it samples from the whole softmax (no top-k or
    top-p) with torch's RNG seeded by ``seed`` inside a forked RNG state, so the global RNG is
    untouched and the same seed gives the same draws with and without interventions."""
    _check_generation(max_new_tokens, temperature)
    module = unwrap(model)
    if isinstance(model, LoadedModel) and model.kind != "causal_lm":
        raise ValueError(f"{model.name} is an {model.kind}; generating text needs a causal LM")
    if not hasattr(module, "generate") or not callable(getattr(module, "get_output_embeddings", None)) \
            or module.get_output_embeddings() is None:
        raise ValueError(f"{type(module).__name__} has no language-model head; generating text needs a causal LM")
    ids = _prompt_ids(model, tokenizer, prompt)
    pad = getattr(tokenizer, "pad_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = getattr(module.config, "eos_token_id", None) if eos is None else eos
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False)
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), intervene(model, interventions or {}, positions=positions):
        torch.manual_seed(seed)
        return module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               pad_token_id=pad if pad is not None else eos, **sampling)


def generate_with(model: Any, tokenizer: Any, prompt: str, interventions: SiteInterventions | None = None, *,
                  max_new_tokens: int = 40, temperature: float = 0.0, seed: int = 0,
                  positions: Positions = "all", chat: bool = False) -> str:
    """The text generated after ``prompt`` (the continuation only) with ``interventions`` in place;
    see :func:`generate_ids`. ``model`` may be a LoadedModel, whose tokenizer is used when
    ``tokenizer`` is None. ``chat``: wrap the prompt in the model's chat template (a user turn)."""
    if tokenizer is None and isinstance(model, LoadedModel):
        tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("generate_with needs a tokenizer to encode the prompt and decode the continuation")
    ids = _prompt_ids(model, tokenizer, prompt, chat)
    out = generate_ids(model, tokenizer, ids, interventions, max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed, positions=positions)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
