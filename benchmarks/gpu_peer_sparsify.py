"""GPU training-step speed: our TopK against EleutherAI sparsify 1.3.3's, on the same batches.

One step of each, as its own training loop runs it on a CUDA device, timed with CUDA
synchronised around the step (median over --repeats steps after warm-ups, the two sides taking
turns step by step so that clock changes hit both alike):

- sparsify (``Trainer.fit``'s hook and step, TrainConfig defaults: auxk_alpha 0, so no AuxK;
  ``signum`` = ``ScheduleFreeWrapper(SignSGD, momentum 0.95)``, lr 5e-3 / sqrt(d_sae / 2**14)):
  ``set_decoder_norm_to_unit_norm``, the batch's total variance, ``SparseCoder.forward`` (its own
  bf16 autocast and, on CUDA, its Triton decoder), ``float(out.fvu)`` (its logging reads it every
  step), backward, ``remove_gradient_parallel_to_decoder_directions``, ``optimizer.step()``,
  ``zero_grad``, and its dead-latent counters.
- ours: the trainer's step (loss, backward, ``remove_parallel_decoder_grad``, optimiser,
  ``normalize_decoder_rows``, ``after_step``) under ``autocast=bf16``, with no dead latents (no
  AuxK, as sparsify's default) and, for reference, with 5% dead (AuxK on); kernel dense and sparse.

sparsify is never our dependency: on the GPU machine its wheel and the pure-Python packages it
needs are installed into a folder of their own (benchmarks/README.md, "GPU"). Its package
``__init__`` imports its Trainer and with it ``datasets``, which this step does not use: the
package is entered without running that ``__init__`` (the modules themselves run unchanged).

    python benchmarks/gpu_peer_sparsify.py --out results/gpu_peer_sparsify.json
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

from gpu_common import stepper, synchronize
from jumpscope.sae import StepContext, build
from jumpscope.train.optim import make_optimizer


@functools.cache
def import_sparsify():
    """sparsify's SparseCoder, its config and SignSGD, without its package __init__ (see above)."""
    spec = importlib.util.find_spec("sparsify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gpu_peer_sparsify: sparsify is not importable here (see the module docstring)")
    package = types.ModuleType("sparsify")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = "1.3.3 (package __init__ not run)"
    sys.modules["sparsify"] = package
    from schedulefree import ScheduleFreeWrapper
    from sparsify.config import SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from sparsify.sparse_coder import SparseCoder
    return SparseCoder, SparseCoderConfig, SignSGD, ScheduleFreeWrapper


def sparsify_stepper(x: torch.Tensor, d_sae: int, k: int):
    SparseCoder, SparseCoderConfig, SignSGD, ScheduleFreeWrapper = import_sparsify()
    torch.manual_seed(0)
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), device=x.device)
    sae.b_dec.data = x.mean(0).to(sae.dtype)  # its first-step initialisation
    optimizer = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (d_sae / 2 ** 14) ** 0.5)]),
                                    momentum=0.95)
    optimizer.train()
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=x.device)
    did_fire = torch.zeros(d_sae, dtype=torch.bool, device=x.device)

    def step() -> float:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        fvu = float(out.fvu.detach())
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
            did_fire.zero_()
        return fvu
    return step


def our_stepper(x: torch.Tensor, d_sae: int, k: int, kernel: str, dead_fraction: float):
    sae = build("topk", d_in=x.shape[1], d_sae=d_sae, k=k, kernel=kernel, seed=0).to(x.device)
    sae.init_from_data(x)
    sae.train()
    optimizer = make_optimizer(sae)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    dead[: int(dead_fraction * d_sae)] = True
    return stepper(sae, optimizer, x, StepContext(dead_mask=dead), "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda", help="'cpu': a dry run of this script (sparsify's eager decoder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_peer_sparsify.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for d_sae in args.widths:
        x = (torch.randn(args.batch, args.d_in, generator=generator) + 0.5).to(device)
        steppers = {"sparsify TopK (bf16 autocast, Triton decoder)": sparsify_stepper(x, d_sae, args.k)}
        for kernel in ("dense", "sparse"):
            steppers[f"jumpscope TopK, {kernel}, bf16 autocast, no AuxK"] = our_stepper(x, d_sae, args.k, kernel, 0.0)
            steppers[f"jumpscope TopK, {kernel}, bf16 autocast, AuxK (5% dead)"] = our_stepper(x, d_sae, args.k, kernel,
                                                                                            0.05)
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for round_index in range(args.repeats + 3):
            for name, step in steppers.items():
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                if round_index >= 3:
                    times[name].append(time.perf_counter() - start)
        peer = statistics.median(times[next(iter(steppers))])
        for name, values in times.items():
            seconds = statistics.median(values)
            rows.append(dict(d_sae=d_sae, d_in=args.d_in, batch=args.batch, k=args.k, run=name, step_ms=seconds * 1e3,
                             sparsify_over_this=peer / seconds))
            print(json.dumps(rows[-1]), flush=True)
    header = dict(torch=torch.__version__,
                  device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    print("| d_sae | run | step (ms, median) | sparsify's step / this |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['d_sae']} | {r['run']} | {r['step_ms']:.2f} | {r['sparsify_over_this']:.2f}x |")


if __name__ == "__main__":
    main()
