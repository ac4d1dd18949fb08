"""dapt.eval.stats: intervals and paired tests against published values, closed forms, direct sums,
scipy.stats and (where installed) scikit-learn. Pure unit tests: no ranks, no subprocesses, no torch."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dapt.eval.stats import (
    accuracy_difference_interval,
    bootstrap_macro_f1_interval,
    bounded_mean_interval,
    draws_difference,
    macro_f1_from_confusion,
    mcnemar_exact,
    mean_interval,
    minimum_detectable_effect,
    normal_quantile,
    paired_difference,
    t_quantile,
    wilson_interval,
)

# A 3-class confusion matrix (rows true, columns predicted) used by several tests.
CONFUSION = [[50, 8, 2], [6, 40, 4], [3, 5, 32]]


# ---------------------------------------------------------------------------------------------
# quantiles


@pytest.mark.parametrize("p, expected", [
    (0.5, 0.0), (0.975, 1.959964), (0.95, 1.644854), (0.995, 2.575829), (0.025, -1.959964),
    (0.999, 3.090232), (1e-10, -6.361341),
])
def test_normal_quantile_table_values(p, expected):
    assert normal_quantile(p) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.706205), (0.975, 2, 4.302653), (0.975, 5, 2.570582), (0.975, 10, 2.228139),
    (0.975, 30, 2.042272), (0.975, 120, 1.979930), (0.95, 1, 6.313752), (0.995, 5, 4.032143),
    (0.025, 10, -2.228139), (0.9, 3, 1.637744), (0.5, 7, 0.0),
])
def test_t_quantile_table_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_tends_to_normal():
    assert t_quantile(0.975, math.inf) == normal_quantile(0.975)
    assert t_quantile(0.975, 1e9) == pytest.approx(normal_quantile(0.975), abs=1e-8)
    assert t_quantile(0.975, 1e4) > t_quantile(0.975, 1e5) > normal_quantile(0.975)


def test_quantiles_match_scipy():
    for p in [1e-12, 1e-6, 0.001, 0.01, 0.025, 0.1, 0.3, 0.4999, 0.6, 0.9, 0.975, 0.999, 1 - 1e-9]:
        assert normal_quantile(p) == pytest.approx(stats.norm.ppf(p), rel=1e-12, abs=1e-12)
        for df in [0.5, 1, 1.5, 2, 3, 4, 7.3, 10, 29, 100, 999, 1e5, 3e6]:
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8, abs=1e-9), (p, df)


def test_t_quantile_inverts_its_cdf_in_far_tails():
    # df=10, p=1e-300: t = -(2.56e30); check through the tail formula P(T < -t) ~ c t^-df.
    t = t_quantile(1e-300, 10)
    c = math.exp(math.lgamma(5.5) - math.lgamma(5) - 0.5 * math.log(10 * math.pi)) * 10**5.5 / 10
    assert c * abs(t) ** -10 == pytest.approx(1e-300, rel=1e-8)
    assert t_quantile(1e-300, 0.1) == -math.inf  # beyond the largest float


def test_t_quantile_closed_forms():
    # df=1 (Cauchy) and df=2 have closed-form quantiles, independent of any incomplete beta.
    for p in [1e-300, 1e-12, 1e-6, 0.01, 0.2, 0.4999, 0.75, 0.975, 1 - 1e-9]:
        q = min(p, 1 - p)
        sign = -1.0 if p < 0.5 else 1.0
        assert t_quantile(p, 1) == pytest.approx(sign / math.tan(math.pi * q), rel=1e-12), p
        assert t_quantile(p, 2) == pytest.approx(sign * (1 - 2 * q) / math.sqrt(2 * q * (1 - q)), rel=1e-12), p


def test_t_quantile_far_tails_where_scipy_stdtrit_is_off():
    # scipy.stats.t.ppf(1e-200, 3) is 2x too small in magnitude; check through P(T < -t) ~ c t^-df.
    t = t_quantile(1e-200, 3)
    c = math.exp(math.lgamma(2.0) - math.lgamma(1.5) - 0.5 * math.log(3 * math.pi)) * 3**2.0 / 3
    assert c * abs(t) ** -3 == pytest.approx(1e-200, rel=1e-8)
    for df in [3, 100]:  # the smallest positive float still gives a finite quantile
        assert -math.inf < t_quantile(5e-324, df) < t_quantile(1e-300, df) < 0


@pytest.mark.parametrize("call", [
    lambda: normal_quantile(0.0), lambda: normal_quantile(1.0), lambda: normal_quantile(float("nan")),
    lambda: t_quantile(0.975, 0), lambda: t_quantile(0.975, -3), lambda: t_quantile(1.5, 3),
    lambda: t_quantile(0.975, float("nan")),
])
def test_quantile_bad_inputs(call):
    with pytest.raises(ValueError, match=r"probability|df"):
        call()


# ---------------------------------------------------------------------------------------------
# Wilson


@pytest.mark.parametrize("successes, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (score, no correction)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombe(successes, n, low, high):
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_edges_and_confidence():
    assert wilson_interval(0, 20)[0] == 0.0
    assert wilson_interval(20, 20)[1] == 1.0
    lo, hi = wilson_interval(20, 20)
    assert lo == pytest.approx(1 - wilson_interval(0, 20)[1])  # symmetric in successes <-> failures
    assert hi == 1.0
    narrow, wide = wilson_interval(81, 263, 0.90), wilson_interval(81, 263, 0.99)
    assert wide[0] < narrow[0] < 81 / 263 < narrow[1] < wide[1]
    assert wilson_interval(np.int64(5), np.int64(10)) == wilson_interval(5, 10)


def test_wilson_matches_scipy():
    for k, n in [(0, 1), (1, 1), (3, 7), (950, 1000), (24_999, 25_000), (12_345, 25_000)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


@pytest.mark.parametrize("args, message", [
    ((0, 0), "n > 0"), ((5, 4), "cannot exceed"), ((-1, 4), "non-negative"), ((1.0, 4), "integer"),
    ((1, 4, 1.0), "confidence"), ((1, 4, 0), "confidence"), ((1, 4, float("nan")), "confidence"),
    ((True, 4), "integer"),
])
def test_wilson_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(*args)


# ---------------------------------------------------------------------------------------------
# macro-F1 and its bootstrap


def test_macro_f1_by_hand():
    # class 0: TP=50, FP=9, FN=10 -> 100/119; class 1: 80/(80+13+10); class 2: 64/(64+6+8)
    expected = (100 / 119 + 80 / 103 + 64 / 78) / 3
    assert macro_f1_from_confusion(CONFUSION) == pytest.approx(expected, rel=1e-15)
    # F1 treats FP and FN alike, so swapping true and predicted labels leaves it unchanged
    assert macro_f1_from_confusion(np.array(CONFUSION).T) == pytest.approx(expected, rel=1e-15)


def test_macro_f1_class_never_seen_counts_as_zero():
    # class 2 neither present nor predicted: F1 = 0 (scikit-learn zero_division=0)
    assert macro_f1_from_confusion([[5, 0, 0], [0, 5, 0], [0, 0, 0]]) == pytest.approx(2 / 3)
    assert macro_f1_from_confusion([[3, 1], [0, 0]]) == pytest.approx((6 / 7 + 0) / 2)  # class 1 only predicted


def test_macro_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for k in [2, 3, 5]:
        y_true = rng.integers(0, k - 1, 300)  # the last class never true ...
        y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, k, 300))
        confusion = np.zeros((k, k), dtype=int)
        np.add.at(confusion, (y_true, y_pred), 1)
        expected = metrics.f1_score(y_true, y_pred, labels=list(range(k)), average="macro", zero_division=0)
        assert macro_f1_from_confusion(confusion) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_contains_point_and_is_deterministic():
    point = macro_f1_from_confusion(CONFUSION)
    lo, hi = bootstrap_macro_f1_interval(CONFUSION)
    assert 0.0 < lo < point < hi < 1.0
    assert bootstrap_macro_f1_interval(CONFUSION) == (lo, hi)
    assert bootstrap_macro_f1_interval(np.array(CONFUSION), seed=0) == (lo, hi)
    assert bootstrap_macro_f1_interval(CONFUSION, seed=1) != (lo, hi)
    lo99, hi99 = bootstrap_macro_f1_interval(CONFUSION, confidence=0.99)
    assert lo99 < lo and hi < hi99


def test_bootstrap_equals_a_per_draw_loop():
    """The vectorised draws and scores equal a plain loop over the same PCG64 stream."""
    counts = np.array(CONFUSION)
    n = int(counts.sum())
    rng = np.random.Generator(np.random.PCG64(7))
    draws = rng.multinomial(n, counts.ravel() / n, size=2000)
    scores = [macro_f1_from_confusion(d.reshape(3, 3)) for d in draws]
    expected = np.percentile(scores, [2.5, 97.5])
    assert bootstrap_macro_f1_interval(counts, draws=2000, seed=7) == pytest.approx(tuple(expected), rel=1e-12)


def test_bootstrap_narrows_with_100x_the_counts():
    lo, hi = bootstrap_macro_f1_interval(CONFUSION)
    big_lo, big_hi = bootstrap_macro_f1_interval(np.array(CONFUSION) * 100)
    ratio = (big_hi - big_lo) / (hi - lo)
    assert 0.05 < ratio < 0.2  # ~ 1 / sqrt(100)
    assert big_lo < macro_f1_from_confusion(CONFUSION) < big_hi


def test_bootstrap_perfect_and_hopeless_classifiers():
    assert bootstrap_macro_f1_interval([[50, 0], [0, 50]]) == (1.0, 1.0)
    assert bootstrap_macro_f1_interval([[0, 50], [50, 0]]) == (0.0, 0.0)
    # an absent class always scores 0, so macro-F1 can never exceed 2/3
    lo, hi = bootstrap_macro_f1_interval([[40, 2, 0], [3, 45, 0], [0, 0, 0]])
    assert hi <= 2 / 3 and lo > 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"confusion": [[1, 2, 3], [4, 5, 6]]}, "square"),
    ({"confusion": [1, 2, 3]}, "square"),
    ({"confusion": [[1, -1], [0, 3]]}, "non-negative"),
    ({"confusion": [[0, 0], [0, 0]]}, "all zeros"),
    ({"confusion": [[1.5, 0], [0, 3]]}, "whole-number"),
    ({"confusion": [["a", "b"], ["c", "d"]]}, "integer counts"),
    ({"confusion": [[1, 2], [3]]}, "square"),
    ({"confusion": CONFUSION, "draws": 1999}, "at least 2000"),
    ({"confusion": CONFUSION, "seed": 1.5}, "seed"),
    ({"confusion": CONFUSION, "confidence": 95}, "confidence"),
])
def test_bootstrap_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_macro_f1_interval(**kwargs)


# ---------------------------------------------------------------------------------------------
# means over seeds


def test_mean_interval_by_hand():
    r = mean_interval([1.0, 2.0, 3.0])
    assert r["n"] == 3 and r["mean"] == 2.0 and r["std"] == 1.0
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert r["ci_low"] == pytest.approx(2.0 - half, abs=1e-6)
    assert r["ci_high"] == pytest.approx(2.0 + half, abs=1e-6)


def test_mean_interval_matches_scipy():
    values = [0.912, 0.905, 0.921, 0.899, 0.917]
    r = mean_interval(values, confidence=0.9)
    low, high = stats.t.interval(0.9, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((low, high), rel=1e-12)


def test_mean_interval_single_run_and_constant_runs():
    assert mean_interval([0.9]) == {"n": 1, "mean": 0.9, "std": None, "ci_low": None, "ci_high": None}
    r = mean_interval([0.5, 0.5, 0.5])
    assert r["std"] == 0.0 and r["ci_low"] == r["ci_high"] == 0.5


# bounded_mean_interval: the logit-t interval of a [0, 1] metric over seeds


def _expit(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bounded_mean_interval_n2_issue_example_stays_inside_0_1():
    """The issue's sweep: two seeds, 0.9867 +- 0.0141, plain t [0.8596, 1.1137]. Logit t: inside [0, 1],
    around the mean, longer below (away from the bound) than above."""
    values = [0.9967, 0.9767]
    plain = mean_interval(values)
    assert plain["ci_high"] == pytest.approx(1.1137, abs=1e-4)  # what the issue saw
    r = bounded_mean_interval(values)
    assert (r["n"], r["method"]) == (2, "logit t")
    assert r["mean"] == plain["mean"] and r["std"] == plain["std"]
    assert 0.0 <= r["ci_low"] < r["mean"] < r["ci_high"] <= 1.0
    # by hand: logit(0.9867) +- t(0.975, 1) * s / (sqrt(2) * m (1 - m)), mapped back
    m, s = 0.9867, 0.0141421356
    half = 12.706204736 * s / (math.sqrt(2) * m * (1 - m))
    centre = math.log(m / (1 - m))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((_expit(centre - half), _expit(centre + half)), rel=1e-6)
    assert r["mean"] - r["ci_low"] > r["ci_high"] - r["mean"]


def test_bounded_mean_interval_n3_by_hand():
    r = bounded_mean_interval([0.97, 0.98, 0.99])
    half = 4.302653 * 0.01 / (math.sqrt(3) * 0.98 * 0.02)
    centre = math.log(0.98 / 0.02)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((_expit(centre - half), _expit(centre + half)), abs=1e-6)
    assert 0.0 < r["ci_low"] < 0.98 < r["ci_high"] < 1.0  # plain t: [0.9552, 1.0048]
    assert mean_interval([0.97, 0.98, 0.99])["ci_high"] > 1.0
    # symmetric data around 0.5: the same interval as the plain t's to first order, and symmetric
    r = bounded_mean_interval([0.4, 0.5, 0.6])
    assert r["mean"] - r["ci_low"] == pytest.approx(r["ci_high"] - r["mean"], abs=1e-12)


def test_bounded_mean_interval_n10_is_nearly_the_t_interval():
    """Ten seeds far from the bounds: the logit-t bounds equal the plain t bounds up to the second-order
    term of expit's Taylor expansion, |1 - 2m| half^2 / (2 m (1 - m)) (half = the plain t half-width);
    the test allows 1.5x that (the O(half^3) rest is far smaller), here ~6e-4 against a half-width of 0.014."""
    values = [0.84, 0.86, 0.85, 0.87, 0.83, 0.88, 0.85, 0.86, 0.84, 0.87]
    plain, r = mean_interval(values), bounded_mean_interval(values)
    low, high = stats.t.interval(0.95, 9, loc=np.mean(values), scale=stats.sem(values))
    assert (plain["ci_low"], plain["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    m, half = plain["mean"], (high - low) / 2
    second_order = abs(1 - 2 * m) * half**2 / (2 * m * (1 - m))
    assert 0.0 < second_order < 0.05 * half  # a relative difference of under 5%
    for got, want in ((r["ci_low"], low), (r["ci_high"], high)):
        assert abs(got - want) <= 1.5 * second_order
    # ... and both sides move the same way (towards the far bound, 0), by about that term
    assert r["ci_low"] < low and r["ci_high"] < high
    assert high - r["ci_high"] == pytest.approx(second_order, rel=0.2)


@pytest.mark.parametrize("values", [[0.0, 1.0], [1.0, 0.999], [0.0, 0.001, 0.002], [0.5] * 10 + [1.0],
                                    [0.01] * 500 + [0.5] * 500, [1e-12, 2e-12]])
def test_bounded_mean_interval_contains_the_mean_inside_0_1(values):
    r = bounded_mean_interval(values)
    assert 0.0 <= r["ci_low"] <= r["mean"] <= r["ci_high"] <= 1.0


def test_bounded_mean_interval_single_run_constant_runs_and_bad_values():
    assert bounded_mean_interval([0.9]) == {"n": 1, "mean": 0.9, "std": None, "ci_low": None, "ci_high": None,
                                            "method": "logit t"}
    for value in (0.0, 0.7, 1.0):  # no spread: the point, as the plain t interval
        r = bounded_mean_interval([value] * 3)
        assert r["std"] == pytest.approx(0.0, abs=1e-15)  # 0.7 * 3 / 3 is not exactly 0.7
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((value, value), abs=1e-12)
    for bad in ([0.5, 1.01], [-0.1, 0.5]):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            bounded_mean_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        bounded_mean_interval([0.5, 0.6], confidence=0.0)


def test_paired_difference_by_hand():
    a, b = [0.90, 0.91, 0.92], [0.88, 0.90, 0.89]  # differences 0.02, 0.01, 0.03
    r = paired_difference(a, b)
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.02)
    assert r["std"] == pytest.approx(0.01)
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.02 - half, 0.02 + half), abs=1e-8)
    assert r["mean_a"] == pytest.approx(0.91) and r["mean_b"] == pytest.approx(0.89)
    # pairing: the spread of the differences, not of each arm, sets the width
    assert r["ci_high"] - r["ci_low"] < mean_interval(a)["ci_high"] - mean_interval(a)["ci_low"]
    assert r["mde"] == pytest.approx((4.302653 + 1.060660) * 0.01 / math.sqrt(3), rel=1e-6)
    single = paired_difference([0.9], [0.8])
    assert single["std"] is None and single["ci_low"] is None and single["mde"] is None


@pytest.mark.parametrize("call, message", [
    (lambda: mean_interval([]), "empty"),
    (lambda: mean_interval([1.0, float("nan")]), "NaN"),
    (lambda: mean_interval([[1.0, 2.0]]), "1-D"),
    (lambda: mean_interval(["x", "y"]), "numbers"),
    (lambda: mean_interval([1.0, 2.0], confidence=1.0), "confidence"),
    (lambda: paired_difference([1.0, 2.0], [1.0]), "len"),
])
def test_mean_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# two classifiers on the same examples


def _binomial_two_sided(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("b, c, expected", [
    (1, 6, 0.125), (6, 1, 0.125), (0, 0, 1.0), (0, 5, 0.0625), (10, 0, 2 / 1024), (3, 3, 1.0),
    (4, 5, 1.0), (0, 1, 1.0),
])
def test_mcnemar_exact_small(b, c, expected):
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-15)


def test_mcnemar_exact_matches_direct_sums_and_scales():
    for b, c in [(7, 20), (30, 12), (100, 140), (512, 600)]:
        assert mcnemar_exact(b, c) == pytest.approx(_binomial_two_sided(b, c), rel=1e-12)
    # b + c = 25,000: still exact integer arithmetic, and fast
    p = mcnemar_exact(12_000, 13_000)
    assert 0 < p < 1e-9
    assert p == pytest.approx(2.631745508336e-10, rel=1e-9)  # scipy.stats.binomtest(12000, 25000)
    assert mcnemar_exact(0, 25_000) == 0.0  # 2 ** -24999 underflows to 0, no error
    assert mcnemar_exact(12_500, 12_500) == 1.0


def test_mcnemar_matches_scipy_binomtest():
    for b, c in [(1, 6), (15, 30), (210, 250), (2000, 2100)]:
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_accuracy_difference_by_hand():
    # 10 examples: both right on 5, only A right on 3 (b), only B right on 1 (c), both wrong on 1
    a = [1] * 5 + [1] * 3 + [0] * 1 + [0]
    b = [1] * 5 + [0] * 3 + [1] * 1 + [0]
    r = accuracy_difference_interval([bool(x) for x in a], np.array(b, dtype=bool))
    assert (r["b"], r["c"], r["n"]) == (3, 1, 10)
    assert r["acc_a"] == 0.8 and r["acc_b"] == 0.6
    assert r["diff"] == pytest.approx(0.2)
    half = 1.959964 * math.sqrt((4 - 4 / 10) / 100)  # ((b + c) - (b - c)^2 / n) / n^2
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-6)
    assert r["mcnemar_p"] == pytest.approx(_binomial_two_sided(3, 1))
    assert accuracy_difference_interval(a, b) == r  # 0/1 integers are accepted too
    assert r["mde"] == pytest.approx(2.801585 * half / 1.959964, rel=1e-6)  # (z.975 + z.8) se


def test_accuracy_difference_identical_and_clipped():
    same = accuracy_difference_interval([True, False, True], [True, False, True])
    assert same["diff"] == same["ci_low"] == same["ci_high"] == 0.0 and same["mcnemar_p"] == 1.0
    opposite = accuracy_difference_interval([True] * 3, [False] * 3)
    assert opposite["diff"] == 1.0 and opposite["ci_high"] == 1.0
    assert opposite["ci_low"] == 1.0  # all pairs discordant one way: zero paired variance


@pytest.mark.parametrize("call, message", [
    (lambda: mcnemar_exact(-1, 3), "non-negative"),
    (lambda: mcnemar_exact(1.5, 3), "integer"),
    (lambda: accuracy_difference_interval([True, False], [True]), "same examples"),
    (lambda: accuracy_difference_interval([], []), "at least one"),
    (lambda: accuracy_difference_interval([0, 2], [1, 1]), "booleans"),
    (lambda: accuracy_difference_interval([[True]], [[True]]), "1-D"),
    (lambda: accuracy_difference_interval([True], [True], confidence=-0.5), "confidence"),
])
def test_paired_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# power: the minimum detectable effect, and the many-draws (linear probe) difference


@pytest.mark.parametrize("df", [None, 1, 2, 4, 9, 30])
def test_minimum_detectable_effect_matches_scipy(df):
    q = (stats.norm.ppf if df is None else (lambda p: stats.t.ppf(p, df)))
    assert minimum_detectable_effect(0.01, df=df) == pytest.approx(0.01 * (q(0.975) + q(0.8)), rel=1e-9)
    assert minimum_detectable_effect(0.01, df=df, confidence=0.9, power=0.9) == pytest.approx(
        0.01 * (q(0.95) + q(0.9)), rel=1e-9)


def test_minimum_detectable_effect_values_and_power_by_simulation():
    assert minimum_detectable_effect(1.0) == pytest.approx(2.801585, abs=1e-6)
    assert minimum_detectable_effect(1.0, df=2) == pytest.approx(5.363313, abs=1e-6)  # 3 paired seeds
    assert minimum_detectable_effect(0.0) == 0.0
    # the definition: a true effect of one MDE is found (|z| > 1.96) in 80% of experiments
    rng = np.random.default_rng(0)
    se = 0.004
    estimates = rng.normal(minimum_detectable_effect(se), se, size=200_000)
    assert np.mean(np.abs(estimates / se) > 1.959964) == pytest.approx(0.80, abs=0.005)


@pytest.mark.parametrize("call, message", [
    (lambda: minimum_detectable_effect(-0.1), "se"),
    (lambda: minimum_detectable_effect(float("nan")), "se"),
    (lambda: minimum_detectable_effect(0.1, df=0), "df"),
    (lambda: minimum_detectable_effect(0.1, power=1.0), "power"),
    (lambda: minimum_detectable_effect(0.1, confidence=1.5), "confidence"),
])
def test_minimum_detectable_effect_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _correct(rng, draws, examples, p):
    return rng.random((draws, examples)) < p


def test_draws_difference_point_interval_and_determinism():
    rng = np.random.default_rng(1)
    a, b = _correct(rng, 20, 500, 0.85), _correct(rng, 20, 500, 0.80)
    r = draws_difference(a, b)
    assert r["diff"] == pytest.approx(a.mean() - b.mean())
    assert (r["acc_a"], r["acc_b"]) == (pytest.approx(a.mean()), pytest.approx(b.mean()))
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    assert (r["n_draws"], r["n_examples"], r["draws"]) == (20, 500, 2000)
    assert r["mde"] == pytest.approx(2.801585 * r["se"], rel=1e-6)
    assert draws_difference(a, b) == r  # seeded
    assert draws_difference(a, a)["ci_low"] == draws_difference(a, a)["ci_high"] == 0.0


def test_draws_difference_se_from_examples_alone():
    """Every draw gives the same predictions: only the test examples vary, and the bootstrap SE is the
    paired per-example one, sqrt(var(a_i - b_i) / N)."""
    rng = np.random.default_rng(2)
    row_a, row_b = _correct(rng, 1, 4000, 0.85), _correct(rng, 1, 4000, 0.82)
    a, b = np.repeat(row_a, 30, axis=0), np.repeat(row_b, 30, axis=0)
    d = row_a[0].astype(float) - row_b[0].astype(float)
    r = draws_difference(a, b, draws=4000)
    assert r["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(d.size), rel=0.08)


def test_draws_difference_se_from_draws_alone():
    """Each draw's classifier is right or wrong on every example alike: only the draws vary, and the SE
    is that of a mean over draws, sd(row differences) / sqrt(D)."""
    rng = np.random.default_rng(3)
    rows = 60
    a = np.repeat(rng.random((rows, 1)) < 0.7, 50, axis=1)
    b = np.repeat(rng.random((rows, 1)) < 0.5, 50, axis=1)
    d = a[:, 0].astype(float) - b[:, 0].astype(float)
    r = draws_difference(a, b, draws=4000)
    assert r["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(rows), rel=0.08)


def test_draws_difference_covers_the_truth():
    """Simulated probes: per-example difficulty shared by the arms, per-draw noise; the true difference
    is known. The 95% interval covers it in most of 40 experiments (binomial: >= 33 of 40) with 50 draws
    (a percentile bootstrap over only ~12 draws covers ~88%: the probe uses 50 or more)."""
    rng = np.random.default_rng(4)
    def expit(x):
        return 1 / (1 + np.exp(-x))
    e = rng.normal(1.5, 1.0, 400_000)  # the truth: over examples and draws (shifts included)
    truth = float(np.mean(expit(e + rng.normal(0.1, 0.3, e.size)) - expit(e + rng.normal(0.0, 0.3, e.size))))
    hits = 0
    for _ in range(40):
        ease = rng.normal(1.5, 1.0, size=800)  # logit of being right, per test example
        shift_a, shift_b = rng.normal(0.1, 0.3, size=(50, 1)), rng.normal(0.0, 0.3, size=(50, 1))
        pa, pb = expit(ease + shift_a), expit(ease + shift_b)
        u = rng.random((50, 800))
        a, b = u < pa, u < pb  # common random numbers: the arms agree where both are likely right
        r = draws_difference(a, b)
        hits += r["ci_low"] <= truth <= r["ci_high"]
    assert hits >= 33


@pytest.mark.parametrize("call, message", [
    (lambda: draws_difference(np.ones((3, 4), bool), np.ones((3, 5), bool)), "one shape"),
    (lambda: draws_difference(np.ones((3, 4)), np.ones((3, 4))), "boolean"),
    (lambda: draws_difference(np.ones(4, bool), np.ones(4, bool)), "draws, examples"),
    (lambda: draws_difference(np.ones((1, 4), bool), np.ones((1, 4), bool)), "at least 2 draws"),
    (lambda: draws_difference(np.ones((3, 4), bool), np.ones((3, 4), bool), draws=10), ">= 2000"),
])
def test_draws_difference_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
