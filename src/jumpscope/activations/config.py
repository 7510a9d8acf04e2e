"""The activation stage's config: which model, corpus and windowing produce the activations."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, check_positive

__all__ = ["ActivationConfig"]


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

    device_map: Literal["auto"] | None = None
    """'auto': spread a transformers model too large for one GPU over this machine's GPUs
    (accelerate places its layers; each SAE then runs on its site's layer's device). None: the
    whole model on --device. Refused without CUDA, and for GGUF and llama2.c files."""

    shuffle_buffer_tokens: int = 65_536
    """Activations held in the shuffle buffer (memory is bounded by this, whatever the total)."""

    cache: str | None = None
    """Folder of an on-disk activation cache: written (resumably) on first use, then read back,
    so later runs and sweeps need not run the model again."""

    cache_shard_rows: int = 65_536
    """Activation rows per cache shard file; a killed cache write resumes after its last whole
    shard. Must match when resuming a partly written cache."""

    outlier_norm_factor: float = 10.0
    """Drop a training activation whose norm is above this many times the median norm of its
    batch of windows (attention-sink positions of Llama-family residual streams reach 100x; on
    SmolLM2's layer 15 ordinary tokens stay under 2x); 0: keep every one. The summary's source
    records how many were dropped. Held-out FVU, MSE, cosine, L0 and dead fraction leave out the
    same rows (``fvu_all_rows`` and ``mse_all_rows`` count them); the spliced measures (delta LM
    loss, KL, CE recovered) splice every ordinary token."""

    eval_every: int = 20
    """Hold out one context window in this many for evaluation."""

    seed: int = 0
    """Seed of the shuffle order."""

    allow_network: bool = False
    """Allow downloads from the Hugging Face hub (models and datasets)."""

    def __post_init__(self) -> None:
        check_positive(self, "model_batch_size", "shuffle_buffer_tokens", "eval_every", "cache_shard_rows")
        if self.context_size is not None and self.context_size < 2:
            raise ConfigError(f"context_size must be at least 2, got {self.context_size}")
        if self.device_map not in (None, "auto"):
            raise ConfigError(f"device_map must be 'auto' or none, got {self.device_map!r}")
        if not self.outlier_norm_factor >= 0 or self.outlier_norm_factor == float("inf"):
            raise ConfigError(f"outlier_norm_factor must be finite and >= 0 (0: off), got {self.outlier_norm_factor}")
        if 0 < self.outlier_norm_factor <= 1:
            raise ConfigError(f"outlier_norm_factor must be above 1 (times the median norm) or 0 (off), "
                              f"got {self.outlier_norm_factor}")
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
