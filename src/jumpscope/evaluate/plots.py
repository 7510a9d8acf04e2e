"""PNG plots of a sweep: sparsity-fidelity frontiers and feature-density histograms.

Each point is a dict with ``arch`` and ``held_out`` (the measures of
:func:`jumpscope.evaluate.heldout.evaluate_saes`). Matplotlib runs headless (the Agg backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .downstream import MAIN_MEASURE

# Fixed colours per architecture, so every plot and report reads the same way.
COLOURS = {"jumprelu": "tab:red", "topk": "tab:blue", "batchtopk": "tab:cyan", "gated": "tab:green",
           "relu": "tab:gray"}
LABELS = {"delta_lm_loss": "delta LM loss (nats/token)", "embedding_1_minus_cosine": "1 - cos(sentence embedding)",
          "fvu": "fraction of variance unexplained", "ce_loss_recovered": "CE loss recovered (vs zero ablation)",
          "embedding_recovered_zero": "embedding distance recovered (vs zero ablation)"}


def frontier_metrics(kind: str) -> list[tuple[str, str]]:
    """``(metric, file stem)`` of the frontier plots for a model kind."""
    recovered = "ce_loss_recovered" if kind == "causal_lm" else "embedding_recovered_zero"
    return [(MAIN_MEASURE[kind], "l0_vs_" + ("delta_loss" if kind == "causal_lm" else "embedding_distance")),
            ("fvu", "l0_vs_fvu"), (recovered, "l0_vs_ce_recovered" if kind == "causal_lm" else "l0_vs_recovered")]


def by_arch(points: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Points grouped per architecture, each group sorted by measured L0."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        groups.setdefault(point["arch"], []).append(point)
    return {arch: sorted(group, key=lambda p: p["held_out"]["l0"]) for arch, group in groups.items()}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def frontier_plot(points: Sequence[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for arch, group in by_arch(points).items():
        rows = [(p["held_out"]["l0"], p["held_out"].get(metric)) for p in group]
        rows = [(l0, value) for l0, value in rows if value is not None and l0 > 0]
        if rows:
            ax.plot(*zip(*rows), marker="o", label=arch, color=COLOURS.get(arch))
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active latents per token, held out)")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def density_plot(points: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per architecture: the log10 firing-frequency histogram of each of its points."""
    plt = _pyplot()
    groups = by_arch(points)
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1.9 * len(groups) + 0.6), dpi=120, sharex=True,
                             squeeze=False)
    for ax, (arch, group) in zip(axes[:, 0], groups.items()):
        for index, point in enumerate(group):
            histogram = point["held_out"]["density_histogram"]
            edges, counts = histogram["log10_frequency_edges"], histogram["counts"]
            shade = 0.35 + 0.65 * (index + 1) / len(group)
            ax.stairs(counts, edges, color=COLOURS.get(arch), alpha=shade,
                      label=f"L0 {point['held_out']['l0']:.0f} (dead {histogram['dead']})")
        ax.axvline(-1.0, color="black", linestyle=":", linewidth=0.8)  # the 10% line of SPEC 3
        ax.set_ylabel(arch)
        ax.legend(fontsize=6, loc="upper left")
    axes[-1, 0].set_xlabel("log10 firing frequency on held-out tokens (dotted: 10%)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(points: Sequence[dict[str, Any]], kind: str, folder: Path, title: str = "") -> dict[str, str]:
    """Write every sweep plot into ``folder``; returns ``{metric or 'density': file name}``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for metric, stem in frontier_metrics(kind):
        frontier_plot(points, metric, folder / f"{stem}.png", f"{title} L0 vs {LABELS.get(metric, metric)}".strip())
        written[metric] = f"{stem}.png"
    density_plot(points, folder / "feature_density.png", f"{title} feature density per architecture".strip())
    written["density"] = "feature_density.png"
    return written
