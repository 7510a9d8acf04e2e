"""The training rows the decoder refit reads (:mod:`.decoder_refit`): up to ``rows`` of them,
spread evenly over the run, in float32 on the host (gathered on the batches' device and copied
over 64 MB at a time, so a GPU run does not wait for the host at every step).

Many more than the calibration sample (500k rows of 384 floats: 768 MB), so they are not in the
checkpoint: with an output folder they are appended to one file per batch entry
(``refit_rows/rank<r>/<i>.f32``: under data parallelism only the main process keeps them, its refit
shared; with an SAE per process every process its own) and the
checkpoint records how many rows count; a resumed run cuts the files back to that and appends on,
so it refits on the rows an uninterrupted run would. Without a folder (and so without checkpoints)
they stay in memory. Where the disk (without a folder, half the free memory) cannot hold the rows
still to come, fewer are kept, with a warning, and the checkpoint keeps the smaller count. The
files go once the run's last checkpoint holds the refit SAEs (:meth:`RefitRows.remove`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ..data.batch import Batch
from ..device import available_memory
from .calibration import spread_slots

log = logging.getLogger(__name__)
FOLDER = "refit_rows"
FLUSH_BYTES = 64 << 20  # rows gathered on the batches' device before one copy to the host


def memory_for_rows() -> float | None:
    """Host bytes refit rows may take: half of what is free (the rest is the run's), None where unknown."""
    free = available_memory("cpu")
    return None if free is None else 0.5 * free


class RefitRows:
    """``rows`` rows of the batch entries ``keys`` (at most every row of ``total_steps`` batches of
    ``batch_size``), on disk under ``folder`` when one is given."""

    def __init__(self, keys: Iterable[str], rows: int, total_steps: int, batch_size: int,
                 folder: Path | None = None, rank: int = 0):
        self.keys, self.total_steps = sorted(set(keys)), int(total_steps)
        self.rows = min(int(rows), self.total_steps * int(batch_size))
        self.folder = Path(folder) / FOLDER / f"rank{rank}" if folder is not None and self.rows else None
        self.kept: dict[str, list[Tensor]] = {key: [] for key in self.keys}
        self.pending: dict[str, list[Tensor]] = {key: [] for key in self.keys}  # not yet on the host
        self.pending_bytes = 0
        self.widths: dict[str, int] = {}
        self.filled = 0
        self.started = False  # files opened (cut to ``filled``) for this run

    def _path(self, key: str) -> Path:
        return self.folder / f"{self.keys.index(key)}.f32"

    def add(self, step: int, batch: Batch) -> None:
        if step >= self.total_steps or not self.rows:
            return
        if not self.started:
            self._start(step, batch)
        start, end = spread_slots(step, self.rows, self.total_steps)
        if end <= start:
            return
        for key in self.keys:  # on the batch's device until a flush: no host sync per step on a GPU
            part = batch[key][: end - start].detach().to(dtype=torch.float32, copy=True)
            self.widths[key] = part.shape[1]
            self.pending[key].append(part)
        self.filled += end - start
        self.pending_bytes += (end - start) * 4 * sum(self.widths.values())
        if self.pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Move the rows kept since the last flush to the host: into memory, or appended to the files."""
        for key, parts in self.pending.items():
            if not parts:
                continue
            rows = torch.cat(parts).cpu()
            if self.folder is None:
                self.kept[key].append(rows)
            else:
                with open(self._path(key), "ab") as handle:
                    handle.write(rows.contiguous().numpy().tobytes())
        self.pending = {key: [] for key in self.keys}
        self.pending_bytes = 0

    def _start(self, step: int, batch: Batch) -> None:
        """Keep only as many rows as fit (half the free memory, or nine tenths of the folder's disk)
        and open the files, cut to the rows the checkpoint counts."""
        self.started = True
        row_bytes = 4 * sum(batch[key].shape[1] for key in self.keys)
        to_come = self.rows - spread_slots(step, self.rows, self.total_steps)[0]
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            free, where = 0.9 * shutil.disk_usage(self.folder).free, f"on the disk of {self.folder}"
        else:
            free, where = memory_for_rows(), "in memory (half of what is free)"
        if free is not None and to_come * row_bytes > free:
            fit = int(free // row_bytes)
            self.rows = min(self.rows, fit * self.total_steps // max(self.total_steps - step, 1))
            log.warning("decoder refit: the %d rows still to keep need %.1f GiB and %.1f GiB is free %s: keeping "
                        "about %d (lower decoder_refit_tokens, or free space)", to_come, to_come * row_bytes / 2**30,
                        free / 2**30, where, fit)
        if self.folder is not None:
            for key in self.keys:  # a stale tail from a killed run, or a new run's empty files
                with open(self._path(key), "ab") as handle:
                    handle.truncate(self.filled * batch[key].shape[1] * 4)

    def __len__(self) -> int:
        return self.filled

    def chunks(self, key: str, chunk_rows: int = 4096) -> Iterator[Tensor]:
        """The kept rows of ``key``, ``chunk_rows`` at a time (host float32)."""
        self.flush()
        if self.folder is None:  # the kept slots, joined up to chunk_rows (no copy of them all)
            group: list[Tensor] = []
            for part in self.kept[key]:
                group.append(part)
                if sum(map(len, group)) >= chunk_rows:  # a few parts per chunk
                    yield torch.cat(group)
                    group = []
            if group:
                yield torch.cat(group)
            return
        width = self.widths.get(key)
        if width is None or not self._path(key).exists():
            return
        table = np.memmap(self._path(key), dtype=np.float32, mode="r", shape=(self.filled, width))
        for start in range(0, self.filled, chunk_rows):
            yield torch.from_numpy(np.array(table[start:start + chunk_rows]))

    def pairs(self, input_key: str, target_key: str | None, input_scale: float, output_scale: float,
              device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
        """(input, target) chunks on ``device`` in an SAE's scaled units; the target is the input
        where the SAE has no target entry."""
        for x, target in zip(self.chunks(input_key), self.chunks(target_key or input_key)):
            x = x.to(device) / input_scale
            yield x, (target.to(device) / output_scale if target_key else x)

    def state(self) -> dict[str, Tensor]:
        """For the checkpoint: how many rows count and each entry's width (the rows stay in their
        files; a run without a folder writes no checkpoint)."""
        self.flush()  # the files hold every row counted
        return {"refit.filled": torch.tensor(self.filled), "refit.rows": torch.tensor(self.rows),
                "refit.widths": torch.tensor([self.widths.get(key, 0) for key in self.keys])}

    def restore(self, tensors: dict[str, Tensor], finished: bool) -> None:
        """The count a checkpoint kept. Unless the run is ``finished`` (its checkpoint holds the
        refit SAEs), the files should hold that many rows; where they do not (a checkpoint copied
        without its folder), the refit takes the rows from here on, with a warning."""
        filled = tensors.get("refit.filled")
        if filled is None:  # a checkpoint written before refits: the rows from here on
            return
        self.filled = int(filled)
        if "refit.rows" in tensors:  # a smaller count the run chose to fit its memory or disk
            self.rows = min(self.rows, int(tensors["refit.rows"]))
        self.widths = {key: int(width) for key, width in zip(self.keys, tensors["refit.widths"].tolist()) if width}
        if finished or self.folder is None:
            return
        short = [self._path(key) for key, width in self.widths.items() if not self._path(key).exists()
                 or self._path(key).stat().st_size < self.filled * width * 4]
        if short:
            log.warning("%s holds fewer than the %d rows the checkpoint counts (copied without its folder?): the "
                        "decoder refit will use only the rows from here on", short[0], self.filled)
            self.filled = 0

    def remove(self) -> None:
        """Delete the files (the run is over and its checkpoint holds the refit SAEs)."""
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder)
            parent = self.folder.parent
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        self.kept = {key: [] for key in self.keys}
        self.pending = {key: [] for key in self.keys}
        self.pending_bytes = 0
