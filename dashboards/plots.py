"""PNG plots logged to MLflow and embedded in reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def forgot_histogram(per_run: dict[str, np.ndarray], path: Path, checkpoints: int) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.arange(checkpoints + 2) - 0.5
    for name, values in per_run.items():
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=name)
    ax.set(xlabel="ForgotNum (checkpoints at which a refusal was lost)", ylabel="alignment examples",
           title="How often each alignment example is forgotten")
    ax.legend(fontsize=8)
    return _save(fig, path)


def overlap_heatmap(jaccard: dict[str, dict[str, float | None]], path: Path) -> Path:
    names = list(jaccard)
    m = np.array([[np.nan if jaccard[a][b] is None else jaccard[a][b] for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.8))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, "—" if np.isnan(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax, label="Jaccard")
    ax.set_title("Overlap of forgotten examples across tasks")
    return _save(fig, path)


def category_bars(by_category: dict[str, dict], path: Path) -> Path:
    cats = sorted(by_category, key=lambda c: by_category[c]["fraction_vulnerable"])
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(cats) + 1.2))
    ax.barh(range(len(cats)), [by_category[c]["fraction_vulnerable"] for c in cats])
    ax.set_yticks(range(len(cats)), [c.replace("_", " ")[:40] for c in cats], fontsize=7)
    ax.set(xlabel="fraction vulnerable", xlim=(0, 1), title="Forgetting by harm category")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
