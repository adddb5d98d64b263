"""95% intervals that respect how evaluation samples are drawn.

An evaluation draws ``samples_per_prompt`` samples for each caption: the draws of one caption share the caption's
difficulty, so they are correlated, and the unit of independent replication is the caption (and, across training
runs, the seed). Resampling individual samples treats 60 captions × 4 draws as 240 independent draws and
under-covers (`tests/test_intervals.py` measures it); the cluster bootstrap resamples whole captions — and when runs
of several seeds are pooled, seeds and captions independently (a two-way bootstrap: the same captions are
evaluated under every seed, so a caption's effect is shared across seeds).

* `bootstrap_ci`: percentile bootstrap of the mean of independent values (e.g. validation pairs of Table 2).
* `cluster_bootstrap_ci`: the same with whole clusters resampled — ``clusters`` labels each value's caption,
  ``groups`` (optional) its seed. A replicate draws caption weights v_c and seed weights w_s (multinomial counts)
  and reports Σ_{s,c} w_s v_c S[s,c] / Σ_{s,c} w_s v_c N[s,c], S/N = per-(seed, caption) sums/counts.
* `caption_clusters`: the caption label of each row of a caption-major evaluation.
* A value of −inf (a log-density reward of a diverged sample) makes the mean −inf in the replicates that draw it
  and in no other (`weighted_sums`), and the interval takes the nearest order statistic at its ends
  (`percentile_interval`): nothing becomes NaN.
* `t_interval`: mean and Student-t 95% interval over seeds (one number per seed), cut to the metric's range
  (`metric_range`: a win rate or an accuracy lies in [0, 1], a KL, a diversity or a cost is ≥ 0). With three seeds
  the t-interval of a rate can reach past 0 or 1; the true value cannot, so the interval intersected with the range
  covers it at least as often as the uncut one.
"""

from __future__ import annotations

import math

