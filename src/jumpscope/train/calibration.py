"""After the last step: which weights to save, and each SAE's ``calibrate`` hook on them, both on a
sample of the training rows.

Which weights: schedule-free sign descent saves the average x of its iterates; at 122 steps it
reconstructs as well as the point y = beta x + (1 - beta) z where gradients were taken, but as the
run grows the sign steps make z wander and the average falls behind (MiniLM TopK, held-out FVU at
x / y: 0.1768 / 0.1760 after 122 steps of 4096, 0.1546 / 0.1459 after 488, 0.171 / 0.135 after
1953; sparsify 1.3.3 saves x: 0.303 after 1953 steps, its y 0.136). The trainer keeps the average unless the training point reconstructs the sample clearly
better (by more than ``TrainerConfig.keep_training_point_margin``, 10%), each after its own
calibration, so that they are compared at the L0 they would be saved with (:func:`finish_point`).
Why a margin: at small FVU gains the training point was worse downstream (stories260K, 732 steps
of 2048, TopK at L0 8 / 16 / 32: 2-4% lower FVU than the average, but delta LM loss 0.212 / 0.124 /
0.064 against 0.205 / 0.112 / 0.053); the average smooths the sign steps' noise in directions
the FVU weighs little.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import Tensor

from ..data.batch import Batch
from .decoder_refit import refit_decoder
from .optim import ScheduleFreeSignSGD


def spread_slots(step: int, rows: int, total_steps: int) -> tuple[int, int]:
    """``[start, end)``: the rows of a ``rows``-row sample, spread evenly over ``total_steps``
    batches, that step ``step`` fills (the calibration sample's, the decoder refit's)."""
    return step * rows // total_steps, (step + 1) * rows // total_steps


class CalibrationSample:
    """``rows`` training rows of the batch entries ``keys``, spread evenly over ``total_steps``
    batches of ``batch_size`` (at most every row of the run)."""

    def __init__(self, keys: Iterable[str], rows: int, total_steps: int, batch_size: int):
        self.keys, self.total_steps = sorted(set(keys)), int(total_steps)
        self.rows = min(int(rows), self.total_steps * int(batch_size))
        self.kept: dict[str, Tensor] = {}
        self.filled = 0
        self.latest: Batch | None = None  # the last batch seen (a reference), for runs that stop early

    def slots(self, step: int) -> tuple[int, int]:
        """The rows of the sample that step ``step`` fills."""
        return spread_slots(step, self.rows, self.total_steps)

    def add(self, step: int, batch: Batch) -> None:
        self.latest = batch
        start, end = self.slots(step)
        if end <= start:
            return
        for key in self.keys:
            part = batch[key]
            if key not in self.kept:
                self.kept[key] = part.new_zeros((self.rows, part.shape[1]))
            self.kept[key][start:end] = part[: end - start]
        self.filled = end

    def sample(self, key: str) -> Tensor:
        """The kept rows; when the data ran out before the sample filled, topped up with the last
        rows of the latest batch (a run stopped at 1% would otherwise calibrate on 1% of the rows)."""
        kept = self.kept[key][: self.filled] if key in self.kept else None
        missing = self.rows - self.filled
        if missing <= 0 or self.latest is None:
            return kept if kept is not None else torch.zeros(0, 0)
        recent = self.latest[key][-missing:]
        return recent if kept is None else torch.cat([kept, recent.to(kept)])

    def __len__(self) -> int:
        if self.filled >= self.rows or self.latest is None:
            return self.filled
        return min(self.rows, self.filled + next(iter(self.latest.values())).shape[0])

    def state(self) -> dict[str, Tensor]:
        """Tensors for the checkpoint (the filled rows)."""
        return {f"calibration.{key}": value[: self.filled].detach().cpu() for key, value in self.kept.items()}

    def restore(self, tensors: dict[str, Tensor], device: torch.device) -> None:
        """The rows a checkpoint kept (none from a checkpoint written before samples were kept)."""
        for key in self.keys:
            saved = tensors.get(f"calibration.{key}")
            if saved is None or saved.shape[0] > self.rows:
                continue
            self.kept[key] = saved.new_zeros((self.rows, saved.shape[1])).to(device)
            self.kept[key][: saved.shape[0]] = saved.to(device)
            self.filled = saved.shape[0]


@torch.no_grad()
def sample_fvu(sae, x: Tensor, target: Tensor, chunk: int = 4096) -> float:
    """FVU of the SAE's inference forward (eval mode) on the rows ``x`` against ``target``."""
    training = sae.training
    sae.eval()
    try:
        error = sum(float((t - sae(c)).pow(2).sum()) for c, t in zip(x.split(chunk), target.split(chunk)))
    finally:
        sae.train(training)
    return error / max(float((target - target.mean(0)).pow(2).sum()), 1e-30)


