"""The benchmark protocol: reporting and tuning seeds, aggregation over seeds, matched-KL comparison.

* Seeds. Every experiment reports ``REPORTING_SEEDS`` (0, 1, 2) unless told otherwise (``seeds=[..]`` or
  ``seeds=<count>``); tuning sweeps (`benchmarks.tune`) use ``TUNING_SEEDS`` (100, 101, ...), disjoint from them,
  so no reported number comes from the seed its settings were picked on.
* Aggregation (`aggregate`): runs are grouped by (world, algo, label, budget) — the configuration minus the seed.
  Each metric gets its mean over seeds and a Student-t 95% interval over seeds (`rlkit_diffusion.intervals.
  t_interval`); the win rate vs base is also pooled over every (seed, caption, draw) row of ``per_sample.npz`` with
  a two-way cluster bootstrap over captions and seeds (``pooled_win_rate``).
* Matched KL (`value_at_kl`): each run's path (the base at KL 0, its learning-curve evaluations, its final
  evaluation) is interpolated linearly to fixed KL-to-base levels; a level the run never reaches is NaN ("not
  reached"), never an extrapolation, and so is a level between two points too far apart to resolve it
  (`RESOLVE_RATIO`). Across seeds: mean and t-interval.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rlkit_diffusion.intervals import caption_clusters, cluster_bootstrap_ci, t_interval

REPORTING_SEEDS = (0, 1, 2)
"""Seeds every reported number is measured on (the default of every experiment)."""
TUNING_SEEDS = (100, 101, 102)
"""Seeds tuning sweeps run on — disjoint from the reporting seeds."""
KL_LEVELS = (25.0, 100.0, 400.0)
"""Default KL-to-base levels (nats) of the matched-KL comparison."""


def resolve_seeds(value: Any, default: tuple[int, ...] = REPORTING_SEEDS) -> list[int]:
    """``seeds=`` → a list: None = ``default``; an int n = the first n reporting seeds (0..n−1); a list as given.

    Reporting seeds may not be tuning seeds (ValueError): a number measured on the seed its settings were tuned on
    is optimistic."""
    if value is None:
        seeds = list(default)
    elif isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"seeds={value}: need at least one seed")
        seeds = list(range(value))
    else:
        seeds = [int(s) for s in value]
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds={seeds}: need distinct seeds")
    return seeds


def check_reporting_seeds(seeds: list[int]) -> None:
    clash = sorted(set(seeds) & set(TUNING_SEEDS))
    if clash:
        raise ValueError(f"seeds {clash} are tuning seeds ({list(TUNING_SEEDS)}); report on other seeds")


def budget_key(run: dict[str, Any]) -> str:
    """The run's training budget as text (``nfe=19200``, ``steps=300``), from its config."""
    cfg = run.get("config")
    if cfg is None:
        return ""
    kind = cfg.get("budget", {}).get("kind", "steps")
    amount = cfg.get("budget", {}).get("amount")
    if amount is None:
        return f"steps={cfg.get('train', {}).get('steps')}"
    return f"{kind}={amount:g}" if isinstance(amount, (int, float)) else f"{kind}={amount}"


def group_key(run: dict[str, Any]) -> tuple[str, str, str, str]:
    """(world, algo, label, budget): the configuration minus the seed."""
    e = run["eval"]
    return (e.get("world", "?"), e.get("algo", "?"), e.get("label") or "", budget_key(run))


def group_by_config(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], list[dict[str, Any]]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        out[group_key(r)].append(r)
    return {k: sorted(v, key=lambda r: r["eval"].get("seed", 0)) for k, v in sorted(out.items())}


def load_per_sample(run_dir: Path) -> dict[str, np.ndarray] | None:
    f = Path(run_dir) / "per_sample.npz"
    if not f.exists():
        return None
    with np.load(f) as z:
        return {k: z[k] for k in z.files}


