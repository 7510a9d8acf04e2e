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
each ablation once for all groups that share the sites, and with a :class:`.passcache.PassCache`
not at all when an earlier evaluation of the same text kept them. Losses and KL are computed a
chunk of positions at a time (:mod:`.readout`), so memory does not grow with the vocabulary.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..data.processes import OneProcess, Processes
from ..errors import ConfigError
from ..models.harvest import harvest, unpack_batch
from ..models.hookpoints import unwrap
from ..models.splice import replace_sites, splice
from ..sae.base import SAE
from .passcache import CleanPass, PassCache, tensors_digest
from .readout import chunked_sums, head_reproduces_logits, scored_mask, scored_values

ABLATIONS = ("zero", "mean")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_lm_head(model: Any) -> None:
    module = unwrap(model)
    if not hasattr(module, "get_output_embeddings") or module.get_output_embeddings() is None:
        raise ValueError(f"{type(module).__name__} has no language-model head: delta LM loss, KL and CE recovered "
                         "need a causal LM (for an encoder the downstream measure is the embedding distance)")


def parse_ablations(values: Sequence[str]) -> tuple[str, ...]:
    """``("zero,mean",)``, ``("zero", "mean")`` or ``("none",)`` -> the ablations to measure against."""
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablations {unknown}; choose from {', '.join(ABLATIONS)} (comma-separated) or none")
    return tuple(dict.fromkeys(names))


def sentence_embeddings(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    module = unwrap(model)
    device = _device(module)
    mask = attention_mask.to(device)
    hidden = module(input_ids=input_ids.to(device), attention_mask=mask)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


class Share:
    """This process's part of an evaluation under torchrun: batch i goes to process i mod world
    size, and :meth:`sum` adds numbers up over the processes (in rank order, so every process gets
    the same result). The default is one process with everything."""

    def __init__(self, processes: Processes | None = None):
        self.processes = processes or OneProcess()
        self.rank, self.world_size = self.processes.rank, self.processes.world_size

    def mine(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.rank::self.world_size])

    def sum(self, values: Any) -> Any:
        """``values`` (a number, a list of numbers, a tensor or a dict of them) summed over the processes."""
        parts = self.processes.all_gather_object(values)
        if isinstance(values, dict):
            return {key: functools.reduce(operator.add, [part[key] for part in parts]) for key in values}
        if isinstance(values, list):
            return [functools.reduce(operator.add, [part[i] for part in parts]) for i in range(len(values))]
        return functools.reduce(operator.add, parts)


@torch.inference_mode()
def site_means(model: Any, batches: Iterable[Any], sites: Sequence[str], share: Share | None = None) -> dict[str, Tensor]:
    """Mean activation of each site over the ordinary tokens of ``batches`` (float64 sums; with a
    ``share``, ``batches`` are this process's and the sums are over every process's)."""
    sums: dict[str, Tensor] = {site: torch.zeros((), dtype=torch.float64) for site in sites}
    count = 0
    for chunk in harvest(model, batches, sites):
        for site, rows in chunk.items():
            sums[site] = sums[site] + rows.double().sum(0).cpu()
        count += next(iter(chunk.values())).shape[0]
    if share is not None and share.world_size > 1:
        sums, count = share.sum(sums), share.sum(count)
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


class _Passes:
    """One batch list's forward passes: the clean one, and any pass with hooks in place, scored
    against it; ``tick`` advances the progress bar once per forward."""

    def __init__(self, model: Any, causal: bool, batches: list, splice_special: bool, chunk: int | None,
                 tick: Callable[[], None], mine: list | None = None):
        """``mine``: the batches this process runs (default all); ``batches[0]`` decides, on every
        process alike, whether the LM head reproduces the logits."""
        self.model, self.causal, self.chunk, self.tick = model, causal, chunk, tick
        self.batches = batches if mine is None else mine
        self.unpacked = []
        for batch in self.batches:
            ids, train, attention = unpack_batch(batch)
            attention = torch.ones_like(train) if attention is None else attention
            self.unpacked.append((ids, train, attention, None if splice_special else train & attention))
        ids, _, attention = unpack_batch(batches[0])
        attention = torch.ones_like(ids) if attention is None else attention
        self.via_head = causal and head_reproduces_logits(model, ids, attention, chunk)

    def per_batch(self) -> list[int]:
        if self.causal:
            return [int(scored_mask(train, attention).sum()) for _, train, attention, _ in self.unpacked]
        return [ids.shape[0] for ids, *_ in self.unpacked]

    def outputs(self, i: int) -> tuple[Tensor, Tensor | None]:
        """``(values, targets)`` of batch ``i`` under whatever hooks are in place."""
        ids, train, attention, _ = self.unpacked[i]
        self.tick()
        if self.causal:
            return scored_values(self.model, ids, train, attention, self.via_head)
        return sentence_embeddings(self.model, ids, attention), None

    def score(self, values: Tensor, targets: Tensor | None, clean: CleanPass | None, i: int,
              kl: bool = True) -> tuple[float, float]:
        """``(summed measure, summed KL if asked for)`` of one batch's outputs against the clean pass."""
        if self.causal:
            reference = clean.values[i].to(values.device) if clean is not None and kl else None
            return chunked_sums(self.model, values, targets, reference, via_head=self.via_head, chunk=self.chunk)
        return (1.0 - (clean.values[i].to(values.device) * values).sum(-1)).double().sum().item(), 0.0

    def clean(self) -> CleanPass:
        values, targets, total = [], [], 0.0
        for i in range(len(self.batches)):
            out, target = self.outputs(i)
            values.append(out)
            targets.append(target)
            if self.causal:
                total += self.score(out, target, None, i)[0]
        return CleanPass(values, targets if self.causal else None, total)

    def total(self, hooks: Callable[[Tensor | None], Any], clean: CleanPass, kl: bool = True) -> tuple[float, float]:
        """Summed measure and KL (0 unless ``kl``) over every batch with ``hooks(positions)`` in place."""
        measure = divergence = 0.0
        for i, (*_, positions) in enumerate(self.unpacked):
            with hooks(positions):
                out, _ = self.outputs(i)
            targets = clean.targets[i] if clean.targets is not None else None
            got = self.score(out, targets, clean, i, kl)
            measure, divergence = measure + got[0], divergence + got[1]
        return measure, divergence


