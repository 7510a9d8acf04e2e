"""Steering stories260K with one SAE latent: does adding a themed latent's direction change the stories?

Trains (or reuses, from ``benchmarks/results/steering_demo/``) a TopK SAE of width 512 on the
residual stream of Karpathy's llama2.c stories260K over ~1M tokens of TinyStories, picks a latent
whose logit lens promotes a theme word (the first of ``--themes`` that some latent promotes among
its top 5 tokens; or ``--latent``), then continues a few prompts greedily (or with seeded sampling)
without steering and with steering at several strengths, printed side by side. The figure of merit
is the fraction of generated tokens that fall in the latent's top-10 promoted tokens, with and
without steering. Alphas are multiples of the site's mean activation norm, so they mean the same at
any layer.

    python benchmarks/steering_demo.py                        # train if needed, then steer
    python benchmarks/steering_demo.py --site layers.2.resid_post --latent 26 --alphas 0.5 1 --temperature 0.8

Exits 0 with a SKIP message where the shared data is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared 2-core machine

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import STORIES260K, verified  # noqa: E402

from jumpscope import formats  # noqa: E402
from jumpscope.analysis import logit_lens, token_strings  # noqa: E402
from jumpscope.activations import ActivationConfig, ActivationSource  # noqa: E402
from jumpscope.jobs.train import TrainJobConfig, run_train  # noqa: E402
from jumpscope.models.harvest import harvest  # noqa: E402
from jumpscope.models.loading import load_model  # noqa: E402
from jumpscope.steer import Steer, generate_ids, side_by_side  # noqa: E402
from jumpscope.train import TrainerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "steering_demo"
TEXTS = ("text/tinystories_cased.txt", "text/tinystories_lower.txt")
THEMES = ("happy", "play", "friend", "mom", "big", "little", "Lily", "Tim")
PROMPTS = ("Once upon a time", "One day, Tom went to", "The little girl was")
SELECT_TOP, PROMOTED_TOP = 5, 10


def trained_sae(paths: list[Path], site: str, tokens: int, k: int, width: int):
    """The SAE under RESULTS/<site>, trained first when absent."""
    folder = RESULTS / site
    if not (folder / "cfg.json").is_file():
        started = time.time()
        job = TrainJobConfig(site=(site,), arch="topk", width=width, k=k, tokens=tokens, out=str(RESULTS),
                             device="cpu", eval_tokens=16_384, trainer=TrainerConfig(batch_size=2048, progress=False))
        activations = ActivationConfig(model=str(paths[0]), corpus=f"{paths[2]},{paths[3]}", context_size=512,
                                       model_batch_size=8)
        _, table = run_train(job, activations)
        print(f"trained in {time.time() - started:.0f} s:\n{table}")
    else:
        print(f"reusing {folder}")
    return formats.load(folder).eval()


def mean_norm(loaded, paths: list[Path], site: str) -> float:
    """Mean L2 norm of the site's activations over a few held-out windows (the alphas' unit)."""
    source = ActivationSource(ActivationConfig(model=str(paths[0]), corpus=str(paths[2]), context_size=512,
                                               model_batch_size=4), [site], loaded=loaded)
    windows = [w for _, w in zip(range(2), source.windows(split="heldout"))]
    with torch.no_grad():
        norms = torch.cat([chunk[site].norm(dim=-1) for chunk in harvest(loaded.model, windows, [site])])
    return float(norms.mean())


def themed_latents(promoted: torch.Tensor, strings: list[str], themes: tuple[str, ...]) -> dict[str, list[int]]:
    """{theme word: latents whose top SELECT_TOP promoted tokens include it, best rank first}."""
    found = {}
    for word in themes:
        ids = [i for i, s in enumerate(strings) if s.strip() == word]
        ranked = []
        for latent in range(promoted.shape[0]):
            ranks = [r for r, token in enumerate(promoted[latent, :SELECT_TOP].tolist()) if token in ids]
            if ranks:
                ranked.append((min(ranks), latent))
        found[word] = [latent for _, latent in sorted(ranked)]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", default="layers.4.resid_post",
                        help="the last layer's residual stream: earlier layers steer too, but the text of this "
                             "tiny model breaks down at smaller alphas there")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens (when training)")
    parser.add_argument("--k", type=int, default=16, help="TopK's active latents per token")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--themes", nargs="+", default=list(THEMES))
    parser.add_argument("--latent", type=int, help="steer this latent instead of searching the themes")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.4, 0.6, 0.8],
                        help="steering strengths in units of the site's mean activation norm")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--line-width", type=int, default=140)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    paths = verified(*STORIES260K, *TEXTS)
    if isinstance(paths, str):
        print(f"SKIP: {paths}")
        return 0
    sae = trained_sae(paths, args.site, args.tokens, args.k, args.width)
    loaded = load_model(paths[0])
    strings = token_strings(loaded.tokenizer)
    lens = logit_lens(sae, loaded, n=PROMOTED_TOP)
    found = themed_latents(lens.promoted_ids, strings, tuple(args.themes))
    print("latents whose top-5 logit-lens tokens include a theme word: "
          + "; ".join(f"{w!r}: {v[:6]}{' ...' if len(v) > 6 else ''}" for w, v in found.items()))
    if args.latent is None:
        theme = next((w for w in args.themes if found[w]), None)
        if theme is None:
            print("no latent promotes any theme word among its top 5 tokens; pass --latent or other --themes")
            return 1
        latent = found[theme][0]
    else:
        latent, theme = args.latent, None
    promoted = lens.promoted_ids[latent].tolist()
    print(f"\nlatent {latent}{f' (theme {theme!r})' if theme else ''} promotes: "
          + ", ".join(f"{strings[t]!r} {v:+.2f}" for t, v in zip(promoted, lens.promoted_values[latent].tolist())))
    unit = mean_norm(loaded, paths, args.site)
    alphas = [a * unit for a in args.alphas]
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
    print(f"site {args.site}: mean activation norm {unit:.2f}; alphas {', '.join(f'{a:.2f}' for a in alphas)}; "
          f"{sampling}, {args.max_new_tokens} new tokens\n")
    # alpha -> [promoted tokens, theme-word tokens, generated tokens]
    in_set = {alpha: [0, 0, 0] for alpha in [0.0] + alphas}
    promoted_set = torch.tensor(promoted)
    theme_ids = torch.tensor([i for i, s in enumerate(strings) if theme and s.strip() == theme] or [-1])
    for prompt in args.prompts:
        ids = torch.tensor([loaded.tokenizer.encode(prompt)])
        cells = []
        for scale, alpha in zip([0.0] + args.alphas, [0.0] + alphas):
            edits = {args.site: (sae, [Steer(latent, alpha)] if alpha else [])}
            out = generate_ids(loaded, loaded.tokenizer, ids, edits, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed)[0, ids.shape[1]:]
            in_set[alpha][0] += int(torch.isin(out, promoted_set).sum())
            in_set[alpha][1] += int(torch.isin(out, theme_ids).sum())
            in_set[alpha][2] += out.numel()
            title = "unsteered" if not alpha else f"steer {latent} by {scale:g} x norm ({alpha:.1f})"
            cells.append((title, loaded.tokenizer.decode(out.tolist(), skip_special_tokens=True)))
        print(f"prompt: {prompt}\n{side_by_side(cells, args.line_width)}\n")
    print(f"generated tokens among latent {latent}'s top-{PROMOTED_TOP} promoted tokens"
          + (f" (and the theme word {theme!r} itself)" if theme else "") + ":")
    summary = {}
    for scale, alpha in zip([0.0] + args.alphas, [0.0] + alphas):
        hits, themed, total = in_set[alpha]
        label = "unsteered" if not alpha else f"alpha {scale:g} x norm"
        summary[label] = {"promoted": hits / max(total, 1), "theme_word": themed / max(total, 1)}
        print(f"  {label:<18} {hits:4d} / {total:4d} = {hits / max(total, 1):.3f}"
              + (f"   ({theme!r}: {themed} = {themed / max(total, 1):.3f})" if theme else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "steering_summary.json").write_text(json.dumps(
        {"site": args.site, "latent": latent, "theme": theme, "promoted": [strings[t] for t in promoted],
         "mean_norm": unit, "alphas": alphas, "sampling": sampling, "fractions": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