def finish_point(sae, optimizer: torch.optim.Optimizer, x: Tensor, target: Tensor, ctx,
                 margin: float | None = 0.1) -> dict[str, float]:
    """The SAE's ``calibrate`` on the rows ``x``, and under schedule-free averaging the average unless
    the training point's FVU is lower by more than ``margin`` (relative; None: always the average),
    each calibrated first so that the two are compared at the L0 they would be saved with. Where the
    training point wins it becomes the average (z := y, so that
    ``use_average`` then gives y; the run is over, so z has no further use). Returns the calibration's
    note, with both FVUs and the choice where there was one."""
    if not isinstance(optimizer, ScheduleFreeSignSGD) or optimizer.averaged or margin is None:
        with averaged_weights(optimizer):
            return sae.calibrate(x, ctx) or {}
    start = {key: value.clone() for key, value in sae.state_dict().items()}
    note_training_point = sae.calibrate(x, ctx) or {}
    at_training_point = sample_fvu(sae, x, target)
    training_point = {key: value.clone() for key, value in sae.state_dict().items()}
    sae.load_state_dict(start)
    with averaged_weights(optimizer):  # the averaged parameters come back; what calibrate set stays
        note = sae.calibrate(x, ctx) or {}
        at_average = sample_fvu(sae, x, target)
    keep = at_training_point < (1.0 - margin) * at_average
    if keep:
        sae.load_state_dict(training_point)
        note = note_training_point
        with torch.no_grad():
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if group["average"] and "z" in optimizer.state[param]:
                        optimizer.state[param]["z"].copy_(param)
    return {**note, "sample_fvu_average": at_average, "sample_fvu_training_point": at_training_point,
            "kept_training_point": float(keep)}


@contextlib.contextmanager
def averaged_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """The averaged weights in the parameters for the block, then the training point back bit for
    bit (a round trip through ``use_average``/``use_training_point`` would round). Parameters the
    optimiser does not average (JumpReLU's steered thresholds) keep what the block wrote."""
    if not isinstance(optimizer, ScheduleFreeSignSGD) or optimizer.averaged:
        yield
        return
    params = [p for group in optimizer.param_groups if group["average"] for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.use_average()
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved):
                param.copy_(value)
        optimizer.averaged = False


def refit_point(sae, optimizer: torch.optim.Optimizer, chunks: Iterable[tuple[Tensor, Tensor]],
                name: str = "SAE") -> dict[str, float]:
    """The decoder refit (:mod:`.decoder_refit`) of the weights the run saves (under schedule-free
    averaging the average), written where the saved weights come from (:func:`save_decoder`)."""
    with averaged_weights(optimizer):
        note = refit_decoder(sae, chunks, name=name)
        refit = sae.W_dec.detach().clone()
    if note:
        save_decoder(sae, optimizer, refit)
    return note


def share_refit(group, sae, optimizer: torch.optim.Optimizer, refit: bool) -> None:
    """Under data parallelism only the main process keeps the rows and refits (``refit``: whether it
    did); every process then takes its weights (the same elsewhere) and so its decoder."""
    if group.world_size == 1 or not group.broadcast_object(refit):
        return
    group.broadcast_module(sae)
    save_decoder(sae, optimizer, sae.W_dec.detach().clone())


@torch.no_grad()
def save_decoder(sae, optimizer: torch.optim.Optimizer, decoder: Tensor) -> None:
    """``decoder`` into the parameter and, when averaged, its z, so that ``use_average`` then gives
    it (the run is over: z has no further use)."""
    sae.W_dec.copy_(decoder)
    state = optimizer.state.get(sae.W_dec, {})
    if "z" in state:
        state["z"].copy_(decoder)
