"""The learning curve of a run: loss, KL, beta and validation NDCG@100 per epoch (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recvae.fileio import atomic_write


def plot_learning_curve(history: list[dict], path: Path) -> None:
    """Loss, KL, beta and validation NDCG@100 per epoch, one panel each, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    panels = [k for k in ("loss", "nll", "kl", "beta", "val_ndcg@100") if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker=".")
        ax.set_title(key)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
