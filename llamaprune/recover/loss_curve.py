"""The loss curve of a finetuning run: ``loss_curve.json`` (train loss per optimizer step, validation loss at
each check, the best check; distilled runs also the next-token loss ``lm_loss`` of each point, their ``loss`` being
the distillation objective) and its picture ``loss_curve.png``.

    >>> curve = {"train": [{"step": 1, "loss": 3.2}], "validation": [{"step": 1, "loss": 3.1}],
    ...          "best": {"step": 1, "loss": 3.1}}
    >>> plot_curve(curve, Path("loss_curve.png"))                                    # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

CURVE_JSON = "loss_curve.json"
CURVE_PNG = "loss_curve.png"


def plot_curve(curve: dict, path: Path) -> None:
    """Training loss per optimizer step and validation loss at each check, and a distilled run's validation
    next-token loss (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([p["step"] for p in curve["train"]], [p["loss"] for p in curve["train"]], label="train", lw=1)
    ax.plot(
        [p["step"] for p in curve["validation"]],
        [p["loss"] for p in curve["validation"]],
        "o-",
        label="validation",
    )
    distilled = bool(curve["validation"]) and "lm_loss" in curve["validation"][0]
    if distilled:
        ax.plot([p["step"] for p in curve["validation"]], [p["lm_loss"] for p in curve["validation"]], "s--",
                label="validation next-token loss")
    best = curve["best"]
    ax.axvline(
        best["step"], color="0.6", ls="--", lw=1, label=f"best (step {best['step']}, {best['loss']:.3f})"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distillation loss, next-token loss" if distilled else "next-token loss")
    ax.legend()
    fig.savefig(path, format="png", dpi=100)
