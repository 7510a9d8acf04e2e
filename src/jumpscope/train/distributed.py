"""The trainer's view of other processes: one process (:class:`SingleProcess`, every collective
the identity) or a torch.distributed group (:class:`TorchDistributed`), picked by
:func:`process_group_from_env` from what torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK).

Two ways to use N processes (``TrainerConfig.distribute``):

- ``"data"``: every process reads the same global batches and trains on its slice of rows
  (:func:`shard_batch`); gradients are summed with weights rows/batch, so the update is the one
  of the whole batch, and every statistic (dead-latent counters, logged values, final metrics)
  is reduced over the processes. The init sample is whole on every process, so input scales and
  data-dependent inits are exact. A loss that is a batch mean of per-token terms is then exact;
  one built on other whole-batch statistics (JumpReLU's target-L0 penalty, BatchTopK's top k*B)
  is exact when it reads them through the hooks of :class:`ShardStepContext`, else per slice.
- ``"saes"``: each process trains its own SAEs (:func:`assign_saes`) on all the data.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from ..device import launched_by_torchrun, local_device
from ..sae.base import StepContext
from ..sae.metrics import StreamingMetrics


class SingleProcess:
    """No other processes: every collective is the identity."""

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over processes in place."""
        return tensor

    def all_reduce_max_(self, tensor: Tensor) -> Tensor:
        """Element-wise max of ``tensor`` over processes in place."""
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every process's ``tensor`` (equal shapes), concatenated along dim 0 in rank order."""
        return tensor

    def reduce_gradients(self, module: nn.Module, weight: float | None = None) -> None:
        """Replace each gradient of ``module`` by the sum over processes of ``weight`` times it
        (None: 1 / world_size, the mean), and its floating buffers (running statistics) alike."""

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Copy process ``src``'s parameters and buffers to every process."""

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Process ``src``'s ``value`` (picklable), on every process."""
        return value

    def gather_object(self, value: Any) -> list[Any] | None:
        """Every process's ``value``, in rank order, on the main process (None elsewhere)."""
        return [value]

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order, on every process."""
        return [value]


class TorchDistributed(SingleProcess):
    """The processes of a torch.distributed group spanning every process (so a rank in it is
    the global rank): gloo for CPU tensors, nccl for CUDA ones."""

    def __init__(self, device: torch.device | str | None = None, group: Any = None):
        import torch.distributed as dist

        self.dist = dist
        backend = str(dist.get_backend(group))
        if device is not None and torch.device(device).type == "cpu" and not ("gloo" in backend or "mpi" in backend):
            group = _gloo_group()  # e.g. a plain "nccl" group, while the SAEs train on the CPU
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_sum_(self, tensor: Tensor) -> Tensor:
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_reduce_max_(self, tensor: Tensor) -> Tensor:
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX, group=self.group)
        return tensor

    def all_gather(self, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self.dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts)

    @torch.no_grad()
    def reduce_gradients(self, module: nn.Module, weight: float | None = None) -> None:
        # One all-reduce per module: weighted gradients, weighted floating buffers, and a flag per
        # parameter saying whether any process had a gradient (so "no gradient" stays None).
        weight = 1.0 / self.world_size if weight is None else weight
        params = [p for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not params and not buffers:
            return
        dtype = (params or buffers)[0].dtype
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=grads[0].device) \
            if params else torch.zeros(0, dtype=dtype, device=buffers[0].device)
        flat = torch.cat([t.reshape(-1).to(dtype) * weight for t in grads + buffers] + [present])
        self.all_reduce_sum_(flat)
        chunks = flat.split([t.numel() for t in grads + buffers] + [len(params)])
        # (the flags are read on the host only when this process lacks a gradient: no sync per step)
        anywhere = chunks[-1].tolist() if any(p.grad is None for p in params) else [1.0] * len(params)
        for param, chunk, had in zip(params, chunks, anywhere):
            if param.grad is not None:
                param.grad.copy_(chunk.view_as(param))
            elif had:
                param.grad = chunk.view_as(param).to(param.dtype).clone()
        for buffer, chunk in zip(buffers, chunks[len(params):]):
            buffer.copy_(chunk.view_as(buffer))

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        for tensor in [*module.parameters(), *module.buffers()]:
            self.dist.broadcast(tensor.data, src=src, group=self.group)

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        box = [value]
        self.dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def gather_object(self, value: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.is_main else None
        self.dist.gather_object(value, out, dst=0, group=self.group)
        return out

    def all_gather_object(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, value, group=self.group)
        return out


_GLOO: dict[str, Any] = {}


def _gloo_group() -> Any:
    import torch.distributed as dist

    if "group" not in _GLOO:
        _GLOO["group"] = dist.new_group(backend="gloo")
    return _GLOO["group"]


def process_group_from_env(device: torch.device | str | None = None) -> SingleProcess:
    """:class:`TorchDistributed` when torch.distributed is initialised or torchrun launched this
    process (WORLD_SIZE > 1), else :class:`SingleProcess`. Initialises the default group when
    needed: gloo for CPU tensors, plus nccl for CUDA tensors where CUDA is available (each process
    then uses the GPU of its LOCAL_RANK). ``device`` is where the trainer's tensors live."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if not initialised:
        if not launched_by_torchrun():
            return SingleProcess()
        if not dist.is_available() or not dist.is_gloo_available():
            raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} asks for several processes, but this torch "
                               "build has no torch.distributed with the gloo backend")
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            backend = "cpu:gloo,cuda:nccl"
            if int(os.environ.get("LOCAL_RANK", "0")) < torch.cuda.device_count():
                torch.cuda.set_device(local_device(torch.device("cuda")))
        dist.init_process_group(backend)
        atexit.register(_destroy)
    if dist.get_world_size() == 1:
        return SingleProcess()
    return TorchDistributed(device)


