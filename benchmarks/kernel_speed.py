"""Speed of the sparse training kernel (sae/kernels.py) against the dense reference path.

One full training step as the trainer runs it (loss, backward, removing the decoder-parallel
gradient, Adam step, decoder renormalisation, after_step) on random Gaussian inputs scaled to
E||x||^2 = 1, per architecture, with kernel='dense' and kernel='sparse' on the same weights.
JumpReLU's thresholds are set from data so that L0 is the requested value (eps = 0.001, the
default bandwidth); TopK and BatchTopK use k = L0 and a dead mask on 5% of the latents so that
AuxK (k_aux = d_in / 2 = 192 dead latents per token) runs as it does once latents die.
Reported: the median wall time over --repeats steps after one warm-up step (dense and sparse
take turns, so load from other processes hits both alike), dense / sparse, and the same ratio of
median CPU (process) time, which load on a shared machine disturbs less.

    python benchmarks/kernel_speed.py                  # the README table (~15 minutes on 2 cores)
    python benchmarks/kernel_speed.py --quick          # d_sae 4096, L0 32 only
    python benchmarks/kernel_speed.py --threads 2 --repeats 7 --append-readme
    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernel_speed.py   # on a machine shared with other jobs

On a machine whose cores are busy with other processes, OpenMP's default spin-waiting makes every
parallel op wait for a descheduled thread; the sparse step runs many more (small) ops than the
dense one and suffers most. OMP_WAIT_POLICY=PASSIVE (set before Python starts) removes that.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from jumpscope.sae import StepContext, build
from jumpscope.train.optim import make_optimizer

README = Path(__file__).resolve().parent / "README.md"
CASES = [(4096, 32), (4096, 256), (16384, 32)]  # (d_sae, L0)
ARCHS = ("jumprelu", "topk", "batchtopk")


def make_sae(arch: str, d_in: int, d_sae: int, l0: int, kernel: str, x: torch.Tensor):
    if arch == "jumprelu":
        sae = build(arch, d_in=d_in, d_sae=d_sae, threshold_init_l0=l0, kernel=kernel, seed=0)
    else:
        sae = build(arch, d_in=d_in, d_sae=d_sae, k=l0, kernel=kernel, seed=0)
    sae.init_from_data(x)
    return sae.train()


def step_times(saes: dict, x: torch.Tensor, ctx: StepContext, repeats: int) -> dict[str, tuple[float, ...]]:
    """Median wall and CPU (process) seconds of a full training step per SAE, and the measured L0
    of its last step.
    The SAEs take turns step by step, so that load from other processes hits them alike."""
    optimizers = {name: make_optimizer(sae) for name, sae in saes.items()}
    for optimizer in optimizers.values():
        for group in optimizer.param_groups:
            group["lr"] = 1e-6  # the cost of a step is the same; L0 stays where it was set
    times: dict[str, list[float]] = {name: [] for name in saes}
    cpu: dict[str, list[float]] = {name: [] for name in saes}
    l0 = {}
    for index in range(repeats + 1):
        for name, sae in saes.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            out = sae.loss(x, ctx)
            optimizers[name].zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            optimizers[name].step()
            sae.normalize_decoder_rows()
            sae.after_step()
            if index:  # the first step warms up allocators and Adam's state
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            if index == repeats:
                l0[name] = (out.feature_acts > 0).float().sum(-1).mean().item()
            del out
    return {name: (statistics.median(times[name]), statistics.median(cpu[name]), l0[name]) for name in saes}


def run(cases, archs, d_in: int, batch: int, repeats: int) -> list[dict]:
    rows = []
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, d_in, generator=generator)
    x = x / x.norm(dim=-1).pow(2).mean().sqrt()
    for d_sae, l0 in cases:
        dead = torch.zeros(d_sae, dtype=torch.bool)
        dead[torch.randperm(d_sae, generator=generator)[: d_sae // 20]] = True
        for arch in archs:
            ctx = StepContext(dead_mask=None if arch == "jumprelu" else dead)
            row = dict(arch=arch, d_sae=d_sae, l0=l0)
            saes = {kernel: make_sae(arch, d_in, d_sae, l0, kernel, x) for kernel in ("dense", "sparse")}
            for kernel, (seconds, cpu, measured) in step_times(saes, x, ctx, repeats).items():
                row[kernel], row[f"cpu_{kernel}"], row[f"l0_{kernel}"] = seconds, cpu, measured
            del saes
            rows.append(row)
            print(f"  {arch} d_sae={d_sae} L0={l0}: dense {row['dense']:.3f}s sparse {row['sparse']:.3f}s "
                  f"(measured L0 {row['l0_dense']:.1f})", flush=True)
    return rows


def table(rows: list[dict], d_in: int, batch: int, threads: int, repeats: int) -> str:
    lines = [f"d_in {d_in}, batch {batch}, torch {torch.__version__}, {threads} CPU threads "
             f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
             f"median of {repeats} steps (dense and sparse taking turns); TopK/BatchTopK with AuxK on "
             "(5% of latents dead).", "",
             "| architecture | d_sae | L0 | dense step (s) | sparse step (s) | speed-up | CPU-time speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['d_sae']} | {r['l0']} | {r['dense']:.3f} | {r['sparse']:.3f} "
                     f"| {r['dense'] / r['sparse']:.1f}x | {r['cpu_dense'] / r['cpu_sparse']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--arch", action="append", choices=ARCHS, help="default: all three")
    parser.add_argument("--quick", action="store_true", help="only d_sae 4096 at L0 32")
    parser.add_argument("--append-readme", action="store_true", help="append the table to benchmarks/README.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = CASES[:1] if args.quick else CASES
    rows = run(cases, tuple(args.arch or ARCHS), args.d_in, args.batch, args.repeats)
    text = table(rows, args.d_in, args.batch, args.threads, args.repeats)
    print(text)
    if args.append_readme:
        with README.open("a") as handle:
            handle.write(f"\n## Kernel speed\n\n`python benchmarks/kernel_speed.py` (sae/kernels.py, the "
                         "`kernel` config field).\n\n" + text + "\n")


if __name__ == "__main__":
    main()
