"""Shared by the GPU benchmarks (gpu_check.py, gpu_speed.py): precisions, timing with CUDA
synchronised, and the runner that keeps each section's figures when another one fails."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from jumpscope.sae.registry import config_class

ARCH_ROWS = (("jumprelu", dict(threshold_init_l0=32)), ("topk", dict(k=32)), ("batchtopk", dict(k=32)),
             ("relu", {}), ("gated", {}))
PRECISIONS = ("float32", "tf32", "bf16")


def has_kernel(arch: str) -> bool:
    return any(f.name == "kernel" for f in dataclasses.fields(config_class(arch)))


def autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def precision_mode(device: torch.device, precision: str):
    """float32; tf32 (float32 tensors, TensorFloat-32 matmuls); bf16 (autocast)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with autocast(device, precision == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmups: int = 3) -> float:
    for _ in range(warmups):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def stepper(sae, optimizer, x: torch.Tensor, ctx, precision: str) -> Callable[[], object]:
    """One training step as the trainer runs it (loss under ``precision``, backward, parallel
    decoder gradient removed, optimiser, decoder rows normalised, after_step); returns the output."""
    def step():
        with precision_mode(x.device, precision):
            out = sae.loss(x, ctx)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_decoder_grad()
        optimizer.step()
        sae.normalize_decoder_rows()
        sae.after_step()
        return out
    return step


def parser(doc: str, out_name: str) -> argparse.ArgumentParser:
    """A GPU benchmark's parser with --device, --skip and --out."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument("--device", default="cuda", help="'cpu' runs the same code on the CPU (a dry run of the script)")
    result.add_argument("--skip", nargs="*", default=[], help="sections not to run")
    result.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / out_name)
    return result


def run_sections(name: str, args: argparse.Namespace, sections: dict[str, Callable[[torch.device], list[dict]]],
                 checks: tuple[str, ...] = ()) -> None:
    """Run each section not skipped on ``args.device``, writing the report after each; exit 1 when
    a section raised or a row of a section in ``checks`` is not ok, 2 when CUDA is absent."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"{name}: no CUDA device here; run it on a machine with one (or --device cpu for a dry run)",
              file=sys.stderr)
        sys.exit(2)
    unknown = set(args.skip) - set(sections)
    if unknown:
        sys.exit(f"{name}: unknown sections {sorted(unknown)}; the sections are {list(sections)}")
    header = dict(torch=torch.__version__, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  tf32=torch.backends.cuda.matmul.allow_tf32)
    print(name, json.dumps(header), flush=True)
    report, errors = dict(header=header), {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for section, fn in sections.items():
        if section in args.skip:
            continue
        try:  # one broken section must not lose the others' figures
            report[section] = fn(device)
        except Exception as error:  # noqa: BLE001 - reported, and the run fails below
            errors[section] = f"{type(error).__name__}: {error}"
            print(f"  {section}: ERROR {errors[section]}", flush=True)
            traceback.print_exc()
        args.out.write_text(json.dumps(dict(report, errors=errors), indent=1))
    failed = [row for section in checks for row in report.get(section, []) if not row["ok"]]
    failed += [dict(section=section, error=error) for section, error in errors.items()]
    for row in failed:
        print("FAILED", json.dumps(row))
    print(f"{name}: {'all passed' if not failed else f'{len(failed)} failed'}; report in {args.out}")
    sys.exit(1 if failed else 0)
