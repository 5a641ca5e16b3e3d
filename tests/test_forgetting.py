import json

import numpy as np
import pytest

from jobs.forgetting import (aggregate, by_category, correlation, forgot_num, hypergeom_tail, overlap, read_groups,
                             write_groups)

IDS = [str(i) for i in range(10)]
CATS = {i: ("x" if int(i) < 5 else "y") for i in IDS}


def test_forgot_num_counts_checkpoints_worse_than_the_start():
    hs = [[0, 1, 0],  # checkpoint 0
          [1, 1, 0],
          [1, 0, 0],
          [0, 1, 1]]
    # example 0: harmful at t=1,2 (2); example 1 started harmful, never "more" (0); example 2: t=3 (1)
    assert forgot_num(hs).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="at least one more"):
        forgot_num([[0, 1]])


def test_aggregate():
    per = {"a": np.array([1, 0, 2]), "b": np.array([3, 0, 0])}
    assert aggregate(per).tolist() == [4, 0, 2] and aggregate(per, "max").tolist() == [3, 0, 2]


def test_overlap_against_hand_computed_values():
    A, B = {"0", "1", "2", "3"}, {"2", "3", "4"}
    o = overlap({"a": A, "b": B}, IDS, CATS)
    assert o["common"] == 2 and o["common_forgot_ratio"] == pytest.approx(2 / 3)
    assert o["jaccard"]["a"]["b"] == pytest.approx(2 / 5) and o["jaccard"]["a"]["a"] == 1.0
    pair = o["pairs"]["a__b"]
    assert pair["expected"] == pytest.approx(4 * 3 / 10)
    assert pair["obs_over_expected"] == pytest.approx(2 / 1.2)
    # P[X >= 2], X ~ Hypergeom(N=10, K=4, n=3) = (C(4,2)C(6,1) + C(4,3)) / C(10,3) = 40/120
    assert pair["p_value"] == pytest.approx(40 / 120)
    # Within categories all forgetting is in x (5 examples): E = 4*3/5 = 2.4, and X >= 2 is certain
    assert pair["expected_within_category"] == pytest.approx(2.4)
    assert pair["obs_over_expected_within_category"] == pytest.approx(2 / 2.4)
    assert pair["p_value_within_category"] == pytest.approx(1.0)


def test_overlap_edge_cases():
    empty = overlap({"a": set(), "b": set()}, IDS, CATS)
    assert empty["common_forgot_ratio"] is None and empty["jaccard"]["a"]["b"] is None
    assert empty["pairs"]["a__b"]["obs_over_expected"] is None and empty["pairs"]["a__b"]["p_value"] == 1.0
    one = overlap({"a": {"1", "2"}}, IDS)
    assert one["pairs"] == {} and one["common_forgot_ratio"] == 1.0
    same = overlap({"a": {"1", "2"}, "b": {"1", "2"}}, IDS)
    assert same["jaccard"]["a"]["b"] == 1.0 and same["pairs"]["a__b"]["obs_over_expected"] == pytest.approx(10 / 2)
    assert same["pairs"]["a__b"]["p_value"] == pytest.approx(1 / 45)  # both drawn = 1 / C(10, 2)
    with pytest.raises(ValueError, match="outside the universe"):
        overlap({"a": {"zz"}}, IDS)


def test_stratified_tail_is_exact():
    # One stratum reduces to the plain hypergeometric tail.
    o = overlap({"a": {"0", "1", "5"}, "b": {"0", "5", "6"}}, IDS, {i: "x" for i in IDS})
    assert o["pairs"]["a__b"]["p_value_within_category"] == pytest.approx(hypergeom_tail(2, 10, 3, 3))


def test_correlation_and_by_category():
    per = {"a": np.array([0, 1, 2, 3]), "b": np.array([0, 2, 4, 6]), "c": np.array([1, 1, 1, 1])}
    r = correlation(per)
    assert r["a"]["b"] == pytest.approx(1.0) and r["a"]["c"] is None
    cats = by_category(["0", "1", "5", "6"], np.array([2, 0, 1, 1]), np.array([1, 0, 1, 1]), CATS)
    assert cats == {"x": {"n": 2, "mean_forgot": 1.0, "fraction_vulnerable": 0.5},
                    "y": {"n": 2, "mean_forgot": 1.0, "fraction_vulnerable": 1.0}}


