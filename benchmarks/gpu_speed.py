"""GPU speed: one training step by architecture, kernel and precision; the Trainer end to end;
where the time goes; and whether bf16 autocast trains as well as float32.

Run by hand on a CUDA machine (CI has none); gpu_check.py checks the CUDA paths' correctness.

1. speed: one full training step (loss, backward, optimiser, decoder normalisation) per
   architecture, kernel (dense / sparse) and precision (float32, TF32 matmuls, bf16 autocast),
   Gaussian rows scaled as the trainer scales them, d_in 768, batch 4096, L0 about 64 (5% of the latents dead: AuxK runs), at --widths; median
   over --repeats steps after 3 warm-ups with CUDA synchronised around each step, as a ratio to
   one dense x @ W_enc in the same precision; and the peak memory.
2. trainer: the Trainer end to end on host batches (metrics, schedule, the final calibration):
   tokens per second for JumpReLU, TopK and BatchTopK by kernel, autocast and how each batch
   reaches the GPU (prefetch: pinned and copied one batch ahead on a side stream; else a plain
   pageable copy in the step), interleaved so that each pair runs side by side.
3. trainer_profile / profile: torch.profiler's top operators of a TopK Trainer run (dense and
   sparse, bf16) and of five sparse steps of JumpReLU and TopK (bf16) at --profile-width.
4. quality: runs of --quality-steps on synthetic data drawn on the device (32768 true features
   with Zipf firing rates, true L0 32, d_in 768, d_sae 16384): held-out FVU and L0 of JumpReLU
   (target L0 32) and TopK (k 32), dense and sparse, float32 and bf16 autocast.

    python benchmarks/gpu_speed.py --out results/gpu_speed.json
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from typing import Callable

import torch

from gpu_common import (ARCH_ROWS, PRECISIONS, has_kernel, parser, precision_mode, run_sections, stepper,
                        synchronize, timed)
from jumpscope.sae import StepContext, build
from jumpscope.sae.registry import make_config
from jumpscope.train import Trainer, TrainerConfig
from jumpscope.train.optim import make_optimizer
from jumpscope.train.trainer import estimate_scale


def scaled_inputs(device: torch.device, batch: int = 4096, d_in: int = 768) -> Callable[[str], torch.Tensor]:
    """A Gaussian batch as each architecture sees it in training: divided by the scale of its
    input_scaling (the trainer's estimate_scale), so that e.g. JumpReLU's bandwidth is in the
    units it was chosen for (unscaled rows put four times as many entries in its sparse step)."""
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(0))
    inputs = {conv: (x / estimate_scale(x, conv)).to(device) for conv in ("unit_mean_sq_norm", "sqrt_d_in_norm", "none")}
    return lambda arch: inputs[make_config(arch, d_in=d_in, d_sae=d_in).input_scaling]


def speed(device: torch.device, widths: list[int], repeats: int) -> list[dict]:
    d_in = 768
    inputs = scaled_inputs(device)
    rows, cuda = [], device.type == "cuda"
    for d_sae in widths:
        dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
        dead[: d_sae // 20] = True
        W = torch.randn(d_in, d_sae, device=device) / d_in ** 0.5
        matmul, x_mm = {}, inputs("topk")
        for precision in PRECISIONS:
            with precision_mode(device, precision):
                matmul[precision] = timed(lambda: x_mm @ W, device, repeats)
        for arch, fields in ARCH_ROWS:
            x = inputs(arch)
            fields = dict(fields, threshold_init_l0=64) if arch == "jumprelu" else (
                dict(k=64) if "k" in fields else fields)
            for kernel in ("dense", "sparse") if has_kernel(arch) else ("-",):
                extra = dict(fields, kernel=kernel) if kernel != "-" else fields
                sae = build(arch, d_in=d_in, d_sae=d_sae, seed=0, **extra).to(device)
                sae.init_from_data(x)
                sae.train()
                optimizer = make_optimizer(sae)
                for group in optimizer.param_groups:
                    group["lr"] = 1e-7  # the cost of a step does not depend on it; L0 stays put
                ctx = StepContext(dead_mask=dead)
                for precision in PRECISIONS:
                    step = stepper(sae, optimizer, x, ctx, precision)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats(device)
                    seconds = timed(step, device, repeats)
                    with torch.no_grad(), precision_mode(device, precision):
                        l0 = (sae.loss(x, ctx).feature_acts > 0).float().sum(-1).mean().item()
                    row = dict(arch=arch, kernel=kernel, d_sae=d_sae, precision=precision, l0=l0,
                               step_ms=seconds * 1e3, matmul_ms=matmul[precision] * 1e3,
                               ratio=seconds / matmul[precision],
                               peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None)
                    rows.append(row)
                    print("  speed", json.dumps(row), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
    return rows


def operator_profiler(device: torch.device):
    """torch.profiler over the CPU and, where there is one, the GPU."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    return torch_profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def profile_sorts(device: torch.device) -> tuple[str, ...]:
    return ("self_cuda_time_total", "self_cpu_time_total") if device.type == "cuda" else ("self_cpu_time_total",)


@functools.cache
def host_batches(count: int = 8, batch: int = 4096, d_in: int = 768) -> list[torch.Tensor]:
    """The Trainer runs' host batches (Gaussian), drawn once per process."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(batch, d_in, generator=generator) for _ in range(count)]


TRAINER_ARCHS = (("jumprelu", dict(target_l0=64)), ("topk", dict(k=64)), ("batchtopk", dict(k=64)))


def trainer_run(device: torch.device, d_sae: int, arch: str, fields: dict, kernel: str, precision: str, steps: int,
                profiled: bool = False, prefetch: bool = True) -> dict:
    """One Trainer run on host batches (Gaussian, d_in 768, batch 4096; prefetched, or copied in
    each step): tokens per second, and with ``profiled`` the top operators."""
    host = host_batches()
    d_in, batch = host[0].shape[1], host[0].shape[0]
    sae = build(arch, d_in=d_in, d_sae=d_sae, seed=0, kernel=kernel, **fields)
    cfg = TrainerConfig(total_tokens=batch * steps, batch_size=batch, progress=False, device=str(device),
                        autocast=precision, log_every=50, checkpoint_every=0, prefetch=prefetch)
    start = time.perf_counter()
    with operator_profiler(device) if profiled else contextlib.nullcontext() as prof:
        Trainer({arch: sae}, cfg).fit(host[i % len(host)] for i in range(steps + 8))
        synchronize(device)
    seconds = time.perf_counter() - start
    row = dict(arch=arch, kernel=kernel, autocast=precision, prefetch=prefetch, d_sae=d_sae, steps=steps, seconds=seconds,
               tokens_per_second=batch * steps / seconds)
    print("  trainer", json.dumps(row), flush=True)
    if profiled:
        row["table"] = prof.key_averages().table(sort_by=profile_sorts(device)[0], row_limit=25)
        print(row["table"], flush=True)
    return row


def trainer_throughput(device: torch.device, widths: list[int], steps: int, precisions: list[str]) -> list[dict]:
    """The Trainer end to end: tokens per second by width, architecture, kernel, autocast and prefetch."""
    return [trainer_run(device, d_sae, arch, fields, kernel, precision, steps, prefetch=prefetch)
            for d_sae in widths for arch, fields in TRAINER_ARCHS
            for kernel, precision in itertools.product(("dense", "sparse"), precisions) for prefetch in (False, True)]


def trainer_profile(device: torch.device, d_sae: int) -> list[dict]:
    """A profiled 60-step TopK Trainer run under bf16 autocast, dense and sparse."""
    return [trainer_run(device, d_sae, "topk", dict(k=64), kernel, "bf16", 60, profiled=True)
            for kernel in ("dense", "sparse")]


def profile(device: torch.device, d_sae: int) -> list[dict]:
    """torch.profiler over 5 sparse steps (bf16 autocast) of JumpReLU and TopK: the top operators."""
    d_in = 768
    inputs = scaled_inputs(device)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
    dead[: d_sae // 20] = True
    rows = []
    for arch, fields in (("jumprelu", dict(threshold_init_l0=64)), ("topk", dict(k=64))):
        x = inputs(arch)
        sae = build(arch, d_in=d_in, d_sae=d_sae, seed=0, kernel="sparse", **fields).to(device)
        sae.init_from_data(x)
        optimizer = make_optimizer(sae)
        step = stepper(sae, optimizer, x, StepContext(dead_mask=dead), "bf16")
        timed(step, device, 1)
        with operator_profiler(device) as prof:
            for _ in range(5):
                step()
            synchronize(device)
        for sort in profile_sorts(device):
            text = prof.key_averages().table(sort_by=sort, row_limit=18)
            print(f"  profile {arch} d_sae {d_sae}, 5 steps, sorted by {sort}\n{text}", flush=True)
            rows.append(dict(arch=arch, d_sae=d_sae, sort=sort, table=text))
    return rows


def quality(device: torch.device, steps: int) -> list[dict]:
    """Short runs on synthetic data generated on the device (d_in 768, 32768 true features with
    Zipf firing rates, true L0 32, d_sae 16384): held-out FVU and L0 by precision and kernel."""
    d_in, n_features, d_sae, batch = 768, 32768, 16384, 4096
    gen = torch.Generator(device=device).manual_seed(0)
    dictionary = torch.randn(n_features, d_in, device=device, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    rates = 1.0 / torch.arange(1, n_features + 1, device=device, dtype=torch.float32)
    rates = (rates * 32 / rates.sum()).clamp_max(0.5)
    offset = torch.randn(d_in, device=device, generator=gen)

    def sample(n: int, generator: torch.Generator) -> torch.Tensor:
        fire = torch.rand(n, n_features, device=device, generator=generator) < rates
        codes = fire * -torch.rand(n, n_features, device=device, generator=generator).clamp_min(1e-12).log()
        return codes @ dictionary + offset

    heldout = sample(16384, torch.Generator(device=device).manual_seed(1))

    def batches(seed: int):
        generator = torch.Generator(device=device).manual_seed(seed)
        while True:
            yield sample(batch, generator)

    rows = []
    runs = [(arch, fields, kernel, precision) for arch, fields in (("jumprelu", dict(target_l0=32)), ("topk", dict(k=32)))
            for kernel, precision in (("dense", "float32"), ("dense", "bf16"), ("sparse", "float32"), ("sparse", "bf16"))]
    for arch, fields, kernel, precision in runs:
        sae = build(arch, d_in=d_in, d_sae=d_sae, seed=0, kernel=kernel, **fields)
        cfg = TrainerConfig(total_tokens=batch * steps, batch_size=batch, progress=False, device=str(device),
                            autocast="bf16" if precision == "bf16" else "none", log_every=100, checkpoint_every=0)
        start = time.perf_counter()
        trained = Trainer({arch: sae}, cfg).fit(batches(2))[arch]
        synchronize(device)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            acts = trained.encode(heldout)
            recon = trained.decode(acts)
        fvu = ((heldout - recon).pow(2).sum() / (heldout - heldout.mean(0)).pow(2).sum()).item()
        rows.append(dict(arch=arch, kernel=kernel, precision=precision, steps=steps, seconds=seconds,
                         heldout_fvu=fvu, heldout_l0=(acts > 0).float().sum(-1).mean().item()))
        print("  quality", json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    cli = parser(__doc__, "gpu_speed.json")
    cli.add_argument("--widths", type=int, nargs="+", default=[4096, 16384, 65536])
    cli.add_argument("--repeats", type=int, default=10, help="timed steps per speed row (median)")
    cli.add_argument("--trainer-steps", type=int, default=150)
    cli.add_argument("--trainer-widths", type=int, nargs="+", default=[16384, 65536])
    cli.add_argument("--trainer-precisions", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    cli.add_argument("--profile-width", type=int, default=16384)
    cli.add_argument("--quality-steps", type=int, default=1000)
    args = cli.parse_args()
    run_sections("gpu_speed", args, dict(
        speed=lambda d: speed(d, args.widths, args.repeats),
        trainer=lambda d: trainer_throughput(d, args.trainer_widths, args.trainer_steps, args.trainer_precisions),
        trainer_profile=lambda d: trainer_profile(d, args.profile_width),
        profile=lambda d: profile(d, args.profile_width), quality=lambda d: quality(d, args.quality_steps)))


if __name__ == "__main__":
    main()
