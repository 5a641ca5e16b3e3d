"""95% intervals and paired differences for the rates a study reports (SCIENCE.md §10).

An outcome is a 0/1 vector over prompts (harmful, correct, refused; None where a judge could
not parse), one per seed, every seed scored on the same prompts. The interval is a two-level
percentile bootstrap: resample the seeds, then the prompts (one draw shared by the drawn seeds,
since they share their prompts), and take the mean over the drawn seeds of each seed's mean. With
one seed it covers prompt sampling only (`levels` says which). A paired difference resamples the
same seeds and prompts for both sides and leaves out a prompt either side could not judge, so what
the two models share (prompts, attack data) cancels.

Several outcome vectors averaged into one number (the average HS over tasks) are resampled each
within itself, with the seed draw shared, so the average's interval is as wide as its parts allow.

A headline comparison also carries a Student-t interval over its seeds' paired differences (k − 1
degrees of freedom), and is called a difference only when both intervals exclude 0. With 3 seeds
the percentile bootstrap resamples 3 numbers, which understates how far another set of seeds (or
another machine: docs/results.md) would move a result; the t interval does not, and is wide.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

RESAMPLES = 1000  # SCIENCE.md §10 asks for at least 1,000
LEVEL = 0.95


def _matrix(outcomes) -> np.ndarray:
    """seeds × prompts, NaN where a verdict was not parsed; one vector is one seed. Every seed is
    scored on the same held-out prompts, in the same order."""
    if not len(outcomes) or not isinstance(outcomes[0], (list, tuple, np.ndarray)):
        outcomes = [outcomes]  # one seed's vector
    rows = [[np.nan if x is None else x for x in o] for o in outcomes]
    if len({len(r) for r in rows}) > 1:
        raise ValueError("every seed must be scored on the same prompts")
    return np.asarray(rows, dtype=float)


def _interval(values: list[float], level: float = LEVEL) -> list[float] | None:
    values = np.asarray([v for v in values if not np.isnan(v)])
    if not len(values):
        return None
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def mean_ci(outcomes, resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """The 95% interval of a rate's mean over seeds (each seed's mean over its prompts)."""
    return average_ci([outcomes], resamples, seed)


def average_ci(parts: list, resamples: int = RESAMPLES, seed: int = 0) -> list[float] | None:
    """The interval of the average of several rates (e.g. HS over tasks), each a per-seed outcome list."""
    return difference_ci(parts, None, resamples, seed)


def _rate(m: np.ndarray) -> float:
    """Mean over seeds of each seed's mean over its (parsed) prompts."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a seed with nothing parsed: left out
        return float(np.nanmean(np.nanmean(m, axis=1)))


def difference_ci(a_parts: list, b_parts: list | None, resamples: int = RESAMPLES,
                  seed: int = 0) -> list[float] | None:
    """The interval of mean(a) − mean(b) (or of mean(a) alone when `b_parts` is None), paired:
    a_parts[k] and b_parts[k] are outcomes on the same prompts under the same seeds, and a prompt
    either side could not judge is left out of both.

    Each resample draws the seeds, then the prompts; the prompts drawn are the same for every seed
    (each seed scored the same prompts, so prompt-to-prompt variation does not average out across
    seeds) and for both sides of a difference."""
    a = [_matrix(x) for x in a_parts]
    b = [_matrix(x) for x in b_parts] if b_parts is not None else None
    if b is not None:
        for k, (ma, mb) in enumerate(zip(a, b, strict=True)):
            if ma.shape != mb.shape:
                raise ValueError("a paired difference needs the same prompts and seeds on both sides")
            unjudged = np.isnan(ma) | np.isnan(mb)
            a[k], b[k] = np.where(unjudged, np.nan, ma), np.where(unjudged, np.nan, mb)
    if any(np.isnan(m).all() for m in a):
        return None
    rng = np.random.default_rng(seed)
    n_seeds = a[0].shape[0]
    stats = []
    for _ in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int)
        total = 0.0
        for k, m in enumerate(a):
            prompts = rng.integers(0, m.shape[1], m.shape[1])
            total += _rate(m[np.ix_(seeds, prompts)])
            if b is not None:
                total -= _rate(b[k][np.ix_(seeds, prompts)])
        stats.append(total / len(a))
    return _interval(stats)


def point(parts: list) -> float:
    """The point estimate the intervals are around: the mean over parts of the mean over seeds."""
    return float(np.mean([_rate(_matrix(x)) for x in parts]))


def levels(n_seeds: int) -> str:
    return "seeds, then prompts" if n_seeds > 1 else "prompts only (one seed)"


