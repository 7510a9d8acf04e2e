"""The model's own measures with SAEs spliced in (SPEC 3).

- Causal LMs: delta LM loss = next-token cross-entropy with the sites replaced by the SAEs'
  reconstructions minus the clean cross-entropy. Predictions are scored where both the position
  and the token it predicts are ordinary tokens (``train_mask``), so the prediction made at BOS
  and predictions of EOS/pad are skipped.
- Encoders (no LM head): 1 - cosine(clean sentence embedding, spliced sentence embedding), with
  mean pooling over the attended tokens and L2 normalisation (the sentence-transformers recipe).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..models.hookpoints import unwrap
from ..models.splice import splice
from ..sae.base import SAE


def _unpack(batch: tuple) -> tuple[Tensor, Tensor, Tensor]:
    input_ids, train_mask = batch[0], batch[1]
    attention_mask = batch[2] if len(batch) > 2 else torch.ones_like(input_ids, dtype=torch.bool)
    return input_ids, train_mask.bool(), attention_mask.bool()


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def next_token_losses(model: Any, input_ids: Tensor, train_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-prediction cross-entropy at the scored positions (a flat tensor)."""
    module = unwrap(model)
    if not hasattr(module, "get_output_embeddings") or module.get_output_embeddings() is None:
        raise ValueError(f"{type(module).__name__} has no language-model head: delta LM loss needs a causal LM "
                         "(for an encoder the downstream measure is the embedding distance)")
    device = _device(module)
    logits = module(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits.float()
    targets = input_ids[:, 1:].to(device)
    scored = (train_mask[:, :-1] & train_mask[:, 1:] & attention_mask[:, 1:]).to(device)
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return losses[scored]


def sentence_embeddings(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    module = unwrap(model)
    device = _device(module)
    mask = attention_mask.to(device)
    hidden = module(input_ids=input_ids.to(device), attention_mask=mask)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


@torch.inference_mode()
def downstream_each(model: Any, kind: str, batches: Iterable[tuple],
                    groups: Mapping[str, Mapping[str, SAE]]) -> dict[str, dict[str, float]]:
    """The model's own measure for each group of SAEs spliced in together (``{name: {site: sae}}``):
    delta LM loss for causal LMs, embedding distance for encoders. The clean pass runs once per
    batch, whatever the number of groups."""
    causal = kind == "causal_lm"
    totals = {name: 0.0 for name in groups}
    clean_total = count = 0.0
    for batch in batches:
        ids, train, attention = _unpack(batch)
        if causal:
            clean = next_token_losses(model, ids, train, attention)
            clean_total += clean.sum().item()
            count += clean.numel()
        else:
            clean = sentence_embeddings(model, ids, attention)
            count += ids.shape[0]
        for name, saes in groups.items():
            with splice(model, saes):
                if causal:
                    totals[name] += next_token_losses(model, ids, train, attention).sum().item()
                else:
                    spliced = sentence_embeddings(model, ids, attention)
                    totals[name] += (1.0 - (clean * spliced).sum(-1)).sum().item()
    if count == 0:
        raise ValueError("no scored tokens or sequences in the evaluation batches")
    if causal:
        return {name: {"ce_clean": clean_total / count, "ce_spliced": total / count,
                       "delta_lm_loss": (total - clean_total) / count, "n_predictions": int(count)}
                for name, total in totals.items()}
    return {name: {"embedding_1_minus_cosine": total / count, "n_sequences": int(count)}
            for name, total in totals.items()}


def downstream(model: Any, kind: str, batches: Iterable[tuple], saes: Mapping[str, SAE]) -> dict[str, float]:
    """The model's own measure with ``saes`` (``{site: sae}``) spliced in together."""
    return downstream_each(model, kind, batches, {"spliced": saes})["spliced"]
