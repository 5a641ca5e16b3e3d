"""The intervals and paired differences of SCIENCE.md §10, against values worked out by hand."""

import numpy as np
import pytest

from jobs.intervals import average_ci, comparison, difference_ci, mean_ci, table_intervals


def test_a_constant_outcome_has_a_point_interval():
    assert mean_ci([1] * 30) == [1.0, 1.0]
    assert mean_ci([1, None, 1]) == [1.0, 1.0]  # unparsed verdicts are left out, not read as 0
    assert mean_ci([None, None]) is None


def test_prompt_level_interval_matches_the_binomial_width():
    ci = mean_ci([1] * 50 + [0] * 50)
    # p = 0.5 over 100 prompts: standard error 0.05, so about 0.5 ± 0.098
    assert 0.38 < ci[0] < 0.42 and 0.58 < ci[1] < 0.62


def test_seeds_are_resampled_before_prompts():
    low, high = [1] * 20 + [0] * 80, [1] * 80 + [0] * 20  # two seeds that disagree
    ci = mean_ci([low, high])
    assert ci[0] < 0.3 and ci[1] > 0.7, "the seed-to-seed spread must widen the interval"
    assert mean_ci(low)[1] - mean_ci(low)[0] < 0.2  # one seed: prompt sampling only


def test_paired_difference_sees_what_an_unpaired_one_cannot():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 2, 200)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:10]] = 1  # a is b with 10 of 200 prompts flipped to harmful
    c = comparison("vaa", "sft", 0.1, "avg/hs", [a], [b])
    assert c["diff"] == pytest.approx(0.05)
    assert c["significant"] and 0 < c["ci"][0] < 0.05 < c["ci"][1] < 0.1
    same = comparison("vaa", "sft", 0.1, "avg/hs", [b], [b])
    assert same["ci"] == [0.0, 0.0] and not same["significant"]
    with pytest.raises(ValueError, match="same prompts"):
        difference_ci([a[:10]], [b])


def test_average_over_tasks_and_the_table():
    assert average_ci([[1] * 10, [0] * 10]) == [0.5, 0.5]
    sft = {"hs": [1] * 40, "fa": {"sentiment": [1] * 40}}
    vaa = {"hs": [0] * 40, "fa": {"sentiment": [1] * 39 + [0]}}
    table = [{"model": "sft", "p": 0.1}, {"model": "vaa", "p": 0.1}]
    comparisons = table_intervals(table, {("sft", "sentiment", 0.1): sft, ("vaa", "sentiment", 0.1): vaa},
                                  ["sentiment"])
    assert table[1]["avg/hs_ci"] == [0.0, 0.0] and table[0]["sentiment/fa_ci"] == [1.0, 1.0]
    hs = next(c for c in comparisons if c["metric"] == "avg/hs")
    assert hs["diff"] == -1.0 and hs["significant"] and (hs["a"], hs["b"], hs["p"]) == ("vaa", "sft", 0.1)
    fa = next(c for c in comparisons if c["metric"] == "avg/fa")
    assert fa["diff"] == pytest.approx(-1 / 40) and not fa["significant"]


def test_seeds_stack_and_pair():
    from jobs.intervals import stack_seeds

    s1 = {"hs": [1, 0, None], "over_refusal": [0, 0], "fa": {"topic": [1, 1]}}
    s2 = {"hs": [1, 1, 1], "over_refusal": [0, 1], "fa": {"topic": [0, 1]}}
    stacked = stack_seeds([s1, s2])
    assert stacked["hs"] == [[1, 0, None], [1, 1, 1]] and stacked["fa"]["topic"] == [[1, 1], [0, 1]]
    ci = mean_ci(stacked["hs"])
    assert ci[0] < 0.75 and ci[1] == 1.0  # the None is left out: seed 1 is [1, 0], seed 2 [1, 1, 1]
    assert difference_ci([stacked["hs"]], [stacked["hs"]]) == [0.0, 0.0]


def test_a_prompt_one_side_could_not_judge_leaves_both_sides():
    a, b = [None, 1, 1, 1], [0, 1, 1, 1]  # equal wherever both were judged
    assert difference_ci([a], [b]) == [0.0, 0.0]
    assert difference_ci([[a, a]], [[b, b]]) == [0.0, 0.0]  # two seeds


def test_a_difference_needs_its_seeds_to_agree():
    """Three seeds, 400 prompts each, every seed's difference positive but of very different sizes
    (+0.3, +0.02, +0.35): the percentile bootstrap, which can only draw these 3 seeds, excludes
    0; the t interval over the 3 seeds (2 degrees of freedom) does not, so this is not called a
    difference. Seeds that agree (+0.3, +0.25, +0.35) are."""
    def seed(rate, n=400):
        return [1] * round(rate * n) + [0] * (n - round(rate * n))

    base = [seed(0.3), seed(0.3), seed(0.3)]
    noisy = comparison("x", "sft", 0.1, "avg/hs", [[seed(0.6), seed(0.32), seed(0.65)]], [base])
    assert noisy["seed_diffs"] == pytest.approx([0.3, 0.02, 0.35])
    assert noisy["ci"][0] > 0, "the percentile bootstrap over 3 seeds excludes 0 here"
    lo, hi = noisy["seed_t_ci"]
    mean, sd = np.mean([0.3, 0.02, 0.35]), np.std([0.3, 0.02, 0.35], ddof=1)
    assert lo == pytest.approx(mean - 4.302653 * sd / np.sqrt(3), abs=1e-5) and lo < 0 < hi
    assert not noisy["significant"]
    steady = comparison("x", "sft", 0.1, "avg/hs", [[seed(0.6), seed(0.55), seed(0.65)]], [base])
    assert steady["seed_t_ci"][0] > 0 and steady["significant"]
    one = comparison("x", "sft", 0.1, "avg/hs", [seed(0.6)], [seed(0.3)])
    assert one["seed_t_ci"] is None and one["significant"]  # one seed: prompts only, and says so


def test_a_free_text_tasks_fa_is_not_measured_and_left_out():
    """FA of a task with free-text answers (Alpaca) is None in every outcome: the table's average FA
    and its interval, and the FA comparison, are over the measured tasks only; HS keeps every task."""
    from jobs.metrics import attack_table

    cells, attack = {}, []
    for model, hs in (("sft", 1), ("vaa", 0)):
        for task, fa in (("sentiment", [1] * 20), ("instruct", [None] * 20)):
            cells[(model, task, 0.1)] = {"hs": [hs] * 20, "fa": {task: fa}}
            attack.append({"model": model, "task": task, "p": 0.1, "hs": float(hs),
                           "fa": None if task == "instruct" else 1.0})
    table = attack_table(attack, ["sentiment", "instruct"])
    assert [(r["avg/hs"], r["avg/fa"]) for r in table] == [(1.0, 1.0), (0.0, 1.0)]
    comparisons = table_intervals(table, cells, ["sentiment", "instruct"])
    assert table[1]["avg/fa_ci"] == [1.0, 1.0] and "instruct/fa_ci" not in table[1]
    assert table[1]["instruct/hs_ci"] == [0.0, 0.0]
    fa = next(c for c in comparisons if c["metric"] == "avg/fa")
    assert fa["diff"] == 0.0 and fa["ci"] == [0.0, 0.0]
