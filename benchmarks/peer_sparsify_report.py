"""peer_sparsify.py's report: the table, the summary lines and the results JSON of one run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch


def parse_spec(text: str) -> tuple[str, dict]:
    """``topk:k=32,lr=2e-3`` -> ("topk", {"k": 32, "lr": 0.002}); values JSON when they parse."""
    arch, _, rest = text.partition(":")
    fields = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{item!r} is not FIELD=VALUE")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return arch.strip(), fields


def _recipe(cfg: dict, step_size: float | None = None) -> str:
    rules = [f"{name} {cfg[field]}" for field, name in (("lr_reference_width", "reference width"),
             ("lr_reference_steps", "reference steps"), ("lr_reference_d_in", "reference d_in")) if cfg.get(field)]
    this_run = f" ({step_size:.3g} in this run)" if step_size is not None and step_size != cfg.get("lr") else ""
    at = f" at {', '.join(rules)}" if rules else ""
    return f"{cfg.get('optimizer')}, lr {cfg.get('lr')}{at}{this_run}, warm-up {cfg.get('lr_warmup_steps')}"


def report(args, data, ours, evals, sparsify, speed, lm, load_start, started) -> None:
    sp, sp_fvu, sp_step = sparsify["eval"], sparsify["eval"]["fvu"], sparsify["step_seconds_median"]
    alone = speed is not None and speed is not ours
    ratios = {spec: {"fvu_ratio_ours_over_sparsify": e["fvu"] / sp_fvu, "l0": e["l0"]} for spec, e in evals.items()}
    for spec, r in ratios.items():
        arch, fields = parse_spec(spec)
        if arch == "jumprelu" and fields.get("target_l0") is not None:
            r.update(target_l0=float(fields["target_l0"]),
                     l0_within_5pct=abs(r["l0"] - fields["target_l0"]) <= 0.05 * fields["target_l0"])
    setting = ", ".join(args.sparsify_field) or "its defaults"
    rows = [(f"ours {spec}", e, f"{ours['train_seconds']:.1f}*", f"{ours['step_seconds_median']:.3f}*",
             f"{e['fvu'] / sp_fvu:.3f}") for spec, e in evals.items()]
    rows.append((f"sparsify 1.3.3 TopK k={args.k} ({setting}, lr {sparsify['lr']:.2e})", sp,
                 f"{sparsify['train_seconds']:.1f}", f"{sp_step:.3f}", "1"))
    refit = sparsify.get("refit", {})
    if "eval" in refit:
        rows.append(("sparsify, then our decoder refit", refit["eval"], f"+{refit['seconds']:.1f}", "-",
                     f"{refit['eval']['fvu'] / sp_fvu:.3f}"))
    lines = ["| SAE | L0 (held-out) | FVU | dead | dense (>10%) | train s | s/step (median) | FVU ours/sparsify |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {e['l0']:.1f} | {e['fvu']:.4f} | {e['dead_fraction']:.3f} | {e['dense_fraction']:.3f} | {s} | "
              f"{st} | {r} |" for n, e, s, st, r in rows]
    if alone:
        lines.append(f"| ours {speed['specs'][0]} alone (speed run) | - | - | - | - | {speed['train_seconds']:.1f} | "
                     f"{speed['step_seconds_median']:.3f} | - |")
    table = "\n".join(lines)
    digests = {r["data_sha256"] for r in (ours, sparsify, speed) if r is not None}
    own, live = sparsify["sparsify_own_eval"], sparsify["sparsify_own_eval_live_weights"]
    reader_diff = max(abs(own["fvu"] - sp_fvu), abs(own["l0"] - sp["l0"]))
    first = speed["specs"][0] if speed else None
    speed_equal = all(torch.equal(a, b) for a, b in zip(ours["saes"][first].state_dict().values(),
                                                        speed["saes"][first].state_dict().values())) if alone else None
    load_end, total, info = os.getloadavg(), time.perf_counter() - started, data["corpus_info"]
    worker = sparsify["worker"]
    worker_wall = "reused from an earlier run" if worker.get("reused") else f"{worker['process_wall_seconds']:.0f} s wall"
    summary = [f"{spec}: FVU {evals[spec]['fvu']:.4f} vs sparsify {sp_fvu:.4f} (ratio ours/sparsify "
               f"{r['fvu_ratio_ours_over_sparsify']:.3f}; ours: {_recipe(ours['configs'][spec], ours.get('step_sizes', {}).get(spec))}), held-out L0 "
               f"{r['l0']:.2f}"
               + (f" vs target {r['target_l0']:g}: {'within' if r['l0_within_5pct'] else 'NOT within'} 5% "
                  f"({100 * (r['l0'] / r['target_l0'] - 1):+.1f}%)" if "target_l0" in r else "") + "."
               for spec, r in ratios.items()]
    if "eval" in refit:
        summary.append(f"sparsify with our decoder refit too (the same {refit.get('refit_rows', 0):,.0f} training rows): "
                       f"FVU {refit['eval']['fvu']:.4f}; ours over it: " + ", ".join(
                           f"{spec} {evals[spec]['fvu'] / refit['eval']['fvu']:.3f}" for spec in evals) + ".")
    if speed is not None:
        summary.append(f"Speed, TopK k={args.k}: sparsify {sp_step:.3f} s/step vs ours ({first}{' alone' * alone}) "
                       f"{speed['step_seconds_median']:.3f} s/step: sparsify/ours "
                       f"{sp_step / speed['step_seconds_median']:.2f}x;"
                       f" fit() {sparsify['train_seconds']:.1f} s (+{sparsify['save_seconds']:.1f} s for its "
                       f"{sparsify['saves']} checkpoint write(s)) vs {speed['train_seconds']:.1f} s: "
                       f"{sparsify['train_seconds'] / speed['train_seconds']:.2f}x.")
    summary += [
        f"* ours: the {len(args.ours)} SAEs trained together in one Trainer ({ours['steps']} steps, "
        f"{ours['passes']} pass(es) over the cache) share this time.",
        f"sparsify ran {sparsify['optimizer']}({sparsify['base_optimizer']}, momentum "
        f"{sparsify['schedulefree_momentum']}),"
        f" lr {sparsify['lr']:.3e}, {sparsify['lr_schedulers']} LR schedulers, {sparsify['steps']} steps, decoder "
        f"{sparsify['decoder']}, CUDA bf16 autocast {sparsify['cuda_bf16_autocast']}, matmul precision "
        f"'{sparsify['float32_matmul_precision_after_fit']}' (CPU F.linear unchanged by it: "
        f"{sparsify['cpu_linear_unchanged_by_precision']}); its saved (averaged x) decoder rows are off unit norm by "
        f"up to {sparsify['saved_decoder_row_norm_max_dev']:.1e}; its training weights y (not saved): "
        f"FVU {live['fvu']:.4f}.",
        f"Same training rows on every side (sha256 of the batches handed out): {'yes' if len(digests) == 1 else 'NO'}; "
        f"jumpscope.load of sparsify's folder vs its own forward, held-out L0/FVU max |diff| {reader_diff:.1e}; "
        f"speed-run TopK bit-identical to the joint run's: {speed_equal}.",
        f"Cache {data['cache_tokens']:,} tokens ({data['cache_seconds']:.0f} s to build); the corpus has "
        f"{info.get('train_window_tokens', 'n/a')} training + {info.get('heldout_window_tokens', 'n/a')} held-out "
        f"window tokens; sparsify worker {worker_wall}; whole benchmark "
        f"{total:.0f} s.",
        f"Load average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; during training: "
        + ", ".join(f"{n} {r['load_average_start']:.1f}-{r['load_average_end']:.1f}" for n, r in
                    (("ours", ours), ("sparsify", sparsify), ("speed run", speed if alone else None)) if r) + "."]
    if lm is not None:
        summary.append("Delta LM loss spliced in: " + (lm["error"] if "error" in lm else "; ".join(
            f"{n} {r['delta_lm_loss']:.4f}" for n, r in lm["rows"].items()) + f" ({lm['seconds']:.0f} s)"))
    print("\n" + table + "\n\n" + "\n".join(f"- {s}" for s in summary))
    strip = lambda r: {k: v for k, v in r.items() if k != "saes"} if r else None  # noqa: E731
    args.out.write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_start": load_start, "load_average_end": load_end, "total_seconds": total,
        "data": {k: v for k, v in data.items() if k != "x_eval"}, "ours": {"eval": evals, "run": strip(ours),
        "ratios": ratios}, "speed_run": strip(speed) if alone else None, "sparsify": sparsify, "lm_loss": lm,
        "timing": {"ours_step_seconds_joint": ours["step_seconds_median"], "sparsify_step_seconds": sp_step,
                   "ours_topk_step_seconds": speed["step_seconds_median"] if speed else None,
                   "step_ratio_sparsify_over_ours_topk": sp_step / speed["step_seconds_median"] if speed else None},
        "same_training_rows": len(digests) == 1, "reader_max_diff": reader_diff, "speed_run_bit_identical": speed_equal,
        "table": table, "summary": summary}, indent=1))
    print(f"\nJSON: {args.out}")