def pooled_win_rate(runs: list[dict[str, Any]], split: str = "train", n: int = 1000, seed: int = 0, key: str = "wins"):
    """Win rate vs base pooled over the runs' (seed, caption, draw) rows: ``(mean, ci_low, ci_high)`` with the
    two-way cluster bootstrap (captions shared across seeds, seeds resampled too); None when a run has no
    ``per_sample.npz`` or no ``key`` rows in it (``wins``: under the evaluation's reward; ``proxy_wins``: the proxy's).
    """
    values, clusters, groups = [], [], []
    for g, r in enumerate(runs):
        rows = load_per_sample(r["dir"])
        if rows is None or f"{split}/{key}" not in rows:
            return None
        w = rows[f"{split}/{key}"].astype(np.float64)
        values.append(w)
        clusters.append(caption_clusters(len(w), int(rows["samples_per_prompt"])))
        groups.append(np.full(len(w), g))
    v = np.concatenate(values)
    lo, hi = cluster_bootstrap_ci(v, np.concatenate(clusters), np.concatenate(groups), n, seed)
    return float(v.mean()), lo, hi


def pooled_win_rates(runs: list[dict[str, Any]]) -> dict[str, tuple[float, float, float]]:
    """``{split: (mean, low, high)}`` of `pooled_win_rate` for the ``train`` and ``heldout`` splits the runs have."""
    out = {}
    for split in ("train", "heldout"):
        p = pooled_win_rate(runs, split)
        if p is not None:
            out[split] = p
    return out