import numpy as np


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates: the percentile 95% interval.

    Linear interpolation between order statistics, as ``np.percentile``; when a replicate is infinite (a mean over a
    −inf reward, `weighted_sums`) the nearest order statistic instead, since interpolating between −inf and a
    finite value is undefined (NaN)."""
    replicates = np.asarray(replicates, dtype=np.float64)
    method = "linear" if np.isfinite(replicates).all() else "nearest"
    return float(np.percentile(replicates, 2.5, method=method)), float(np.percentile(replicates, 97.5, method=method))


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of independent values."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(1)
    return percentile_interval(means)


def caption_clusters(n_rows: int, samples_per_prompt: int) -> np.ndarray:
    """(n_rows,) caption index of each row: rows are caption-major, ``samples_per_prompt`` consecutive per caption."""
    return np.arange(n_rows) // samples_per_prompt


def cluster_weights(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """(n, k) multinomial counts: how often each of k clusters is drawn in each of n bootstrap replicates."""
    idx = rng.integers(0, k, size=(n, k))
    w = np.zeros((n, k))
    np.add.at(w, (np.repeat(np.arange(n), k), idx.ravel()), 1.0)
    return w


def weighted_sums(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``weights @ values`` in which a term of weight 0 is 0 even when its value is ±inf (0 · ∞ := 0).

    A reward can be −inf (toy2d's gold reward is a log-density; a diverged sample far from every mode underflows
    it). A bootstrap replicate that leaves such a caption out must keep a finite mean, and one that draws it has
    mean −inf; the plain product would turn both into NaN (0 · −inf). With every value finite this *is*
    ``weights @ values``, the same bits.

    Args:
        weights: (B, K) or (K,) non-negative weights (multinomial counts, order-statistic weights).
        values: (K,) or (K, M).

    Returns:
        ``weights @ values``: (B,), (B, M), (M,) or a scalar.
    """
    weights, values = np.asarray(weights, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if np.isfinite(values).all():
        return weights @ values
    w = np.atleast_2d(weights)  # (B, K)
    v = values.reshape(len(values), -1)  # (K, M)
    finite = np.isfinite(v)
    out = w @ np.where(finite, v, 0.0)  # (B, M): the finite terms
    for k, m in zip(*np.nonzero(~finite)):  # each infinite (or NaN) value joins the sums that weight it
        out[:, m] = np.where(w[:, k] != 0, out[:, m] + v[k, m], out[:, m])
    return out.reshape(w.shape[:1] + values.shape[1:]) if weights.ndim == 2 else out.reshape(values.shape[1:])


def cluster_bootstrap_means(
    values: np.ndarray, clusters: np.ndarray, groups: np.ndarray | None = None, n: int = 1000, seed: int = 0
) -> np.ndarray:
    """(n,) bootstrap replicates of the mean of ``values`` resampling whole clusters (and groups, module docstring)."""
    values = np.asarray(values, dtype=np.float64)
    _, c = np.unique(np.asarray(clusters), return_inverse=True)
    _, g = np.unique(np.zeros(len(values)) if groups is None else np.asarray(groups), return_inverse=True)
    n_g, n_c = int(g.max()) + 1, int(c.max()) + 1
    sums, counts = np.zeros((n_g, n_c)), np.zeros((n_g, n_c))  # (S, C)
    np.add.at(sums, (g, c), values)
    np.add.at(counts, (g, c), 1.0)
    rng = np.random.default_rng(seed)
    v = cluster_weights(rng, n, n_c)  # (n, C) caption weights
    w = cluster_weights(rng, n, n_g) if n_g > 1 else np.ones((n, 1))  # (n, S) seed weights
    den = np.einsum("bs,sc,bc->b", w, counts, v)
    if np.isfinite(sums).all():
        num = np.einsum("bs,sc,bc->b", w, sums, v)
    else:  # an infinite value counts only in the replicates that draw its (seed, caption): `weighted_sums`
        num = weighted_sums((w[:, :, None] * v[:, None, :]).reshape(n, -1), sums.ravel())
    return num / np.maximum(den, 1e-300)


def cluster_bootstrap_ci(
    values: np.ndarray, clusters: np.ndarray, groups: np.ndarray | None = None, n: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile 95% interval of the mean, resampling whole ``clusters`` (captions) and ``groups`` (seeds)."""
    if len(values) == 0:
        return float("nan"), float("nan")
    means = cluster_bootstrap_means(values, clusters, groups, n, seed)
    return percentile_interval(means)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% Student-t quantiles by degrees of freedom (≥ 11: scipy-free approximation below)."""


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table above, then the Cornish–Fisher expansion (error < 1e-3 for df ≥ 11)."""
    if df in T_975:
        return T_975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


_UNIT = ("win_rate", "_acc", "s8_p_")  # "_acc": implicit_acc and reward_acc_*
_NONNEGATIVE = ("kl", "diversity", "distance", "nfe", "queries", "wall_s", "updates", "best_of_n_equivalent", "draws")


def metric_range(key: str | None) -> tuple[float, float]:
    """The values an evaluation metric named ``key`` can take (as `evaluate` names them, with or without a
    ``heldout_`` prefix): [0, 1] for win rates, accuracies and probabilities, [0, ∞) for KLs, diversities, costs and
    draw counts, the real line otherwise (rewards, margins) and for ``None``."""
    if key is None:
        return -math.inf, math.inf
    if any(u in key for u in _UNIT):
        return 0.0, 1.0
    if any(n in key for n in _NONNEGATIVE):
        return 0.0, math.inf
    return -math.inf, math.inf


def t_interval(values: list[float] | np.ndarray, key: str | None = None) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t 95% interval of the mean over seeds, cut to `metric_range` of ``key`` (the
    metric's name; None: not cut); a single seed gives (x, nan, nan)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = t_quantile(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))
    low, high = metric_range(key)
    return m, max(m - half, low), min(m + half, high)