def _destroy() -> None:
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        try:  # leave together: a peer that closes its gloo connections first can abort this one
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception:  # a peer died or left: nothing to wait for
            pass
        dist.destroy_process_group()


# -- what the trainer does with the processes ---------------------------------------------------
def assign_saes(names: Iterable[str], world_size: int) -> dict[str, int]:
    """The process that trains each SAE when every process trains its own: round robin over the
    sorted names. The SAEs must divide evenly over the processes (each then does the same work)."""
    ordered = sorted(names)
    if len(ordered) % world_size:
        raise ValueError(f"distribute='saes' needs the number of SAEs ({len(ordered)}) to be a multiple of the "
                         f"number of processes ({world_size}): start torchrun with --nproc_per_node dividing "
                         f"{len(ordered)}, or use distribute='data'")
    return {name: index % world_size for index, name in enumerate(ordered)}


def shard_batch(batch: dict[str, Tensor], rank: int, world_size: int) -> tuple[dict[str, Tensor], float]:
    """Process ``rank``'s contiguous slice of the batch's rows, and its share of the rows."""
    if world_size == 1:
        return batch, 1.0
    rows = next(iter(batch.values())).shape[0]
    local = {key: value.tensor_split(world_size)[rank] for key, value in batch.items()}
    return local, next(iter(local.values())).shape[0] / rows


class _GlobalMean(torch.autograd.Function):
    """Forward: sum over processes of weight * (a shard's mean). Backward: the identity, because
    the trainer's gradient reduction applies the weight and the sum."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, group: SingleProcess, weight: float) -> Tensor:
        return group.all_reduce_sum_(value.detach() * weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def _top_threshold(group: SingleProcess, values: Tensor, keep: int) -> Tensor:
    """The keep-th largest entry of every process's ``values`` together."""
    flat = values.detach().reshape(-1)
    top = flat.topk(min(keep, flat.numel())).values
    gathered = group.all_gather(torch.cat([top, top.new_full((keep - top.numel(),), float("-inf"))]))
    return gathered.topk(keep).values[-1]


@dataclass
class ShardStepContext(StepContext):
    """The StepContext of one process's slice of a data-parallel batch: hooks that make a loss
    built on whole-batch statistics exact (an SAE that ignores them sees only its slice)."""

    batch_top_threshold: Callable[[Tensor, int], Tensor] | None = None
    """``(values [rows, d], k)``: the (k * whole-batch rows)-th largest entry of every slice's
    values together; keeping this slice's entries >= it is BatchTopK's selection over the batch."""

    batch_min: Callable[[Tensor], Tensor] | None = None
    """The minimum of a (0-d) statistic over every slice (no gradient)."""


