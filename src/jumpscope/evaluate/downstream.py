"""The model's own measures with SAEs spliced in (SPEC 3).

Causal LMs, per group of SAEs spliced in together:

- ``delta_lm_loss``: next-token cross-entropy with the sites replaced by the reconstructions minus
  the clean cross-entropy. A prediction is scored where both the position and the token it
  predicts are ordinary tokens (``train_mask``), so the prediction made at BOS and predictions of
  EOS / padding are skipped.
- ``kl_div``: mean over the same predictions of KL(clean || spliced) of the next-token distributions.
- ``ce_loss_recovered_zero`` / ``_mean``: (CE_ablated - CE_spliced) / (CE_ablated - CE_clean), where
  the ablation replaces the same sites by zeros, or by the mean activation of each site over the
  evaluation tokens. 1 is a perfect reconstruction, 0 is no better than the ablation.
  ``ce_loss_recovered`` is the zero-ablation one (the paper's).

Encoders (no LM head): ``embedding_1_minus_cosine`` = 1 - cosine(clean, spliced sentence
embedding), mean pooling over attended tokens and L2 normalisation (the sentence-transformers
recipe), with the same recovered fractions against the ablations.

Splicing happens only at ``train_mask`` positions unless ``splice_special=True``: SAEs are never
trained on BOS / CLS / SEP / padding, whose activations (a BOS attention sink, typically) are
outliers, so those keep their clean values. Every pass runs once per batch: the clean pass and
each ablation once for all groups that share the sites.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..models.harvest import harvest, unpack_batch
from ..models.hookpoints import unwrap
from ..models.splice import replace_sites, splice
from ..sae.base import SAE

ABLATIONS = ("zero", "mean")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_lm_head(model: Any) -> None:
    module = unwrap(model)
    if not hasattr(module, "get_output_embeddings") or module.get_output_embeddings() is None:
        raise ValueError(f"{type(module).__name__} has no language-model head: delta LM loss, KL and CE recovered "
                         "need a causal LM (for an encoder the downstream measure is the embedding distance)")


def next_token_logprobs(model: Any, input_ids: Tensor, train_mask: Tensor,
                        attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities ``[n, vocab]`` (float32) and targets ``[n]`` at the scored predictions."""
    check_lm_head(model)
    module = unwrap(model)
    device = _device(module)
    logits = module(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    scored = (train_mask[:, :-1] & train_mask[:, 1:] & attention_mask[:, 1:]).to(device)
    return logits[:, :-1][scored].float().log_softmax(-1), input_ids[:, 1:].to(device)[scored]


def next_token_losses(model: Any, input_ids: Tensor, train_mask: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-prediction cross-entropy at the scored positions (a flat tensor)."""
    logprobs, targets = next_token_logprobs(model, input_ids, train_mask, attention_mask)
    return -logprobs.gather(1, targets[:, None])[:, 0]


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
def site_means(model: Any, batches: Iterable[Any], sites: Sequence[str]) -> dict[str, Tensor]:
    """Mean activation of each site over the ordinary tokens of ``batches`` (float64 sums)."""
    sums: dict[str, Tensor] = {}
    count = 0
    for chunk in harvest(model, batches, sites):
        for site, rows in chunk.items():
            sums[site] = sums.get(site, 0) + rows.double().sum(0)
        count += next(iter(chunk.values())).shape[0]
    if count == 0:
        raise ValueError("no ordinary tokens in the evaluation batches to take site means over")
    return {site: (total / count).float() for site, total in sums.items()}


def _ablation(kind: str, means: Mapping[str, Tensor], site: str):
    if kind == "zero":
        return torch.zeros_like
    if kind == "mean":
        mean = means[site]
        return lambda x: mean.to(x.device, x.dtype).expand_as(x).clone()
    raise ValueError(f"unknown ablation {kind!r}; choose from {', '.join(ABLATIONS)}")


def _recovered(ablated: float, spliced: float, clean: float) -> float | None:
    gap = ablated - clean
    return None if gap == 0 else (ablated - spliced) / gap


@torch.inference_mode()
def spliced_measures(model: Any, kind: str, batches: Iterable[Any], groups: Mapping[str, Mapping[str, SAE]], *,
                     ablations: Sequence[str] = ABLATIONS, means: Mapping[str, Tensor] | None = None,
                     splice_special: bool = False, progress: bool = False) -> dict[str, dict[str, Any]]:
    """The model's own measures for each group of SAEs spliced in together (``{name: {site: sae}}``).

    ``kind`` is ``"causal_lm"`` or ``"encoder"``. ``means`` (per site) default to the mean
    activations over ``batches`` (one extra pass) when a mean ablation is asked for. ``progress``
    shows a bar over the batches.
    """
    from tqdm.auto import tqdm

    causal = kind == "causal_lm"
    if causal:
        check_lm_head(model)
    batches = list(batches)
    site_sets = {name: tuple(sorted(saes)) for name, saes in groups.items()}
    if "mean" in ablations and means is None:
        means = site_means(model, batches, sorted({s for sites in site_sets.values() for s in sites}))
    ablated = {(sites, a): 0.0 for sites in set(site_sets.values()) for a in ablations}
    spliced = {name: 0.0 for name in groups}
    kl = {name: 0.0 for name in groups}
    clean_total = count = 0.0
    passes = len(set(site_sets.values())) * len(ablations) + len(groups) + 1
    for batch in tqdm(batches, desc=f"evaluating ({passes} passes per batch)", unit="batch", disable=not progress):
        ids, train, attention = unpack_batch(batch)
        attention = torch.ones_like(train) if attention is None else attention
        positions = None if splice_special else train & attention
        if causal:
            clean_lp, targets = next_token_logprobs(model, ids, train, attention)
            clean_p = clean_lp.exp()

            def run() -> tuple[float, Tensor]:
                logprobs, _ = next_token_logprobs(model, ids, train, attention)
                return -logprobs.gather(1, targets[:, None]).double().sum().item(), logprobs

            clean_total += -clean_lp.gather(1, targets[:, None]).double().sum().item()
            count += targets.numel()
        else:
            clean_emb = sentence_embeddings(model, ids, attention)

            def run() -> tuple[float, Tensor]:
                embedding = sentence_embeddings(model, ids, attention)
                return (1.0 - (clean_emb * embedding).sum(-1)).double().sum().item(), embedding

            count += ids.shape[0]
        for sites, ablation in ablated:
            with replace_sites(model, {s: _ablation(ablation, means or {}, s) for s in sites}, positions=positions):
                ablated[sites, ablation] += run()[0]
        for name, saes in groups.items():
            with splice(model, saes, positions=positions):
                total, out = run()
            spliced[name] += total
            if causal:
                kl[name] += (clean_p * (clean_lp - out)).sum().double().item()
    if count == 0:
        raise ValueError("no scored tokens or sequences in the evaluation batches")
    results = {}
    for name in groups:
        sites = site_sets[name]
        if causal:
            clean, ce = clean_total / count, spliced[name] / count
            row: dict[str, Any] = {"ce_clean": clean, "ce_spliced": ce, "delta_lm_loss": ce - clean,
                                   "kl_div": kl[name] / count, "n_predictions": int(count)}
            for a in ablations:
                row[f"ce_{a}_ablated"] = ablated[sites, a] / count
                row[f"ce_loss_recovered_{a}"] = _recovered(ablated[sites, a] / count, ce, clean)
            if "zero" in ablations:
                row["ce_loss_recovered"] = row["ce_loss_recovered_zero"]
        else:
            distance = spliced[name] / count
            row = {"embedding_1_minus_cosine": distance, "n_sequences": int(count)}
            for a in ablations:
                row[f"embedding_{a}_ablated"] = ablated[sites, a] / count
                row[f"embedding_recovered_{a}"] = _recovered(ablated[sites, a] / count, distance, 0.0)
        results[name] = row
    return results


def downstream(model: Any, kind: str, batches: Iterable[Any], saes: Mapping[str, SAE], **options: Any) -> dict:
    """The model's own measures with ``saes`` (``{site: sae}``) spliced in together."""
    return spliced_measures(model, kind, batches, {"spliced": saes}, **options)["spliced"]


MAIN_MEASURE = {"causal_lm": "delta_lm_loss", "encoder": "embedding_1_minus_cosine"}