def numeric_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Top-level numeric metrics of eval.json (not intervals, not bookkeeping)."""
    skip = ("_ci_low", "_ci_high", "_censored")
    keys = set()
    for r in runs:
        for k, v in r["eval"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith(skip):
                keys.add(k)
    return sorted(keys - {"seed", "schema_version"})


def aggregate(runs: list[dict[str, Any]], kl_levels: tuple[float, ...] = KL_LEVELS) -> list[dict[str, Any]]:
    """One row per configuration (module docstring): ``{world, algo, label, budget, seeds, metrics: {key: {mean,
    ci_low, ci_high, n}}, pooled_win_rate: {train, heldout}, matched_kl: {level: {gold, win_rate}}}``."""
    rows = []
    for (world, algo, label, budget), rs in group_by_config(runs).items():
        metrics = {}
        for k in numeric_keys(rs):
            m, lo, hi = t_interval([r["eval"].get(k) for r in rs], k)
            metrics[k] = {"mean": m, "ci_low": lo, "ci_high": hi, "n": sum(k in r["eval"] for r in rs)}
        pooled = {split: dict(zip(("mean", "ci_low", "ci_high"), p)) for split, p in pooled_win_rates(rs).items()}
        rows.append(
            {
                "world": world,
                "algo": algo,
                "label": label,
                "budget": budget,
                "seeds": [int(r["eval"].get("seed", 0)) for r in rs],
                "metrics": metrics,
                "pooled_win_rate": pooled,
                "matched_kl": matched_kl(rs, kl_levels),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------------
# Matched KL
# --------------------------------------------------------------------------------------------------------------
def kl_path(run: dict[str, Any]) -> dict[str, np.ndarray]:
    """A run's (KL, gold, win rate) path: the base (0, base gold, ½), each learning-curve evaluation in training
    order, then the final evaluation. Refuses a run whose KL is not a measured divergence (NaN: an inference-time
    procedure)."""
    e = run["eval"]
    kl_final = e.get("kl_to_ref", math.nan)
    if not math.isfinite(kl_final):
        raise ValueError(f"{e.get('algo')}: kl_to_ref is not measured (inference-time procedure): no matched-KL point")
    pts = [(0.0, e["gold_reward_base"], 0.5)]
    for m in run.get("metrics", []):
        if "eval/kl_to_ref" in m and "eval/gold_reward_trained" in m:
            pts.append((m["eval/kl_to_ref"], m["eval/gold_reward_trained"], m.get("eval/win_rate_vs_base", math.nan)))
    pts.append((kl_final, e["gold_reward_trained"], e["win_rate_vs_base"]))
    a = np.array(pts, dtype=np.float64)
    return {"kl": a[:, 0], "gold": a[:, 1], "win_rate": a[:, 2]}


RESOLVE_RATIO = 2.0
"""`value_at_kl` interpolates only between measured points within this factor of the level (or from the base)."""


def value_at_kl(kl: np.ndarray, values: np.ndarray, level: float, ratio: float = RESOLVE_RATIO) -> float:
    """``values`` linearly interpolated where the path first reaches ``level`` nats; NaN when it never does, and NaN
    when the two points around the level are too far apart to say what the path does there: the upper one above
    ``ratio`` × level, or the lower one below level / ``ratio`` unless it is the base (KL 0, known exactly). A run
    whose first evaluation is already at 600 nats has no measured value at 25 nats — the straight line from the base
    is not one (found by review: SFT's "gold at 25 nats" was that chord)."""
    for i in range(1, len(kl)):
        lo, hi = kl[i - 1], kl[i]
        if not lo <= level <= hi:
            continue
        if hi > ratio * level or (lo > 0 and lo < level / ratio):
            return math.nan
        if hi > lo:
            return float(values[i - 1] + (level - lo) / (hi - lo) * (values[i] - values[i - 1]))
        return float(values[i])
    return math.nan


def matched_kl(runs: list[dict[str, Any]], levels: tuple[float, ...] = KL_LEVELS) -> dict[str, dict[str, Any]]:
    """Per KL level: gold reward and win rate interpolated on each seed's path, mean and t-interval over the seeds
    that reach it (``reached`` = how many); {} when the runs have no measured KL."""
    try:
        paths = [kl_path(r) for r in runs]
    except ValueError:
        return {}
    out = {}
    for level in levels:
        cell: dict[str, Any] = {}
        for name in ("gold", "win_rate"):
            vals = [value_at_kl(p["kl"], p[name], level) for p in paths]
            m, lo, hi = t_interval(vals, name)
            cell[name] = {"mean": m, "ci_low": lo, "ci_high": hi}
            cell["reached"] = sum(math.isfinite(v) for v in vals)
        out[f"{level:g}"] = cell
    return out


def fmt_ci(cell: dict[str, float] | None, fmt: str = "{:.3f}") -> str:
    """``mean [lo, hi]`` (``mean`` alone for one seed, ``–`` for nothing)."""
    if not cell or cell.get("mean") is None or not math.isfinite(cell["mean"]):
        return "–"
    if not math.isfinite(cell.get("ci_low", math.nan)):
        return fmt.format(cell["mean"])
    return f"{fmt.format(cell['mean'])} [{fmt.format(cell['ci_low'])}, {fmt.format(cell['ci_high'])}]"


def merge_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one configuration over several seeds as one run-like record for report sections: ``eval`` holds
    each numeric metric's mean over seeds with its Student-t 95% interval as ``<key>_ci_low/_ci_high`` (a single
    seed keeps its own caption-bootstrap interval), the win rates pooled over seeds and captions with the two-way
    cluster bootstrap, list metrics (curves) averaged elementwise, ``n_seeds``; ``dir``/``config``/``metrics``
    of the first seed (for config look-ups and image grids) and ``seed_runs``."""
    first = runs[0]
    if len(runs) == 1:
        return {**first, "seed_runs": runs, "eval": {**first["eval"], "n_seeds": 1}}
    ev: dict[str, Any] = dict(first["eval"])
    for k in numeric_keys(runs):
        m, lo, hi = t_interval([r["eval"].get(k) for r in runs], k)
        ev[k] = m
        if f"{k}_ci_low" in first["eval"] or k in ("unet_nfe", "wall_s"):
            ev[f"{k}_ci_low"], ev[f"{k}_ci_high"] = lo, hi
    for k, v in first["eval"].items():
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
            vals = [r["eval"].get(k) for r in runs]
            if all(isinstance(x, list) and len(x) == len(v) for x in vals):
                ev[k] = [float(x) for x in np.mean(np.array(vals, dtype=np.float64), axis=0)]
    for split, p in pooled_win_rates(runs).items():
        pre = "" if split == "train" else "heldout_"
        ev[f"{pre}win_rate_vs_base"], ev[f"{pre}win_rate_vs_base_ci_low"], ev[f"{pre}win_rate_vs_base_ci_high"] = p
    ev["n_seeds"] = len(runs)
    ev["seeds"] = [r["eval"].get("seed") for r in runs]
    return {**first, "eval": ev, "seed_runs": runs}
