"""Jacobian SAEs on real models: is the trained model's MLP computation sparser than a random one's?

The Jacobian SAE paper's control (SPEC 5): train the same pairs on the real model and on a randomly
re-initialised copy of it (every matrix re-drawn with its own standard deviation), and compare the
fraction of held-out Jacobian entries with |J| > 0.01 (also 0.005, 0.02), with each SAE's FVU and
the model's own measure (delta LM loss for the causal LM, 1 - cosine of the sentence embedding
for the encoder) beside it. lambda = 0 is the same pair without the penalty.

- ``stories``: stories260K (Karpathy's tinyllamas, llama2.c; SwiGLU MLP), layer 2 of 5, over
  TinyStories; k 16 of 512 latents per side (d_model is only 64).
- ``minilm``: the built-in all-MiniLM-L6-v2 (GELU MLP), layer 3 of 6 (the middle), over Project
  Gutenberg books and WikiText-2 paragraphs; k 32 of 1536 latents per side (4 x d_model:
  the Jacobian products make wider pairs slow on a 2-core CPU).

Each model runs ``jumpscope.jobs.jsae.run_jsae`` twice (trained, randomised) with every lambda
trained on the same batches, then prints one table. Needs ``../shared/data`` (skips cleanly
without it).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/jsae_real.py            # about 40 minutes on 2 cores
    python benchmarks/jsae_real.py --models stories --quick            # a tenth of the tokens
    python benchmarks/jsae_real.py --report-only                       # re-read the saved summaries
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: see benchmarks/README.md

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from jumpscope.activations import ActivationConfig  # noqa: E402
from jumpscope.jobs.jsae import JsaeJobConfig, run_jsae  # noqa: E402
from jumpscope.train import TrainerConfig  # noqa: E402
from shared_data import GUTENBERG, STORIES260K, WIKITEXT, available, real_model_parser  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAMBDAS = (0.0, 1.0, 4.0, 16.0)


def setups(quick: bool) -> dict[str, dict]:
    """Per model: files it needs, the job, the activations and the trainer fields."""
    scale = 0.1 if quick else 1.0
    return {
        "stories": dict(
            files=(*STORIES260K, "text/tinystories_cased.txt", "text/tinystories_lower.txt"),
            job=dict(layer=2, k=16, width=512, tokens=int(2_000_000 * scale), eval_tokens=8_192),
            activations=lambda paths: dict(model=str(paths[0]), corpus=f"{paths[2]},{paths[3]}", context_size=256,
                                           model_batch_size=16),
            trainer=dict(batch_size=1024)),
        "minilm": dict(
            files=(*GUTENBERG, *WIKITEXT),
            job=dict(layer=3, k=32, width=1536, tokens=int(100_000 * scale), eval_tokens=4_096),
            activations=lambda paths: dict(model="minilm", corpus=f"{paths[0].parent},{paths[-2]},{paths[-1]}",
                                           txt_split="paragraph", context_size=128, model_batch_size=32),
            trainer=dict(batch_size=512)),
    }


def measure_of(held_out: dict) -> tuple[str, float]:
    """The model's own downstream measure with the SAE spliced in."""
    for key in ("delta_lm_loss", "embedding_1_minus_cosine"):
        if key in held_out:
            return key, held_out[key]
    return "-", float("nan")


def table(name: str, runs: dict[str, dict]) -> str:
    """One row per lambda: the trained model's pair beside the randomised model's."""
    trained, random = runs["trained"]["pairs"], runs["random"]["pairs"]
    measure = measure_of(next(iter(trained.values()))["held_out"]["output"])[0]
    lines = [f"### {name}: layer {runs['trained']['layer']} ({runs['trained']['mlp']} MLP, "
             f"{runs['trained']['activation']}); trained model | randomised model", "",
             f"| lambda | |J|>0.01 trained | |J|>0.01 random | random / trained | |J|>0.005 tr / rnd | "
             f"|J|>0.02 tr / rnd | FVU in tr / rnd | FVU out tr / rnd | {measure} in / out (trained) |",
             "|---:|---:|---:|---:|---|---|---|---|---|"]
    for key, row in trained.items():
        other = random.get(key)
        if other is None:
            continue
        j_tr, j_rnd = row["jacobian"], other["jacobian"]
        held, held_rnd = row["held_out"], other["held_out"]
        lines.append(
            f"| {row['jacobian_coefficient']:g} | {j_tr['jacobian_above_0.01']:.4f} | {j_rnd['jacobian_above_0.01']:.4f}"
            f" | {j_rnd['jacobian_above_0.01'] / max(j_tr['jacobian_above_0.01'], 1e-12):.2f}x"
            f" | {j_tr['jacobian_above_0.005']:.3f} / {j_rnd['jacobian_above_0.005']:.3f}"
            f" | {j_tr['jacobian_above_0.02']:.3f} / {j_rnd['jacobian_above_0.02']:.3f}"
            f" | {held['input']['fvu']:.3f} / {held_rnd['input']['fvu']:.3f}"
            f" | {held['output']['fvu']:.3f} / {held_rnd['output']['fvu']:.3f}"
            f" | {measure_of(held['input'])[1]:.4f} / {measure_of(held['output'])[1]:.4f} |")
    return "\n".join(lines)


def verdict(runs: dict[str, dict]) -> str:
    """Does the penalty sparsify the trained model's computation more than the randomised one's?"""
    trained, random = runs["trained"]["pairs"], runs["random"]["pairs"]
    penalised = [key for key, row in trained.items() if row["jacobian_coefficient"] > 0 and key in random]
    if not penalised or "lambda_0" not in trained or "lambda_0" not in random:
        return "no lambda > 0 with lambda = 0 beside it: no verdict"
    parts = []
    for key in penalised:
        tr = trained[key]["jacobian"]["jacobian_above_0.01"] / trained["lambda_0"]["jacobian"]["jacobian_above_0.01"]
        rnd = random[key]["jacobian"]["jacobian_above_0.01"] / random["lambda_0"]["jacobian"]["jacobian_above_0.01"]
        parts.append(f"{key.replace('lambda_', 'lambda ')}: trained keeps {tr:.1%} of its lambda-0 density, "
                     f"random keeps {rnd:.1%}")
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = real_model_parser(__doc__, "runs", "re-read the saved summaries")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per pair (default: per model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {}
    for name, setup, paths in available(args.models, setups(args.quick)):
        runs = {}
        for variant in ("trained", "random"):
            out = RESULTS / f"jsae_{name}{'_quick' if args.quick else ''}" / variant
            if not args.report_only:
                started = time.time()
                job = JsaeJobConfig(**{**setup["job"], **({"tokens": args.tokens} if args.tokens else {})},
                                    jacobian_coefficients=tuple(args.lambdas),
                                    randomize_model=variant == "random", out=str(out), device="cpu",
                                    resume=args.resume, trainer=TrainerConfig(**setup["trainer"], progress=True))
                run_jsae(job, ActivationConfig(**setup["activations"](paths)))
                print(f"{name} {variant}: {time.time() - started:.0f} s", flush=True)
            runs[variant] = json.loads((out / "summary.json").read_text())
        print(table(name, runs))
        print(f"\n{name}: {verdict(runs)}\n")
        report[name] = {"table": table(name, runs), "verdict": verdict(runs),
                        "seconds": {v: r["seconds"] for v, r in runs.items()}}
    if report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"jsae_real{'_quick' if args.quick else ''}.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
