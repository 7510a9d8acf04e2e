"""Training speed: time per full training step of every architecture, as a ratio to one dense matmul.

One step is what the trainer runs: ``sae.loss(x, StepContext(dead_mask=...))``, backward,
``remove_parallel_decoder_grad``, an Adam step (``make_optimizer``), ``normalize_decoder_rows``,
``after_step``. Each row is timed against ONE dense ``x @ W_enc`` ((batch, d_in) @ (d_in, d_sae))
measured in the same run: all rows and the matmul take turns, round after round, and the
reported figure is the median over the rounds (after one warm-up round), so load from other
processes hits them alike (the dense rows, which take most of the time, only in the first
--dense-repeats rounds). The target (sparse path, L0 about 64) is a step of at most 3 matmuls.

Rows, at L0 ~64: JumpReLU (thresholds at each latent's (1 - 64/d_sae) quantile on the batch:
``threshold_init_l0=64`` then ``init_from_data``), with its default pre_act_coefficient (1e-4,
folded into the sparse products plus a rank-one term) and with 0; TopK and BatchTopK with k = 64 and a
dead mask on --dead-fraction of the latents (so AuxK runs, k_aux = d_in / 2); each with
kernel='dense' and kernel='sparse'. ReLU and Gated have no sparse path and no L0 knob: their
dense step with the default config, their measured L0 as it comes. Inputs: Gaussian, scaled to
each architecture's input_scaling. The learning rate is set to 1e-6 (the cost of a step does
not depend on it) so that L0 stays where it was set.

Gradient check: before any optimiser step, every parameter gradient of each sparse row is
compared with its dense twin's (same weights, same batch, float32) as ||g_sparse - g_dense|| /
||g_dense|| per tensor; the maximum over tensors is reported (the requirement is < 1e-5).

    python benchmarks/kernel_speed.py            # d_sae 4096 and 16384 (about 8 minutes on 2 busy cores)
    python benchmarks/kernel_speed.py --quick    # d_sae 4096, 3 rounds (about 2 minutes on 2 busy cores)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/kernel_speed.py --threads 2   # see benchmarks/README.md
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from jumpscope.device import reuse_freed_cpu_memory
from jumpscope.sae import StepContext, build
from jumpscope.sae.registry import make_config
from jumpscope.train.optim import make_optimizer
from jumpscope.train.trainer import estimate_scale
from shared_data import timing_parser

RESULTS = Path(__file__).resolve().parent / "results" / "training_speed.json"
ARCHS = ("jumprelu", "relu", "gated", "topk", "batchtopk")


def row_specs(l0: int, archs: tuple[str, ...]) -> list[tuple[str, str, dict, str]]:
    """(label, architecture, config fields, kernel) of every row; kernel '-' = no kernel field."""
    specs = []
    for arch in archs:
        if arch == "jumprelu":
            for pre_act, tag in ((1e-4, "pre_act 1e-4 (default)"), (0.0, "pre_act 0")):
                for kernel in ("dense", "sparse"):
                    specs.append((f"jumprelu, {tag}", arch, dict(threshold_init_l0=l0, pre_act_coefficient=pre_act),
                                  kernel))
        elif arch in ("topk", "batchtopk"):
            specs += [(f"{arch}, k={l0}", arch, dict(k=l0), kernel) for kernel in ("dense", "sparse")]
        else:
            specs.append((f"{arch}, default config", arch, {}, "-"))
    return specs


def make_sae(arch: str, fields: dict, kernel: str, d_in: int, d_sae: int, x: torch.Tensor):
    if kernel != "-":
        fields = dict(fields, kernel=kernel)
    sae = build(arch, d_in=d_in, d_sae=d_sae, seed=0, **fields)
    sae.init_from_data(x)
    sae.train()
    optimizer = make_optimizer(sae)
    for group in optimizer.param_groups:
        group["lr"] = 1e-6  # as the trainer sets each step's lr; keeps L0 where it was set
    return sae, optimizer


def train_step(sae, optimizer, x: torch.Tensor, ctx: StepContext, grads: dict | None = None):
    out = sae.loss(x, ctx)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if grads is not None:  # the raw gradients of the first step, for the check against dense
        grads.update({name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None})
    sae.remove_parallel_decoder_grad()
    optimizer.step()
    sae.normalize_decoder_rows()
    sae.after_step()
    return out


def relative_errors(sparse: dict, dense: dict) -> dict[str, float]:
    errors = {}
    for name in dense.keys() | sparse.keys():
        d, s = dense.get(name), sparse.get(name)
        d = torch.zeros_like(s) if d is None else d
        s = torch.zeros_like(d) if s is None else s
        norm = d.double().norm().item()
        diff = (s.double() - d.double()).norm().item()
        errors[name] = diff / norm if norm > 0 else diff
    return errors


def run_width(d_sae: int, args, generator: torch.Generator) -> list[dict]:
    x_raw = torch.randn(args.batch, args.d_in, generator=generator)
    inputs = {conv: x_raw / estimate_scale(x_raw, conv) for conv in ("unit_mean_sq_norm", "sqrt_d_in_norm", "none")}
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=generator)[: int(round(args.dead_fraction * d_sae))]] = True
    contexts = {False: StepContext(dead_mask=dead), True: StepContext(dead_mask=dead, bf16_selection=True)}
    W = torch.randn(args.d_in, d_sae, generator=generator) / args.d_in ** 0.5
    x_mm = inputs["unit_mean_sq_norm"]

    rows = []
    for label, arch, fields, kernel in row_specs(args.l0, tuple(args.arch or ARCHS)):
        x = inputs[make_config(arch, d_in=args.d_in, d_sae=d_sae, **fields).input_scaling]
        # bf16 selection recomputes z at the entries in another summation order: thresholds initialised on
        # the timed rows would tie with their z exactly, and those ties could flip against the dense twin
        init = x.roll(1, dims=0).flip(1) if args.bf16_selection else x
        for bf16 in (False, True) if kernel == "sparse" and args.bf16_selection else (False,):
            sae, optimizer = make_sae(arch, fields, kernel, args.d_in, d_sae, init)
            rows.append(dict(label=label, arch=arch, d_sae=d_sae, kernel=kernel + (", bf16 sel." if bf16 else ""),
                             x=x, sae=sae, opt=optimizer, ctx=contexts[bf16], times=[], grads={}))
    matmul: list[float] = []
    for round_index in range(args.repeats + 1):
        # Dense rows are timed in the first --dense-repeats rounds only (they take most of the time);
        # round 0 warms up every row and holds the gradient check.
        stepping = [row for row in rows if row["kernel"].startswith("sparse") or round_index <= args.dense_repeats]
        for index, row in enumerate(stepping):
            if index % 3 == 0:  # the reference matmul, several times per round
                start = time.perf_counter()
                product = x_mm @ W
                if round_index:
                    matmul.append(time.perf_counter() - start)
                del product
            start = time.perf_counter()
            out = train_step(row["sae"], row["opt"], row["x"], row["ctx"], row["grads"] if round_index == 0 else None)
            seconds = time.perf_counter() - start
            if round_index:
                row["times"].append(seconds)
            row["l0"] = (out.feature_acts > 0).float().sum(-1).mean().item()  # the last timed step's
            del out
        if round_index == 0:  # the gradient check: sparse rows against their dense twins, first step
            for row in rows:
                if row["kernel"].startswith("sparse"):
                    twin = next(r for r in rows if r["label"] == row["label"] and r["kernel"] == "dense")
                    row["grad_errors"] = relative_errors(row["grads"], twin["grads"])
            for row in rows:
                row["grads"] = {}
        print(f"  d_sae {d_sae}: round {round_index}/{args.repeats} done ({len(stepping)} rows, "
              f"{time.perf_counter() - args.started:.0f} s, load average {os.getloadavg()[0]:.1f})", flush=True)
    mm = statistics.median(matmul)
    results = []
    for row in rows:
        seconds = statistics.median(row["times"])
        result = dict(label=row["label"], arch=row["arch"], d_sae=d_sae, kernel=row["kernel"], l0=row["l0"],
                      seconds=seconds, matmul_seconds=mm, ratio=seconds / mm, times=row["times"])
        if row["kernel"].startswith("sparse"):
            twin = next(r for r in rows if r["label"] == row["label"] and r["kernel"] == "dense")
            result["speedup"] = statistics.median(twin["times"]) / seconds
            result["grad_errors"] = row["grad_errors"]
            result["max_grad_error"] = max(row["grad_errors"].values())
        results.append(result)
    print(f"  d_sae {d_sae}: one x @ W_enc ({args.batch}x{args.d_in} @ {args.d_in}x{d_sae}) median {mm:.4f} s "
          f"over {len(matmul)} runs", flush=True)
    return results


def table(results: list[dict], target: float) -> str:
    lines = ["| architecture | d_sae | L0 measured | kernel | step (s, median) | step / one x @ W_enc | "
             "speed-up vs dense | max grad rel. error | <= 3x |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in results:
        speedup = f"{r['speedup']:.1f}x" if "speedup" in r else ("1.0x" if r["kernel"] == "dense" else "-")
        error = f"{r['max_grad_error']:.1e}" if "max_grad_error" in r else "-"
        verdict = ("yes" if r["ratio"] <= target else "no") if r["kernel"].startswith("sparse") else "-"
        lines.append(f"| {r['label']} | {r['d_sae']} | {r['l0']:.1f} | {r['kernel']} | {r['seconds']:.3f} "
                     f"| {r['ratio']:.1f}x | {speedup} | {error} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    parser = timing_parser(__doc__, "timed rounds after one warm-up round")
    parser.add_argument("--dense-repeats", type=int, default=2,
                        help="rounds in which the dense rows are timed (the first ones; default 2)")
    parser.add_argument("--d-sae", type=int, action="append", help="repeatable; default 4096 and 16384")
    parser.add_argument("--d-in", type=int, default=384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--l0", type=int, default=64, help="JumpReLU's initial L0 and TopK/BatchTopK's k")
    parser.add_argument("--dead-fraction", type=float, default=0.05,
                        help="latents marked dead in the StepContext (TopK/BatchTopK AuxK; 0: AuxK off)")
    parser.add_argument("--arch", action="append", choices=ARCHS, help="repeatable; default all five")
    parser.add_argument("--quick", action="store_true", help="d_sae 4096 only, 3 rounds (dense rows: 2)")
    parser.add_argument("--target", type=float, default=3.0, help="the target step / matmul ratio")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--bf16-selection", action="store_true",
                        help="every sparse row runs twice in the same rounds: entries chosen in float32, and on bf16 "
                             "pre-activations with bf16 gathered products (the trainer's autocast bf16 on a CPU "
                             "with AMX or AVX512-BF16; sae/mixed.py, sae/kernels.py)")
    parser.add_argument("--no-reuse-cpu-memory", action="store_true",
                        help="leave glibc's allocator as it is (the trainer's reuse_cpu_memory default sets it)")
    args = parser.parse_args()
    if not args.no_reuse_cpu_memory:  # as the trainer runs: freed blocks reused, no page faults per step
        reuse_freed_cpu_memory()
    if args.quick:
        args.d_sae, args.repeats, args.dense_repeats = args.d_sae or [4096], 3, 2
    args.dense_repeats = max(1, min(args.dense_repeats, args.repeats))
    torch.set_num_threads(args.threads)
    args.started, load_start = time.perf_counter(), os.getloadavg()[0]
    header = (f"{date.today()}, torch {torch.__version__}, float32 on CPU ({platform.machine()}, "
              f"{os.cpu_count()} cores), torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY="
              f"{os.environ.get('OMP_WAIT_POLICY', 'unset (OpenMP default: spin, then sleep)')}, d_in {args.d_in}, "
              f"batch {args.batch}, medians over {args.repeats} rounds after a warm-up round (dense rows: the first "
              f"{args.dense_repeats}), freed CPU memory reused: {not args.no_reuse_cpu_memory}, "
              f"dead fraction {args.dead_fraction} (TopK/BatchTopK AuxK), sparse entries chosen in "
              f"{'float32, and again in bf16 (float32 values at the entries, bf16 gathered products; sparse, bf16 sel.)' if args.bf16_selection else 'float32'}")
    print(header + "\nThe cores may be shared with other jobs (e.g. a test run or another benchmark): load average "
          f"{load_start:.1f} at the start; only the ratios within one run are meaningful.", flush=True)
    results = []
    generator = torch.Generator().manual_seed(0)
    for d_sae in args.d_sae or [4096, 16384]:
        results += run_width(d_sae, args, generator)
    load_end = os.getloadavg()[0]
    print(f"\n{header}; load average {load_start:.1f} at the start, {load_end:.1f} at the end; "
          f"{time.perf_counter() - args.started:.0f} s in all.\n")
    print(table(results, args.target))
    bf16_rows = [r for r in results if "max_grad_error" in r and r["kernel"] != "sparse"]
    if bf16_rows:  # another summation order: entries within float32 rounding of a bound fall either side
        print(f"\nLargest gradient error of a bf16-selection row: {max(r['max_grad_error'] for r in bf16_rows):.2e} "
              "(not held to 1e-5: bf16 tables in the decoder and weight-gradient products, about 4e-3; see "
              "sae/kernels.py).")
    worst = max((r for r in results if "max_grad_error" in r and r["kernel"] == "sparse"),
                key=lambda r: r["max_grad_error"], default=None)
    if worst is not None:
        name, value = max(worst["grad_errors"].items(), key=lambda item: item[1])
        verdict = "OK" if value < 1e-5 else "ABOVE 1e-5"
        print(f"\nLargest gradient error of any float32 sparse row: {value:.2e} ({worst['label']}, d_sae {worst['d_sae']}, "
              f"{name}): {verdict}.")
        for r in results:
            if "grad_errors" in r:
                print(f"  {r['label']}, d_sae {r['d_sae']}: " +
                      ", ".join(f"{k} {v:.1e}" for k, v in sorted(r["grad_errors"].items())))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(header=header, load_start=load_start, load_end=load_end,
                                        results=results), indent=1))


if __name__ == "__main__":
    main()
