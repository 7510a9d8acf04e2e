"""Plots of Jacobian SAE results: the lambda sweep of one model, and the trade-off curves of a
trained model against its random controls (issue 16: compare along curves, not at one lambda).

Both read the rows ``jumpscope jsae`` writes (``summary.json``'s ``pairs``): per pair its
``jacobian`` measures (``at_input`` / ``at_reconstruction``, each with ``above_0.01`` and
``mean_abs``) and its ``held_out`` results per side (``fvu``, and ``delta_lm_loss`` or the encoder's
``embedding_1_minus_cosine``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["sweep_plot", "tradeoff_plot", "DOWNSTREAM"]

# held-out key and axis label of the model's own measure, by model kind
DOWNSTREAM = {"causal_lm": ("delta_lm_loss", "delta LM loss (SAE spliced in)"),
              "encoder": ("embedding_1_minus_cosine", "1 - cos(sentence embedding)")}
_CONTROL_LABELS = {"none": "trained model", "init": "random: init (reference's)", "redraw": "random: redraw"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def sweep_plot(rows: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """Reconstruction (FVU of each SAE) against the Jacobian's density at the true input, one point per lambda."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    dense = [row["jacobian"]["at_input"]["above_0.01"] for row in rows.values()]
    for side, marker in (("input", "o"), ("output", "s")):
        ax.plot(dense, [row["held_out"][side]["fvu"] for row in rows.values()], marker=marker, label=f"{side} SAE")
    for name, row, x in zip(rows, rows.values(), dense):
        ax.annotate(name.replace("lambda_", "λ="), (x, row["held_out"]["output"]["fvu"]), fontsize=7)
    ax.set_xlabel("fraction of |J| > 0.01 at the true MLP input (held out; lower is sparser)")
    ax.set_ylabel("FVU (held out)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tradeoff_plot(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], path: Path, title: str,
                  kind: str = "causal_lm") -> None:
    """One figure, 2 x 4 panels: |J| > 0.01 (top) and mean |J| (bottom), both at the true input,
    against FVU of the input SAE, FVU of the output SAE, and the model's own measure with each
    SAE spliced in. One curve per model (``curves``: control -> pair rows, points ordered by
    lambda), so trained and random are compared at equal reconstruction, not at equal lambda.
    Each curve's legend entry carries its out/in scale ratio (raw |J| scales with it)."""
    plt = _pyplot()
    key, label = DOWNSTREAM.get(kind, DOWNSTREAM["causal_lm"])
    columns = [("input", "fvu", "FVU, input SAE"), ("output", "fvu", "FVU, output SAE"),
               ("input", key, f"{label}: input SAE"), ("output", key, f"{label}: output SAE")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5), dpi=110)
    for control, rows in curves.items():
        ordered = sorted(rows.values(), key=lambda row: row["jacobian_coefficient"])
        ratio = ordered[0]["jacobian"]["out_in_scale_ratio"] if ordered else float("nan")
        name = f"{_CONTROL_LABELS.get(control, control)} (out/in {ratio:.2f})"
        for row_index, (measure, ylabel) in enumerate((("above_0.01", "fraction of |J| > 0.01"),
                                                        ("mean_abs", "mean |J|"))):
            for col, (side, metric, xlabel) in enumerate(columns):
                points = [(row["held_out"][side].get(metric), row["jacobian"]["at_input"][measure])
                          for row in ordered if row["held_out"][side].get(metric) is not None]
                if not points:
                    continue
                ax = axes[row_index][col]
                ax.plot(*zip(*points), marker="o", label=name)
                ax.set_xlabel(xlabel, fontsize=8)
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}\n(J at the true MLP input; one point per lambda; lower-left is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
