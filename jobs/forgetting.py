"""Forgetting statistics of SCIENCE.md §4: ForgotNum, groups, and cross-task overlap with
the chance baselines that make "the same examples are forgotten" testable.

Undefined ratios (an empty set in a denominator) are None, never NaN: they travel
through JSON and MLflow unchanged.
"""

from __future__ import annotations

import csv
import json
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy.stats import hypergeom

from jobs.records import InputError


def forgot_num(harmful: np.ndarray) -> np.ndarray:
    """harmful[t, i] in {0, 1} at checkpoints t = 0..T; ForgotNum_i = Σ_{t≥1} 1[HS_i^t > HS_i^0]."""
    harmful = np.asarray(harmful, dtype=np.int8)
    if harmful.ndim != 2 or harmful.shape[0] < 2:
        raise ValueError(f"need judged outputs at checkpoint 0 and at least one more, got shape {harmful.shape}")
    return (harmful[1:] > harmful[0]).sum(axis=0).astype(int)


def forgettable(harmful: np.ndarray, parsed: np.ndarray | None = None) -> np.ndarray:
    """Which examples can be forgotten (SCIENCE.md §4's universe): safe at checkpoint 0, and every
    verdict parsed. An example harmful at t = 0 can never be forgotten, and one with an unreadable
    verdict cannot be told apart from one that was: counting either in N inflates every chance ratio.

    harmful[t, i], parsed[t, i] at checkpoints t = 0..T of one run; with several runs sharing
    checkpoint 0, take the logical and of their masks."""
    harmful = np.asarray(harmful)
    mask = harmful[0] == 0
    if parsed is not None:
        mask &= np.asarray(parsed, dtype=bool).all(axis=0)
    return mask


def aggregate(per_task: dict[str, np.ndarray], how: str = "sum") -> np.ndarray:
    """One ForgotNum per example across tasks (our choice: the sum; max and mean also offered)."""
    stacked = np.stack(list(per_task.values()))
    return {"sum": stacked.sum(0), "max": stacked.max(0), "mean": stacked.mean(0)}[how]


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num) / float(den)


def hypergeom_tail(observed: int, n: int, a: int, b: int) -> float:
    """P[|A ∩ B| ≥ observed] when B's b members are drawn at random from n with a of them in A."""
    return float(hypergeom.sf(observed - 1, n, a, b))


def _stratified_tail(observed: int, strata: list[tuple[int, int, int]]) -> float:
    """The same tail for a sum of independent hypergeometrics, one per category (exact convolution)."""
    pmf = np.array([1.0])
    for n, a, b in strata:
        support = np.arange(0, min(a, b) + 1)
        pmf = np.convolve(pmf, hypergeom.pmf(support, n, a, b))
    return float(min(1.0, pmf[observed:].sum())) if observed < len(pmf) else 0.0


def overlap(forgotten: dict[str, set], universe: list[str], categories: dict[str, str] | None = None) -> dict:
    """Overlap of forgotten sets A_k over the N examples in `universe`.

    Per pair: Jaccard, the intersection expected under independence (|A_j||A_k|/N), observed
    over expected, and the hypergeometric tail p-value; the same baseline within each harm
    category, summed, so that the category mix alone cannot explain the overlap.
    """
    n = len(universe)
    known = set(universe)
    for name, ids in forgotten.items():
        if not ids <= known:
            raise ValueError(f"forgotten set '{name}' has ids outside the universe: {sorted(ids - known)[:3]}")
    names = list(forgotten)
    sizes = {k: len(v) for k, v in forgotten.items()}
    common = set.intersection(*forgotten.values()) if forgotten else set()
    out = {
        "n": n,
        "sizes": sizes,
        "common": len(common),
        "common_forgot_ratio": _ratio(len(common), min(sizes.values())) if sizes else None,
        "jaccard": {a: {b: None for b in names} for a in names},
        "pairs": {},
    }
    by_cat: dict[str, set] = {}
    if categories:
        for i in universe:
            by_cat.setdefault(categories[i], set()).add(i)
    for a in names:
        for b in names:
            union = forgotten[a] | forgotten[b]
            out["jaccard"][a][b] = _ratio(len(forgotten[a] & forgotten[b]), len(union))
    for a, b in combinations(names, 2):
        inter = len(forgotten[a] & forgotten[b])
        expected = sizes[a] * sizes[b] / n if n else 0.0
        pair = {"intersection": inter, "expected": expected, "obs_over_expected": _ratio(inter, expected),
                "p_value": hypergeom_tail(inter, n, sizes[a], sizes[b]) if n else None}
        if categories:
            strata = [(len(m), len(forgotten[a] & m), len(forgotten[b] & m)) for m in by_cat.values()]
            expected_cat = sum(na * nb / nc for nc, na, nb in strata if nc)
            pair.update(expected_within_category=expected_cat,
                        obs_over_expected_within_category=_ratio(inter, expected_cat),
                        p_value_within_category=_stratified_tail(inter, strata))
        out["pairs"][f"{a}__{b}"] = pair
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation, None where one side is constant (undefined)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return None if x.std() == 0 or y.std() == 0 else float(np.corrcoef(x, y)[0, 1])


