"""The training curve figure: train and val top-1 error against epochs (the paper's Fig. 5 style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_curves(history: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Save a PNG of train (dashed) and val (solid) top-1 error in % per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    try:
        ax.plot(epochs, [r["train_top1_err"] for r in history], "--", color="C0", label="train")
        validated = [r for r in history if "val_top1_err" in r]
        ax.plot(
            [r["epoch"] for r in validated],
            [r["val_top1_err"] for r in validated],
            "-" if len(validated) > 1 else "o",
            color="C0",
            label="val",
        )
        ax.set_xlabel("epochs")
        ax.set_ylabel("top-1 error (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
