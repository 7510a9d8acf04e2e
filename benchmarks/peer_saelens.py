"""Peer benchmark: our JumpReLU SAE against SAELens's, on the same cached MiniLM activations.

    .venv/bin/python benchmarks/peer_saelens.py            # defaults: about 12 min on 2 lightly loaded cores (18 at load 3-5)
    .venv/bin/python benchmarks/peer_saelens.py --quick    # smoke run, 1.5-2 min
    .venv/bin/python benchmarks/peer_saelens.py --l0 64 --threads 2 --no-install

Data: ONE on-disk activation cache (jumpscope.data.cache, built by our ActivationSource) of
all-MiniLM-L6-v2 ``layers.3.resid_post`` (d_in 384) over the ten Project Gutenberg books in
../shared/data (checksummed; exit 0 with SKIP where absent), under benchmarks/results/. Both
sides train on the same shuffled batches (``CacheReader.iterate`` with the same seed; each side
hashes what it was handed and the digests are compared). Evaluation uses held-out activations
(``ActivationSource.chunks(split="heldout")``: the one-in-20 context windows that are never in
the training stream), identical for both sides.

Ours: ``build("jumprelu", d_in=384, d_sae=W, target_l0=L)`` with its defaults, trained by
``jumpscope.Trainer``, at --l0 and at each of --targets. SAELens (6.54.x, in .venv-saelens, created
here as ``make interop`` does unless --no-install): ``JumpReLUTrainingSAE`` + ``SAETrainer``
(benchmarks/peer_saelens_worker.py), same width, tokens, batch size and seed, in two of its
sparsity modes:

- its target-L0 mode, ``jumprelu_sparsity_loss_mode="quadratic"`` with ``target_l0=T`` (Gemma
  Scope 2's penalty: l0_coefficient * 2/T * (L0_token - T)^2 averaged over the batch, each token's
  L0 counted through its step straight-through estimator, whose gradient reaches the thresholds
  only), at each of --targets (default --l0, 20 and 55), with ``l0_coefficient`` 10 and lr 5e-3
  (--quadratic-coefficient, --quadratic-lr; --quadratic-field sets other config fields). Its
  thresholds start at 0.01 (one scalar; ours are set per latent from a data sample at the
  target's quantile) and move by at most about lr per Adam step, and they must reach about 0.2,
  so at 200 steps the lr decides whether the target is reached. Tried at T 32 on this cache: lr
  3e-4 (its default): L0 2,990; lr 3e-3: L0 51-67 for coefficients 0.1-10, still falling at the
  last step (coefficient 100: L0 319, its L0 first rising to 2,700); lr 5e-3, coefficient 10:
  L0 36, settled from about step 160 (the pick); lr 1e-2: L0 32-36 but FVU 0.37. The figures
  and the runs are in benchmarks/README.md;
- its L0-penalty mode (``"step"``, its default) at several ``l0_coefficient`` values, SAELens's
  defaults otherwise except the learning rate: 3e-3 (our default peak lr) instead of its 3e-4 for
  the same reason; plus one reference run with its documented defaults (lr 3e-4, l0_coefficient
  1; not with --quick).

Its SAEs are saved in SAELens's format and loaded back with ``jumpscope.load``, so both sides are
measured by the same code (``StreamingMetrics``: L0, mean-centred FVU, dead fraction on the
held-out rows). The worker also records each SAELens training batch's L0 and mean threshold
(``train_trace_every_20`` in the JSON), which shows whether its L0 had settled.

Matched L0, both ways: SAELens's FVU at our L0, linear in log L0 between its coefficient runs
(flagged EXTRAPOLATED when they do not bracket it: at this budget its L0 has a floor that larger
coefficients do not lower), and for each target between its quadratic runs; and ours re-trained
(one Trainer, several SAEs) with target_l0 = each L0 SAELens reached in either mode, our FVU then
read at exactly that L0 (linear in log L0 between our runs).

Timings: training only (``fit()`` on each side, data reading from the cache included on both
sides), and the median time per step; cache building and process start-up are reported
apart. Same torch thread count on both sides (--threads), OMP_WAIT_POLICY=PASSIVE. The machine
is shared: read ratios and medians, and the load averages printed. JSON:
benchmarks/results/peer_saelens.json (--quick: peer_saelens_quick.json), the SAELens SAEs and
the worker's job/result files in the folder of the same name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see kernel_speed.py)

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import jumpscope  # noqa: E402
from jumpscope.data.cache import CacheReader, is_complete  # noqa: E402
from jumpscope.device import MALLOC_REUSE_ENV  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_batches import Provider, add_autocast_option, evaluate, safetensors_meta  # noqa: E402
from shared_data import GUTENBERG, data_dir, verified  # noqa: E402
from peer_saelens_report import report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VENV = ROOT / ".venv-saelens"
WORKER = Path(__file__).resolve().parent / "peer_saelens_worker.py"
SITE, MODEL, D_IN = "layers.3.resid_post", "minilm", 384
SAELENS_DEFAULT_LR, SAELENS_DEFAULT_COEFFICIENT = 3e-4, 1.0
QUADRATIC_COEFFICIENT, QUADRATIC_LR = 10.0, 5e-3  # SAELens's quadratic target-L0 runs (see the docstring)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--l0", type=float, default=32.0, help="requested L0 (ours: target_l0)")
    p.add_argument("--width", type=int, default=None, help="latents (default 3072 = 8 x 384; --quick 1536)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default 200 batches = 204,800)")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 16,384)")
    p.add_argument("--coefficients", type=str, default=None, help="SAELens l0_coefficient values, comma-separated")
    p.add_argument("--targets", type=str, default=None, help="target L0s for SAELens's quadratic target-L0 mode and "
                   "for ours, comma-separated (default: --l0, 20, 55; --quick: --l0 only)")
    p.add_argument("--quadratic-coefficient", type=float, default=QUADRATIC_COEFFICIENT,
                   help="SAELens l0_coefficient in quadratic mode")
    p.add_argument("--quadratic-lr", type=float, default=QUADRATIC_LR, help="SAELens learning rate in quadratic mode")
    p.add_argument("--quadratic-field", action="append", default=[], metavar="NAME=VALUE",
                   help="a JumpReLUTrainingSAEConfig field (JSON value) for the quadratic runs only, repeatable")
    p.add_argument("--no-quadratic", action="store_true", help="skip SAELens's quadratic target-L0 runs")
    p.add_argument("--saelens-lr", type=float, default=3e-3, help="SAELens learning rate (its default is 3e-4)")
    p.add_argument("--saelens-sae-field", action="append", default=[], metavar="NAME=VALUE",
                   help="override a JumpReLUTrainingSAEConfig field (JSON value), repeatable")
    p.add_argument("--no-defaults-row", action="store_true", help="skip the SAELens documented-defaults run")
    p.add_argument("--no-reverse", action="store_true", help="skip training ours at each SAELens L0")
    p.add_argument("--ours-repeats", type=int, default=2, help="train ours this many times (before/after SAELens)")
    p.add_argument("--saelens-malloc-reuse", action="store_true",
                   help="start SAELens with jumpscope.device.MALLOC_REUSE_ENV, the glibc "
                        "setting our trainer applies on the CPU (reuse_cpu_memory)")
    add_autocast_option(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: width 1536, 16 batches, 4,096 held-out tokens")
    p.add_argument("--no-install", action="store_true", help="never create .venv-saelens (skip if absent)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default results/peer_saelens[_quick].json); the "
                   "SAELens folders and worker files go to the folder of the same name beside it")
    args = p.parse_args()
    args.out = args.out or RESULTS / ("peer_saelens_quick.json" if args.quick else "peer_saelens.json")
    args.width = args.width or (1536 if args.quick else 3072)
    args.tokens = args.tokens or (16 if args.quick else 200) * args.batch
    args.tokens -= args.tokens % args.batch  # whole batches: both trainers then take the same steps
    args.eval_tokens = args.eval_tokens or (4096 if args.quick else 16_384)
    default = "3,10,30,100"
    args.coefficients = [float(c) for c in (args.coefficients or default).split(",")]
    targets = [float(t) for t in args.targets.split(",")] if args.targets else [args.l0] + ([] if args.quick else [20.0, 55.0])
    args.targets = [] if args.no_quadratic else sorted(set(targets), key=lambda t: (t != args.l0, t))
    args.defaults_row = not (args.no_defaults_row or args.quick)
    if args.tokens < args.batch:
        p.error("--tokens must hold at least one batch")
    return args


def run(cmd: list) -> None:
    print("  $", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_saelens(no_install: bool) -> Path | None:
    """The SAELens venv's python, created as `make interop` does when missing (None: refused)."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import sae_lens, jumpscope.data.cache"],
                                          capture_output=True).returncode == 0:
        return python
    if no_install:
        return None
    print(f"{VENV} is missing or lacks sae-lens: creating it as `make interop` does (needs PyPI, a few minutes).")
    if not python.exists():
        run([shutil.which("python3") or sys.executable, "-m", "venv", VENV])
    pip = [python, "-m", "pip", "install", "-q"]
    run(pip + ["torch==2.13.0"])  # pinned, like the Makefile: never an unpinned torch
    run(pip + ["sae-lens"])
    run(pip + ["--no-deps", "-e", "."])
    return python


