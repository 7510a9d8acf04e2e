"""One process of a torchrun run that harvests a tiny causal LM's activations and trains on them,
for tests/activations/test_source_distributed.py (which also calls :func:`run` in its own process
as the one-process reference).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/harvest_worker.py \
        --root ROOT --scenarios live_data,live_saes,cache_data,read_data

ROOT holds ``model/`` and ``corpus.txt`` (written by the test). Scenarios:

- ``live_data``, ``live_saes``: harvest live (no cache) and train four SAEs, ``distribute`` data or saes;
- ``cache_data``: fill ROOT/cache_<world size> (every process harvests its share, the main
  process writes), then train from it;
- ``read_data`` / ``readtwo_data``: train from ROOT/cache_1 / cache_2, a cache one / two processes wrote;
- ``job``: `jumpscope train` (:func:`run_job`) into ROOT/runs/job_2;
- ``kill_data`` / ``killcache_data``: as live_data / cache_data (into ROOT/killcache), but the last
  process SIGKILLs itself once its model has run on KILL_AFTER batches of windows; a later run
  (any process count) resumes the same folder.

Each process writes RESULTS/<scenario>.rank<R>.safetensors (what ``fit`` returned) and
RESULTS/<scenario>.rank<R>.json (world size, tokens its model forward saw, rows it gathered).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from jumpscope.activations import ActivationConfig, ActivationSource
from jumpscope.train import Trainer, TrainerConfig
from jumpscope.train.distributed import process_group_from_env
from recipes import adam_build

SITE = "layers.1.resid_post"
BATCH, STEPS, CONTEXT, MODEL_BATCH = 128, 20, 32, 4
KILL_AFTER = 9  # batches of windows (of 4 x 32 tokens) the last process runs before it dies


def make_saes(d_in: int) -> dict:
    """On the Adam recipes (recipes.py says why): the comparisons are to float rounding."""
    common = dict(d_in=d_in, d_sae=64, site=SITE)
    return {"jumprelu": adam_build("jumprelu", **common, target_l0=6, seed=1),
            "topk": adam_build("topk", **common, k=6, seed=2),
            "relu": adam_build("relu", **common, seed=3),
            "jumprelu_coefficient": adam_build("jumprelu", **common, l0_coefficient=0.05, seed=4)}


def activations(root: Path, cache: str | None = None) -> ActivationConfig:
    return ActivationConfig(model=str(root / "model" / "model.bin"), corpus=str(root / "corpus.txt"),
                            txt_split="paragraph", context_size=CONTEXT, model_batch_size=MODEL_BATCH,
                            shuffle_buffer_tokens=4 * BATCH, cache=cache, cache_shard_rows=3 * BATCH)


def trainer_config(out: Path, distribute: str) -> TrainerConfig:
    return TrainerConfig(total_tokens=BATCH * STEPS, batch_size=BATCH, init_sample_tokens=2 * BATCH,
                         dead_tokens=BATCH, final_metrics_tokens=4 * BATCH, log_every=4, checkpoint_every=3,
                         progress=False, device="cpu", out_dir=str(out), distribute=distribute)


def flat_state(saes: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().cpu().contiguous().clone()
            for name, sae in saes.items() for key, value in sae.state_dict().items()}


def dies_after(source: ActivationSource, batches: int) -> None:
    """Make the process SIGKILL itself when its model forward has seen ``batches`` batches of windows."""
    counted = source._counted

    def counting(windows):
        for batch in counted(windows):
            if source.forward_tokens > batches * MODEL_BATCH * CONTEXT:
                os.kill(os.getpid(), signal.SIGKILL)
            yield batch

    source._counted = counting


def run(scenario: str, root: Path, results: Path, processes=None, resume: bool = False) -> dict:
    """Train as ``scenario`` says; ``processes`` None: torchrun's (one process without torchrun)."""
    kind, mode = scenario.split("_")
    processes = processes or process_group_from_env("cpu")
    world, rank = processes.world_size, processes.rank
    cache = {"cache": root / f"cache_{world}", "read": root / "cache_1", "readtwo": root / "cache_2",
             "killcache": root / "killcache"}.get(kind)
    distribute = "saes" if mode == "saes" else "data"
    source = ActivationSource(activations(root, cache and str(cache)), [SITE], processes=processes)
    if kind.startswith("kill") and rank == world - 1 and not resume:
        dies_after(source, KILL_AFTER)
    out = root / "runs" / (scenario if kind.startswith("kill") else f"{scenario}_{world}")  # a resume: the same
    trainer = Trainer(make_saes(source.site_dims[SITE]), trainer_config(out, distribute), processes)
    trained = trainer.fit(source.training_stream(BATCH * STEPS, BATCH, progress=False), resume=resume)
    record = {"world_size": world, "forward_tokens": source.forward_tokens, "trained_here": sorted(trainer.saes)}
    if results is not None:
        save_file(flat_state(trained), str(results / f"{scenario}.rank{rank}.safetensors"))
        (results / f"{scenario}.rank{rank}.json").write_text(json.dumps(record))
    return {"weights": flat_state(trained), **record}


def run_job(root: Path, out: Path) -> dict:
    """`jumpscope train` itself (JumpReLU at target L0 on the Adam preset): the job finds the
    processes, splits the harvest and evaluates on the main process; returns its summary."""
    from jumpscope.jobs.train import TrainJobConfig, run_train

    job = TrainJobConfig(site=(SITE,), width=64, target_l0=6, preset="adam", tokens=BATCH * STEPS, eval_tokens=512,
                         ablations=("zero", "mean"), out=str(out), device="cpu",
                         trainer=TrainerConfig(batch_size=BATCH, init_sample_tokens=2 * BATCH, progress=False,
                                               checkpoint_every=5, log_every=5))
    import jumpscope.evaluate.heldout as heldout

    seen = [0]
    real = heldout.harvest

    def counting(model, windows, sites, **kwargs):  # the held-out windows this process runs the model on
        windows = list(windows)
        seen[0] += sum(int(batch[0].numel()) for batch in windows)
        return real(model, windows, sites, **kwargs)

    heldout.harvest = counting
    try:
        trained, _ = run_train(job, activations(root))
    finally:
        heldout.harvest = real
    return {"weights": flat_state(trained), "eval_tokens_seen": seen[0]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--scenarios", default="live_data,live_saes,cache_data,read_data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = args.root / "results"
    results.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios.split(","):
        if scenario == "job":
            done = run_job(args.root, args.root / "runs" / "job_2")
            rank = os.environ.get("RANK", "0")
            save_file(done["weights"], str(results / f"job.rank{rank}.safetensors"))
            (results / f"job.rank{rank}.json").write_text(json.dumps({"eval_tokens_seen": done["eval_tokens_seen"]}))
        else:
            run(scenario, args.root, results)


if __name__ == "__main__":
    sys.exit(main())
