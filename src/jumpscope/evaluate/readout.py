"""Next-token losses and KL with bounded memory, whatever the vocabulary.

A causal LM's logits for a whole batch (``[B, T, vocab]``, e.g. 16 x 1024 x 49,152 floats = 3.2 GB
for SmolLM2) dwarf everything else an evaluation holds. So a pass runs the model only up to the
input of its LM head (the final hidden states, ``[n, d]`` at the scored predictions), and the head,
log-softmax, target log-probability and KL run over at most ``chunk`` positions at a time, keeping
per-chunk sums only. The KL's clean log-probabilities are recomputed from the clean hidden states
chunk by chunk (one extra head matmul per chunk, no ``[n, vocab]`` tensor kept between passes).

A model whose logits are not just its head applied to the final hidden states (a transform after
the head that :func:`head_logits` does not know) is detected on a short prefix; it then keeps the
model's own logits at the scored predictions (as before: memory grows with the vocabulary), still
log-softmaxed chunk by chunk.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..models.hookpoints import first_input, unwrap

log = logging.getLogger(__name__)

LOGIT_CHUNK_BYTES = 64 << 20
"""The float32 log-probabilities of one chunk stay under this; a chunk holds a few such tensors."""
CHECK_POSITIONS = 16
"""Positions of the first window on which the head-only logits are checked against the model's."""


class _Stop(BaseException):
    """Raised by the head's pre-hook once it has its input; BaseException so no ``except Exception`` eats it."""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def chunk_positions(vocab: int, budget: int = LOGIT_CHUNK_BYTES) -> int:
    """Positions per chunk so that one ``[chunk, vocab]`` float32 tensor fits ``budget`` bytes."""
    return max(1, budget // (4 * vocab))


def scored_mask(train_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, T-1]``: predictions made from an ordinary token of an ordinary token."""
    return train_mask[:, :-1] & train_mask[:, 1:] & attention_mask[:, 1:].bool()


def head_input(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The LM head's input ``[B, T, d]`` (model dtype), the forward stopped there so the head never
    runs on the whole batch."""
    module = unwrap(model)
    captured: list[Tensor] = []

    def hook(mod, args, kwargs):
        captured.append(first_input(mod, args, kwargs))
        raise _Stop

    device = _device(module)
    handle = module.get_output_embeddings().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        module(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(module).__name__}'s forward never called its LM head")
    return captured[0]


def head_logits(model: Any, hidden: Tensor) -> Tensor:
    """Logits from final hidden states: the LM head, then Gemma 2/3's final soft-capping."""
    module = unwrap(model)
    logits = module.get_output_embeddings()(hidden)
    cap = getattr(module.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def head_reproduces_logits(model: Any, input_ids: Tensor, attention_mask: Tensor, chunk: int | None = None) -> bool:
    """Whether :func:`head_logits` of the head's input gives the model's own logits (checked on the
    first ``CHECK_POSITIONS`` positions, at most ``chunk``, of the first window: causal, so a
    prefix suffices)."""
    module = unwrap(model)
    n = min(CHECK_POSITIONS, chunk or CHECK_POSITIONS)
    ids, mask = input_ids[:1, :n], attention_mask[:1, :n]
    device = _device(module)
    own = module(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    ours = head_logits(model, head_input(model, ids, mask)).float()
    scale = max(1.0, own.abs().max().item())
    same = own.shape == ours.shape and torch.allclose(ours, own, rtol=1e-2, atol=1e-2 * scale)
    if not same:
        log.warning("%s's logits are not its LM head's output alone; evaluation keeps its full logits "
                    "(memory grows with the vocabulary)", type(module).__name__)
    return same


def scored_values(model: Any, input_ids: Tensor, train_mask: Tensor, attention_mask: Tensor,
                  via_head: bool = True) -> tuple[Tensor, Tensor]:
    """``(values [n, d or vocab], targets [n])`` at the scored predictions: the LM head's input
    (``via_head``) or the model's own logits, in the model's dtype."""
    module = unwrap(model)
    device = _device(module)
    scored = scored_mask(train_mask, attention_mask).to(device)
    if via_head:
        values = head_input(model, input_ids, attention_mask)
    else:
        values = module(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    return values[:, :-1][scored], input_ids[:, 1:].to(device)[scored]


def _logprobs(model: Any, values: Tensor, via_head: bool) -> Tensor:
    logits = head_logits(model, values) if via_head else values
    return logits.float().log_softmax(-1)


def chunked_sums(model: Any, values: Tensor, targets: Tensor, clean: Tensor | None = None, *,
                 via_head: bool = True, chunk: int | None = None) -> tuple[float, float]:
    """``(sum of cross-entropies, sum of KL(clean || these))`` over the predictions, ``chunk``
    positions at a time (default: :func:`chunk_positions` of the vocabulary); KL is 0 without ``clean``."""
    if chunk is None:
        vocab = unwrap(model).get_output_embeddings().weight.shape[0] if via_head else values.shape[-1]
        chunk = chunk_positions(vocab)
    ce = kl = 0.0
    targets = targets.to(values.device)  # a cached clean pass (evaluate/passcache.py) is read onto the CPU
    for start in range(0, values.shape[0], chunk):
        part = slice(start, start + chunk)
        logprobs = _logprobs(model, values[part], via_head)
        ce -= logprobs.gather(1, targets[part, None]).double().sum().item()
        if clean is not None:
            reference = _logprobs(model, clean[part], via_head)
            kl += (reference.exp() * (reference - logprobs)).sum().double().item()
    return ce, kl