def prepare_data(args) -> dict:
    """Fill the shared cache (>= args.tokens rows) and write the held-out rows; returns paths and times."""
    cache = RESULTS / "peer_saelens_cache"
    eval_file = RESULTS / "peer_saelens_eval.safetensors"
    corpus = str(data_dir() / "text" / "gutenberg" / "*.txt")
    meta = {"model": MODEL, "site": SITE, "corpus": corpus, "eval_every": "20"}
    if is_complete(cache) and CacheReader(cache).total_tokens < args.tokens:
        print(f"{cache} holds fewer than {args.tokens} tokens: writing it again")
        shutil.rmtree(cache)
    have_eval = eval_file.exists() and all(v == meta.get(k) for k, v in safetensors_meta(eval_file).items() if k != "tokens") \
        and int(safetensors_meta(eval_file).get("tokens", 0)) >= args.eval_tokens
    times = {"cache_seconds": 0.0, "eval_seconds": 0.0}
    if not is_complete(cache) or not have_eval:
        from jumpscope.activations import ActivationConfig, ActivationSource

        source = ActivationSource(ActivationConfig(model=MODEL, corpus=corpus, cache=str(cache), seed=args.seed),
                                  sites=[SITE])
        start = time.perf_counter()
        source.fill_cache(args.tokens)
        times["cache_seconds"] = time.perf_counter() - start
        if not have_eval:
            start, rows, n = time.perf_counter(), [], 0
            for chunk in source.chunks(split="heldout"):
                rows.append(chunk[SITE])
                n += chunk[SITE].shape[0]
                if n >= args.eval_tokens:
                    break
            x = torch.cat(rows)[: args.eval_tokens].contiguous()
            save_file({SITE: x}, eval_file, metadata={**meta, "tokens": str(x.shape[0])})
            times["eval_seconds"] = time.perf_counter() - start
    x_eval = load_file(eval_file)[SITE][: args.eval_tokens].contiguous()
    if x_eval.shape[0] < args.eval_tokens:
        print(f"WARNING: only {x_eval.shape[0]} held-out tokens available")
    return {"cache": str(cache), "eval_file": str(eval_file), "x_eval": x_eval, **times,
            "cache_tokens": CacheReader(cache).total_tokens}


