"""The sparsify side of benchmarks/peer_sparsify.py: EleutherAI sparsify 1.3.3 trains its own TopK
SAE on our activation cache, with its own ``Trainer.fit`` loop.

It runs inside the separate venv .venv-sparsify (never a dependency of jumpscope), started by
peer_sparsify.py as::

    .venv-sparsify/bin/python benchmarks/peer_sparsify_worker.py JOB.json

sparsify trains SAEs on a Hugging Face model's hidden states: ``Trainer(cfg, dataset, model)``
registers a forward hook on each hookpoint module, runs ``model(input_ids)`` once per batch of the
dataset, and inside the hook does everything else (b_dec = mean of the first batch, decoder rows
renormalised before every forward, ``SparseCoder.forward`` -> FVU loss, backward; then, after the
forward, parallel-gradient removal, ``ScheduleFreeWrapper(SignSGD).step()``, dead-latent
bookkeeping, ``save()`` with ``optimizer.eval()`` so the saved weights are the averaged x).
Here the model is a stub (:class:`CachedActivations`) whose module ``layers.N`` emits the next
cached activation batch instead of a transformer layer's output, and the dataset holds one dummy
"sequence" of ``batch_size`` token ids per step (``TrainConfig.batch_size=1``): every line of
sparsify's loop then runs unchanged on exactly our rows (the hook flattens (1, rows, d_in) to
(rows, d_in); no token is excluded). Nothing of sparsify is reimplemented or patched; the only
wrapper times ``Trainer.save`` so that the checkpoint writes can be reported apart.

Settings: ``SparseCoderConfig(num_latents=d_sae, k=k)`` and ``TrainConfig`` defaults (optimizer
"signum", lr = 5e-3 / sqrt(num_latents / 2**14), auxk_alpha 0, fvu loss, save_every 1000),
``hookpoints=["layers.N"]``, ``init_seeds=[seed]``, ``log_to_wandb=False``, plus the fields the job
overrides (``sparsify_fields``: TrainConfig fields, ``sae.NAME`` for SparseCoderConfig). On CPU:
Triton is absent or disabled (SPARSIFY_DISABLE_TRITON=1: the eager ``F.embedding_bag`` decoder),
the bf16 autocast of ``SparseCoder.forward`` is a CUDA autocast and ``torch.cuda.is_bf16_supported()``
is False here, so training is float32; ``fit`` sets ``set_float32_matmul_precision("high")``, and
the worker records whether that changes a CPU ``F.linear`` (it did not on the machine tested).

The saved folder (``<out>/<run>/layers.N``: cfg.json + sae.safetensors, written by
``SparseCoder.save_to_disk``) is loaded back with ``SparseCoder.load_from_disk`` and measured on
the held-out rows with sparsify's own encode/decode, as a cross-check of our reader of the format.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402

import sparsify  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer  # noqa: E402
from sparsify.utils import decoder_impl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_batches import Provider  # noqa: E402


class Hookpoint(nn.Module):
    """The module sparsify hooks; its output (what the hook reads) is the cached batch itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class CachedActivations(nn.Module):
    """Stands in for the language model: ``layers.N`` outputs the next cached activation batch,
    shaped (1, rows, d_in) like one sequence of ``rows`` tokens."""

    def __init__(self, provider: Provider, layer: int, d_in: int):
        super().__init__()
        self.layers = nn.ModuleList(Hookpoint() for _ in range(layer + 1))
        self.provider, self.layer, self.d_in = provider, layer, d_in
        # resolve_widths runs model(**dummy_inputs) once: answer it without consuming a batch
        self.dummy_inputs = {"input_ids": torch.zeros(1, 1, dtype=torch.long), "probe": True}

    @property
    def base_model(self) -> nn.Module:
        return self

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, probe: bool = False) -> torch.Tensor:
        if probe:
            return self.layers[self.layer](torch.zeros(1, 1, self.d_in))
        batch = next(self.provider)
        if input_ids.shape != (1, batch.shape[0]):
            raise RuntimeError(f"dataset item {tuple(input_ids.shape)} does not match a batch of {batch.shape[0]} rows")
        return self.layers[self.layer](batch.unsqueeze(0))


class Steps(torch.utils.data.Dataset):
    """One dummy sequence of ``rows`` token ids per training step (ids 0: none is excluded)."""

    def __init__(self, steps: int, rows: int):
        self.steps, self.ids = steps, torch.zeros(rows, dtype=torch.long)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.steps:
            raise IndexError(index)
        return {"input_ids": self.ids}


@torch.no_grad()
def own_metrics(sae: SparseCoder, x: torch.Tensor, batch: int) -> dict:
    """L0 and mean-centred FVU with sparsify's own encode/decode (float64 sums)."""
    sq_err = l0 = 0.0
    for chunk in x.split(batch):
        top_acts, top_indices, _ = sae.encode(chunk)
        sq_err += (chunk.double() - sae.decode(top_acts, top_indices).double()).pow(2).sum().item()
        l0 += (top_acts > 0).sum().item()
    centred = (x.double() - x.double().mean(0)).pow(2).sum().item()
    return {"l0": l0 / x.shape[0], "fvu": sq_err / centred}


