"""What the peer benchmarks share: the batches both sides train on (the first ``steps`` shuffled
batches of an activation cache, hashed as they are handed out, so the two processes can prove they
saw the same rows, with the time each was handed out), the one evaluation every SAE gets, and the
metadata reader of the held-out file. Imported by ``peer_saelens.py``, ``peer_sparsify.py`` and
their workers, which run in the peers' venvs."""

from __future__ import annotations

import hashlib
import time

import torch

from jumpscope.data.cache import CacheReader
from jumpscope.sae.metrics import StreamingMetrics


class Provider:
    """The first ``steps`` batches of ``batch_size`` shuffled rows of the cache. A budget beyond the
    cache takes further passes over it: pass p shuffles with ``seed + p`` (pass 0 is ``seed``, so a
    one-pass run is unchanged) and every pass ends at its last full batch."""

    def __init__(self, cache: str, site: str, seed: int, buffer_rows: int, batch_size: int, steps: int):
        self.reader, self.site, self.seed = CacheReader(cache), site, seed
        self.buffer_rows, self.batch_size = buffer_rows, batch_size
        self.steps, self.handed, self.passes, self.digest, self.stamps = steps, 0, 0, hashlib.sha256(), []
        self.stream = self._pass(0)

    def _pass(self, index: int):
        return self.reader.iterate(site=self.site, shuffle_shards=True, seed=self.seed + index,
                                   buffer_rows=self.buffer_rows, batch_size=self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.handed >= self.steps:
            raise StopIteration
        batch = next(self.stream, None)
        if batch is None or batch.shape[0] < self.batch_size:  # the pass is over: start the next
            self.passes += 1
            self.stream = self._pass(self.passes)
            batch = next(self.stream, None)
            if batch is None or batch.shape[0] < self.batch_size:
                raise RuntimeError(f"the cache holds fewer than {self.batch_size} rows")
        self.digest.update(batch.contiguous().numpy().tobytes())
        self.handed += 1
        self.stamps.append(time.perf_counter())
        return batch


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, batch: int) -> dict:
    """The one evaluation of every SAE: L0, FVU, MSE, cosine, dead and dense fractions on ``x``."""
    metrics = StreamingMetrics(sae.cfg.d_sae, sae.cfg.d_output)
    for chunk in x.split(batch):
        f = sae.encode(chunk)
        metrics.update(chunk, sae.decode(f), f)
    out = metrics.compute()
    return {k: out[k] for k in ("n_tokens", "l0", "fvu", "mse", "cosine", "dead_fraction", "dense_fraction")}


def safetensors_meta(path) -> dict:
    """The string metadata of a safetensors file (the held-out rows record what they are)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


def add_autocast_option(parser) -> None:
    """``--autocast``: our side's TrainerConfig.autocast (both peer benchmarks)."""
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none",
                        help="our TrainerConfig.autocast: bf16 chooses the sparse kernels' entries on bf16 "
                             "pre-activations on a CPU with AMX / AVX512-BF16 (values and gradients float32; "
                             "sae/mixed.py)")
