"""The picture of a plan: kept attention heads and MLP width per layer, drawn over the original widths.

matplotlib is imported only when a picture is drawn, through its Agg canvas (no display needed and
the caller's pyplot backend is left alone).

    >>> plan = read_plan(Path("artifacts/run1/plans/global-taylor-0.20.json"))   # doctest: +SKIP
    >>> plot_plan(plan, Path("artifacts/run1/plans/global-taylor-0.20.png"))      # doctest: +SKIP
"""

from __future__ import annotations

import io
from pathlib import Path

from llamaprune.core.artifacts import atomic_write_bytes
from llamaprune.core.plan_file import Plan


def plot_plan(plan: Plan, path: Path) -> None:
    """Two bar charts sharing the layer axis; removed layers are shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = [lp.layer for lp in plan.layers]
    fig = Figure(figsize=(max(6.0, 0.22 * len(layers) + 2), 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(2, 1, sharex=True)
    widths = (
        (
            "attention heads",
            [lp.num_attention_heads for lp in plan.layers],
            [lp.heads_kept for lp in plan.layers],
        ),
        (
            "MLP width",
            [lp.intermediate_size for lp in plan.layers],
            [len(lp.mlp_channels) for lp in plan.layers],
        ),
    )
    for ax, (label, original, kept) in zip(panels, widths, strict=True):
        ax.bar(layers, original, color="0.85", label="original")
        ax.bar(layers, kept, color="tab:blue", label="kept")
        for layer in plan.removed_layers:
            ax.axvspan(layer - 0.5, layer + 0.5, color="tab:red", alpha=0.2, lw=0)
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    panels[0].legend(loc="lower right", fontsize="small")
    panels[1].set_xlabel("layer" + (" (shaded: removed)" if plan.removed_layers else ""))
    fig.suptitle(
        f"{plan.name}: {plan.achieved_ratio:.1%} of {plan.params_before:,} parameters removed "
        f"(target {plan.target_ratio:.1%})",
        fontsize="medium",
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(Path(path), buffer.getvalue())
