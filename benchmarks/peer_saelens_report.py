"""peer_saelens.py's report: the table, the summary lines and the results JSON of one run."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import torch


def interpolate(points: list[tuple[float, float]], l0: float) -> tuple[float | None, str]:
    """FVU at ``l0``, linear in log L0 between the (L0, FVU) points; outside them, extrapolated."""
    pts = sorted((math.log(a), b) for a, b in points if a > 0)
    if len(pts) < 2 or l0 <= 0:
        return None, "fewer than two runs"
    x = math.log(l0)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0), "interpolated"
    (x0, y0), (x1, y1) = pts[:2] if x < pts[0][0] else pts[-2:]
    return (y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0), "EXTRAPOLATED (not bracketed)"


def report(args, data, ours_runs, ours_eval, saelens, process, matched_runs, ours_targets, load_start,
           started) -> None:
    ours = ours_runs[0]
    sweep = sorted((r for r in saelens if r["sweep"]), key=lambda r: r["l0_coefficient"])
    quadratic = sorted((r for r in saelens if "target_l0" in r), key=lambda r: r["target_l0"])
    matched, how = interpolate([(r["eval"]["l0"], r["eval"]["fvu"]) for r in sweep], ours_eval["l0"])
    ours_points = [(ours_eval["l0"], ours_eval["fvu"])] + [(m["eval"]["l0"], m["eval"]["fvu"])
                                                            for m in matched_runs.values()] \
        + [(o["eval"]["l0"], o["eval"]["fvu"]) for t, o in ours_targets.items() if t != args.l0]
    for r in sweep + quadratic:  # our FVU at exactly SAELens's L0, from our own points
        r["ours_fvu_at_this_l0"] = interpolate(ours_points, r["eval"]["l0"])
    quadratic_points = [(r["eval"]["l0"], r["eval"]["fvu"]) for r in quadratic]
    for r in quadratic:  # and SAELens's quadratic runs at our L0 for the same target
        o = ours_targets[r["target_l0"]]["eval"]
        r["ours_at_same_target"] = {k: o[k] for k in ("l0", "fvu", "dead_fraction")}
        r["saelens_fvu_at_our_l0"] = interpolate(quadratic_points, o["l0"]) if len(quadratic) > 1 else \
            (None, "one quadratic run")
    ours_seconds = statistics.median(r["train_seconds"] for r in ours_runs)
    ours_step = statistics.median(r["step_seconds_median"] for r in ours_runs)
    sl_seconds = statistics.median(r["train_seconds"] for r in saelens)
    sl_step = statistics.median(r["step_seconds_median"] for r in saelens)
    extra_ours = [o for t, o in ours_targets.items() if t != args.l0]
    digests = {r["data_sha256"] for r in saelens + ours_runs + extra_ours} \
        | {m["data_sha256"] for m in matched_runs.values()}
    first = list(ours["saes"]["ours"].state_dict().values())
    repeat_equal = [all(torch.equal(a, b) for a, b in zip(first, r["saes"]["ours"].state_dict().values()))
                    for r in ours_runs[1:]]
    reader_error = max(max(abs(r["eval"]["fvu"] - r["saelens_own_eval"]["fvu"]),
                           abs(r["eval"]["l0"] - r["saelens_own_eval"]["l0"])) for r in saelens)
    load_end, total = os.getloadavg(), time.perf_counter() - started
    within = abs(ours_eval["l0"] - args.l0) <= 0.1 * args.l0
    rows = [("ours (jumpscope)", f"target_l0 {args.l0:g} (defaults)", ours_eval,
             f"{ours_seconds:.1f}", f"{ours_step:.3f}")]
    rows += [("SAELens" if r["sweep"] else "SAELens, documented defaults",
              f"l0_coefficient {r['l0_coefficient']:g}, lr {r['lr']:g}", r["eval"], f"{r['train_seconds']:.1f}",
              f"{r['step_seconds_median']:.3f}") for r in sweep + [r for r in saelens if r["name"] ==
                                                                   "documented_defaults"]]
    for r in quadratic:
        o = ours_targets[r["target_l0"]]
        if r["target_l0"] != args.l0:
            rows.append(("ours (jumpscope)", f"target_l0 {r['target_l0']:g} (defaults)", o["eval"],
                         f"{o['train_seconds']:.1f}", f"{o['step_seconds_median']:.3f}"))
        fields = "".join(f", {k} {v}" for k, v in r["sae_fields"].items()
                         if k not in ("jumprelu_sparsity_loss_mode", "target_l0"))
        rows.append(("SAELens, quadratic target-L0 mode", f"target_l0 {r['target_l0']:g}, l0_coefficient "
                     f"{r['l0_coefficient']:g}, lr {r['lr']:g}{fields}", r["eval"], f"{r['train_seconds']:.1f}",
                     f"{r['step_seconds_median']:.3f}"))
    rows += [("ours at that SAELens L0", f"target_l0 {m['target_l0']:g} (SAELens {n[8:]})", m["eval"], "-", "-")
             for n, m in matched_runs.items()]
    lines = ["| SAE | setting | L0 (held-out) | FVU | dead fraction | train s | s/step (median) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {setting} | {e['l0']:.1f} | {e['fvu']:.4f} | {e['dead_fraction']:.3f} | {sec} | {step} |"
              for name, setting, e, sec, step in rows]
    if matched is not None:
        lines.append(f"| SAELens at our L0 ({how}) | linear in log L0 | {ours_eval['l0']:.1f} | {matched:.4f} "
                     "| - | - | - |")
    table = "\n".join(lines)
    pairs = [f"L0 {r['eval']['l0']:.1f}: ours {r['ours_fvu_at_this_l0'][0]:.4f} vs SAELens {r['eval']['fvu']:.4f} "
             f"(ratio {r['ours_fvu_at_this_l0'][0] / r['eval']['fvu']:.3f}, ours {r['ours_fvu_at_this_l0'][1]})"
             for r in sweep if r["ours_fvu_at_this_l0"][0] is not None]
    quad_lines = []
    for r in quadratic:
        t, e, o = r["target_l0"], r["eval"], r["ours_at_same_target"]
        at_theirs, at_ours = r["ours_fvu_at_this_l0"], r["saelens_fvu_at_our_l0"]
        line = (f"Target L0 {t:g}: ours L0 {o['l0']:.1f} ({100 * (o['l0'] / t - 1):+.1f}%), FVU {o['fvu']:.4f}, dead "
                f"{o['dead_fraction']:.3f}; SAELens quadratic L0 {e['l0']:.1f} ({100 * (e['l0'] / t - 1):+.1f}%; "
                f"{r['train_l0_last_10pct']:.1f} over its last 10% of training), FVU {e['fvu']:.4f}, dead "
                f"{e['dead_fraction']:.3f}.")
        if at_theirs[0] is not None:
            line += (f" At SAELens's L0 {e['l0']:.1f}: ours {at_theirs[0]:.4f} ({at_theirs[1]}), ratio ours/SAELens "
                     f"{at_theirs[0] / e['fvu']:.3f}.")
        if at_ours[1] == "interpolated":  # extrapolating one mode's three points is not a measurement
            line += (f" At our L0 {o['l0']:.1f}: SAELens quadratic {at_ours[0]:.4f} (interpolated between its "
                     f"quadratic runs), ratio ours/SAELens {o['fvu'] / at_ours[0]:.3f}.")
        else:
            why = "not bracketed by its quadratic runs" if at_ours[1].startswith("EXTRAPOLATED") else at_ours[1]
            line += f" At our L0 {o['l0']:.1f}: no SAELens quadratic figure ({why})."
        quad_lines.append(line)
    summary = [
        f"Our L0 {ours_eval['l0']:.2f} vs requested {args.l0:g}: {'within' if within else 'NOT within'} 10% "
        f"({100 * (ours_eval['l0'] / args.l0 - 1):+.1f}%); over the last 10% of training "
        f"{ours['training_window']['ours']['l0']:.2f}.",
        (f"FVU at our L0 ({how}): ours {ours_eval['fvu']:.4f}, SAELens {matched:.4f}, ratio ours/SAELens "
         f"{ours_eval['fvu'] / matched:.3f}." if matched is not None else f"FVU at our L0: unavailable ({how})."),
        "FVU at SAELens's L0s (ours re-trained at each): " + ("; ".join(pairs) or "-") + ".",
        *quad_lines,
        f"Training time per SAE (median): ours {ours_seconds:.1f} s ({len(ours_runs)} runs at target_l0 "
        f"{args.l0:g}: " + ", ".join(f"{r['train_seconds']:.1f}" for r in ours_runs) + f"), SAELens {sl_seconds:.1f} s "
        f"({len(saelens)} runs: " + ", ".join(f"{r['train_seconds']:.1f}" for r in saelens)
        + f"): SAELens/ours {sl_seconds / ours_seconds:.2f}x; per step (median) {sl_step:.3f} vs {ours_step:.3f} s: "
        f"{sl_step / ours_step:.2f}x.",
        f"SAELens worker process: {process['process_wall_seconds']:.0f} s wall for {len(saelens)} runs "
        f"({sum(r['train_seconds'] for r in saelens):.0f} s of it training; the rest start-up, saving, its own check).",
        f"Cache: {data['cache_seconds']:.0f} s to build ({data['cache_tokens']:,} tokens), held-out rows "
        f"{data['eval_seconds']:.0f} s; whole benchmark {total:.0f} s.",
        f"Same training rows on every side (sha256 of the batches handed out): {'yes' if len(digests) == 1 else 'NO'}; "
        f"our repeat runs bit-identical: {repeat_equal or '-'}; jumpscope.load of the SAELens folders vs SAELens's "
        f"own forward on the held-out rows: max |diff| of L0/FVU {reader_error:.1e}.",
        f"Load average (1 min) {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; per training run: "
        + ", ".join(f"{r.get('name', 'ours')} {r['load_average_start']:.1f}-{r['load_average_end']:.1f}"
                    for r in ours_runs + extra_ours + saelens) + ".",
    ]
    print("\n" + table + "\n\n" + "\n".join(f"- {s}" for s in summary))
    strip = lambda r: {k: v for k, v in r.items() if k != "saes"}  # noqa: E731
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_start": load_start, "load_average_end": load_end, "total_seconds": total,
        "data": {k: v for k, v in data.items() if k != "x_eval"},
        "ours": {"eval": ours_eval, "runs": [strip(r) for r in ours_runs], "l0_within_10pct": within,
                 "at_saelens_l0": matched_runs,
                 "at_targets": {f"{t:g}": strip(o) for t, o in ours_targets.items()}},
        "saelens": {"runs": saelens, "process": process},
        "matched": {"l0": ours_eval["l0"], "saelens_fvu": matched, "how": how,
                    "fvu_ratio_ours_over_saelens": ours_eval["fvu"] / matched if matched else None},
        "timing": {"ours_train_seconds": ours_seconds, "saelens_train_seconds": sl_seconds,
                   "ratio_saelens_over_ours": sl_seconds / ours_seconds, "ours_step_seconds": ours_step,
                   "saelens_step_seconds": sl_step, "step_ratio_saelens_over_ours": sl_step / ours_step},
        "same_training_rows": len(digests) == 1, "ours_repeats_bit_identical": repeat_equal,
        "reader_max_diff": reader_error, "table": table, "summary": summary}, indent=1))
    print(f"\nJSON: {args.out}")
