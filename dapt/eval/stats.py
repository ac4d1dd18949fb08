"""Uncertainty for evaluation numbers: intervals and paired tests, on numpy and scipy.special.

One test-set accuracy or one seed's macro-F1 is a point estimate; a claim that domain-adaptive
pretraining helps needs its error bars. This module gives:

    wilson_interval               accuracy (a binomial proportion) -> Wilson score interval
    bootstrap_macro_f1_interval   macro-F1 from a confusion matrix -> multinomial bootstrap interval
    mean_interval                 a metric over seeds -> mean, sample std, Student-t interval
    bounded_mean_interval         a [0, 1] metric over seeds -> mean, std, logit-t interval inside [0, 1]
    paired_difference             two arms over the same seeds -> mean difference, t interval
    mcnemar_exact                 two classifiers on the same examples -> exact McNemar p-value
    accuracy_difference_interval  two classifiers on the same examples -> paired accuracy difference
    draws_difference              two feature sets, many label draws, the same examples -> mean accuracy
                                  difference with a two-way (draws x examples) bootstrap interval
    minimum_detectable_effect     a standard error -> the smallest true effect found with 80% power

The normal and Student-t quantiles (``normal_quantile``, ``t_quantile``) come from scipy's special
functions; McNemar's test sums binomial terms in exact integers. Intervals are two-sided and 95% by
default (``confidence=0.95``). Bad inputs raise ``ValueError`` with a message that says what was
wrong.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np
from scipy import special

__all__ = [
    "accuracy_difference_interval",
    "bootstrap_macro_f1_interval",
    "bounded_mean_interval",
    "draws_difference",
    "macro_f1_from_confusion",
    "mcnemar_exact",
    "mean_interval",
    "minimum_detectable_effect",
    "normal_quantile",
    "paired_difference",
    "t_quantile",
    "wilson_interval",
]

MIN_BOOTSTRAP_DRAWS = 2000
BOUNDED_METHOD = "logit t"  # bounded_mean_interval's method, as summaries name it
_LOG_FLOAT_MAX = math.log(sys.float_info.max)


# ---------------------------------------------------------------------------------------------
# input checks


def _check_confidence(confidence: float) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, Real):
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:  # also rejects NaN
        raise ValueError(f"confidence must be strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return confidence


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer count, got {value!r}")
    return int(value)


def _check_probability(p: float, name: str = "p") -> float:
    if isinstance(p, bool) or not isinstance(p, Real):
        raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {p!r}")
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"{name} must be a probability strictly between 0 and 1, got {p!r}")
    return p


def _two_sided_z(confidence: float) -> float:
    confidence = _check_confidence(confidence)
    return normal_quantile(0.5 + confidence / 2.0)


def _as_values(values: Sequence[float], name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_correct(values: Sequence[bool], name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of booleans (one per example), got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and (arr.dtype.kind not in "iuf" or not np.all((arr == 0) | (arr == 1))):
        raise ValueError(f"{name} must hold booleans (or 0/1), one per example: was each prediction correct")
    return arr.astype(bool)


# ---------------------------------------------------------------------------------------------
# quantiles


def normal_quantile(p: float) -> float:
    """The standard normal quantile z with P(Z <= z) = p, for 0 < p < 1 (scipy's ndtri)."""
    return float(special.ndtri(_check_probability(p)))


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile t with P(T_df <= t) = p, for 0 < p < 1 and df > 0 (need not be whole).

    Needed for confidence intervals of a mean over a handful of seeds, where the normal quantile
    is far too narrow (df=2: 4.30 against 1.96). df=inf gives the normal quantile.
    """
    p = _check_probability(p)
    if isinstance(df, bool) or not isinstance(df, Real) or math.isnan(df) or df <= 0:
        raise ValueError(f"df (degrees of freedom) must be a positive number, got {df!r}")
    df = float(df)
    if p == 0.5:
        return 0.0
    # Work with the smaller tail probability q (exact in floating point) and the sign.
    sign, q = (-1.0, p) if p < 0.5 else (1.0, 1.0 - p)
    if math.isinf(df):
        return -sign * normal_quantile(q)
    return sign * _t_upper_quantile(q, df)


def _t_upper_quantile(q: float, df: float) -> float:
    """t > 0 with P(T_df > t) = q, for 0 < q < 0.5, from the inverse regularized incomplete beta.

    P(T_df > t) = I_x(df/2, 1/2) / 2 at x = df / (df + t^2). Not scipy's stdtrit, which is off
    in the far tails (inf at df=10, p=1e-300; 2x at df=3, p=1e-200) and near p=0.5 (df=4).
    """
    a = df / 2.0
    x = float(special.betaincinv(a, 0.5, 2.0 * q))
    if x < 1e-300:
        # scipy clamps x at the smallest normal float: solve the leading term instead,
        # I_x(a, 1/2) = x^a / (a B(a, 1/2)) (1 + O(x)), in logs; t^2 = df / x may overflow.
        log_x = (math.log(2.0 * q) + math.log(a) + float(special.betaln(a, 0.5))) / a
        log_t = 0.5 * (math.log(df) - log_x)
        return math.inf if log_t > _LOG_FLOAT_MAX else math.exp(log_t)
    y = float(special.betainccinv(0.5, a, 2.0 * q))  # 1 - x = t^2 / (df + t^2), without cancellation
    return math.sqrt(df * y / x)


# ---------------------------------------------------------------------------------------------
# accuracy and macro-F1


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion, e.g. test accuracy = correct / n.

    Unlike the Wald interval it stays inside [0, 1] and keeps near-nominal coverage at accuracies
    near 0 or 1 and at small n. 0 successes gives a lower bound of exactly 0, n successes an
    upper bound of exactly 1.
    """
    successes = _check_count(successes, "successes")
    n = _check_count(n, "n")
    if n == 0:
        raise ValueError("wilson_interval needs n > 0 trials (an interval for 0 examples is undefined)")
    if successes > n:
        raise ValueError(f"successes ({successes}) cannot exceed n ({n})")
    z = _two_sided_z(confidence)
    phat = successes / n
    z2n = z * z / n
    center = (phat + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(phat * (1.0 - phat) / n + z2n / (4.0 * n))
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _as_confusion(confusion: list[list[int]] | np.ndarray) -> np.ndarray:
    try:
        arr = np.asarray(confusion)
    except ValueError as exc:  # ragged rows
        raise ValueError(f"confusion must be a square matrix of counts: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"confusion must be a non-empty square matrix (rows true, columns predicted), "
                         f"got shape {arr.shape}")
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise ValueError(f"confusion must hold integer counts, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise ValueError("confusion must hold whole-number counts")
    if np.any(arr < 0):
        raise ValueError("confusion counts must be non-negative")
    arr = arr.astype(np.int64)
    if arr.sum() == 0:
        raise ValueError("confusion is all zeros: no examples to score")
    return arr


def _macro_f1(counts: np.ndarray) -> np.ndarray:
    """Macro-F1 over the last two axes (rows true, columns predicted); leading axes are batch."""
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    denom = counts.sum(axis=-2) + counts.sum(axis=-1)  # (TP + FP) + (TP + FN) = 2TP + FP + FN
    f1 = np.divide(2.0 * tp, denom, out=np.zeros(denom.shape, dtype=float), where=denom > 0)
    return f1.mean(axis=-1)


def macro_f1_from_confusion(confusion: list[list[int]] | np.ndarray) -> float:
    """Macro-F1 from a confusion matrix (rows true labels, columns predicted labels).

    Per-class F1 = 2TP / (2TP + FP + FN), and 0 where that denominator is 0 (a class never
    predicted and never present), as scikit-learn's zero_division=0 and dapt.eval.metrics.
    """
    return float(_macro_f1(_as_confusion(confusion)))


def bootstrap_macro_f1_interval(confusion: list[list[int]] | np.ndarray, draws: int = 2000,
                                seed: int = 0, confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval for macro-F1, resampling the confusion matrix itself.

    Macro-F1 is not a proportion, so there is no closed-form interval. Each draw is a multinomial
    over the cells (n = total count, p = cell counts / n), i.e. the test set resampled with
    replacement, which needs only the (all-reduced) confusion counts, never the examples. Draws
    use numpy's Generator(PCG64(seed)), so a fixed seed gives the same interval; memory is
    draws x classes^2 integers. At least 2000 draws: fewer make the 2.5%/97.5% percentiles noisy.
    """
    counts = _as_confusion(confusion)
    draws = _check_count(draws, "draws")
    if draws < MIN_BOOTSTRAP_DRAWS:
        raise ValueError(f"draws must be at least {MIN_BOOTSTRAP_DRAWS} for stable percentile "
                         f"intervals, got {draws}")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    confidence = _check_confidence(confidence)
    k = counts.shape[0]
    n = int(counts.sum())
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    resampled = rng.multinomial(n, counts.ravel() / n, size=draws).reshape(draws, k, k)
    scores = _macro_f1(resampled)
    tail = (1.0 - confidence) / 2.0
    low, high = np.percentile(scores, [100.0 * tail, 100.0 * (1.0 - tail)])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# means over seeds


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample standard deviation (ddof=1) and Student-t interval of a metric over runs.

    For a handful of seeds the t quantile (df = n - 1) is what makes the interval honest.
    Returns {"n", "mean", "std", "ci_low", "ci_high"}. With n = 1 there is no spread to estimate:
    "std", "ci_low" and "ci_high" are None (not NaN), so reports print them as missing.
    """
    arr = _as_values(values, "values")
    confidence = _check_confidence(confidence)
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(arr.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def bounded_mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std and a Student-t interval of the mean of a [0, 1] metric (accuracy, F1) over
    runs, built on the logit scale so that it stays inside [0, 1].

    The plain t interval mean +- t(n-1) s / sqrt(n) ignores the bound: two seeds at 0.9967 and
    0.9767 give [0.8596, 1.1137]. Here the same t quantile and the same s are used on the logit
    scale, with the delta-method standard error of logit(mean), and mapped back:

        L = logit(mean),  h = t(n-1) * s / (sqrt(n) * mean * (1 - mean)),  [expit(L - h), expit(L + h)]

    It always contains the mean (it is centred on logit(mean)), lies inside (0, 1) and is longer on
    the side away from the bound. Its bounds differ from the plain t interval's by
    |1 - 2 mean| half^2 / (2 mean (1 - mean)) + O(half^3) (half = the plain t half-width): for many
    seeds far from 0 and 1 it is the usual t interval. Why not a bootstrap: with a handful of seeds a
    percentile bootstrap cannot reach past the smallest and largest seed (at n = 2 it is [min, max],
    about 50% coverage); the t quantile is what keeps few-seed intervals honest. Why logit(mean) and
    not the mean of the per-seed logits: the latter is centred on a different average and need not
    contain the mean; and a per-seed value of exactly 0 or 1 would need a continuity adjustment.
    Here none is needed: when the values differ the mean lies strictly inside (0, 1); when they are
    all equal (s = 0, e.g. every seed at 1.0) the interval is the point [mean, mean], as the plain t
    interval's.

    Returns {"n", "mean", "std", "ci_low", "ci_high", "method"}; with n = 1 "std", "ci_low" and
    "ci_high" are None (no spread to estimate), as mean_interval. Values outside [0, 1] raise
    ValueError.
    """
    arr = _as_values(values, "values")
    confidence = _check_confidence(confidence)
    if np.any((arr < 0.0) | (arr > 1.0)):
        raise ValueError(f"values must lie in [0, 1] (accuracies, F1 scores), got {arr.min():g} .. {arr.max():g}")
    result = mean_interval(arr, confidence)
    result["method"] = BOUNDED_METHOD
    if result["n"] == 1:
        return result
    mean, std, n = result["mean"], result["std"], result["n"]
    if std == 0.0 or not 0.0 < mean < 1.0:  # all runs equal: no spread, the point
        result["ci_low"] = result["ci_high"] = mean
        return result
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * std / (math.sqrt(n) * mean * (1.0 - mean))
    centre = math.log(mean) - math.log1p(-mean)
    low, high = float(special.expit(centre - half)), float(special.expit(centre + half))
    # expit rounds to exactly 0 or 1 far out; min/max keep the mean inside against any last-bit rounding
    result["ci_low"], result["ci_high"] = min(low, mean), max(high, mean)
    return result


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of a - b over paired runs (two arms run on the same seeds) with its t interval.

    Pairing removes the seed-to-seed variation the arms share, so it is much tighter than
    comparing two independent means. Returns {"n", "mean", "std", "ci_low", "ci_high"} about the
    differences (as mean_interval; None for std and the interval when n = 1), plus "mean_a" and
    "mean_b".
    """
    arr_a = _as_values(a, "a")
    arr_b = _as_values(b, "b")
    if arr_a.size != arr_b.size:
        raise ValueError(f"paired_difference needs one value per seed in both arms: "
                         f"len(a)={arr_a.size} != len(b)={arr_b.size}")
    result = mean_interval(arr_a - arr_b, confidence)
    result["mean_a"] = float(arr_a.mean())
    result["mean_b"] = float(arr_b.mean())
    n = result["n"]
    result["mde"] = (None if n == 1 else
                     minimum_detectable_effect(result["std"] / math.sqrt(n), df=n - 1, confidence=confidence))
    return result


def minimum_detectable_effect(se: float, df: float | None = None, confidence: float = 0.95,
                              power: float = 0.8) -> float:
    """The smallest true effect that a two-sided test at level 1 - confidence detects with probability
    `power`, for an estimate with standard error `se`: (q(0.5 + confidence / 2) + q(power)) * se.

    q is Student's t quantile on `df` degrees of freedom (a mean over n paired seeds: df = n - 1) or the
    normal one (df None: many test examples, a bootstrap). At 95% and 80% power: 2.80 se (normal), 5.36 se
    for 3 seeds (df 2), 3.72 se for 5, 3.15 se for 10. An estimate whose MDE exceeds the effect one looks
    for cannot tell that effect from none.
    """
    if not (isinstance(se, Real) and math.isfinite(se) and se >= 0):
        raise ValueError(f"se must be a finite number >= 0, got {se!r}")
    confidence = _check_confidence(confidence)
    if not (isinstance(power, Real) and 0.0 < power < 1.0):
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if df is None:
        return (normal_quantile(0.5 + confidence / 2.0) + normal_quantile(power)) * float(se)
    if not (isinstance(df, Real) and df > 0):
        raise ValueError(f"df must be > 0 (n - 1 for n paired seeds), got {df!r}")
    return (t_quantile(0.5 + confidence / 2.0, df) + t_quantile(power, df)) * float(se)


# ---------------------------------------------------------------------------------------------
# two classifiers on the same test examples


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    b = examples the first classifier got right and the second wrong, c = the reverse. Under the
    null both are equally likely, so min(b, c) is Binomial(b + c, 1/2):
    p = min(1, 2 * P(X <= min(b, c))), and 1.0 when b + c == 0. Summed in exact integer
    arithmetic, so b + c in the tens of thousands is fine.
    """
    b = _check_count(b, "b")
    c = _check_count(c, "c")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    if 2 * k >= n:  # b == c: the two tails cover everything
        return 1.0
    term, total = 1, 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)
        total += term
    return min(1.0, (2 * total) / (1 << n))  # int / int is correctly rounded, even when huge


def accuracy_difference_interval(correct_a: Sequence[bool], correct_b: Sequence[bool],
                                 confidence: float = 0.95) -> dict:
    """Difference of two classifiers' accuracies on the same examples, with a paired interval.

    diff = acc_a - acc_b = (b - c) / n, where b = examples only A got right and c = only B got
    right. The Wald interval for paired proportions uses the variance from the discordant counts,
    ((b + c) - (b - c)^2 / n) / n^2, which is much tighter than treating the accuracies as
    independent; it is clipped to [-1, 1]. Returns {"diff", "ci_low", "ci_high", "b", "c", "n",
    "acc_a", "acc_b", "mcnemar_p"} (mcnemar_p from mcnemar_exact(b, c)).
    """
    arr_a = _as_correct(correct_a, "correct_a")
    arr_b = _as_correct(correct_b, "correct_b")
    if arr_a.size != arr_b.size:
        raise ValueError(f"correct_a and correct_b must cover the same examples: "
                         f"len {arr_a.size} != {arr_b.size}")
    n = int(arr_a.size)
    if n == 0:
        raise ValueError("accuracy_difference_interval needs at least one example")
    z = _two_sided_z(confidence)
    b = int(np.count_nonzero(arr_a & ~arr_b))
    c = int(np.count_nonzero(~arr_a & arr_b))
    diff = (b - c) / n
    variance = max(0.0, ((b + c) - (b - c) ** 2 / n) / n**2)
    half = z * math.sqrt(variance)
    return {
        "diff": diff,
        "ci_low": max(-1.0, diff - half),
        "ci_high": min(1.0, diff + half),
        "b": b,
        "c": c,
        "n": n,
        "acc_a": int(np.count_nonzero(arr_a)) / n,
        "acc_b": int(np.count_nonzero(arr_b)) / n,
        "mcnemar_p": mcnemar_exact(b, c),
        "mde": minimum_detectable_effect(math.sqrt(variance), confidence=confidence),
    }


def draws_difference(correct_a: np.ndarray, correct_b: np.ndarray, draws: int = MIN_BOOTSTRAP_DRAWS,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean accuracy difference a - b of two feature sets (e.g. two encoders under a linear probe),
    each trained on the same D label draws and scored on the same N test examples.

    correct_a, correct_b: (D, N) booleans, row d = the classifier of draw d, column i = test example i.
    The estimate averages over draws and examples. Its interval is a percentile bootstrap that resamples
    draws and examples independently (a two-way bootstrap), so it covers both what another draw of
    training labels and what another test set would change; pairing (the same draw and example in both
    arms) removes what the arms share. "se" is the bootstrap standard deviation and "mde" the minimum
    detectable effect at 80% power from it (normal quantiles: D and N are large). Use 50 or more draws: with
    ~12 the percentile interval covers ~88% instead of 95% (simulated in tests/test_stats.py).
    Returns {"diff", "ci_low", "ci_high", "se", "mde", "acc_a", "acc_b", "n_draws", "n_examples", "draws"}.
    """
    a = np.asarray(correct_a)
    b = np.asarray(correct_b)
    if a.dtype != bool or b.dtype != bool or a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must be boolean arrays of one shape (draws, examples), "
                         f"got {a.dtype} {a.shape} and {b.dtype} {b.shape}")
    n_draws, n_examples = a.shape
    if n_draws < 2 or n_examples < 2:
        raise ValueError(f"draws_difference needs at least 2 draws and 2 examples, got {a.shape}")
    confidence = _check_confidence(confidence)
    draws = _check_count(draws, "draws")
    if draws < MIN_BOOTSTRAP_DRAWS:
        raise ValueError(f"draws must be >= {MIN_BOOTSTRAP_DRAWS} for a percentile interval, got {draws}")
    diff = a.astype(np.float64) - b.astype(np.float64)  # (D, N) in {-1, 0, 1}
    rng = np.random.default_rng(seed)
    stats = np.empty(draws)
    chunk = max(1, 2_000_000 // n_examples)  # bounded memory: (chunk, N) floats at a time
    for start in range(0, draws, chunk):
        k = min(chunk, draws - start)
        w = rng.multinomial(n_draws, np.full(n_draws, 1.0 / n_draws), size=k)  # (k, D) draw counts
        v = rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=k)  # (k, N)
        stats[start:start + k] = np.einsum("kn,kn->k", w @ diff, v) / (n_draws * n_examples)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    se = float(stats.std(ddof=1))
    return {"diff": float(diff.mean()), "ci_low": float(low), "ci_high": float(high), "se": se,
            "mde": minimum_detectable_effect(se, confidence=confidence), "acc_a": float(a.mean()),
            "acc_b": float(b.mean()), "n_draws": int(n_draws), "n_examples": int(n_examples), "draws": draws}
