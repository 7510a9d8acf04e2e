"""A Markdown report of a sweep: every point, the frontier at matched L0, and the plots.

Architectures are compared at equal L0 by interpolating each one's curve linearly in log L0
between its measured points (never extrapolating: outside its range the cell reads n/a, unless
an end point lies within 5% of the L0 asked for, when its value is used as is).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..sae.metrics import dead_label, dead_sample_warning
from ..safeio import write_text
from .plots import LABELS, by_arch, frontier_metrics

NEAR = 0.05


def interpolate_at(group: Sequence[dict[str, Any]], metric: str, l0: float) -> float | None:
    """``metric`` of one architecture's points (sorted by L0) at ``l0``, or None outside their range."""
    rows = [(p["held_out"]["l0"], p["held_out"].get(metric)) for p in group]
    rows = sorted((x, y) for x, y in rows if y is not None and x > 0)
    for (x0, y0), (x1, y1) in zip(rows, rows[1:]):
        if x0 <= l0 <= x1:
            if x1 == x0:
                return y0
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    near = [y for x, y in rows if math.isclose(x, l0, rel_tol=NEAR)]  # an end point just short of l0
    return near[0] if near else None


def frontier(points: Sequence[dict[str, Any]], metric: str, levels: Sequence[float]) -> dict[float, dict[str, Any]]:
    """``{l0: {arch: interpolated metric or None}}``."""
    groups = by_arch(points)
    return {level: {arch: interpolate_at(group, metric, level) for arch, group in groups.items()} for level in levels}


def lower_is_better(metric: str) -> bool:
    return "recovered" not in metric


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def frontier_table(points: Sequence[dict[str, Any]], metric: str, levels: Sequence[float],
                   mark_best: bool = True) -> str:
    """Rows of L0 levels, a column per architecture; the best cell of a row in bold."""
    table = frontier(points, metric, levels)
    archs = list(by_arch(points))
    lines = ["| L0 | " + " | ".join(archs) + " |", "|" + " --- |" * (len(archs) + 1)]
    pick = min if lower_is_better(metric) else max
    for level, row in table.items():
        known = [v for v in row.values() if v is not None]
        best = pick(known) if mark_best and len(known) > 1 else None
        cells = [f"**{_fmt(row[a])}**" if best is not None and row[a] == best else _fmt(row[a]) for a in archs]
        lines.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def points_table(points: Sequence[dict[str, Any]], kind: str) -> str:
    measure = frontier_metrics(kind)[0][0]
    extra = [("KL", "kl_div"), ("CE rec. (zero)", "ce_loss_recovered_zero"), ("CE rec. (mean)", "ce_loss_recovered_mean")]
    if kind != "causal_lm":
        extra = [("rec. (zero)", "embedding_recovered_zero"), ("rec. (mean)", "embedding_recovered_mean")]
    columns = [("L0", "l0"), ("FVU", "fvu"), (LABELS[measure].split(" (")[0], measure), *extra,
               (_dead_title(points), "dead_fraction"), (">10%", "dense_fraction")]
    lines = ["| SAE | setting | " + " | ".join(t for t, _ in columns) + " |", "|" + " --- |" * (len(columns) + 2)]
    for group in by_arch(points).values():
        for p in group:
            row = p["held_out"]
            cells = [_fmt(row.get(key), 1 if key == "l0" else 4) for _, key in columns]
            lines.append(f"| {p['name']} | {p['knob']} = {p['value']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _dead_title(points: Sequence[dict[str, Any]]) -> str:
    """``dead on N tokens`` (every point is evaluated on the same held-out text), or ``dead``."""
    sizes = {p["held_out"].get("n_tokens") for p in points}
    return dead_label(sizes.pop()) if len(sizes) == 1 and None not in sizes else "dead"


def dense_table(points: Sequence[dict[str, Any]]) -> str:
    """Mean fraction of >10%-frequency and dead latents per architecture (SPEC 3)."""
    lines = [f"| architecture | mean >10% fraction | max >10% fraction | mean {_dead_title(points)} |",
             "| --- | --- | --- | --- |"]
    for arch, group in by_arch(points).items():
        dense = [p["held_out"]["dense_fraction"] for p in group]
        dead = [p["held_out"]["dead_fraction"] for p in group]
        lines.append(f"| {arch} | {sum(dense) / len(dense):.4f} | {max(dense):.4f} | {sum(dead) / len(dead):.4f} |")
    return "\n".join(lines) + "\n"


def render_report(payload: Mapping[str, Any], figures: Mapping[str, str], levels: Sequence[float] | None = None) -> str:
    points, kind, source, sweep = payload["points"], payload["kind"], payload["source"], payload["sweep"]
    levels = levels or sweep.get("l0") or sorted({round(p["held_out"]["l0"]) for p in points})
    first = points[0]["held_out"]
    small = dead_sample_warning(first["n_tokens"])
    parts = [f"# Sparsity sweep: {source['model']}, {points[0]['site']}", "",
             f"- corpus: {source['corpus']} (context {source['context_size']}); {sweep['tokens']:,} training "
             f"tokens per SAE; d_sae {first['d_sae']} for every point",
             f"- held-out evaluation: {first['n_tokens']:,} tokens "
             f"({first.get('n_predictions', first.get('n_sequences'))} "
             f"{'predictions' if kind == 'causal_lm' else 'sequences'}); dead = never fired on them"
             + (f" (warning: {small})" if small else ""),
             f"- wall time: {payload['seconds']['training']:.0f} s training (all points together), "
             f"{payload['seconds']['total']:.0f} s in all", "", "## Every point", "", points_table(points, kind)]
    for metric, _ in frontier_metrics(kind):
        direction = "lower" if lower_is_better(metric) else "higher"
        parts += [f"## {LABELS.get(metric, metric)} at matched L0 ({direction} is better; interpolated in log L0)",
                  "", frontier_table(points, metric, levels), f"![L0 vs {metric}]({figures[metric]})", ""]
    parts += ["## Dead and high-frequency latents", "", dense_table(points),
              f"![feature density]({figures['density']})", ""]
    return "\n".join(parts)


def write_report(payload: Mapping[str, Any], figures: Mapping[str, str], path: Path) -> str:
    text = render_report(payload, figures)
    write_text(path, text)
    return text
