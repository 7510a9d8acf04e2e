"""Activations of a model over a corpus: the held-out split, live harvesting and the on-disk cache.

One forward per batch of windows feeds every site. One context window in ``eval_every`` is held
out for evaluation and never trained on (by window, so a single-document corpus splits too).

Training activations far above their batch's median norm (``outlier_norm_factor``; attention-sink
positions with massive activations) are dropped and counted (:func:`drop_outliers`).

Under torchrun (``processes`` with ``world_size`` > 1) each process runs the model on its own
share of the batches of windows (batch i on process i mod world size) and the rows are gathered,
in corpus order, on every process (:func:`gather_in_order`): every process then holds the stream a
one-process run harvests, while the forward passes, the dominant cost, are split.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import Tensor

from ..data.batch import skip_rows
from ..data.buffer import counted, shuffled
from ..data.cache import CacheReader, CacheWriter, is_complete
from ..data.cache_shared import SharedCacheWriter
from ..data.processes import OneProcess, Processes
from ..data.corpus import open_corpus
from ..data.tokens import batch_windows, pack_tokens
from ..models.harvest import harvest
from ..models.loading import LoadedModel, load_model
from ..models.sites import parse_site
from .config import ActivationConfig

__all__ = ["ActivationSource", "ReplayableStream", "Split", "context_size_for", "default_site",
           "drop_outliers", "gather_in_order", "inlier_mask", "load_source_model", "max_positions", "split_windows"]

log = logging.getLogger(__name__)

Split = Literal["train", "heldout", "all"]
"""Which context windows: the training part, the held-out part, or all of them."""


def gather_in_order(local: Iterable[dict[str, Tensor]], processes: Processes) -> Iterator[dict[str, Tensor]]:
    """The chunks of every process in global order, on every process, where process r holds
    chunks r, r + W, r + 2W, ... (W = world size) of one stream: one all-gather per round, until
    every process has run out. Every process must consume the result to the same point (they do:
    they all see the same rows)."""
    mine = iter(local)
    while True:
        chunk = next(mine, None)
        parts = processes.all_gather_object(None if chunk is None else {k: v.cpu() for k, v in chunk.items()})
        if all(part is None for part in parts):
            return
        yield from (part for part in parts if part is not None)


def default_site(loaded: LoadedModel) -> str:
    """The residual stream after the middle layer."""
    layers = getattr(loaded.model.config, "num_hidden_layers", None)
    if not layers:
        raise ValueError(f"cannot pick a default site for {loaded.name}: give --site")
    return f"layers.{layers // 2}.resid_post"


def max_positions(loaded: LoadedModel) -> int | None:
    config = loaded.model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def context_size_for(cfg: ActivationConfig, loaded: LoadedModel) -> int:
    if cfg.context_size is not None:
        return cfg.context_size
    if loaded.kind == "encoder":
        return 128
    return min(1024, max_positions(loaded) or 1024)


def split_windows(windows: Iterable, every: int, split: Literal["train", "heldout"]) -> Iterator:
    """The training (or held-out) part of a stream of windows: one in ``every`` is held out."""
    heldout = split == "heldout"
    for index, window in enumerate(windows):
        if (index % every == every - 1) == heldout:
            yield window


def nonempty(windows: Iterator, corpus: str, context_size: int, what: str) -> Iterator:
    """``windows``, or a clear error when there is not a single one."""
    first = next(windows, None)
    if first is None:
        raise ValueError(f"corpus {corpus} gives no {what} context window of {context_size} tokens: it is empty "
                         "or shorter than one context; give more text or a smaller --context-size")
    yield first
    yield from windows


def inlier_mask(chunk: dict[str, Tensor], factor: float) -> Tensor | None:
    """True for the rows of ``chunk`` whose norm is at most ``factor`` x the chunk's median row norm
    at every site (None for an empty chunk). Training drops the other rows; held-out evaluation
    reports its reconstruction metrics both without them and over every row."""
    keep = None
    for x in chunk.values():
        norms = x.float().norm(dim=-1)
        fine = norms <= factor * norms.median() if norms.numel() else torch.ones(0, dtype=torch.bool)
        keep = fine if keep is None else keep & fine.to(keep.device)
    return keep


def drop_outliers(chunks: Iterable[dict[str, Tensor]], factor: float, counts: Counter) -> Iterator[dict[str, Tensor]]:
    """``chunks`` without the rows :func:`inlier_mask` rejects (the sites' rows stay aligned);
    ``counts`` gains 'rows' seen and 'dropped'."""
    for chunk in chunks:
        keep = inlier_mask(chunk, factor)
        rows = 0 if keep is None else keep.numel()
        dropped = 0 if keep is None else rows - int(keep.sum())
        counts["rows"] += rows
        counts["dropped"] += dropped
        if dropped == 0:
            yield chunk
        elif dropped < rows:
            yield {site: x[keep.to(x.device)] for site, x in chunk.items()}


def load_source_model(cfg: ActivationConfig, device: str = "cpu") -> LoadedModel:
    """The model ``cfg`` names, loaded as the activation source will use it."""
    return load_model(cfg.model, dtype=cfg.dtype, device=device, allow_network=cfg.allow_network,
                      device_map=cfg.device_map)


class ActivationSource:
    """Activations of ``sites`` of a model over a corpus, as ``{site: Tensor [n, d]}`` chunks."""

    def __init__(self, cfg: ActivationConfig, sites: Iterable[str] = (), device: str = "cpu",
                 loaded: LoadedModel | None = None, processes: Processes | None = None):
        """``processes``: the torchrun processes sharing the text (None: this one alone)."""
        self.cfg = cfg
        self.processes = processes or OneProcess()
        self.loaded = loaded or load_source_model(cfg, device)
        if self.loaded.tokenizer is None:
            raise ValueError(f"model {self.loaded.name} has no tokenizer; it cannot read text")
        self.sites = list(dict.fromkeys(sites)) or [default_site(self.loaded)]
        self.site_dims = {}
        for name in self.sites:
            site = parse_site(name, self.loaded.model)
            if site.d is None:
                raise ValueError(f"the width of {name!r} is unknown until the model runs; use a named site")
            self.site_dims[name] = site.d
        self.context_size = context_size_for(cfg, self.loaded)
        self.corpus = open_corpus(cfg.corpus, allow_network=cfg.allow_network, txt_split=cfg.txt_split,
                                  encoding=cfg.encoding, encoding_errors=cfg.encoding_errors)
        self.outliers: Counter = Counter()
        """Training rows harvested by this source ('rows') and dropped as norm outliers ('dropped')."""
        self.forward_tokens = 0
        """Tokens this process ran through the model (its share of the windows under torchrun)."""

    def windows(self, split: Split = "train") -> Iterator[tuple]:
        """Batches of context windows: the training part ('train'), the one-in-``eval_every``
        held-out part ('heldout'), or all of them ('all')."""
        if split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
        packed = pack_tokens(self.loaded.tokenizer, self.corpus, self.context_size,
                             max_positions=max_positions(self.loaded))
        what = {"all": "any", "heldout": "held-out", "train": "training"}[split]
        part = nonempty(packed if split == "all" else split_windows(packed, self.cfg.eval_every, split),
                        self.corpus.name, self.context_size, what)
        return batch_windows(part, self.cfg.model_batch_size)

    def chunks(self, split: Split = "train") -> Iterator[dict]:
        """Unshuffled activation chunks of the ``split`` windows (see :meth:`windows`), in corpus order;
        the 'train' split without norm outliers (``cfg.outlier_norm_factor``)."""
        chunks = self.harvest(self.windows(split))
        if split != "train" or not self.cfg.outlier_norm_factor:
            return chunks
        return drop_outliers(chunks, self.cfg.outlier_norm_factor, self.outliers)

    def harvest(self, windows: Iterable[tuple]) -> Iterator[dict[str, Tensor]]:
        """The sites' rows of every batch of ``windows``, in order; under torchrun this process
        runs the model on its share of the batches only and the rows are gathered."""
        world, rank = self.processes.world_size, self.processes.rank
        mine = windows if world == 1 else (batch for i, batch in enumerate(windows) if i % world == rank)
        chunks = harvest(self.loaded.model, self._counted(mine), self.sites)
        return chunks if world == 1 else gather_in_order(chunks, self.processes)

    def _counted(self, windows: Iterable[tuple]) -> Iterator[tuple]:
        for batch in windows:
            self.forward_tokens += int(batch[0].numel())
            yield batch

    def training_stream(self, total_tokens: int, batch_size: int, progress: bool = True) -> Iterable:
        """A replayable shuffled stream for the trainer (from the cache when one is configured).
        ``progress`` shows the harvest that fills the shuffle buffer (no step runs until it is full;
        minutes on a large model) as a bar in tokens on stderr."""
        if self.cfg.cache is None:
            fill = min(self.cfg.shuffle_buffer_tokens, total_tokens)
            return ReplayableStream(lambda: shuffled(
                counted(self.chunks(), fill, "harvesting (filling the shuffle buffer)", enabled=progress),
                self.cfg.shuffle_buffer_tokens, batch_size, self.cfg.seed))
        self.fill_cache(total_tokens, progress)
        reader = CacheReader(self.cfg.cache)
        return ReplayableStream(lambda: reader.iterate(sites=None, shuffle_shards=True, seed=self.cfg.seed,
                                                       buffer_rows=self.cfg.shuffle_buffer_tokens,
                                                       batch_size=batch_size))

    def manifest(self) -> dict[str, Any]:
        corpus = self.corpus.name if self.cfg.txt_split == "file" else f"{self.corpus.name} ({self.cfg.txt_split}s)"
        return {"model": self.loaded.name, "corpus": corpus, "context_size": self.context_size,
                "sites": self.site_dims, "dtype": self.cfg.dtype, "eval_every": self.cfg.eval_every,
                "outlier_norm_factor": self.cfg.outlier_norm_factor,
                "outliers_dropped": self.outliers["dropped"], "rows_harvested": self.outliers["rows"]}

    def check_cache(self, reader: CacheReader) -> None:
        """Refuse a cache written from another model, corpus, context size or set of sites."""
        ours = self.manifest()
        theirs = {"model": reader.manifest.get("model"), "corpus": reader.manifest.get("corpus"),
                  "context_size": reader.manifest.get("context_size"), "sites": reader.sites}
        if "outlier_norm_factor" in reader.manifest:  # caches written before the option existed kept every row
            theirs["outlier_norm_factor"] = reader.manifest["outlier_norm_factor"]
        different = [f"{key}: cache has {theirs[key]!r}, this run wants {ours[key]!r}" for key in theirs
                     if theirs[key] != ours[key]]
        if different:
            raise ValueError(f"the activation cache {reader.folder} was written for another run ("
                             + "; ".join(different) + "); use another --cache folder")

    def fill_cache(self, total_tokens: int, progress: bool = True) -> None:
        """Write at least ``total_tokens`` activations to the cache, resuming a partial one. Under
        torchrun every process runs the model on its share of the windows and writes its share of
        the shards (:class:`~jumpscope.data.cache_shared.SharedCacheWriter`): the cache is the same
        at any process count."""
        folder = self.cfg.cache
        main = self.processes.rank == 0
        if is_complete(folder):
            reader = CacheReader(folder)
            self.check_cache(reader)
            if reader.total_tokens < total_tokens:
                log.warning("cache %s holds %d tokens, fewer than the %d asked for: the run will be shorter",
                            folder, reader.total_tokens, total_tokens)
            return
        manifest = {key: value for key, value in self.manifest().items()
                    if key not in ("outliers_dropped", "rows_harvested")}  # counts of this process, not the cache's
        options = dict(shard_rows=self.cfg.cache_shard_rows, metadata=manifest, model=self.loaded.name,
                       corpus=manifest["corpus"], context_size=self.context_size)
        writer = CacheWriter(folder, self.site_dims, **options) if self.processes.world_size == 1 else \
            SharedCacheWriter(folder, self.site_dims, processes=self.processes, **options)
        from tqdm.auto import tqdm

        with writer, tqdm(total=total_tokens, initial=writer.tokens_done, unit="tok", desc="harvesting (to the cache)",
                          unit_scale=True, disable=not (progress and main), dynamic_ncols=True) as bar:
            done = writer.tokens_done  # counted here: a disabled bar counts nothing
            for chunk in skip_rows(self.chunks(), writer.tokens_done):
                writer.write(chunk)
                rows = next(iter(chunk.values())).shape[0]
                bar.update(max(0, min(rows, total_tokens - done)))  # the last chunk overshoots
                done += rows
                if done >= total_tokens:
                    break
        self.processes.all_gather_object(None)  # no process reads the cache before it is complete


class ReplayableStream:
    """An iterable that restarts its stream on every ``iter()`` (the trainer replays on resume)."""

    def __init__(self, make: Any):
        self.make = make

    def __iter__(self) -> Iterator:
        return iter(self.make())