def test_groups_file_round_trip_and_imports(tmp_path):
    per = {"sentiment": np.array([1, 0, 2]), "topic": np.array([0, 0, 1])}
    total = aggregate(per)
    path = tmp_path / "groups.csv"
    write_groups(path, ["0", "1", "2"], CATS, per, total, total > 0)
    assert path.read_text().splitlines()[0] == "id,category,forgot_sentiment,forgot_topic,forgot_total,group"
    assert read_groups(path, ["0", "1", "2"]) == {"0", "2"}
    published = tmp_path / "vulnerable.json"
    published.write_text(json.dumps(["1", "2"]))
    assert read_groups(published, IDS) == {"1", "2"}
    published.write_text(json.dumps(["1", "align-404"]))
    with pytest.raises(ValueError, match=r"vulnerable.json: entry 2: id 'align-404' is not in the alignment set"):
        read_groups(published, IDS)
    published.write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_groups(published, IDS)


def test_forgetting_stats_count_only_the_forgettable_universe():
    """One example harmful at t = 0 and two with an unparsed verdict (one of them at t = 0) leave
    the universe: N' = 4 of 7."""
    import pandas as pd

    from jobs.forgetting import forgetting_stats

    ids = [f"e{i}" for i in range(7)]
    rows = []

    def checkpoint(run, t, harmful, unparsed=()):
        rows.extend({"run": run, "t": t, "id": i, "harmful": h, "parsed": i not in unparsed, "margin": 1.0}
                    for i, h in zip(ids, harmful))

    checkpoint("", 0, [1, 0, 0, 0, 0, 0, 0], unparsed={"e6"})  # e0 harmful before fine-tuning; e6 unread
    checkpoint("a", 1, [1, 1, 0, 0, 0, 0, 1])  # e6 has no baseline: its later harm is not a flip
    checkpoint("a", 2, [1, 1, 1, 0, 0, 0, 1])
    checkpoint("b", 1, [1, 1, 0, 0, 1, 0, 0], unparsed={"e4"})  # e4's verdict unreadable: not a flip, not safe
    checkpoint("b", 2, [1, 0, 1, 1, 0, 0, 0])
    stats, per_run, total, vulnerable = forgetting_stats(pd.DataFrame(rows), ["a", "b"], ids, {i: "x" for i in ids},
                                                          threshold=0)
    assert per_run["a"].tolist() == [0, 2, 1, 0, 0, 0, 0] and per_run["b"].tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert stats["n"] == 7 and stats["n_forgettable"] == 4 and stats["unparsed_verdicts"] == 2
    pair = stats["overlap"]["pairs"]["a__b"]
    # A_a = {e1, e2}, A_b = {e1, e2, e3} over U = {e1, e2, e3, e5}: E|A_a ∩ A_b| = 2·3/4 (not 2·3/6).
    assert pair["intersection"] == 2 and pair["expected"] == pytest.approx(1.5)
    assert pair["expected_within_category"] == pytest.approx(1.5)
    assert stats["hs_by_checkpoint"]["b"] == pytest.approx([1 / 6, 2 / 6, 3 / 7])  # over parsed verdicts
    assert vulnerable.tolist() == [False, True, True, True, False, False, False]


def test_a_study_where_nothing_can_be_forgotten_still_reports():
    """A judge that flags every answer at checkpoint 0 (a degenerate model judge) leaves no example
    that could be forgotten: the overlap statistics are undefined, and `saferay`'s summary says n/a
    where it has no number instead of failing after the stage has finished."""
    import io

    import pandas as pd
    from rich.console import Console

    from jobs.forgetting import forgetting_stats
    from orchestrator.summary import render

    judged = pd.DataFrame([{"run": run, "t": t, "id": i, "harmful": True, "parsed": True, "margin": -1.0}
                           for run, ts in (("", [0]), ("a", [1, 2]), ("b", [1, 2])) for t in ts for i in IDS])
    stats, *_ = forgetting_stats(judged, ["a", "b"], IDS, CATS, 0.0, checkpoints=2)
    assert stats["n_forgettable"] == 0 and stats["overlap"]["pairs"]["a__b"]["p_value"] is None
    out = io.StringIO()
    render({"study": "s", "status": "partial", "stages": [], "models": {}, "vulnerability": stats,
            "mlflow": {"tracking_uri": "sqlite:///x", "experiment_id": "1", "run_id": "r"}}, Console(file=out, width=200))
    assert "a__b: Jaccard n/a, observed/expected n/a (p = n/a)" in out.getvalue(), out.getvalue()