def train_ours(args, cache: str, targets: dict[str, float]) -> dict:
    """Our JumpReLU SAEs (defaults, one per target L0) trained together in one Trainer on the cache."""
    steps = args.tokens // args.batch
    saes = {name: jumpscope.build("jumprelu", d_in=D_IN, d_sae=args.width, target_l0=target, seed=args.seed,
                                  model=MODEL, site=SITE) for name, target in targets.items()}
    trainer = jumpscope.Trainer(saes, jumpscope.TrainerConfig(
        total_tokens=args.tokens, batch_size=args.batch, device="cpu", progress=False, checkpoint_every=0,
        autocast=args.autocast))
    provider = Provider(cache, SITE, args.seed, 65_536, args.batch, steps)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    trained = trainer.fit(provider)
    seconds = time.perf_counter() - start
    skip = math.ceil(trainer.cfg.init_sample_tokens / args.batch)  # the init sample is pulled before any step
    intervals = [b - a for a, b in zip(provider.stamps[skip:], provider.stamps[skip + 1:])]
    summary = trainer.final_summary()
    return {"saes": trained, "targets": targets, "train_seconds": seconds, "steps": trainer.step,
            "data_sha256": provider.digest.hexdigest(),
            "step_seconds_median": statistics.median(intervals) if intervals else seconds / max(1, trainer.step),
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
            "training_window": {n: {k: summary[n][k] for k in ("l0", "fvu", "dead_fraction")} for n in summary}}


