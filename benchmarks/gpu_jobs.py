"""GPU jobs: the `jumpscope train` job end to end with the model in the loop, on CUDA against the CPU.

The job harvests stories260K's ``layers.2.resid_post`` over TinyStories, trains a JumpReLU SAE
(target L0 32) and evaluates it on held-out text (FVU, L0, delta LM loss with the SAE spliced in),
once per setting below, each a fresh process on the same tokens:

- ``cpu``: the model and the SAE on the CPU (every core of the machine);
- ``cuda``: both on the GPU, float32;
- ``cuda-bf16``: both on the GPU, the SAE under bf16 autocast;
- ``cuda-cache``: both on the GPU, through an on-disk activation cache (written, then trained from).

Then, with --chain, the jobs that read a trained SAE run on CUDA on the ``cuda`` run's SAE:
``eval``, ``dashboard``, ``find`` (examples/concepts), ``steer`` and a Jacobian SAE pair
(``jsae``); each passes when it exits 0 (its last lines are kept otherwise).

A setting passes when its held-out FVU is within 10% of the CPU's and its L0 within 10% of 32
(different devices sum in different orders, so the runs are not bit-identical; gpu_check.py checks
the parts exactly). Needs stories260K and a TinyStories text (../shared/data; see data/README.md).

    python benchmarks/gpu_jobs.py --data ../shared/data --out results/gpu_jobs.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"cpu": ["--device", "cpu"], "cuda": ["--device", "cuda"],
            "cuda-bf16": ["--device", "cuda", "--autocast", "bf16"],
            "cuda-cache": ["--device", "cuda", "--cache", "{tmp}/cache"]}


def find(data: Path, *names: str) -> Path:
    for name in names:
        for path in (data / name, data / Path(name).name):  # the shared layout, or the files side by side
            if path.is_file():
                return path
    sys.exit(f"gpu_jobs: none of {list(names)} under {data}")


def run_job(setting: str, model: Path, corpus: Path, tokens: int, tmp: str) -> dict:
    out = Path(tmp) / setting
    command = [sys.executable, "-m", "jumpscope", "train", "--model", str(model), "--corpus", str(corpus),
               "--site", "layers.2.resid_post", "--tokens", str(tokens), "--no-progress", "--out", str(out)]
    command += [part.format(tmp=tmp) for part in SETTINGS[setting]]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        return dict(setting=setting, error=done.stderr.strip().splitlines()[-3:], ok=False)
    held_out = json.loads((out / "summary.json").read_text())["held_out"]["layers.2.resid_post"]
    return dict(setting=setting, seconds=seconds, fvu=held_out["fvu"], l0=held_out["l0"],
                delta_lm_loss=held_out["delta_lm_loss"], dead_fraction=held_out["dead_fraction"])


def chain_jobs(model: Path, corpus: Path, tmp: str, device: str, trained: list[str]) -> list[dict]:
    if not trained:
        return [dict(job="chain", error="no setting trained an SAE to chain from", ok=False)]
    sae = str(Path(tmp) / ("cuda" if "cuda" in trained else trained[0]) / "layers.2.resid_post")
    concepts = Path(__file__).resolve().parents[1] / "examples" / "concepts"
    jobs = {"eval": ["eval", sae, "--corpus", str(corpus), "--eval-tokens", "8192", "--out", f"{tmp}/eval.json"],
            "dashboard": ["dashboard", sae, "--corpus", str(corpus), "--tokens", "50000", "--out", f"{tmp}/dash"],
            "find": ["find", sae, "--positive", str(concepts / "animals.txt"), "--negative",
                     str(concepts / "finance.txt"), "--out", f"{tmp}/found.json"],
            "steer": ["steer", sae, "--prompt", "Once upon a time", "--steer", "12:8", "--max-new-tokens", "16"],
            "jsae": ["jsae", "--model", str(model), "--corpus", str(corpus), "--layer", "2", "--k", "8",
                     "--tokens", "100000", "--eval-tokens", "8192", "--jacobian-coefficients", "0", "1",
                     "--out", f"{tmp}/jsae"]}
    rows = []
    for name, arguments in jobs.items():
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "jumpscope", "--debug", *arguments, "--device", device],
                              capture_output=True, text=True)
        rows.append(dict(job=name, seconds=time.perf_counter() - start, exit_status=done.returncode,
                         tail=(done.stdout + done.stderr).strip().splitlines()[-12:] if done.returncode else [],
                         ok=done.returncode == 0))
        print("  chain", json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--data", type=Path, default=Path(os.environ.get("JUMPSCOPE_SHARED_DATA", "../shared/data")))
    cli.add_argument("--tokens", type=int, default=1_000_000)
    cli.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    cli.add_argument("--chain", action="store_true", help="then eval, dashboard, find, steer and jsae on CUDA")
    cli.add_argument("--chain-device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run here
    cli.add_argument("--out", type=Path, default=Path("results/gpu_jobs.json"))
    args = cli.parse_args()
    model = find(args.data, "stories260k/stories260K.bin")
    corpus = find(args.data, "text/tinystories_lower.txt")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings:
            rows.append(run_job(setting, model, corpus, args.tokens, tmp))
            print("  job", json.dumps(rows[-1]), flush=True)
        chained = chain_jobs(model, corpus, tmp, args.chain_device,
                             [row["setting"] for row in rows if "fvu" in row]) if args.chain else []
    reference = next((row for row in rows if row["setting"] == "cpu" and "fvu" in row), None)
    for row in rows:
        if "fvu" in row:
            row["fvu_vs_cpu"] = row["fvu"] / reference["fvu"] if reference else None
            row["ok"] = abs(row["l0"] / 32 - 1) < 0.1 and (reference is None or abs(row["fvu_vs_cpu"] - 1) < 0.1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows + chained, indent=1))
    failed = [row for row in rows + chained if not row["ok"]]
    print("gpu_jobs:", "all passed" if not failed else f"{len(failed)} failed", json.dumps(rows + chained), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
