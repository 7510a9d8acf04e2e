"""Does a suite's memory grow with its SAEs' parameters, not with a copy of the activations per SAE?

Trains 1, 4 and 16 JumpReLU SAEs together on the real MiniLM's ``layers.3.resid_post`` (the
built-in corpus, the same shuffled activation stream a suite uses), each count in a fresh process,
and prints the peak resident memory (``ru_maxrss``) of each. What the SAEs themselves need is
parameters + gradients + two Adam moments = 4 x 4 bytes per parameter; a trainer that kept one
activation buffer per SAE would add ``buffer_tokens x d_in x 4`` bytes per SAE on top.

    python benchmarks/suite_memory.py                    # about 2 min on 2 cores
    python benchmarks/suite_memory.py --counts 1 4 16 32 --width 3072
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
SITE = "layers.3.resid_post"


def child(count: int, width: int, tokens: int, buffer_tokens: int) -> None:
    import torch

    from jumpscope.activations import ActivationConfig, ActivationSource
    from jumpscope.sae import build
    from jumpscope.train import Trainer, TrainerConfig

    torch.set_num_threads(2)
    source = ActivationSource(ActivationConfig(model="minilm", shuffle_buffer_tokens=buffer_tokens), [SITE])
    saes = {f"l0_{8 + i}": build("jumprelu", d_in=384, d_sae=width, target_l0=8 + i, site=SITE)
            for i in range(count)}
    params = sum(p.numel() for sae in saes.values() for p in sae.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Trainer(saes, TrainerConfig(total_tokens=tokens, batch_size=2048, progress=False, init_sample_tokens=4096)
            ).fit(source.training_stream(tokens, 2048))
    print(json.dumps({"count": count, "parameters": params, "peak_rss_kb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss, "rss_before_training_kb": before}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--buffer-tokens", type=int, default=65_536)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.width, args.tokens, args.buffer_tokens)
        return 0
    rows = []
    for count in args.counts:
        out = subprocess.run([sys.executable, __file__, "--child", str(count), "--width", str(args.width),
                              "--tokens", str(args.tokens), "--buffer-tokens", str(args.buffer_tokens)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    buffer_mb = args.buffer_tokens * 384 * 4 / 2**20
    print(f"JumpReLU SAEs d_in 384, d_sae {args.width}, {args.tokens:,} tokens, shuffle buffer {args.buffer_tokens:,} "
          f"tokens ({buffer_mb:.0f} MB of activations)\n")
    print("| SAEs | parameters | params+grads+Adam (MB) | peak RSS (MB) | growth over 1 SAE (MB) | growth per added SAE (MB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = rows[0]
    for row in rows:
        state_mb = row["parameters"] * 16 / 2**20
        growth = (row["peak_rss_kb"] - base["peak_rss_kb"]) / 1024
        per = growth / (row["count"] - base["count"]) if row["count"] != base["count"] else float("nan")
        print(f"| {row['count']} | {row['parameters']:,} | {state_mb:.0f} | {row['peak_rss_kb'] / 1024:.0f} | "
              f"{growth:.0f} | {per:.1f} |")
    per_sae_state = rows[0]["parameters"] / rows[0]["count"] * 16 / 2**20
    print(f"\nper SAE: {per_sae_state:.1f} MB of parameters, gradients and Adam moments; one activation "
          f"buffer would be {buffer_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
