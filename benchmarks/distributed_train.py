"""Tokens per second of `jumpscope train` with 1 and 2 torchrun processes, one thread each.

Each process runs the model on its own share of the windows (batch of windows i on process
i mod N) and the rows are gathered, so every process trains on the batches one process would;
with ``--distribute data`` each then trains on its slice of every batch. Both the forward passes
and the SAE step are split; the gather, the shuffle and each process's tokenisation are not.

- ``minilm``: MiniLM ``layers.3.resid_post`` over the Gutenberg books (the forward pass dominates);
- ``stories``: stories260K ``layers.3.resid_post`` over TinyStories (a tiny model: the SAE step
  dominates).

The time is that of the whole command (model load and held-out evaluation included: the same on
both sides), median of ``--repeats``; the ratio is 1-process seconds over 2-process seconds.

    python benchmarks/distributed_train.py --models minilm stories
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared_data import GUTENBERG, STORIES260K, available

RESULTS = Path(__file__).resolve().parent / "results"
SETUPS = {  # documents by paragraph: tokenised lazily (one 4 MB document is tokenised whole, on every process)
    "minilm": dict(files=GUTENBERG, args=lambda p: ["--model", "minilm", "--corpus", str(p[0].parent),
                                                    "--txt-split", "paragraph", "--site", "layers.3.resid_post"]),
    "stories": dict(files=(*STORIES260K, "text/tinystories_lower.txt"),
                    args=lambda p: ["--model", str(p[0]), "--corpus", str(p[2]), "--txt-split", "paragraph",
                                    "--site", "layers.3.resid_post", "--context-size", "256"]),
}
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def one_run(processes: int, model_args: list[str], tokens: int, width: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory() as out:
        train = ["-m", "jumpscope", "train", *model_args, "--tokens", str(tokens), "--width", str(width),
                 "--target-l0", "32", "--batch-size", "4096", "--model-batch-size", "16", "--eval-tokens", "4096",
                 "--ablations", "none", "--no-progress", "--out", out, "--device", "cpu"]
        launcher = [sys.executable] if processes == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        started = time.perf_counter()
        done = subprocess.run(launcher + train, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            raise SystemExit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "stories"], choices=sorted(SETUPS))
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    report = {}
    for name, setup, paths in available(args.models, SETUPS):
        times = {1: [], 2: []}
        for _ in range(args.repeats):  # interleaved: slow drift in the machine's load hits both sides
            for processes in (1, 2):
                times[processes].append(one_run(processes, setup["args"](paths), args.tokens, args.width))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        report[name] = {"tokens": args.tokens, "seconds_1": times[1], "seconds_2": times[2],
                        "tokens_per_s_1": args.tokens / one, "tokens_per_s_2": args.tokens / two, "speedup": one / two}
        print(f"{name}: {args.tokens:,} tokens, 1 process {one:.1f} s ({args.tokens / one:,.0f} tok/s), "
              f"2 processes {two:.1f} s ({args.tokens / two:,.0f} tok/s): {one / two:.2f}x", flush=True)
    if report:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "distributed_train.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
