"""Intervals: the caption-cluster bootstrap covers at its nominal level on correlated samples; the per-sample one
does not; the two-way (seed × caption) bootstrap and the t-interval over seeds."""

import numpy as np
import pytest

from rlkit_diffusion.intervals import (
    bootstrap_ci,
    caption_clusters,
    cluster_bootstrap_ci,
    cluster_bootstrap_means,
    cluster_weights,
    metric_range,
    percentile_interval,
    t_interval,
    t_quantile,
    weighted_sums,
)


def _simulate_wins(rng, reps: int, captions: int, draws: int, a: float = 0.3, sd: float = 1.5):
    """Win outcomes with a caption random effect: P(win | caption) = σ(a + u_c), u_c ~ N(0, sd²). Returns the
    (reps, captions, draws) outcomes and the true win rate E_u[σ(a + u)] (Gauss–Hermite)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    truth = float((w / w.sum()) @ (1 / (1 + np.exp(-(a + sd * x)))))
    p = 1 / (1 + np.exp(-(a + rng.normal(0, sd, (reps, captions, 1)))))
    return (rng.random((reps, captions, draws)) < p).astype(np.float64), truth


def _coverage(y: np.ndarray, truth: float, per_caption: bool, rng, boot: int = 1000) -> tuple[float, float]:
    """Coverage and mean width of percentile intervals over the replications (vectorised `cluster_bootstrap_means`:
    one weight matrix per replication batch; equal cluster sizes make the weighted mean a matrix product)."""
    reps, k, m = y.shape
    units = y.mean(2) if per_caption else y.reshape(reps, k * m)  # (reps, units)
    w = cluster_weights(rng, boot, units.shape[1])  # (boot, units)
    means = w @ units.T / units.shape[1]  # (boot, reps)
    lo, hi = np.percentile(means, 2.5, 0), np.percentile(means, 97.5, 0)
    return float(np.mean((lo <= truth) & (truth <= hi))), float(np.mean(hi - lo))


def test_vectorised_formula_is_cluster_bootstrap_means():
    rng = np.random.default_rng(3)
    y = rng.random(60 * 4)
    clusters = caption_clusters(len(y), 4)
    got = cluster_bootstrap_means(y, clusters, n=200, seed=7)
    w = cluster_weights(np.random.default_rng(7), 200, 60)
    np.testing.assert_allclose(got, w @ y.reshape(60, 4).mean(1) / 60, rtol=1e-12)


def test_caption_bootstrap_covers_and_per_sample_bootstrap_undercovers():
    rng = np.random.default_rng(0)
    y, truth = _simulate_wins(rng, reps=2000, captions=60, draws=4)
    cov_caption, width_caption = _coverage(y, truth, per_caption=True, rng=rng)
    cov_sample, width_sample = _coverage(y, truth, per_caption=False, rng=rng)
    assert 0.93 <= cov_caption <= 0.97, cov_caption
    assert cov_sample < 0.88, cov_sample  # the old interval: ~83% at nominal 95%
    assert width_caption > 1.2 * width_sample


def test_two_way_bootstrap_covers_with_a_seed_effect():
    """Runs of 5 seeds on the same 40 captions: a caption effect shared by the seeds and a seed effect. Resampling
    captions and seeds covers; resampling captions alone does not (it ignores the seed-to-seed variation)."""
    rng = np.random.default_rng(1)
    reps, seeds, k, m = 400, 5, 40, 2
    hits_two, hits_caption = 0, 0
    for _ in range(reps):
        v = rng.normal(0, 1.0, (1, k, 1)) + rng.normal(0, 0.5, (seeds, 1, 1)) + rng.normal(0, 1.0, (seeds, k, m))
        groups = np.repeat(np.arange(seeds), k * m)
        clusters = np.tile(np.repeat(np.arange(k), m), seeds)
        lo, hi = cluster_bootstrap_ci(v.ravel(), clusters, groups, n=400, seed=int(rng.integers(1 << 30)))
        hits_two += lo <= 0.0 <= hi
        lo, hi = cluster_bootstrap_ci(v.ravel(), clusters, n=400, seed=int(rng.integers(1 << 30)))
        hits_caption += lo <= 0.0 <= hi
    assert hits_two / reps >= 0.88, hits_two / reps  # percentile bootstrap with 5 seeds is slightly liberal
    assert hits_caption / reps < hits_two / reps - 0.1


def test_cluster_bootstrap_point_and_degenerate_cases():
    y = np.array([1.0, 1.0, 0.0, 0.0])
    lo, hi = cluster_bootstrap_ci(y, caption_clusters(4, 2), n=500)
    assert lo == 0.0 and hi == 1.0  # two clusters with means 1 and 0
    assert np.isnan(cluster_bootstrap_ci(np.array([]), np.array([]))[0])
    lo, hi = bootstrap_ci(np.full(10, 0.25))
    assert lo == hi == 0.25


def test_t_interval():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0
    assert hi - m == pytest.approx(4.303 * 1.0 / np.sqrt(3), rel=1e-6)
    assert np.isnan(t_interval([1.0])[1])
    assert t_quantile(30) == pytest.approx(2.042, abs=2e-3)
    assert t_quantile(100) == pytest.approx(1.984, abs=2e-3)


def test_t_interval_is_cut_to_the_metrics_range():
    """Three seeds' win rates 0.1, 0.5, 0.9: the t-interval reaches below 0 and above 1, the cut one stops at the
    range (the mean is unchanged); a KL stops at 0 only; a reward (no range) is not cut."""
    wins = [0.1, 0.5, 0.9]
    m, lo, hi = t_interval(wins)
    assert lo < 0.0 and hi > 1.0
    assert t_interval(wins, "win_rate_vs_base") == (m, 0.0, 1.0)
    assert t_interval(wins, "heldout_win_rate_vs_base")[1:] == (0.0, 1.0)
    kl = t_interval([1.0, 50.0, 300.0], "kl_to_ref")
    assert kl[1] == 0.0 and kl[2] == t_interval([1.0, 50.0, 300.0])[2]
    assert t_interval([-3.0, 0.0, 9.0], "gold_reward_trained") == t_interval([-3.0, 0.0, 9.0])
    assert metric_range("implicit_acc") == metric_range("reward_acc_proxy") == (0.0, 1.0)
    assert metric_range("s8_base_draws_for_half")[0] == 0.0 and metric_range("implicit_margin")[0] == -np.inf


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_minus_infinite_value_counts_only_where_it_is_drawn():
    """A −inf reward (toy2d's log-density gold reward of a diverged sample): a replicate that draws its caption has
    mean −inf, one that leaves it out stays finite, and no statistic becomes NaN (0 · −inf, −inf − −inf)."""
    rng = np.random.default_rng(0)
    weights = cluster_weights(rng, 200, 6)  # (200, 6) multinomial caption counts
    finite = rng.normal(size=(6, 3))
    assert np.array_equal(weighted_sums(weights, finite), weights @ finite)  # finite values: the same bits
    assert np.array_equal(weighted_sums(weights[0], finite[:, 0]), weights[0] @ finite[:, 0])
    values = finite[:, 0].copy()
    values[2] = -np.inf
    sums = weighted_sums(weights, values)  # (200,)
    drawn = weights[:, 2] > 0
    assert np.isneginf(sums[drawn]).all() and 0 < drawn.sum() < 200
    kept = np.delete(values, 2)
    assert np.allclose(sums[~drawn], np.delete(weights[~drawn], 2, axis=1) @ kept)

    rows = np.repeat(finite[:, 0], 4)  # (24,) 6 captions × 4 draws
    rows[9] = -np.inf  # one draw of caption 2
    lo, hi = cluster_bootstrap_ci(rows, caption_clusters(24, 4))
    assert lo == -np.inf and np.isfinite(hi)  # P(caption 2 not drawn) = (5/6)^6 ≈ 33%: the upper end is finite
    assert percentile_interval(np.array([-np.inf, 1.0, 2.0, 3.0])) == (-np.inf, 3.0)
    assert percentile_interval(np.arange(5.0)) == (float(np.percentile(np.arange(5.0), 2.5)), 3.9)
