"""Logit lens of SAE latents: which next tokens each latent's decoder direction promotes or suppresses.

For latent i the direct effect on the logits is ``W_U @ (gain * W_dec[i])``, with ``W_U`` the
causal LM's unembedding and ``gain`` the final norm's elementwise weight (``1 + weight`` for
Gemma's RMSNorm; ones where the model has no final norm). The norm's data-dependent scale is left
out, as is usual: it rescales every token's logit alike and so does not change the ranking.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.hookpoints import unwrap
from ..sae.base import SAE
from .records import LogitLens

FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")
"""Attribute names of the final norm on a transformers base model (Llama/Gemma/Qwen/Mistral,
GPT-2, GPT-NeoX, OPT/Phi)."""


def unembedding(model: Any) -> tuple[Tensor, Tensor]:
    """``(W_U [vocab, d_model], gain [d_model])`` of a causal LM; a clear error for other models."""
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no language-model head: the logit lens needs a causal LM")
    W_U = head.weight.detach()
    base = getattr(model, "base_model", model)
    norm = next((getattr(base, name) for name in FINAL_NORMS if isinstance(getattr(base, name, None),
                                                                           torch.nn.Module)), None)
    weight = getattr(norm, "weight", None)
    if weight is None:
        gain = torch.ones(W_U.shape[1], dtype=W_U.dtype, device=W_U.device)
    else:
        gain = weight.detach() + (1.0 if "Gemma" in type(norm).__name__ else 0.0)  # Gemma scales by 1 + weight
    if gain.shape[0] != W_U.shape[1]:
        raise ValueError(f"final norm width {gain.shape[0]} != unembedding width {W_U.shape[1]}")
    return W_U, gain


@torch.no_grad()
def logit_lens(sae: SAE, model: Any, n: int = 10, chunk: int = 1024) -> LogitLens:
    """The ``n`` most promoted and most suppressed tokens of every latent (in chunks of latents, so
    a 16k x 256k logit matrix is never held at once)."""
    W_U, gain = unembedding(model)
    W_dec = sae.W_dec.detach()
    if W_dec.shape[1] != W_U.shape[1]:
        raise ValueError(f"the SAE's decoder writes width {W_dec.shape[1]} but the model's unembedding reads "
                         f"{W_U.shape[1]}: the logit lens needs an SAE on the residual stream or a sublayer output")
    n = min(n, W_U.shape[0])
    W_U, gain = W_U.float(), gain.float()
    parts: dict[str, list[Tensor]] = {"promoted_ids": [], "promoted_values": [], "suppressed_ids": [],
                                      "suppressed_values": []}
    for start in range(0, W_dec.shape[0], chunk):
        directions = W_dec[start:start + chunk].to(W_U.device, torch.float32) * gain
        logits = directions @ W_U.T
        top, low = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        parts["promoted_ids"].append(top.indices.cpu())
        parts["promoted_values"].append(top.values.cpu())
        parts["suppressed_ids"].append(low.indices.cpu())
        parts["suppressed_values"].append(low.values.cpu())
    return LogitLens(**{name: torch.cat(values) for name, values in parts.items()})
