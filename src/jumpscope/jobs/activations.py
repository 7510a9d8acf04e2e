"""Text in, activations out: model + corpus + sites -> a replayable stream of activation chunks.

Every job that needs activations (train, and later sweeps, suites, Jacobian SAEs) builds them
here, live from the model (one forward per batch of windows feeds every site) or from an on-disk
cache written once and read back as often as needed. One context window in ``eval_every`` is held
out for evaluation and never trained on (by window, so a single-document corpus splits too).
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

from ..config_cli import positive
from ..data.buffer import counted, shuffled, skip_rows
from ..data.cache import CacheReader, CacheWriter, is_complete
from ..data.corpus import open_corpus
from ..data.tokens import batch_windows, pack_tokens
from ..errors import ConfigError
from ..models.harvest import harvest
from ..models.loading import LoadedModel, load_model
from ..models.sites import parse_site

log = logging.getLogger(__name__)


@dataclass
class ActivationConfig:
    """Where activations come from."""

    model: str = "minilm"
    """A model: 'minilm' (the built-in all-MiniLM-L6-v2), a llama2.c .bin, a local transformers
    folder, or a Hugging Face hub id (with --allow-network unless cached)."""

    corpus: str = "builtin"
    """Text: 'builtin' (Python standard-library docs), a .txt/.jsonl/.parquet file, a folder or
    glob of them, or 'hf:NAME[:CONFIG][:SPLIT]' (needs the datasets package)."""

    txt_split: str = "file"
    """How .txt files divide into documents: 'file' (one each), 'paragraph' (blank lines) or 'line'.
    Documents matter for mixtures ('a,b' takes one from each in turn) and for where BOS goes."""

    encoding: str = "utf-8"
    """Text encoding of .txt and .jsonl corpus files, e.g. utf-8, latin-1, cp1252."""

    encoding_errors: Literal["strict", "replace"] = "strict"
    """What a byte that is not valid in --encoding does: 'strict' stops with an error naming the
    file and byte offset, 'replace' reads it as U+FFFD and goes on."""

    context_size: int | None = None
    """Tokens per context window (BOS or CLS/SEP framing included). None: 128 for encoders,
    else min(1024, the model's maximum positions)."""

    model_batch_size: int = 16
    """Context windows per model forward pass."""

    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16."""

    shuffle_buffer_tokens: int = 65_536
    """Activations held in the shuffle buffer (memory is bounded by this, whatever the total)."""

    cache: str | None = None
    """Folder of an on-disk activation cache: written (resumably) on first use, then read back,
    so later runs and sweeps need not run the model again."""

    cache_shard_rows: int = 65_536
    """Activation rows per cache shard file; a killed cache write resumes after its last whole
    shard. Must match when resuming a partly written cache."""

    eval_every: int = 20
    """Hold out one context window in this many for evaluation."""

    seed: int = 0
    """Seed of the shuffle order."""

    allow_network: bool = False
    """Allow downloads from the Hugging Face hub (models and datasets)."""

    def __post_init__(self) -> None:
        positive(self, "model_batch_size", "shuffle_buffer_tokens", "eval_every", "cache_shard_rows")
        if self.context_size is not None and self.context_size < 2:
            raise ConfigError(f"context_size must be at least 2, got {self.context_size}")
        if self.txt_split not in ("file", "paragraph", "line"):
            raise ConfigError(f"txt_split must be 'file', 'paragraph' or 'line', got {self.txt_split!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.encoding_errors not in ("strict", "replace"):
            raise ConfigError(f"encoding_errors must be 'strict' or 'replace', got {self.encoding_errors!r}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"unknown encoding {self.encoding!r}; e.g. utf-8, latin-1, cp1252") from None


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


def held_out(windows: Iterable, every: int, evaluation: bool) -> Iterator:
    """The training (or evaluation) part of a stream of windows: one in ``every`` is held out."""
    for index, window in enumerate(windows):
        if (index % every == every - 1) == evaluation:
            yield window


def nonempty(windows: Iterator, corpus: str, context_size: int, what: str) -> Iterator:
    """``windows``, or a clear error when there is not a single one."""
    first = next(windows, None)
    if first is None:
        raise ValueError(f"corpus {corpus} gives no {what} context window of {context_size} tokens: it is empty "
                         "or shorter than one context; give more text or a smaller --context-size")
    yield first
    yield from windows


def load_source_model(cfg: ActivationConfig, device: str = "cpu") -> LoadedModel:
    """The model ``cfg`` names, loaded as the activation source will use it."""
    return load_model(cfg.model, dtype=cfg.dtype, device=device, allow_network=cfg.allow_network)


class ActivationSource:
    """Activations of ``sites`` of a model over a corpus, as ``{site: Tensor [n, d]}`` chunks."""

    def __init__(self, cfg: ActivationConfig, sites: Iterable[str] = (), device: str = "cpu",
                 loaded: LoadedModel | None = None):
        self.cfg = cfg
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

    def windows(self, evaluation: bool | None = False) -> Iterator[tuple]:
        """Batches of context windows: the training part, the held-out part, or (None) all of them."""
        packed = pack_tokens(self.loaded.tokenizer, self.corpus, self.context_size,
                             max_positions=max_positions(self.loaded))
        what = "any" if evaluation is None else "held-out" if evaluation else "training"
        part = nonempty(packed if evaluation is None else held_out(packed, self.cfg.eval_every, evaluation),
                        self.corpus.name, self.context_size, what)
        return batch_windows(part, self.cfg.model_batch_size)

    def chunks(self, evaluation: bool = False) -> Iterator[dict]:
        """Unshuffled activation chunks, in corpus order."""
        return harvest(self.loaded.model, self.windows(evaluation), self.sites)

    def training_stream(self, total_tokens: int, batch_size: int, progress: bool = True) -> Iterable:
        """A replayable shuffled stream for the trainer (from the cache when one is configured).
        ``progress`` shows the harvest that fills the shuffle buffer (no step runs until it is full;
        minutes on a large model) as a bar in tokens on stderr."""
        if self.cfg.cache is None:
            fill = min(self.cfg.shuffle_buffer_tokens, total_tokens)
            return _Replay(lambda: shuffled(counted(self.chunks(), fill, "harvesting (filling the shuffle buffer)",
                                                    enabled=progress),
                                            self.cfg.shuffle_buffer_tokens, batch_size, self.cfg.seed))
        self.fill_cache(total_tokens, progress)
        reader = CacheReader(self.cfg.cache)
        return _Replay(lambda: reader.iterate(sites=None, shuffle_shards=True, seed=self.cfg.seed,
                                              buffer_rows=self.cfg.shuffle_buffer_tokens, batch_size=batch_size))

    def manifest(self) -> dict[str, Any]:
        corpus = self.corpus.name if self.cfg.txt_split == "file" else f"{self.corpus.name} ({self.cfg.txt_split}s)"
        return {"model": self.loaded.name, "corpus": corpus, "context_size": self.context_size,
                "sites": self.site_dims, "dtype": self.cfg.dtype, "eval_every": self.cfg.eval_every}

    def check_cache(self, reader: CacheReader) -> None:
        """Refuse a cache written from another model, corpus, context size or set of sites."""
        ours = self.manifest()
        theirs = {"model": reader.manifest.get("model"), "corpus": reader.manifest.get("corpus"),
                  "context_size": reader.manifest.get("context_size"), "sites": reader.sites}
        different = [f"{key}: cache has {theirs[key]!r}, this run wants {ours[key]!r}" for key in theirs
                     if theirs[key] != ours[key]]
        if different:
            raise ValueError(f"the activation cache {reader.folder} was written for another run ("
                             + "; ".join(different) + "); use another --cache folder")

    def fill_cache(self, total_tokens: int, progress: bool = True) -> None:
        """Write at least ``total_tokens`` activations to the cache, resuming a partial one."""
        folder = self.cfg.cache
        if is_complete(folder):
            reader = CacheReader(folder)
            self.check_cache(reader)
            if reader.total_tokens < total_tokens:
                log.warning("cache %s holds %d tokens, fewer than the %d asked for: the run will be shorter",
                            folder, reader.total_tokens, total_tokens)
            return
        manifest = self.manifest()
        writer = CacheWriter(folder, self.site_dims, shard_rows=self.cfg.cache_shard_rows, metadata=manifest,
                             model=self.loaded.name, corpus=manifest["corpus"], context_size=self.context_size)
        from tqdm.auto import tqdm

        with writer, tqdm(total=total_tokens, initial=writer.tokens_done, unit="tok", desc="harvesting (to the cache)",
                          unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
            done = writer.tokens_done  # counted here: a disabled bar counts nothing
            for chunk in skip_rows(self.chunks(), writer.tokens_done):
                writer.write(chunk)
                rows = next(iter(chunk.values())).shape[0]
                bar.update(max(0, min(rows, total_tokens - done)))  # the last chunk overshoots
                done += rows
                if done >= total_tokens:
                    break


class _Replay:
    """An iterable that restarts its stream on every ``iter()`` (the trainer replays on resume)."""

    def __init__(self, make: Any):
        self.make = make

    def __iter__(self) -> Iterator:
        return iter(self.make())
