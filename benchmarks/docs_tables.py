"""Regenerate the results tables of the docs from runs of ``benchmarks.run`` — never typed by hand.

::

    python -m benchmarks.docs_tables                          # every algorithm on toy2d, seed 0, then rewrite docs
    python -m benchmarks.docs_tables --world shapes --seeds 0 1 2
    python -m benchmarks.docs_tables --algos dpo ddpo --runs runs/docs_tables/20250101-120000   # re-render only
    python -m benchmarks.docs_tables --world shapes --experiment runs/<time>-head_to_head   # from the experiment
    python -m benchmarks.docs_tables --sections runs/<time>-flow_vs_eps --page flow.md       # one page's block

For each algorithm it runs ``python -m benchmarks.run algo=<name> world=<world> seed=<s>`` (the repository's
defaults and tuning files; ``--override algo:key=value`` adds a Hydra override for one algorithm and is printed
under the table), reads the run's ``eval.json`` and ``config.yaml``, and rewrites the block between
``<!-- results:start -->`` and ``<!-- results:end -->`` of ``docs/algos/<name>.md``; the head-to-head summary of
``docs/README.md`` is rewritten the same way. With several seeds each number is the mean and its Student-t 95%
interval over seeds. ``--experiment <dir>`` renders the tables from the runs of ``python -m benchmarks.run
experiment=head_to_head`` or ``experiment=leaderboard`` instead (``<dir>/runs/<algo>/s<seed>/``, every module at the
same training budget, each number over the experiment's seeds), so the docs and the comparison are the same
measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from algos import ALGOS as ALGO_REGISTRY
from benchmarks.report import load_run
from rlkit_diffusion.intervals import t_interval

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
ALGOS = list(ALGO_REGISTRY)  # every registered algorithm, in the registry's order
HEAD_TO_HEAD = REPO_ROOT / "benchmarks" / "conf" / "experiment" / "head_to_head.yaml"
START, END = "<!-- results:start -->", "<!-- results:end -->"
BLOCK = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
SEEDS_LEGEND = (
    "mean [Student-t 95% interval over seeds, cut to the metric's range]; win rates pooled over every seed's "
    "captions and draws with the cluster bootstrap over captions and seeds; costs (steps, seconds, NFEs) as mean "
    "(min–max); a value every seed shares stands alone"
)


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------
def run_command(algo: str, world: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    """The exact ``benchmarks.run`` command of one table cell."""
    return [
        sys.executable,
        "-m",
        "benchmarks.run",
        f"algo={algo}",
        f"world={world}",
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def run_one(algo: str, world: str, seed: int, run_dir: Path, extra: list[str], threads: int) -> bool:
    """Train and evaluate one algorithm; the run's console output goes to ``run_dir/console.log``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "console.log", "w") as log:
        proc = subprocess.run(
            run_command(algo, world, seed, run_dir, extra), cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
    return proc.returncode == 0 and (run_dir / "eval.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
def _values(results: list[dict[str, Any]], key: str) -> list[float] | None:
    vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
    return vals if len(vals) == len(results) and vals else None


def fmt(
    results: list[dict[str, Any]],
    key: str,
    spec: str = ".3f",
    pct: bool = False,
    ci: bool = False,
    counter: bool = False,
    pooled: tuple[float, float, float] | None = None,
) -> str:
    """One number, as a percentage if ``pct``. A single seed gives its value, with its own 95% CI
    (``<key>_ci_low/_ci_high``) if ``ci``. Several seeds give: the value alone when every seed has the same one;
    ``pooled`` (mean, low, high) when given (the win rates: every seed's rows pooled, caption-cluster bootstrap);
    the mean and the min–max over seeds for a ``counter`` (steps, seconds, NFEs: a cost, not an estimate);
    otherwise the mean and its Student-t 95% interval over seeds."""
    vals = _values(results, key)
    if vals is None:
        return "n/a"
    scale, unit = (100.0, "%") if pct else (1.0, "")

    def num(x: float) -> str:
        return f"{x * scale:{spec}}{unit}"

    if len(vals) > 1 and pooled is not None:
        mean, lo, hi = pooled
        return f"{num(mean)} [{num(lo)}, {num(hi)}]"
    text = num(statistics.fmean(vals))
    if len(vals) > 1 and len({num(v) for v in vals}) == 1:
        return num(vals[0])
    if len(vals) > 1 and counter:
        return f"{text} ({num(min(vals))}–{num(max(vals))})"
    if len(vals) > 1:
        _, lo, hi = t_interval(vals, key)
        text += f" [{num(lo)}, {num(hi)}]"
    elif ci and _values(results, f"{key}_ci_low") is not None:
        text += f" [{num(results[0][f'{key}_ci_low'])}, {num(results[0][f'{key}_ci_high'])}]"
    return text


def arrow(results: list[dict[str, Any]], base: str, trained: str, spec: str = ".3f") -> str:
    return f"{fmt(results, base, spec)} → {fmt(results, trained, spec)}"


def algo_table(
    results: list[dict[str, Any]],
    config: Any,
    commands: list[str],
    regen: str,
    pooled: dict[str, tuple[float, float, float]] | None = None,
) -> str:
    """The per-algorithm block: one row per metric of ``eval.json``; ``pooled`` maps ``train``/``heldout`` to the
    win rate pooled over the seeds' rows (`pooled_wins`)."""
    world = results[0]["world"]
    pooled = pooled or {}
    rows = [
        (
            "win rate vs base, training prompts (gold reward, 95% CI)",
            fmt(results, "win_rate_vs_base", ".1f", True, True, pooled=pooled.get("train")),
        ),
        (
            "win rate vs base, held-out prompts",
            fmt(results, "heldout_win_rate_vs_base", ".1f", True, True, pooled=pooled.get("heldout")),
        ),
        ("gold reward, base → trained", arrow(results, "gold_reward_base", "gold_reward_trained")),
    ]
    proxy, gold = _values(results, "proxy_reward_trained"), _values(results, "gold_reward_trained")
    if proxy and proxy != gold:  # toy2d's proxy is the gold reward: one row is enough
        rows.append(
            (
                f"`reward={config.reward}` reward, base → trained",
                arrow(results, "proxy_reward_base", "proxy_reward_trained"),
            )
        )
    if _values(results, "distance_to_optimum_trained"):
        beta = config.eval.optimum_beta
        rows.append(
            (
                f"energy distance to p* (β* = {beta:g}), base → trained",
                arrow(results, "distance_to_optimum_base", "distance_to_optimum_trained"),
            )
        )
    rows += [
        ("path KL to the reference", fmt(results, "kl_to_ref", ".3g")),
        ("diversity, base → trained", arrow(results, "diversity_base", "diversity")),
    ]
    if _values(results, "implicit_acc"):
        rows.append(("implicit-reward accuracy on validation pairs", fmt(results, "implicit_acc", ".3f")))
    rows += [
        ("optimizer steps", fmt(results, "updates", ".0f", counter=True)),
        ("training wall seconds", fmt(results, "train_wall_s", ".1f", counter=True)),
        ("UNet evaluations during training", fmt(results, "unet_nfe", ".0f", counter=True)),
        ("reward queries during training", fmt(results, "reward_queries", ".0f", counter=True)),
        ("UNet evaluations per generated sample", fmt(results, "inference_nfe_per_sample", ".0f", counter=True)),
    ]
    seeds = ", ".join(str(r["seed"]) for r in results)
    lines = [
        START,
        f"Measured on `world={world}` (seed{'s' if len(results) > 1 else ''} {seeds}"
        + (f"; {SEEDS_LEGEND}" if len(results) > 1 else "")
        + f") by `{regen}`, which ran:",
        "",
        "```",
        *commands,
        "```",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        END,
    ]
    return "\n".join(lines)


def summary_table(
    all_results: dict[str, list[dict[str, Any]]],
    world: str,
    regen: str,
    pooled: dict[str, dict[str, tuple[float, float, float]]] | None = None,
) -> str:
    """The head-to-head block of docs/README.md: one row per algorithm (``pooled``: per algorithm, as
    `algo_table`'s)."""
    pooled = pooled or {}
    several = any(len(r) > 1 for r in all_results.values())
    has_opt = any(_values(r, "distance_to_optimum_trained") for r in all_results.values())
    head = ["algorithm", "win rate vs base", "held-out win rate", "gold reward (trained)"]
    head += ["distance to p*"] if has_opt else []
    head += ["KL to ref", "steps", "train s", "NFE/sample"]
    lines = [
        START,
        f"Measured on `world={world}` by `{regen}` (each algorithm at the repository's defaults and tuning; "
        "per-algorithm commands and all metrics in its page)."
        + (f" Several seeds: {SEEDS_LEGEND}." if several else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, res in all_results.items():
        row = [
            f"[{name}](algos/{name}.md)",
            fmt(res, "win_rate_vs_base", ".1f", True, pooled=pooled.get(name, {}).get("train")),
            fmt(res, "heldout_win_rate_vs_base", ".1f", True, pooled=pooled.get(name, {}).get("heldout")),
            fmt(res, "gold_reward_trained"),
        ]
        row += [fmt(res, "distance_to_optimum_trained")] if has_opt else []
        row += [
            fmt(res, "kl_to_ref", ".3g"),
            fmt(res, "updates", ".0f", counter=True),
            fmt(res, "train_wall_s", ".1f", counter=True),
            fmt(res, "inference_nfe_per_sample", ".0f", counter=True),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(END)
    return "\n".join(lines)


def pooled_wins(run_dirs: list[Path]) -> dict[str, tuple[float, float, float]]:
    """``{split: (mean, low, high)}``: the win rate vs base over every seed's (caption, draw) rows, with the two-way
    cluster bootstrap over captions and seeds (`benchmarks.protocol.pooled_win_rate`, as the leaderboard reports
    it); empty when fewer than two runs, or a run without ``per_sample.npz``."""
    from benchmarks.protocol import pooled_win_rates

    return pooled_win_rates([{"dir": d} for d in run_dirs]) if len(run_dirs) > 1 else {}


def replace_block(path: Path, block: str) -> None:
    """Rewrite the marked results block of ``path`` (which must have exactly one)."""
    text = path.read_text()
    if len(BLOCK.findall(text)) != 1:
        raise ValueError(f"{path} must contain exactly one {START} ... {END} block")
    path.write_text(BLOCK.sub(lambda _: block, text))


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, list[str]]:
    """``["draft:algo.k=2", ...]`` → ``{"draft": ["algo.k=2"]}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        algo, sep, override = item.partition(":")
        if not sep or "=" not in override or algo not in ALGOS:
            raise SystemExit(f"--override must look like <algo>:<key>=<value> with algo in {ALGOS}, got {item!r}")
        out.setdefault(algo, []).append(override)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", default="toy2d", help="world of the tables (toy2d, or shapes once prepared)")
    p.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out-dir", default="runs/docs_tables", help="parent of the new runs (relative to the repo)")
    p.add_argument("--runs", default=None, help="re-render from this earlier output directory instead of training")
    p.add_argument(
        "--experiment",
        default=None,
        help="re-render from the runs of an experiment=head_to_head (or leaderboard) directory instead",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=None,
        help="experiment directories whose sections (section.md + figures) are pasted into docs/<--page>",
    )
    p.add_argument("--page", default="experiments.md", help="the docs page --sections rewrites (its results block)")
    p.add_argument("--override", action="append", default=[], help="<algo>:<hydra override>, repeatable")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--docs-dir", default=str(DOCS), help="folder holding README.md and algos/<name>.md")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.override)
    docs = Path(args.docs_dir)
    root = Path(args.runs) if args.runs else REPO_ROOT / args.out_dir / time.strftime("%Y%m%d-%H%M%S")
    regen = " ".join(
        ["python -m benchmarks.docs_tables", f"--world {args.world}"]
        + (["--seeds " + " ".join(map(str, args.seeds))] if args.seeds != [0] else [])
        + [f"--override {o}" for o in args.override]
    )
    if args.sections:
        return paste_sections([Path(d) for d in args.sections], docs, args.page)
    if args.experiment:
        return render_experiment(Path(args.experiment), args.algos, docs, regen + " --experiment <dir>")
    collected: dict[str, list[dict[str, Any]]] = {}
    failed: list[str] = []
    for algo in args.algos:
        results, commands, config = [], [], None
        for seed in args.seeds:
            run_dir = root / f"{args.world}-{algo}-s{seed}"
            extra = overrides.get(algo, [])
            shown = ["python -m benchmarks.run", f"algo={algo}", f"world={args.world}", f"seed={seed}", *extra]
            commands.append(" ".join(shown))
            if not args.runs:
                t0 = time.perf_counter()
                ok = run_one(algo, args.world, seed, run_dir, extra, args.threads)
                print(f"{algo} seed {seed}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f}s", flush=True)
                if not ok:
                    log = (run_dir / "console.log").read_text().splitlines()[-15:]
                    print("\n".join(f"    {line}" for line in log), file=sys.stderr)
                    break
            run = load_run(run_dir)
            result, config = run["eval"], run["config"]
            results.append(result)
        if len(results) != len(args.seeds):
            failed.append(algo)
            continue
        replace_block(docs / "algos" / f"{algo}.md", algo_table(results, config, commands, regen))
        collected[algo] = results
    if set(collected) == set(ALGOS):  # the head-to-head needs every algorithm (a partial run keeps the old one)
        replace_block(docs / "README.md", summary_table(collected, args.world, regen))
    print(f"runs in {root}; tables rewritten for: {', '.join(collected) or 'none'}", flush=True)
    if failed:
        print(f"failed (tables left unchanged): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def paste_sections(exp_dirs: list[Path], docs: Path, page: str = "experiments.md") -> int:
    """Rewrite the results block of ``docs/<page>`` (``experiments.md``, or e.g. ``flow.md``) with each experiment's
    ``section.md``; its figures are copied to ``docs/images/experiments/<experiment>_<figure>.png`` and the links
    rewritten."""
    import shutil

    images = docs / "images" / "experiments"
    images.mkdir(parents=True, exist_ok=True)
    parts = []
    for d in exp_dirs:
        record = json.loads((d / "experiment.json").read_text())
        text = (d / "section.md").read_text()
        for png in sorted(d.glob("*.png")):
            if f"]({png.name})" in text:
                target = images / f"{record['experiment']}_{png.name}"
                shutil.copyfile(png, target)
                text = text.replace(f"]({png.name})", f"](images/experiments/{target.name})")
        parts.append(re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE).strip())  # one heading level down
    block = "\n".join([START, *[p + "\n" for p in parts], END])
    replace_block(docs / page, block)
    print(f"docs/{page}: {len(parts)} sections", flush=True)
    return 0


def experiment_specs(exp_dir: Path) -> tuple[str, dict[str, list[str]]]:
    """The experiment's name and each label's overrides, from the directory's own composed config
    (``.hydra/config.yaml``; ``sweep.grid`` expanded as the experiment expands it), else ``head_to_head.yaml``."""
    from benchmarks.leaderboard import expand_grid

    composed = exp_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(composed if composed.exists() else HEAD_TO_HEAD)
    sweep = OmegaConf.to_container(cfg.sweep, resolve=False)
    runs = expand_grid(sweep) if sweep.get("grid") else sweep["runs"]
    return str(cfg.get("experiment", "head_to_head")), {r["label"]: list(r["overrides"]) for r in runs}


def seed_run_dirs(label_dir: Path) -> list[Path]:
    """The finished runs of one label of an experiment: ``<label>/s<seed>/`` (seed order), or ``<label>/`` itself
    (an experiment of one seed written before seeds were first-class)."""
    if (label_dir / "eval.json").exists():
        return [label_dir]
    found = [d for d in label_dir.glob("s*") if d.name[1:].isdigit() and (d / "eval.json").exists()]
    return sorted(found, key=lambda d: int(d.name[1:]))


def render_experiment(exp_dir: Path, algos: list[str], docs: Path, regen: str) -> int:
    """Rewrite the tables from an experiment directory whose runs are one per module (``experiment=head_to_head``
    or ``experiment=leaderboard``): ``runs/<algo>/s<seed>/``, every reporting seed of it."""
    if not any((exp_dir / "runs").glob("*/**/config.yaml")):
        raise SystemExit(f"--experiment: no runs under {exp_dir / 'runs'}")
    name, specs = experiment_specs(exp_dir)
    collected: dict[str, list[dict[str, Any]]] = {}
    pooled: dict[str, dict[str, tuple[float, float, float]]] = {}
    world = "?"
    for algo in algos:
        dirs = seed_run_dirs(exp_dir / "runs" / algo)
        if not dirs:
            print(f"{algo}: no finished run in {exp_dir / 'runs' / algo} (table left unchanged)", file=sys.stderr)
            continue
        runs = [load_run(d) for d in dirs]
        results, config = [r["eval"] for r in runs], runs[0]["config"]
        wins = pooled[algo] = pooled_wins(dirs)
        world = str(config.world.name)
        seeds = ", ".join(str(r["seed"]) for r in results)
        command = " ".join(["python -m benchmarks.run", f"world={world}", *specs.get(algo, [f"algo={algo}"])])
        note = f"# the runs of: python -m benchmarks.run experiment={name} world={world} (seeds {seeds}), each:"
        block = algo_table(results, config, [note, f"{command} seed=<s>"], regen, wins)
        block = block.replace(", which ran:", ", from the runs of:")
        replace_block(docs / "algos" / f"{algo}.md", block)
        collected[algo] = results
    if collected:  # one experiment is one comparison: its summary is rewritten even when a module is missing
        missing = [a for a in ALGOS if a not in collected]
        block = summary_table(collected, world, regen, pooled).replace(
            "(each algorithm at the repository's defaults and tuning;",
            f"(the runs of `python -m benchmarks.run experiment={name}`: every module at the same training "
            "budget in UNet NFEs, best_of_n paying at inference instead;",
        )
        if missing:
            note = f"Not in this experiment's runs: {', '.join(missing)} (their pages keep earlier tables)."
            block = block.replace(END, note + "\n" + END)
        replace_block(docs / "README.md", block)
    print(f"tables rewritten from {exp_dir} for: {', '.join(collected) or 'none'}", flush=True)
    return 0 if collected else 1


if __name__ == "__main__":
    sys.exit(main())
