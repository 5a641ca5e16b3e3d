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


def hs_against_ratio(table: list[dict], path: Path) -> Path:
    """Average harmful score after the attack against the harmful ratio p, one line per model, with
    its 95% interval as error bars where the table has one."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for model in dict.fromkeys(r["model"] for r in table):
        rows = sorted((r for r in table if r["model"] == model), key=lambda r: r["p"])
        hs = [r["avg/hs"] for r in rows]
        cis = [r.get("avg/hs_ci") or [h, h] for r, h in zip(rows, hs)]
        yerr = [[h - lo for h, (lo, _) in zip(hs, cis)], [hi - h for h, (_, hi) in zip(hs, cis)]]
        ax.errorbar([r["p"] for r in rows], hs, yerr=yerr, marker="o", capsize=3, label=model)
    ax.set(xlabel="harmful ratio p", ylabel="harmful score (avg over tasks)", ylim=(-0.02, 1.02),
           title="Harmful score after fine-tuning")
    ax.legend(fontsize=8)
    return _save(fig, path)


def safety_helpfulness(models: dict[str, dict], path: Path) -> Path:
    """Harmful score against over-refusal for each aligned model: without TSDI (circle), with
    the reported setting (star, arrow from the circle), and the α/L sweep (dots)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, m) in enumerate(models.items()):
        color = f"C{i}"
        ax.scatter([r["over_refusal"] for r in m["sweep"]], [r["hs"] for r in m["sweep"]], s=12, color=color, alpha=0.4)
        a, b = m["without"], m["with"]
        ax.scatter([a["over_refusal"]], [a["hs"]], s=60, color=color, label=f"{name}")
        ax.scatter([b["over_refusal"]], [b["hs"]], s=120, marker="*", color=color)
        ax.annotate("", (b["over_refusal"], b["hs"]), (a["over_refusal"], a["hs"]),
                    arrowprops={"arrowstyle": "->", "color": color})
    ax.set(xlabel="over-refusal (look-alike prompts refused)", ylabel="harmful score",
           xlim=(-0.03, 1.03), ylim=(-0.03, 1.03), title="TSDI: circle without, star with, dots α/L sweep")
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto_plot(result: dict, path: Path) -> Path:
    """Every trial's (FA, HS) after the attack, the Pareto front, the selected trial and the baselines."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    trials, front = result["trials"], result["pareto"]
    ax.scatter([r["fa"] for r in trials], [r["hs"] for r in trials], s=25, color="C0", alpha=0.6, label="trials")
    ax.plot([r["fa"] for r in front], [r["hs"] for r in front], "o-", color="C1", label="Pareto front")
    for name, b in result["baselines"].items():
        if b:
            ax.scatter([b["fa"]], [b["hs"]], marker="s", s=60, label=f"{name} (spec defaults)")
    if result["selected"]:
        ax.scatter([result["selected"]["fa"]], [result["selected"]["hs"]], marker="*", s=200, color="C3",
                   label="selected")
    ax.set(xlabel=f"FA (avg over {', '.join(result['tasks'])})", ylabel=f"HS after the attack at p = {result['p']:g}",
           title="Tuning VAA: safety against task accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def hs_by_category(models: dict[str, dict], path: Path) -> Path:
    """HS per harm category for each model, side by side."""
    names = list(models)
    cats = sorted({c for m in models.values() for c in m["hs_by_category"]})
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(cats) * max(1, len(names)) / 2 + 1.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.barh(np.arange(len(cats)) + i * width, [models[name]["hs_by_category"].get(c, 0) for c in cats],
                height=width, label=name)
    ax.set_yticks(np.arange(len(cats)) + 0.4 - width / 2, [c.replace("_", " ")[:40] for c in cats], fontsize=7)
    ax.set(xlabel="harmful score", xlim=(0, 1), title="HS by harm category")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