@torch.inference_mode()
def spliced_measures(model: Any, kind: str, batches: Iterable[Any], groups: Mapping[str, Mapping[str, SAE]], *,
                     ablations: Sequence[str] = ABLATIONS, means: Mapping[str, Tensor] | None = None,
                     splice_special: bool = False, progress: bool = False, cache: PassCache | None = None,
                     chunk: int | None = None, share: Share | None = None) -> dict[str, dict[str, Any]]:
    """The model's own measures for each group of SAEs spliced in together (``{name: {site: sae}}``).

    ``kind`` is ``"causal_lm"`` or ``"encoder"``. ``means`` (per site) default to the mean
    activations over ``batches`` (one extra pass) when a mean ablation is asked for. ``progress``
    shows a bar over the forward passes. ``cache`` keeps the clean and ablation passes (which do
    not depend on the SAEs) for later calls on the same text. ``chunk``: positions per
    log-softmax (default: a memory budget, see :mod:`.readout`). ``share``: this process's part
    of the batches under torchrun (every process passes the same ``batches``; each runs its own
    share and the sums are added up over the processes; no pass cache then).
    """
    from tqdm.auto import tqdm

    causal = kind == "causal_lm"
    if causal:
        check_lm_head(model)
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:  # before any pass runs
        raise ValueError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    batches = list(batches)
    if not batches:
        raise ValueError("no scored tokens or sequences in the evaluation batches")
    share = share or Share()
    if share.world_size > 1:
        cache = None  # each process's share is another text: nothing to keep for a later evaluation
    site_sets = {name: tuple(sorted(saes)) for name, saes in groups.items()}
    passes = _Passes(model, causal, batches, splice_special, chunk, lambda: bar.update(1), share.mine(batches))
    module = unwrap(model)
    width = module.get_output_embeddings().weight.shape[1] if passes.via_head else None
    dtype = next(module.parameters()).dtype if causal else torch.float32
    clean_key = {"via_head": passes.via_head}
    cacheable = cache is not None and (passes.via_head or not causal)  # never cache n x vocab logits
    clean = cache.clean(clean_key, passes.per_batch(), width, dtype) if cacheable else None
    todo = {(sites, a) for sites in set(site_sets.values()) for a in ablations}
    settings = {key: {"sites": list(key[0]), "ablation": key[1], "splice_special": splice_special,
                      "means": "evaluation text" if means is None else tensors_digest({s: means[s] for s in key[0]})}
                for key in todo}
    ablated = {key: cache.total(settings[key]) if cache is not None else None for key in todo}
    todo = {key for key, total in ablated.items() if total is None}
    bar = tqdm(total=len(passes.batches) * ((clean is None) + len(todo) + len(groups)), desc="evaluating",
               unit="pass", disable=not progress)
    if clean is None:
        clean = passes.clean()
        if cacheable:
            cache.save_clean(clean_key, clean)
    if means is None and any(a == "mean" for _, a in todo):
        means = site_means(model, passes.batches, sorted({s for sites, a in todo if a == "mean" for s in sites}),
                           share=share)
    for sites, a in sorted(todo):
        hooks = {s: _ablation(a, means or {}, s) for s in sites}
        ablated[sites, a] = passes.total(lambda positions: replace_sites(model, hooks, positions=positions), clean,
                                         kl=False)[0]
        if cache is not None:
            cache.save_total(settings[sites, a], ablated[sites, a])
    spliced, kl = {}, {}
    for name, saes in groups.items():
        spliced[name], kl[name] = passes.total(lambda positions: splice(model, saes, positions=positions), clean)
    bar.close()
    count, clean_total = clean.count, clean.total
    if share.world_size > 1:  # every sum over every process's batches
        keys = sorted(ablated)
        sums = share.sum([count, clean_total, *(ablated[k] for k in keys), *(spliced[n] for n in groups),
                          *(kl[n] for n in groups)])
        count, clean_total = sums[0], sums[1]
        ablated = dict(zip(keys, sums[2:2 + len(keys)]))
        spliced = dict(zip(groups, sums[2 + len(keys):2 + len(keys) + len(groups)]))
        kl = dict(zip(groups, sums[2 + len(keys) + len(groups):]))
    if count == 0:
        raise ValueError("no scored tokens or sequences in the evaluation batches")
    results = {}
    for name in groups:
        sites = site_sets[name]
        if causal:
            clean_ce, ce = clean_total / count, spliced[name] / count
            row: dict[str, Any] = {"ce_clean": clean_ce, "ce_spliced": ce, "delta_lm_loss": ce - clean_ce,
                                   "kl_div": kl[name] / count, "n_predictions": int(count)}
            for a in ablations:
                row[f"ce_{a}_ablated"] = ablated[sites, a] / count
                row[f"ce_loss_recovered_{a}"] = _recovered(ablated[sites, a] / count, ce, clean_ce)
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