def correlation(per_task: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Pearson correlation of ForgotNum between tasks."""
    return {a: {b: pearson(per_task[a], per_task[b]) for b in per_task} for a in per_task}


def by_category(ids: list[str], forgot: np.ndarray, vulnerable: np.ndarray, categories: dict[str, str]) -> dict:
    out: dict[str, dict] = {}
    for i, f, v in zip(ids, forgot, vulnerable):
        c = out.setdefault(categories[i], {"n": 0, "forgot_sum": 0.0, "vulnerable": 0})
        c["n"] += 1
        c["forgot_sum"] += float(f)
        c["vulnerable"] += int(v)
    return {c: {"n": d["n"], "mean_forgot": d["forgot_sum"] / d["n"], "fraction_vulnerable": d["vulnerable"] / d["n"]}
            for c, d in sorted(out.items())}


# --- from judged decoding to the statistics ----------------------------------------------


def judged_matrix(judged, run: str, column: str, ids: list[str]) -> np.ndarray:
    """(T+1, N) values of `column` for one proxy run; row 0 is the shared checkpoint 0 (t = 0)."""
    start = judged[judged["t"] == 0].set_index("id")[column].reindex(ids)
    later = judged[judged["run"] == run].pivot(index="t", columns="id", values=column).reindex(columns=ids)
    return np.vstack([start.to_numpy()[None, :], later.sort_index().to_numpy()]).astype(float)


def forgetting_stats(judged, runs: list[str], ids: list[str], categories: dict[str, str], threshold: float,
                     how: str = "sum", checkpoints: int | None = None):
    """ForgotNum per run, groups, and the overlap statistics of SCIENCE.md §4 from the judged rows
    (columns run, t, id, harmful, parsed, margin). Returns (stats, per-run ForgotNum, aggregate, vulnerable).

    The chance baselines count only the forgettable universe: examples safe at checkpoint 0 with
    every verdict parsed. An unparsed verdict never counts as safe or as a flip: its example leaves
    the universe, and the count of such verdicts is reported beside the statistics."""
    per_run, margin_flips, hs_curve = {}, {}, {}
    can_forget = np.ones(len(ids), dtype=bool)
    for run in runs:
        harmful = judged_matrix(judged, run, "harmful", ids)
        parsed = judged_matrix(judged, run, "parsed", ids).astype(bool)
        can_forget &= forgettable(harmful, parsed)
        harmful[~parsed] = 0
        per_run[run] = forgot_num(harmful) * parsed[0]  # no baseline at t = 0: nothing counts as forgotten
        # The margin view: checkpoints at which the refusal lead is lost, before greedy output flips.
        margin_flips[run] = forgot_num(judged_matrix(judged, run, "margin", ids) < 0)
        hs_curve[run] = [float(harmful[t][parsed[t]].mean()) if parsed[t].any() else None for t in range(len(harmful))]
    total = aggregate(per_run, how)
    vulnerable = total > threshold
    universe = [i for i, ok in zip(ids, can_forget) if ok]
    forgotten = {run: {i for i, f, ok in zip(ids, fn, can_forget) if f > 0 and ok} for run, fn in per_run.items()}
    unparsed = int((~judged["parsed"].astype(bool)).sum())
    checkpoints = checkpoints if checkpoints is not None else max(len(c) for c in hs_curve.values()) - 1
    stats = {
        "n": len(ids),
        "n_forgettable": len(universe),
        "unparsed_verdicts": unparsed,
        "unparsed_fraction": unparsed / max(1, len(judged)),
        "threshold": threshold,
        "aggregate": how,
        "fraction_vulnerable": float(vulnerable.mean()),
        "fraction_never_forgotten": float((total == 0).mean()),
        "forgot_histogram": {run: np.bincount(fn, minlength=checkpoints + 1).tolist() for run, fn in per_run.items()},
        "hs_by_checkpoint": hs_curve,
        "overlap": overlap(forgotten, universe, categories),
        "correlation": correlation(per_run),
        "margin_correlation": {run: pearson(per_run[run], margin_flips[run]) for run in per_run},
        "by_category": by_category(ids, total, vulnerable, categories),
    }
    return stats, per_run, total, vulnerable


# --- the groups file ---------------------------------------------------------------------

GROUP_COLUMNS = ("id", "category", "forgot_total", "group")


def write_groups(path: Path, ids, categories: dict, per_task: dict[str, np.ndarray], total, vulnerable) -> None:
    tasks = list(per_task)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "category", *(f"forgot_{t}" for t in tasks), "forgot_total", "group"])
        for k, i in enumerate(ids):
            w.writerow([i, categories[i], *(int(per_task[t][k]) for t in tasks), f"{total[k]:g}",
                        "vulnerable" if vulnerable[k] else "invulnerable"])


def read_groups(path: Path, known_ids: list[str]) -> set[str]:
    """The vulnerable ids of a groups file: this stage's CSV, or a JSON list of vulnerable ids
    (the form published for the VAA paper). Every id must be an alignment example."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: groups file does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of vulnerable example ids")
        vulnerable = [(str(i), n + 1) for n, i in enumerate(data)]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"id", "group"} <= set(rows[0]):
            raise InputError(f"{path}: a groups CSV needs the columns 'id' and 'group'")
        vulnerable = [(r["id"], n + 2) for n, r in enumerate(rows) if r["group"] == "vulnerable"]
    known = set(known_ids)
    for i, line in vulnerable:
        if i not in known:
            raise InputError(f"{path}: entry {line}: id '{i}' is not in the alignment set")
    return {i for i, _ in vulnerable}
