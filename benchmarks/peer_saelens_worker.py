"""The SAELens side of benchmarks/peer_saelens.py: trains SAELens's own JumpReLU SAE on our cache.

It runs inside the separate SAELens venv (never a dependency of jumpscope), started by
peer_saelens.py as::

    .venv-saelens/bin/python benchmarks/peer_saelens_worker.py JOB.json

JOB.json (written by peer_saelens.py) names the activation cache folder, the site, the shuffle
seed and buffer, d_in, d_sae, the token budget and batch size, the torch thread count, the runs
(each an ``l0_coefficient``, a learning rate and optionally ``sae_fields``:
JumpReLUTrainingSAEConfig fields for that run only, e.g. ``{"jumprelu_sparsity_loss_mode":
"quadratic", "target_l0": 32}`` for its target-L0 mode), the output folder, the held-out
activations (a safetensors file, of which the first ``eval_tokens`` rows are used) and where to
write the result JSON.

For each run: ``torch.manual_seed(seed)``, ``JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(...))``
with SAELens's defaults except ``l0_coefficient`` (and the fields the job and the run override), then
``SAETrainer(SAETrainerConfig(...), sae, provider).fit()``, where the provider yields the same
shuffled batches as our side reads (``jumpscope.data.cache.CacheReader.iterate`` with the same
seed; jumpscope is installed in this venv with --no-deps) and hashes what it hands out, so the
two sides can prove they trained on identical rows. Only ``fit()`` is timed (the per-step figure is
the median interval between successive batches handed out); a forward hook on SAELens's
``hook_sae_acts_post`` records each training batch's L0 and the mean threshold (the trace in the
result, every 20th step). The SAE is then saved in SAELens's
own format (``save_inference_model``: cfg.json + sae_weights.safetensors, plus the trainer's
sparsity.safetensors), loaded back with ``SAE.load_from_disk`` and measured on the held-out rows
with SAELens's own forward, as a cross-check of our reader of the format.
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

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import sae_lens  # noqa: E402
from sae_lens import SAE, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, SAETrainer  # noqa: E402
from sae_lens.config import LoggingConfig, SAETrainerConfig  # noqa: E402
from sae_lens.saes.sae import SAEMetadata  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_batches import Provider  # noqa: E402


@torch.no_grad()
def own_metrics(sae, x: torch.Tensor, batch: int) -> dict:
    """L0 and mean-centred FVU with SAELens's own encode/decode (float64 sums)."""
    sq_err = l0 = 0.0
    for chunk in x.split(batch):
        f = sae.encode(chunk)
        sq_err += (chunk.double() - sae.decode(f).double()).pow(2).sum().item()
        l0 += (f > 0).sum().item()
    centred = (x.double() - x.double().mean(0)).pow(2).sum().item()
    return {"l0": l0 / x.shape[0], "fvu": sq_err / centred}


def train_one(job: dict, run: dict, x_eval: torch.Tensor) -> dict:
    steps = job["tokens"] // job["batch_size"]
    torch.manual_seed(job["seed"])
    metadata = SAEMetadata(model_name=job["model"], hook_name=job["site"], context_size=job.get("context_size"))
    fields = {**job.get("sae_overrides", {}), **run.get("sae_fields", {})}  # the run's own fields win
    cfg = JumpReLUTrainingSAEConfig(d_in=job["d_in"], d_sae=job["d_sae"], l0_coefficient=run["l0_coefficient"],
                                    metadata=metadata, **fields)
    sae = JumpReLUTrainingSAE(cfg)
    trace = []  # (training L0 of each batch, mean threshold), from a hook on SAELens's own activation hook point

    def record(_module, _inputs, acts):
        if sae.training:
            trace.append(((acts > 0).sum(-1).float().mean().item(), sae.threshold.detach().mean().item()))

    sae.hook_sae_acts_post.register_forward_hook(record)
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * job["batch_size"],
                                   train_batch_size_samples=job["batch_size"], lr=run["lr"], lr_end=run["lr"] / 10,
                                   device="cpu", logger=LoggingConfig(log_to_wandb=False))
    provider = Provider(job["cache"], job["site"], job["seed"], job["buffer_rows"], job["batch_size"], steps)
    trainer = SAETrainer(trainer_cfg, sae, provider)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    stamps = [start] + provider.stamps + [start + seconds]
    intervals = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # batch i handed out -> batch i+1
    folder = Path(job["out"]) / run["name"]
    sae.save_inference_model(folder)
    save_file({"sparsity": trainer.log_feature_sparsity.contiguous()}, folder / "sparsity.safetensors")
    loaded = SAE.load_from_disk(str(folder), device="cpu")
    loaded.eval()
    return {**run, "folder": str(folder), "steps": trainer.n_training_steps, "tokens": trainer.n_training_samples,
            "batches_handed_out": provider.handed, "data_sha256": provider.digest.hexdigest(),
            "train_seconds": seconds, "step_seconds_median": statistics.median(intervals) if intervals else seconds,
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
            "trainer_l0_last_window": getattr(sae.cfg.metadata, "l0", None),
            "cfg_fields": {k: getattr(cfg, k) for k in ("jumprelu_sparsity_loss_mode", "target_l0", "l0_warm_up_steps",
                                                          "jumprelu_init_threshold", "jumprelu_bandwidth")},
            "train_l0_last_10pct": statistics.fmean(t[0] for t in trace[-max(1, len(trace) // 10):]) if trace else None,
            "train_trace_every_20": [[i, round(a, 2), round(b, 4)] for i, (a, b) in enumerate(trace)
                                     if i % 20 == 0 or i == len(trace) - 1],
            "saelens_own_eval": own_metrics(loaded, x_eval, job["batch_size"]),
            "threshold_mean": float(sae.threshold.detach().mean()), "saved_as": type(loaded).__name__}


def main() -> None:
    started = time.perf_counter()
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(job["threads"])
    x_eval = load_file(job["eval"])[job["site"]][: job["eval_tokens"]].float()  # the rows our side measures
    runs = []
    for run in job["runs"]:
        result = train_one(job, run, x_eval)
        print(f"  SAELens {run['name']}: {result['train_seconds']:.1f} s training, "
              f"held-out L0 {result['saelens_own_eval']['l0']:.1f}, FVU {result['saelens_own_eval']['fvu']:.4f}",
              flush=True)
        runs.append(result)
    Path(job["result"]).write_text(json.dumps({
        "sae_lens_version": sae_lens.__version__, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "worker_seconds": time.perf_counter() - started, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
