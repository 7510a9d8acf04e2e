"""One process of a torchrun training run, for tests/test_distributed.py (and its reference).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py \
        --out OUT --results RESULTS [--scenarios data_full,data_resume,saes_full,saes_resume]

Every process reads the same deterministic stream of global batches; the Trainer finds the other
processes itself (WORLD_SIZE etc. from torchrun). Scenarios, all in one launch (starting torch
twice costs more than the training):

- ``data_full``, ``saes_full``: an uninterrupted run; each process writes into OUT/{scenario}/rank{R}
  (so whatever a process other than the main one writes is visible);
- ``data_resume``, ``saes_resume``: a run into the shared OUT/{scenario} that dies at batch
  CRASH_AFTER on every process (a copy of its checkpoint goes to RESULTS), then new Trainers
  resume it from the file.

Each process writes what ``fit`` returned to RESULTS/{scenario}.rank{R}.safetensors and its
final summary to RESULTS/{scenario}.rank{R}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from jumpscope.sae import build
from jumpscope.sae.batchtopk import BatchTopKSAE
from jumpscope.train import Trainer, TrainerConfig
from recipes import adam_build

D_IN, D_SAE, BATCH, STEPS = 16, 64, 96, 24


def stream(n_batches: int = STEPS + 2, seed: int = 0):
    """Replayable sparse-ish activations with a mean offset, in chunks of 40 rows (not the batch size)."""
    generator = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(48, D_IN, generator=generator)
    for _ in range(n_batches * BATCH // 40):
        codes = (torch.rand(40, 48, generator=generator) < 0.1) * torch.rand(40, 48, generator=generator)
        yield codes @ dictionary + 0.3


class GlobalBatchTopK(BatchTopKSAE):
    """BatchTopK that keeps the top k * B of the whole batch through the context's
    ``batch_top_threshold`` and ``batch_min`` (what batchtopk.py would do to be exact)."""

    def loss(self, x, ctx, target=None):
        self._ctx = ctx
        return super().loss(x, ctx, target)

    def batch_topk(self, pre):
        threshold = getattr(getattr(self, "_ctx", None), "batch_top_threshold", None)
        if threshold is None:
            return super().batch_topk(pre)
        acts = torch.relu(pre)
        kept = acts * (acts >= threshold(acts, self.cfg.k)).to(acts.dtype)
        positive = kept.detach()[kept.detach() > 0]
        smallest = positive.min() if positive.numel() else acts.new_tensor(float("inf"))
        return kept, self._ctx.batch_min(smallest)


def make_saes(suite: str) -> dict:
    common = dict(d_in=D_IN, d_sae=D_SAE)
    if suite == "data":  # trained under data parallelism; all but plain batchtopk exactly as in one process
        return {"jumprelu": adam_build("jumprelu", **common, l0_coefficient=0.05, threshold_init_l0=6, seed=1),
                "jumprelu_sparse": adam_build("jumprelu", **common, l0_coefficient=0.05, threshold_init_l0=6, seed=2,
                                         kernel="sparse"),
                "topk": adam_build("topk", **common, k=4, seed=3),
                "gated": build("gated", **common, seed=4),
                "relu": build("relu", **common, seed=5),
                "jumprelu_target": adam_build("jumprelu", **common, target_l0=4, seed=6),
                "batchtopk_global": GlobalBatchTopK(adam_build("batchtopk", **common, k=4, seed=7).cfg),
                "batchtopk": adam_build("batchtopk", **common, k=4, seed=7)}
    if suite == "saes":  # one SAE set per process
        return {"jumprelu": adam_build("jumprelu", **common, target_l0=4, seed=1),
                "topk": adam_build("topk", **common, k=4, seed=2),
                "batchtopk": adam_build("batchtopk", **common, k=4, seed=3),
                "relu": build("relu", **common, seed=4)}
    raise ValueError(f"unknown suite {suite!r}")


EXACT = ("jumprelu", "jumprelu_sparse", "topk", "gated", "relu", "jumprelu_target", "batchtopk_global")


def config(suite: str, out: str | None) -> TrainerConfig:
    return TrainerConfig(total_tokens=BATCH * STEPS, batch_size=BATCH, init_sample_tokens=2 * BATCH,
                         dead_tokens=BATCH, final_metrics_tokens=8 * BATCH, log_every=4, checkpoint_every=5,
                         progress=False, device="cpu", out_dir=out, distribute="saes" if suite == "saes" else "data",
                         decoder_refit_tokens=BATCH * STEPS)  # the refit's rows and its sharing under torchrun


class Crash(RuntimeError):
    pass


def crashing(batches, after: int):
    for index, batch in enumerate(batches):
        if index == after:
            raise Crash("simulated kill")
        yield batch


def flat_state(saes: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().cpu().contiguous().clone()
            for name, sae in saes.items() for key, value in sae.state_dict().items()}


def run(scenario: str, out: Path, results: Path, rank: int, crash_after: int) -> None:
    suite, kind = scenario.split("_")
    out = out / scenario / f"rank{rank}" if kind == "full" else out / scenario
    if kind == "resume":
        try:
            Trainer(make_saes(suite), config(suite, str(out))).fit(crashing(stream(), crash_after))
        except Crash:
            pass
        if rank == 0:
            shutil.copy(out / "checkpoint.safetensors", results / f"{scenario}.crash_checkpoint.safetensors")
            shutil.copytree(out / "refit_rows", results / f"{scenario}.crash_refit_rows")  # the decoder refit's rows
    trainer = Trainer(make_saes(suite), config(suite, str(out)))
    trained = trainer.fit(stream(), resume=kind == "resume")
    save_file(flat_state(trained), str(results / f"{scenario}.rank{rank}.safetensors"))
    (results / f"{scenario}.rank{rank}.json").write_text(json.dumps(
        {"world_size": trainer.processes.world_size, "trained_here": sorted(trainer.saes),
         "scales": [sorted(trainer.input_scales), sorted(trainer.output_scales)],
         "summary": trainer.final_summary()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--scenarios", default="data_full,data_resume,saes_full,saes_resume")
    parser.add_argument("--crash-after", type=int, default=31, help="incoming chunk (of 40 rows) to die at")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    args.results.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios.split(","):
        run(scenario, args.out, args.results, rank, args.crash_after)


if __name__ == "__main__":
    sys.exit(main())
