"""The batches both sides of the peer benchmark train on: the first ``steps`` shuffled batches of an
activation cache, hashed as they are handed out (so the two processes can prove they saw the same
rows), with the time each was handed out. Imported by ``peer_saelens.py`` and by its worker, which
runs in the SAELens venv."""

from __future__ import annotations

import hashlib
import time

import torch

from jumpscope.data.cache import CacheReader


class Provider:
    def __init__(self, cache: str, site: str, seed: int, buffer_rows: int, batch_size: int, steps: int):
        self.stream = CacheReader(cache).iterate(site=site, shuffle_shards=True, seed=seed, buffer_rows=buffer_rows,
                                                 batch_size=batch_size)
        self.steps, self.handed, self.digest, self.stamps = steps, 0, hashlib.sha256(), []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.handed >= self.steps:
            raise StopIteration
        batch = next(self.stream)
        self.digest.update(batch.contiguous().numpy().tobytes())
        self.handed += 1
        self.stamps.append(time.perf_counter())
        return batch
