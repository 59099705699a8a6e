"""Statistics of a comparison over paired seeds: mean and spread of one variant, the paired
difference of two with its t interval, and a verdict that says only what the interval supports.

Pure Python (no scipy): the values are AP in percent, one per seed, a handful of them.
"""

import math
import statistics
from typing import Dict, Sequence

__all__ = [
    "t_quantile",
    "t_half_width",
    "mean_sd",
    "paired_difference",
    "describe",
    "spread",
]


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t distribution with ``df`` >= 1 degrees of
    freedom: the CDF, integrated from the density with Simpson's rule, inverted by bisection
    (accurate to about 1e-6)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        ys = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (ys[0] + ys[-1] + 4 * sum(ys[1:-1:2]) + 2 * sum(ys[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_sd(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "sd", "n"}`` of ``values``: sd is the sample standard deviation (n - 1),
    NaN for one value; both NaN if a value is NaN (COCO's APs of a set without small objects)."""
    values = list(values)
    if any(v != v for v in values):
        return {"mean": float("nan"), "sd": float("nan"), "n": len(values)}
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def t_half_width(sd: float, n: int, confidence: float = 0.95) -> float:
    """Half the width of the ``confidence`` t interval of a mean of ``n`` values with sample
    standard deviation ``sd``: t((1 + confidence) / 2, n - 1) * sd / sqrt(n); NaN for n < 2."""
    if n < 2:
        return float("nan")
    return t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """The paired differences ``d_k = a_k - b_k`` (seed k of both) and their mean's
    ``confidence`` interval from Student's t with n - 1 degrees of freedom.

    Returns:
        ``{"mean", "sd", "n", "ci_low", "ci_high", "diffs"}``, in the units of ``a`` and ``b``
        (NaN bounds for n = 1).

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must have the same, non-zero length: {len(a)}, {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    s = mean_sd(d)
    half = t_half_width(s["sd"], s["n"], confidence)
    return {**s, "ci_low": s["mean"] - half, "ci_high": s["mean"] + half, "diffs": d}


def describe(name_a: str, name_b: str, diff: dict, unit: str = "AP") -> str:
    """One sentence on a :func:`paired_difference` (95% interval) of ``name_a`` minus
    ``name_b``: what its interval supports, nothing more."""
    head = f"{name_a} - {name_b}: {diff['mean']:+.2f} {unit}"
    if diff["n"] < 2:
        return f"{head} with one seed: no interval, no conclusion."
    span = f"95% CI [{diff['ci_low']:+.2f}, {diff['ci_high']:+.2f}], {diff['n']} paired seeds"
    if diff["ci_low"] > 0:
        return f"{head} ({span}): {name_a} is better; the interval excludes 0."
    if diff["ci_high"] < 0:
        return f"{head} ({span}): {name_a} is worse; the interval excludes 0."
    return f"{head} ({span}): the interval includes 0, no difference shown."


def spread(values: Sequence[float]) -> Dict[str, float]:
    """``{"median", "q1", "q3", "min", "max", "n"}`` of ``values`` (quartiles by linear
    interpolation between the sorted values, ``statistics.quantiles(method="inclusive")``;
    for one value all equal it)."""
    values = sorted(values)
    if not values:
        raise ValueError("spread of no values")
    q1, _, q3 = (
        statistics.quantiles(values, n=4, method="inclusive")
        if len(values) > 1
        else [values[0]] * 3
    )
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": values[0],
        "max": values[-1],
        "n": len(values),
    }
