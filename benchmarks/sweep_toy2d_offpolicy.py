"""A small recorded tuning sweep on toy2d: learning rates × one main knob of an algorithm, the same count of trials
for every module, scored on toy2d's own objective (the energy distance to the KL-optimal p*, lower is better).

    python -m benchmarks.sweep_toy2d_offpolicy --algo kto --knob algo.beta=5,20 \\
        --lrs 1e-4,3e-4,1e-3,3e-3 --set train.steps=100 train.batch_size=128 --out docs/tuning/toy2d_kto.md

Every trial is one ``benchmarks.run`` (world=toy2d, the algorithm's tuning file if any, then ``--set``, then the
trial's lr and knob value) with the fast evaluation of the zoo's learning tests (64 noises per prompt, training
prompts only, 100 bootstrap draws, a 1024-sample optimum pool). The table (one row per trial) is printed and, with
``--out``, written as Markdown with the command that produced it; the chosen row is in bold: the smallest distance
to p*, or with ``--select reward`` (a method without a KL target) the largest gold reward.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

import benchmarks.schema  # noqa: F401  (registers the structured configs)
from rlkit_diffusion.checkpoint import atomic_write_text

FAST_EVAL = ["eval.samples_per_prompt=64", "eval.heldout=false", "eval.bootstrap=100", "world.optimum_pool=1024"]
COLUMNS = [
    ("distance_to_optimum_trained", "dist. to p*"),
    ("gold_reward_trained", "gold reward"),
    ("win_rate_vs_base", "win rate"),
    ("kl_to_ref", "KL to ref"),
    ("train_wall_s", "train s"),
]


def trial(algo: str, overrides: list[str], run_dir: Path) -> dict:
    """One toy2d run of ``algo`` with ``overrides``; returns its eval.json."""
    from benchmarks.run import run

    with initialize_config_module("benchmarks.conf", version_base="1.3"):
        cfg = compose(
            "config", overrides=["world=toy2d", f"algo={algo}", f"out_dir={run_dir}", "report=false", *overrides]
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg, run_dir=run_dir)


def sweep(algo: str, lrs: list[str], knob: str, values: list[str], extra: list[str], root: Path) -> list[dict]:
    """Every (lr, knob value) trial; rows with the trial's settings and metrics."""
    rows = []
    for lr, value in itertools.product(lrs, values):
        overrides = [*FAST_EVAL, *extra, f"train.lr={lr}", f"{knob}={value}"]
        res = trial(algo, overrides, root / f"{algo}-lr{lr}-{knob.split('.')[-1]}{value}")
        rows.append({"lr": lr, knob: value, **{k: res[k] for k, _ in COLUMNS}, "base": res})
        print(f"{algo} lr={lr} {knob}={value}: " + ", ".join(f"{n} {res[k]:.4g}" for k, n in COLUMNS), flush=True)
    return rows


SELECT = {"distance": ("distance_to_optimum_trained", 1.0), "reward": ("gold_reward_trained", -1.0)}


def table(algo: str, knob: str, rows: list[dict], select: str = "distance") -> str:
    """Markdown table of the trials, the chosen one in bold (``select``: the smallest distance to p*, or the largest
    gold reward for a method without a KL target), with the base model's row."""
    key, sign = SELECT[select]
    best = min(range(len(rows)), key=lambda i: sign * rows[i][key])
    base = rows[0]["base"]
    lines = [
        f"| lr | `{knob}` | " + " | ".join(n for _, n in COLUMNS) + " |",
        "|---" * (2 + len(COLUMNS)) + "|",
        f"| base model | – | {base['distance_to_optimum_base']:.4g} | {base['gold_reward_base']:.4g} | 50% | 0 | 0 |",
    ]
    for i, r in enumerate(rows):
        cells = [r["lr"], r[knob]] + [
            f"{100 * r[k]:.1f}%" if k == "win_rate_vs_base" else f"{r[k]:.4g}" for k, _ in COLUMNS
        ]
        if i == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", required=True)
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3", help="comma-separated learning rates")
    ap.add_argument("--knob", required=True, help="key=v1,v2,... (e.g. algo.beta=5,20)")
    ap.add_argument("--set", nargs="*", default=[], help="extra overrides for every trial")
    ap.add_argument("--select", default="distance", choices=sorted(SELECT), help="criterion of the bold row")
    ap.add_argument("--out", default=None, help="write the Markdown table here")
    ap.add_argument("--root", default=None, help="parent of the trials' run directories (default: a temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the toy MLP is tiny: one intra-op thread is as fast and kinder to a shared machine
    knob, _, values = args.knob.partition("=")
    root = Path(args.root or tempfile.mkdtemp(prefix=f"sweep_{args.algo}_"))
    rows = sweep(args.algo, args.lrs.split(","), knob, values.split(","), list(args.set), root)
    md = table(args.algo, knob, rows, args.select)
    print(md)
    if args.out:
        command = "python -m benchmarks.sweep_toy2d_offpolicy " + " ".join(argv if argv is not None else sys.argv[1:])
        atomic_write_text(Path(args.out), f"Command: `{command}`\n\n{md}\n")


if __name__ == "__main__":
    main()
