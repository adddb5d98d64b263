"""``python -m benchmarks.learning_check <run dir> [<run dir> ...]`` — did each run raise the reward it optimises?

For every finished run (a directory with ``eval.json`` and ``metrics.jsonl``; seed folders of a ``seeds=`` run too):
the win rate against the base under the training reward with its caption-bootstrap interval, that reward's mean
base → trained, the gold win rate, the path KL, and the learning curve of the *collected* batches — the mean reward
of each batch the algorithm collected (``train/reward_mean``), its first and last quarter, and the least-squares
slope per update with its p-value. Then, per configuration (runs grouped as ``benchmarks.report`` groups them: full
config minus the seed, so runs of different budgets or settings are never pooled), the t-interval over seeds of the
win rate and of the slope.

Issue #21's criterion for the policy-gradient family on shapes: on 3 seeds the interval of the win rate under the
proxy lies above 50% and the collected-batch reward rises.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks.report import find_runs, group, load_run
from rlkit_diffusion.intervals import t_interval


def summarise(run: dict[str, Any], reward: str) -> dict[str, Any]:
    """One run's numbers (see the module docstring) from `benchmarks.report.load_run`'s record."""
    ev, where = run["eval"], run["dir"]
    curve = np.array([m["train/reward_mean"] for m in run["metrics"] if "train/reward_mean" in m], dtype=np.float64)
    if len(curve) < 3:
        raise ValueError(f"{where}: {len(curve)} collected batches in metrics.jsonl (train/reward_mean); need >= 3")
    by = ev.get("win_rate_vs_base_by_reward", {})
    if reward not in by:
        raise ValueError(f"{where}: eval.json has no win rate under {reward!r} (has {sorted(by)})")
    fit = stats.linregress(np.arange(len(curve)), curve)
    q = max(1, len(curve) // 4)
    w = by[reward]
    return {
        "seed": ev.get("seed"),
        "win": w["win_rate"],
        "win_low": w["ci_low"],
        "win_high": w["ci_high"],
        "reward_base": w["reward_base"],
        "reward_trained": w["reward_trained"],
        "gold_win": ev.get("win_rate_vs_base", math.nan),
        "kl": ev.get("kl_to_ref", math.nan),
        "updates": len(curve),
        "first_quarter": float(curve[:q].mean()),
        "last_quarter": float(curve[-q:].mean()),
        "slope": float(fit.slope),
        "slope_p": float(fit.pvalue),
    }


def report_lines(name: str, runs: list[dict[str, Any]], reward: str) -> list[str]:
    lines = [f"{name}:"]
    for r in runs:
        lines.append(
            f"  seed {r['seed']}: win vs base by {reward} {r['win']:.1%} [{r['win_low']:.1%}, {r['win_high']:.1%}], "
            f"{reward} {r['reward_base']:.3f} -> {r['reward_trained']:.3f}, gold win {r['gold_win']:.1%}, KL "
            f"{r['kl']:.1f}; {r['updates']} batches, batch reward {r['first_quarter']:.3f} (first quarter) -> "
            f"{r['last_quarter']:.3f} (last), slope {r['slope']:+.5f}/update (p {r['slope_p']:.2g})"
        )
    if len(runs) > 1:
        w, s = t_interval([r["win"] for r in runs], "win_rate"), t_interval([r["slope"] for r in runs])
        above = sum(r["win_low"] > 0.5 for r in runs)
        lines.append(
            f"  over {len(runs)} seeds: win by {reward} {w[0]:.1%} [{w[1]:.1%}, {w[2]:.1%}] (t); {above}/{len(runs)} "
            f"seeds with the caption interval above 50%; batch-reward slope {s[0]:+.5f} [{s[1]:+.5f}, {s[2]:+.5f}] "
            "per update (t)"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning_check", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or folders holding them)")
    p.add_argument("--reward", default="proxy", help="the optimised reward (a key of win_rate_vs_base_by_reward)")
    args = p.parse_args(argv)
    try:
        dirs = sorted(set(find_runs([Path(p) for p in args.runs])))
    except FileNotFoundError as err:
        sys.exit(f"learning_check: {err}")
    loaded = [r for r in map(load_run, dirs) if r is not None]
    if not loaded:
        sys.exit(f"learning_check: no readable eval.json under {' '.join(args.runs)}")
    out = {}
    for (world, name), runs in group(loaded).items():
        out[f"{world} {name}"] = summary = sorted((summarise(r, args.reward) for r in runs), key=lambda r: r["seed"])
        print("\n".join(report_lines(f"{world} {name}", summary, args.reward)))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