def step_context(group: SingleProcess, weight: float, batch_size: int, **fields: Any) -> StepContext:
    if group.world_size == 1:
        return StepContext(**fields)
    return ShardStepContext(
        **fields, batch_mean=lambda value: _GlobalMean.apply(value, group, weight),
        batch_top_threshold=lambda values, k: _top_threshold(group, values, k * batch_size),
        batch_min=lambda value: -group.all_reduce_max_(-value.detach().clone()))


def reduce_metrics(metrics: StreamingMetrics, group: SingleProcess) -> StreamingMetrics:
    """The metrics over every process's rows (each process accumulated its own slices)."""
    if group.world_size == 1:
        return metrics
    reduced = StreamingMetrics(metrics.d_sae, metrics.d_out, metrics.device)
    reduced.load_state_dict({key: group.all_reduce_sum_(value.to(metrics.device).clone())
                             for key, value in metrics.state_dict().items()})
    return reduced


def any_process(group: SingleProcess, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process (so that all of them stop at the same step)."""
    if group.world_size == 1:
        return flag
    return bool(group.all_reduce_max_(torch.tensor(int(flag), device=device)).item())


def gather_by_name(group: SingleProcess, parts: dict[str, Any], order: Iterable[str]) -> dict[str, Any] | None:
    """Every process's ``{name: value}`` merged on the main process, in ``order`` (None elsewhere)."""
    gathered = group.gather_object(parts)
    if gathered is None:
        return None
    merged = {name: value for part in gathered for name, value in part.items()}
    return {name: merged[name] for name in order if name in merged}


def share_saes(group: SingleProcess, saes: dict[str, nn.Module], owners: dict[str, int],
               metrics: dict[str, StreamingMetrics], device: torch.device) -> dict[str, StreamingMetrics]:
    """After each process trained its own SAEs: every SAE's weights (from its owner) and final
    metrics, on every process, in the order of ``saes``."""
    for name, sae in saes.items():
        group.broadcast_module(sae.to(device), src=owners[name])
        sae.eval()
    states = group.all_gather_object({name: {key: value.cpu() for key, value in m.state_dict().items()}
                                      for name, m in metrics.items()})
    merged = {name: state for part in states for name, state in part.items()}
    shared = {}
    for name, sae in saes.items():
        if name not in metrics:
            shared[name] = StreamingMetrics(sae.cfg.d_sae, sae.cfg.d_output, device)
            shared[name].load_state_dict(merged[name])
        else:
            shared[name] = metrics[name]
    return shared


def share_scales(group: SingleProcess, *scales: dict[str, float]) -> tuple[dict[str, float], ...]:
    """After each process trained its own SAEs: every SAE's scales (``{name: scale}`` dicts of each
    process's own) on every process."""
    parts = group.all_gather_object(scales)
    return tuple({name: value for part in parts for name, value in part[i].items()} for i in range(len(scales)))


def reduced_row(group: SingleProcess, weight: float, loss: Tensor, terms: dict[str, Tensor], l0: Tensor,
                reference: Tensor, reconstruction: Tensor) -> dict[str, float]:
    """The log values of the whole batch from the slices: the loss terms and L0 (weighted means;
    a term that is not linear in the batch mean gets the mean of the slices' values) and FVU."""
    means = torch.stack([loss.detach().float(), *[t.detach().float() for t in terms.values()],
                         l0.float()]).double() * weight
    ref, recon = reference.double(), reconstruction.detach().double()
    sums = group.all_reduce_sum_(torch.cat([means, (ref - recon).pow(2).sum().view(1), ref.pow(2).sum().view(1),
                                            ref.new_tensor([ref.shape[0]]), ref.sum(0)])).tolist()
    n_means = len(means)
    error, square, rows, column_sums = sums[n_means], sums[n_means + 1], sums[n_means + 2], sums[n_means + 3:]
    centred = square - sum(s * s for s in column_sums) / rows
    return {"loss": sums[0], **dict(zip(terms, sums[1:n_means - 1])), "l0": sums[n_means - 1],
            "fvu": error / max(centred, 1e-30)}