def run_saelens(python: Path, args, data: dict, runs: list[dict], tag: str) -> tuple[list[dict], dict]:
    job_dir = args.out.parent / args.out.stem
    job_dir.mkdir(parents=True, exist_ok=True)
    overrides = {k: json.loads(v) for k, v in (f.split("=", 1) for f in args.saelens_sae_field)}
    job = {"cache": data["cache"], "site": SITE, "model": MODEL, "seed": args.seed, "buffer_rows": 65_536,
           "d_in": D_IN, "d_sae": args.width, "tokens": args.tokens, "batch_size": args.batch, "threads": args.threads,
           "runs": runs, "out": str(job_dir / "saelens"), "eval": data["eval_file"], "context_size": 128,
           "eval_tokens": int(data["x_eval"].shape[0]),
           "result": str(job_dir / f"worker_{tag}.json"), "sae_overrides": overrides}
    (job_dir / f"job_{tag}.json").write_text(json.dumps(job, indent=1))
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ["OMP_WAIT_POLICY"], TQDM_DISABLE="1", WANDB_MODE="disabled")
    if args.saelens_malloc_reuse:
        env.update(MALLOC_REUSE_ENV)
    start = time.perf_counter()
    subprocess.run([str(python), str(WORKER), str(job_dir / f"job_{tag}.json")], check=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    result = json.loads(Path(job["result"]).read_text())
    return result["runs"], {"process_wall_seconds": wall, **{k: v for k, v in result.items() if k != "runs"}}


def main() -> None:
    args = parse_args()
    started, load_start = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(args.threads)
    print(f"peer_saelens: JumpReLU ours vs SAELens, {MODEL} {SITE}, d_sae {args.width}, {args.tokens:,} training "
          f"tokens ({args.tokens // args.batch} batches of {args.batch}), {args.eval_tokens:,} held-out tokens, "
          f"requested L0 {args.l0:g}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, {os.cpu_count()} cores, load average "
          f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} at the start", flush=True)
    books = verified(*GUTENBERG)
    if isinstance(books, str):
        print(f"SKIP: {books}")
        return
    python = ensure_saelens(args.no_install)
    if python is None:
        print(f"SKIP: {VENV} is missing (or lacks sae-lens) and --no-install was given; run `make interop` "
              "or drop --no-install")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    print(f"data: cache {data['cache']} ({data['cache_tokens']:,} tokens; built in {data['cache_seconds']:.0f} s), "
          f"{data['x_eval'].shape[0]:,} held-out rows (harvested in {data['eval_seconds']:.0f} s)", flush=True)
    x_eval = data["x_eval"]

    ours_runs = [train_ours(args, data["cache"], {"ours": args.l0})]
    print(f"  ours: {ours_runs[0]['train_seconds']:.1f} s training", flush=True)
    runs = [{"name": f"coef_{c:g}", "l0_coefficient": c, "lr": args.saelens_lr, "sweep": True}
            for c in args.coefficients]
    if args.defaults_row:
        runs.append({"name": "documented_defaults", "l0_coefficient": SAELENS_DEFAULT_COEFFICIENT,
                     "lr": SAELENS_DEFAULT_LR, "sweep": False})
    quadratic_fields = {k: json.loads(v) for k, v in (f.split("=", 1) for f in args.quadratic_field)}
    runs += [{"name": f"quadratic_{t:g}", "l0_coefficient": args.quadratic_coefficient, "lr": args.quadratic_lr,
              "sweep": False, "target_l0": t, "sae_fields": {"jumprelu_sparsity_loss_mode": "quadratic",
                                                              "target_l0": t, **quadratic_fields}}
             for t in args.targets]
    saelens, process = run_saelens(python, args, data, runs, "main")
    for r in saelens:  # SAELens's folders, read by our loader, measured by our code
        r["eval"] = evaluate(jumpscope.load(r["folder"]), x_eval, args.batch)
    for _ in range(args.ours_repeats - 1):
        ours_runs.append(train_ours(args, data["cache"], {"ours": args.l0}))
        print(f"  ours (repeat): {ours_runs[-1]['train_seconds']:.1f} s training", flush=True)
    ours_eval = evaluate(ours_runs[0]["saes"]["ours"], x_eval, args.batch)
    # Ours at SAELens's quadratic targets, each alone in a Trainer as the main run is (timed alike).
    ours_targets = {}
    for t in args.targets:
        run_t = ours_runs[0] if t == args.l0 else train_ours(args, data["cache"], {"ours": t})
        ours_targets[t] = {**run_t, "eval": ours_eval if t == args.l0 else evaluate(run_t["saes"]["ours"], x_eval,
                                                                                      args.batch)}
        if t != args.l0:
            print(f"  ours at target_l0 {t:g}: {run_t['train_seconds']:.1f} s training", flush=True)
    # The other way round: ours asked for each L0 SAELens reached (one Trainer, several SAEs).
    targets = {f"ours_at_{r['name']}": round(r["eval"]["l0"], 1) for r in saelens
               if (r["sweep"] or "target_l0" in r) and 1 <= r["eval"]["l0"] < args.width / 4}
    matched_runs = {}
    if targets and not args.no_reverse:
        reverse = train_ours(args, data["cache"], targets)
        print(f"  ours at SAELens's L0s ({len(targets)} SAEs in one run): {reverse['train_seconds']:.1f} s", flush=True)
        matched_runs = {n: {"target_l0": t, "eval": evaluate(reverse["saes"][n], x_eval, args.batch),
                            "data_sha256": reverse["data_sha256"]} for n, t in targets.items()}
    report(args, data, ours_runs, ours_eval, saelens, process, matched_runs, ours_targets, load_start, started)


if __name__ == "__main__":
    main()