def train(job: dict, x_eval: torch.Tensor) -> dict:
    steps, rows = job["tokens"] // job["batch_size"], job["batch_size"]
    hookpoint = job["hookpoint"]  # "layers.N", so that our reader maps the folder to layers.N.resid_post
    layer = int(hookpoint.split(".")[1])
    fields = dict(job.get("sparsify_fields", {}))
    sae_fields = {k[4:]: fields.pop(k) for k in list(fields) if k.startswith("sae.")}
    cfg = TrainConfig(SparseCoderConfig(**{"num_latents": job["d_sae"], "k": job["k"], **sae_fields}),
                      batch_size=1, hookpoints=[hookpoint], init_seeds=[job["seed"]], log_to_wandb=False,
                      run_name=job["run_name"], save_dir=job["out"], **fields)
    provider = Provider(job["cache"], job["site"], job["seed"], job["buffer_rows"], rows, steps)
    model = CachedActivations(provider, layer, job["d_in"])
    trainer = Trainer(cfg, Steps(steps, rows), model)
    (sae,) = trainer.saes.values()
    optimizer = trainer.optimizers[0]
    save_seconds = []
    original_save = trainer.save

    def timed_save():  # behaviour unchanged: only the time of each checkpoint is noted
        start = time.perf_counter()
        original_save()
        save_seconds.append(time.perf_counter() - start)

    trainer.save = timed_save
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    precision = torch.get_float32_matmul_precision()  # fit() sets "high"
    intervals = [b - a for a, b in zip(provider.stamps, provider.stamps[1:])]  # batch i -> batch i+1 handed out
    folder = Path(job["out"]) / job["run_name"] / hookpoint
    loaded = SparseCoder.load_from_disk(folder, device="cpu")
    live = {k: v.detach().clone() for k, v in sae.state_dict().items()}  # y: the weights training forwards used
    saved = loaded.state_dict()
    norms = saved["W_dec"].norm(dim=1)
    return {"folder": str(folder), "steps": trainer.global_step, "batches_handed_out": provider.handed,
            "tokens": provider.handed * rows, "data_sha256": provider.digest.hexdigest(),
            "fit_seconds": seconds, "save_seconds": sum(save_seconds), "saves": len(save_seconds),
            "train_seconds": seconds - sum(save_seconds),
            "step_seconds_median": statistics.median(intervals) if intervals else seconds / max(1, steps),
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
            "lr": optimizer.param_groups[0]["lr"], "optimizer": type(optimizer).__name__,
            "base_optimizer": type(getattr(optimizer, "base", optimizer)).__name__,
            "schedulefree_momentum": getattr(optimizer, "momentum", None), "lr_schedulers": len(trainer.lr_schedulers),
            "train_config": cfg.to_dict(), "num_latents": sae.num_latents,
            "float32_matmul_precision_after_fit": precision,
            "cpu_linear_unchanged_by_precision": _linear_check(x_eval[:256]),
            "cuda_bf16_autocast": bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
            "decoder": decoder_impl.__name__,
            "saved_decoder_row_norm_max_dev": float((norms - 1).abs().max()),
            "saved_minus_live_max_abs": max(float((saved[k] - live[k]).abs().max()) for k in saved),
            "sparsify_own_eval": own_metrics(loaded, x_eval, rows),
            "sparsify_own_eval_live_weights": _live_metrics(loaded, live, x_eval, rows)}


def _linear_check(probe: torch.Tensor) -> bool:
    """Whether F.linear gives the same float32 result under the precision fit() set as under 'highest'."""
    weight = torch.randn(512, probe.shape[1], generator=torch.Generator().manual_seed(0))
    high = F.linear(probe, weight)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        return torch.equal(F.linear(probe, weight), high)
    finally:
        torch.set_float32_matmul_precision(previous)


def _live_metrics(sae: SparseCoder, live: dict, x: torch.Tensor, batch: int) -> dict:
    """The same measures on the in-memory weights after fit (ScheduleFree's y, not the saved x)."""
    copy = SparseCoder(sae.d_in, sae.cfg, device="cpu", dtype=torch.float32)
    copy.load_state_dict(live)
    return own_metrics(copy, x, batch)


def main() -> None:
    started = time.perf_counter()
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(job["threads"])
    x_eval = load_file(job["eval"])[job["site"]][: job["eval_tokens"]].float()  # the rows our side measures
    result = train(job, x_eval)
    own = result["sparsify_own_eval"]
    print(f"  sparsify TopK k={job['k']}: {result['train_seconds']:.1f} s training (+{result['save_seconds']:.1f} s "
          f"saving), held-out L0 {own['l0']:.1f}, FVU {own['fvu']:.4f}", flush=True)
    Path(job["result"]).write_text(json.dumps({
        "sparsify_version": sparsify.__version__, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "sparsify_disable_triton": os.environ.get("SPARSIFY_DISABLE_TRITON"),
        "worker_seconds": time.perf_counter() - started, "run": result}, indent=1))


if __name__ == "__main__":
    main()
