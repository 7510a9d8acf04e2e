"""Dashboard generation for a 16k-latent SAE over 200k tokens of real text on the real MiniLM.

Trains (once; reused afterwards) a 16,384-latent JumpReLU SAE on all-MiniLM-L6-v2's
``layers.3.resid_post`` over Project Gutenberg books and WikiText-2 paragraphs, then runs
``jumpscope dashboard`` on it over 200,000 tokens in a child process, and prints the time of each
stage (scanning = model + SAE + top-k merge; writing the site) with the child's peak resident
memory, the site's size on disk and its file count. MiniLM is an encoder, so there is no logit
lens. Needs ``../shared/data`` (skips cleanly without it).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/dashboard_speed.py            # ~10 min with training
    python benchmarks/dashboard_speed.py --tokens 50000                      # a shorter scan
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see benchmarks/README.md

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from shared_data import GUTENBERG, WIKITEXT, verified  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SITE = "layers.3.resid_post"


def corpus_of(paths: list[Path]) -> str:
    return f"{paths[0].parent},{paths[-2]},{paths[-1]}"


def train_sae(out: Path, corpus: str, tokens: int) -> Path:
    """The 16k-latent SAE, trained once and reused."""
    folder = out / SITE
    if (folder / "cfg.json").is_file():
        return folder
    import torch

    from jumpscope.activations import ActivationConfig
    from jumpscope.jobs.train import TrainJobConfig, run_train
    from jumpscope.train import TrainerConfig

    torch.set_num_threads(2)
    job = TrainJobConfig(site=(SITE,), arch="jumprelu", width=16_384, target_l0=32, tokens=tokens, out=str(out),
                         device="cpu", eval_tokens=4_096, trainer=TrainerConfig(batch_size=1024, progress=True))
    run_train(job, ActivationConfig(model="minilm", corpus=corpus, txt_split="paragraph", context_size=128,
                                    model_batch_size=32))
    if not (folder / "cfg.json").is_file():
        raise SystemExit(f"training wrote no SAE at {folder}")
    return folder


def folder_size(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200_000, help="tokens the dashboard scans")
    parser.add_argument("--train-tokens", type=int, default=300_000, help="tokens the 16k SAE trains on (once)")
    parser.add_argument("--out", type=Path, default=RESULTS / "dashboard_minilm")
    args = parser.parse_args(argv)
    paths = verified(*GUTENBERG, *WIKITEXT)
    if isinstance(paths, str):
        print(f"SKIP: {paths}")
        return 0
    corpus = corpus_of(paths)
    started = time.time()
    sae = train_sae(args.out / "sae", corpus, args.train_tokens)
    print(f"SAE ready at {sae} ({time.time() - started:.0f} s)", flush=True)
    site = args.out / "site"
    command = [sys.executable, "-m", "jumpscope", "dashboard", str(sae), "--model", "minilm", "--corpus", corpus,
               "--txt-split", "paragraph", "--context-size", "128", "--model-batch-size", "32",
               "--tokens", str(args.tokens), "--out", str(site), "--device", "cpu"]
    load0 = os.getloadavg()[0]
    begun = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - begun
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    summary = json.loads((site / "summary.json").read_text())
    size, count = folder_size(site)
    scan = summary["seconds"]["scan_and_logit_lens"]
    result = {"d_sae": summary["d_sae"], "n_tokens": summary["n_tokens"], "wall_seconds": wall,
              "scan_seconds": scan, "site_seconds": summary["seconds"]["total"] - scan,
              "tokens_per_second_scan": summary["n_tokens"] / scan, "peak_rss_mb": peak_mb,
              "site_mb": size / 1e6, "site_files": count, "dead": summary["dead"],
              "dense_above_0.1": summary["dense_above_0.1"], "load_average": [load0, os.getloadavg()[0]]}
    print(f"\n{result['d_sae']:,} latents over {result['n_tokens']:,} tokens of MiniLM {SITE}: "
          f"{wall:.0f} s in all (process start and model load included): scan {scan:.0f} s "
          f"({result['tokens_per_second_scan']:,.0f} tokens/s), site {result['site_seconds']:.1f} s; "
          f"peak RSS {peak_mb:,.0f} MB; site {size / 1e6:,.1f} MB in {count:,} files; "
          f"{result['dead']:.1%} dead, {result['dense_above_0.1']:.1%} dense; load average {load0:.1f} at start")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dashboard_speed.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
