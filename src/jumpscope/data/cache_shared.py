"""One activation cache written by every torchrun process together.

Every process feeds :class:`SharedCacheWriter` the same rows (each harvested its share of the
windows and the rows were gathered), so every process knows where each shard starts and ends;
shard i is serialised, hashed and written by process i mod N only, and its manifest entry reaches
the main process, which alone writes the manifest. The folder is then byte for byte the cache one
process writes, and a killed write resumes, at any process count, after the last shard the
manifest lists (a shard written but not yet listed is removed as a stray).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .cache import CacheWriter
from .processes import Processes

__all__ = ["SharedCacheWriter"]


class SharedCacheWriter(CacheWriter):
    """A :class:`CacheWriter` that every process of ``processes`` runs on the same rows. Every
    call (``write``, ``close``) must be made by every process alike; shards are written by their
    owners, the manifest by the main process."""

    def __init__(self, folder: str | Path, sites: Mapping[str, int], *, processes: Processes, **options: Any):
        self.processes = processes
        if processes.rank == 0:  # resumes or starts the manifest and removes stray shards first
            super().__init__(folder, sites, **options)
        processes.all_gather_object(None)
        if processes.rank != 0:  # reads the manifest the main process left (nothing written here)
            super().__init__(folder, sites, **options)

    @property
    def is_main(self) -> bool:
        return self.processes.rank == 0

    def _flush(self, rows: int) -> None:
        index, shard = self._take(rows)
        mine = index % self.processes.world_size == self.processes.rank
        entries = self.processes.all_gather_object(self._store(index, shard) if mine else None)
        self._record(next(entry for entry in entries if entry is not None))

    def _save_manifest(self) -> None:
        if self.is_main:
            super()._save_manifest()

    def _clean(self, everything: bool) -> None:
        if self.is_main:
            super()._clean(everything)
