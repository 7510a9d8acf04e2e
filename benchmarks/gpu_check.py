"""GPU check: the CUDA paths agree with the CPU's, resume exactly and harvest the same rows.

CI has no GPU, so this is the check of every CUDA path, run by hand on a CUDA machine (it exits
with status 1 when a check fails, 2 when no CUDA device is present); gpu_speed.py has the speed
figures:

1. Agreement, one training step per architecture (d_in 64, d_sae 2048, batch 1024, L0 about 32,
   5% of the latents dead so AuxK runs): the loss and every parameter gradient on CUDA against the
   CPU's (float32, dense kernel; bound 1e-3 relative, several summation orders apart); the sparse
   kernel on CUDA against the dense one on CUDA (bound 1e-5, as benchmarks/kernel_speed.py on the
   CPU); CUDA bf16 autocast against CUDA float32 (reported, not bounded: bf16 rounding moves
   pre-activations by more than JumpReLU's threshold window, so its threshold gradient is another
   sample, not a rounded copy; gpu_speed.py's quality section trains both to the same FVU).
2. Resume: a Trainer run on CUDA interrupted after 31 of 40 steps and resumed ends with the
   weights of an uninterrupted run (bit for bit), for JumpReLU, TopK and BatchTopK, float32 and
   bf16 autocast.
3. Prefetch: a Trainer run on CUDA fed host batches (pageable float32, float16, pinned, rows
   re-chunked) copied one batch ahead on a side stream ends with the weights of the same run copied
   in each step (bit for bit).
4. The test suite's tests marked ``cuda`` (prefetch, evaluation on the GPU, a cached clean pass
   scored on the GPU), which CI skips.
5. Harvest: a tiny random Llama's activations at two sites, model on CUDA, rows delivered on the
   CPU, against the CPU model's (bound 1e-4 relative).

    python benchmarks/gpu_check.py --out results/gpu_check.json
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch

from gpu_common import ARCH_ROWS, autocast, has_kernel, parser, run_sections
from jumpscope.sae import StepContext, build
from jumpscope.train import Trainer, TrainerConfig

CPU_BOUND, SPARSE_BOUND = 1e-3, 1e-5


def loss_and_grads(sae, x: torch.Tensor, dead: torch.Tensor, bf16: bool = False):
    ctx = StepContext(dead_mask=dead.to(x.device))
    with autocast(x.device, bf16):
        out = sae.loss(x, ctx)
    sae.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {name: p.grad.detach().double().cpu() for name, p in sae.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


def max_relative_error(grads: dict, reference: dict) -> tuple[float, str]:
    worst = (0.0, "-")
    for name in reference.keys() | grads.keys():
        ref = reference.get(name, torch.zeros_like(grads.get(name, torch.zeros(1))))
        got = grads.get(name, torch.zeros_like(ref))
        norm = ref.norm().item()
        error = (got - ref).norm().item() / (norm if norm > 0 else 1.0)
        worst = max(worst, (error, name))
    return worst


def agreement(device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    d_in, d_sae, batch = 64, 2048, 1024
    x = torch.randn(batch, d_in, generator=generator) * 3 + 1
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=generator)[: d_sae // 20]] = True
    rows = []
    for arch, fields in ARCH_ROWS:
        kernels = ("dense", "sparse") if has_kernel(arch) else ("-",)
        cuda_dense = None
        for kernel in kernels:
            extra = dict(fields, kernel=kernel) if kernel != "-" else fields
            cpu = build(arch, d_in=d_in, d_sae=d_sae, seed=0, **extra)
            cpu.init_from_data(x)
            cpu.train()
            gpu = copy.deepcopy(cpu).to(device)
            row = dict(arch=arch, kernel=kernel)
            loss_gpu, grads_gpu = loss_and_grads(gpu, x.to(device), dead)
            if kernel in ("dense", "-"):
                loss_cpu, grads_cpu = loss_and_grads(cpu, x, dead)
                row["loss_vs_cpu"] = abs(loss_gpu - loss_cpu) / abs(loss_cpu)
                row["grad_vs_cpu"], row["worst_vs_cpu"] = max_relative_error(grads_gpu, grads_cpu)
                row["ok"] = row["loss_vs_cpu"] < CPU_BOUND and row["grad_vs_cpu"] < CPU_BOUND
                cuda_dense = grads_gpu
            else:
                row["grad_vs_cuda_dense"], row["worst_vs_dense"] = max_relative_error(grads_gpu, cuda_dense)
                row["ok"] = row["grad_vs_cuda_dense"] < SPARSE_BOUND
            loss_bf16, grads_bf16 = loss_and_grads(copy.deepcopy(gpu), x.to(device), dead, bf16=True)
            row["bf16_loss_vs_fp32"] = abs(loss_bf16 - loss_gpu) / abs(loss_gpu)
            row["bf16_grad_vs_fp32"], _ = max_relative_error(grads_bf16, grads_gpu)
            rows.append(row)
            print("  agreement", json.dumps(row), flush=True)
    return rows


def stream(n_batches: int, rows: int = 256, d_in: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(96, d_in, generator=generator)
    for _ in range(n_batches):
        codes = (torch.rand(rows, 96, generator=generator) < 0.1) * torch.rand(rows, 96, generator=generator)
        yield codes @ dictionary + 0.3


class Crash(RuntimeError):
    pass


def crashing(batches, after: int):
    for index, batch in enumerate(batches):
        if index == after:
            raise Crash
        yield batch


def small_saes(*names: str) -> dict:
    """Fresh small SAEs (d_in 32, 256 latents, L0 8) for the Trainer runs compared bit for bit."""
    makers = {"jumprelu": lambda: build("jumprelu", d_in=32, d_sae=256, target_l0=8, seed=1),
              "topk": lambda: build("topk", d_in=32, d_sae=256, k=8, seed=2),
              "batchtopk": lambda: build("batchtopk", d_in=32, d_sae=256, k=8, seed=3)}
    return {name: makers[name]() for name in names}


def weight_differences(reference: dict, got: dict) -> dict[str, tuple[list[str], float]]:
    """Per SAE: the state keys that differ and the largest absolute difference among them."""
    out = {}
    for name in reference:
        ref, new = reference[name].state_dict(), got[name].state_dict()
        differing = [key for key in ref if not torch.equal(ref[key], new[key])]
        out[name] = differing, max(((ref[k].double() - new[k].double()).abs().max().item() for k in differing),
                                   default=0.0)
    return out


def resume_check(device: torch.device) -> list[dict]:
    rows = []
    for precision in ("none", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            def config(name):
                return TrainerConfig(total_tokens=256 * 40, batch_size=256, init_sample_tokens=512, log_every=5,
                                     checkpoint_every=7, progress=False, device=str(device), autocast=precision,
                                     out_dir=str(Path(tmp) / name))
            reference = Trainer(small_saes("jumprelu", "topk", "batchtopk"), config("ref")).fit(stream(60))
            try:
                Trainer(small_saes("jumprelu", "topk", "batchtopk"), config("run")).fit(crashing(stream(60), after=31))
            except Crash:
                pass
            resumed = Trainer(small_saes("jumprelu", "topk", "batchtopk"), config("run")).fit(stream(60), resume=True)
        for name, (differing, largest) in weight_differences(reference, resumed).items():
            rows.append(dict(sae=name, autocast=precision, identical=not differing, differing=differing,
                             largest_difference=largest, ok=not differing))
            print("  resume", json.dumps(rows[-1]), flush=True)
    return rows


def prefetch_check(device: torch.device) -> list[dict]:
    def run(prefetch: bool, items) -> dict:
        cfg = TrainerConfig(total_tokens=256 * 30, batch_size=256, init_sample_tokens=512, log_every=5,
                            checkpoint_every=0, progress=False, device=str(device), prefetch=prefetch)
        return Trainer(small_saes("jumprelu", "topk"), cfg).fit(items)

    feeds = {"float32": lambda: stream(40), "float16": lambda: (b.half() for b in stream(40)),
             "pinned": lambda: (b.pin_memory() if device.type == "cuda" else b for b in stream(40)),
             "rechunked": lambda: (part for b in stream(40) for part in b.split(100))}
    rows = []
    for feed, items in feeds.items():
        for name, (differing, largest) in weight_differences(run(False, items()), run(True, items())).items():
            rows.append(dict(feed=feed, sae=name, identical=not differing, differing=differing,
                             largest_difference=largest, ok=not differing))
            print("  prefetch", json.dumps(rows[-1]), flush=True)
    return rows


def cuda_tests(device: torch.device) -> list[dict]:
    """The test suite's tests marked ``cuda`` (skipped where there is no CUDA device, as in CI)."""
    import pytest

    root = Path(__file__).resolve().parents[1]
    status = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "cuda", "--rootdir", str(root), str(root / "tests")])
    row = dict(pytest="-m cuda", exit_status=int(status), ok=status == 0 and device.type == "cuda")
    print("  cuda_tests", json.dumps(row), flush=True)
    return [row]


def harvest_check(device: torch.device) -> list[dict]:
    """A tiny random Llama's residual stream harvested on CUDA against the CPU's."""
    import transformers

    from jumpscope.models.harvest import harvest

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    sites = ["layers.1.resid_post", "layers.2.mlp_out"]
    cpu = next(harvest(model, [(ids, mask)], sites))
    gpu = next(harvest(copy.deepcopy(model).to(device), [(ids, mask)], sites))
    rows = []
    for site in sites:
        error = ((gpu[site] - cpu[site]).norm() / cpu[site].norm()).item()
        rows.append(dict(site=site, rows=cpu[site].shape[0], relative_error=error,
                         on_cpu=gpu[site].device.type == "cpu", ok=error < 1e-4 and gpu[site].device.type == "cpu"))
        print("  harvest", json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    args = parser(__doc__, "gpu_check.json").parse_args()
    run_sections("gpu_check", args, dict(agreement=agreement, resume=resume_check, prefetch=prefetch_check,
                                           cuda_tests=cuda_tests, harvest=harvest_check),
                 checks=("agreement", "resume", "prefetch", "cuda_tests", "harvest"))


if __name__ == "__main__":
    main()
