"""A small recorded tuning sweep of any algorithm on toy2d (or toy2d_flow, ``--world``): learning rates × values of one
knob × seeds.

::

    python -m benchmarks.sweep_toy2d --algo grpo --knob algo.kl_coef --values 0.04 0.4 \\
        --lrs 3e-4 1e-3 3e-3 1e-2 --seeds 0 1 --set algo.group_size=8 train.steps=60 train.batch_size=128

Every trial is one ``benchmarks.run`` run (``world=<--world> algo=<algo>``, the ``--set`` overrides, then the lr, the
knob and the seed), evaluated with the cheap evaluation of ``--eval`` (training prompts, 64 noises per prompt). The
trials of a (lr, knob) cell are averaged over seeds; the chosen cell is the best by ``--select`` (default: the mean
win rate vs the base, gold reward; or the gold reward, or the distance to p*), ties broken by the smaller distance
to p*; a cell in which a seed diverged is never chosen (its row says "diverged"). The script prints a Markdown
table (paste it into ``docs/tuning/<world>_<algo>.md``) and the chosen overrides (the tuning file
``conf/tuning/<world>_<algo>.yaml``). A ``conf/tuning/<world>_<algo>.yaml`` that already exists is composed too (the
sweep's overrides come after it), so pass every setting you mean to hold fixed with ``--set``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from benchmarks.experiments import compose_run

METRICS = [
    ("win_rate_vs_base", "win rate vs base", "{:.1%}"),
    ("gold_reward_trained", "gold reward", "{:.3f}"),
    ("distance_to_optimum_trained", "distance to p*", "{:.3f}"),
    ("kl_to_ref", "path KL", "{:.1f}"),
    ("unet_nfe", "training NFE", "{:.0f}"),
]
SELECT = {"win_rate_vs_base": 1.0, "gold_reward_trained": 1.0, "distance_to_optimum_trained": -1.0}
DEFAULT_EVAL = ["eval.samples_per_prompt=64", "eval.heldout=false", "eval.bootstrap=100", "world.optimum_pool=1024"]


def trial(algo: str, overrides: list[str], out_dir: Path, name: str, world: str = "toy2d") -> dict | None:
    """One training run; returns its eval.json, or None when training diverged (a non-finite loss, or samples so
    far out that the reward is not finite)."""
    from benchmarks.run import run
    from rlkit_diffusion.train import DivergenceError

    cfg = compose_run([f"algo={algo}", f"world={world}", f"out_dir={out_dir}", "report=false", *overrides])
    run_dir = out_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run(cfg, run_dir=run_dir)
    except (DivergenceError, ValueError) as err:
        if isinstance(err, ValueError) and "NaN or inf" not in str(err):
            raise
        print(f"{name}: diverged ({err})", flush=True)
        return None


def table(rows: list[dict], knob: str) -> str:
    """Markdown: one line per (lr, knob value), means over seeds; the chosen line in bold."""
    head = ["train.lr", knob, "seeds", *[label for _, label, _ in METRICS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [fmt.format(r[k]) for k, _, fmt in METRICS] if r["diverged"] < r["n"] else ["diverged"] * len(METRICS)
        seeds = f"{r['n']} ({r['diverged']} diverged)" if r["diverged"] else str(r["n"])
        cells = [str(r["lr"]), str(r["value"]), seeds, *values]
        if r.get("chosen"):
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algo", required=True)
    p.add_argument("--world", default="toy2d", choices=["toy2d", "toy2d_flow"])
    p.add_argument("--knob", required=True, help="the second swept key, e.g. algo.kl_coef")
    p.add_argument("--values", nargs="+", required=True)
    p.add_argument("--lrs", nargs="+", default=["3e-4", "1e-3", "3e-3", "1e-2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", nargs="*", default=[], help="fixed overrides of every trial")
    p.add_argument("--eval", nargs="*", default=DEFAULT_EVAL, help="evaluation overrides of every trial")
    p.add_argument("--out-dir", default="runs/sweep_toy2d")
    p.add_argument("--select", default="win_rate_vs_base", choices=list(SELECT), help="the criterion of the choice")
    args = p.parse_args(argv)
    out = Path(args.out_dir) / (args.algo if args.world == "toy2d" else f"{args.world}_{args.algo}")
    rows = []
    for lr, value in itertools.product(args.lrs, args.values):
        results = [
            trial(
                args.algo,
                [*args.set, *args.eval, f"train.lr={lr}", f"{args.knob}={value}", f"seed={seed}"],
                out,
                f"lr{lr}-{args.knob.split('.')[-1]}{value}-s{seed}",
                args.world,
            )
            for seed in args.seeds
        ]
        done = [r for r in results if r is not None]
        row = {"lr": lr, "value": value, "n": len(results), "diverged": len(results) - len(done)}
        row.update({k: float(np.mean([r[k] for r in done])) if done else float("nan") for k, _, _ in METRICS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    ok = [r for r in rows if not r["diverged"]]  # a cell with a diverged seed is never chosen
    best = max(ok, key=lambda r: (SELECT[args.select] * r[args.select], -r["distance_to_optimum_trained"]))
    best["chosen"] = True
    command = " ".join(
        ["python -m benchmarks.sweep_toy2d", f"--algo {args.algo}"]
        + ([f"--world {args.world}"] if args.world != "toy2d" else [])
        + [f"--knob {args.knob}"]
        + [f"--values {' '.join(args.values)}", f"--lrs {' '.join(args.lrs)}"]
        + [f"--seeds {' '.join(map(str, args.seeds))}", f"--select {args.select}", f"--set {' '.join(args.set)}"]
    )
    print(f"\n```\n{command}\n```\n\n{table(rows, args.knob)}\n")
    print(f"chosen: train.lr={best['lr']} {args.knob}={best['value']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