def seed_differences(a_parts: list, b_parts: list) -> list[float]:
    """Per seed: mean(a) − mean(b) over the prompts both sides judged, averaged over parts."""
    per_part = []
    for a, b in zip(a_parts, b_parts, strict=True):
        ma, mb = _matrix(a), _matrix(b)
        unjudged = np.isnan(ma) | np.isnan(mb)
        per_part.append([_rate(np.where(unjudged, np.nan, ma)[[k]]) - _rate(np.where(unjudged, np.nan, mb)[[k]])
                         for k in range(ma.shape[0])])
    return np.mean(per_part, axis=0).tolist()


def seed_t_interval(differences: list[float], level: float = LEVEL) -> list[float] | None:
    """The Student-t interval of the mean of per-seed differences (None with fewer than 2 seeds)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return None
    half = stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return [float(d.mean() - half), float(d.mean() + half)]


def comparison(a: str, b: str, p: float, metric: str, a_parts: list, b_parts: list, seed: int = 0) -> dict:
    """One headline comparison: the paired difference a − b with its bootstrap interval and its
    seeds' t interval, called a difference only when both exclude 0 (with one seed: the bootstrap's)."""
    ci = difference_ci(a_parts, b_parts, seed=seed)
    diff = point(a_parts) - point(b_parts)
    by_seed = seed_differences(a_parts, b_parts)
    t_ci = seed_t_interval(by_seed)

    def excludes_zero(interval):
        return interval is not None and (interval[0] > 0 or interval[1] < 0)

    return {"a": a, "b": b, "p": p, "metric": metric, "diff": diff, "ci": ci, "seed_diffs": by_seed,
            "seed_t_ci": t_ci, "significant": excludes_zero(ci) and (t_ci is None and len(by_seed) < 2
                                                                   or excludes_zero(t_ci))}


def reading(c: dict) -> tuple[str, str, str]:
    """How a comparison reads: its bootstrap interval, its seeds' t interval, and the verdict."""
    def text(interval):
        return f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else "n/a"

    ci, t_ci = c.get("ci"), c.get("seed_t_ci")
    if c["significant"]:
        verdict = "a difference"
    elif ci is not None and (ci[0] > 0 or ci[1] < 0):
        verdict = "no difference shown (the seeds disagree: their t interval includes 0)"
    else:
        verdict = "no difference shown (the interval includes 0)"
    return text(ci), text(t_ci), verdict


# --- a study's tables, annotated ------------------------------------------------------------


def stack_seeds(per_seed: list[dict]) -> dict:
    """One model's (or cell's) per-prompt outcomes over its seeds: each vector becomes a list of
    vectors, one per seed, in the order given."""
    return {"hs": [o["hs"] for o in per_seed], "over_refusal": [o["over_refusal"] for o in per_seed],
            "fa": {t: [o["fa"][t] for o in per_seed] for t in per_seed[0]["fa"]}}


def model_intervals(outcomes: dict) -> dict:
    """`hs_ci`, `over_refusal_ci` and `fa_ci` (per task) from one model's per-prompt outcomes."""
    return {"hs_ci": mean_ci(outcomes["hs"]), "over_refusal_ci": mean_ci(outcomes["over_refusal"]),
            "fa_ci": {t: mean_ci(o) for t, o in outcomes["fa"].items()}}


def _unmeasured(outcomes) -> bool:
    return bool(np.isnan(_matrix(outcomes)).all())


def table_intervals(table: list[dict], cells: dict[tuple, dict], tasks: list[str], reference: str = "sft"):
    """Intervals on the attack table's rows (per task and the average over tasks) and the headline
    comparisons: every model against `reference` at each p, average HS and FA, paired by task.

    `cells[(model, task, p)]` holds that cell's per-prompt outcomes."""
    comparisons = []
    for row in table:
        model, p = row["model"], row["p"]
        for metric, pick in (("hs", lambda o, t: o["hs"]), ("fa", lambda o, t: o["fa"][t])):
            # A free-text task's FA is not measured (all None): it is in no FA interval or average.
            present = [t for t in tasks if (model, t, p) in cells and not _unmeasured(pick(cells[(model, t, p)], t))]
            for t in present:
                row[f"{t}/{metric}_ci"] = mean_ci(pick(cells[(model, t, p)], t))
            row[f"avg/{metric}_ci"] = average_ci([pick(cells[(model, t, p)], t) for t in present]) if present else None
            shared = [t for t in present if (reference, t, p) in cells]
            if model != reference and shared:
                comparisons.append(comparison(
                    model, reference, p, f"avg/{metric}", [pick(cells[(model, t, p)], t) for t in shared],
                    [pick(cells[(reference, t, p)], t) for t in shared]))
    return comparisons
