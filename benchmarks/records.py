"""``python -m benchmarks.records <experiment dir> <records dir>`` — an experiment's records, without its weights.

An experiment directory (``python -m benchmarks.run experiment=<name>``) holds, for each run, its checkpoints, event
files and logs (megabytes to gigabytes) and the three small files that every page, table and verdict is computed
from. The records are those files and nothing else, in the experiment directory's own layout:

====================================  ============================================================================
kept                                  why
====================================  ============================================================================
``runs/<label>/s<seed>/eval.json``    the run's evaluation (`benchmarks.eval_schema`), its code and environment
``runs/<label>/s<seed>/metrics.jsonl`` its training rows and learning-curve evaluations (`benchmarks.report.load_run`)
``runs/<label>/s<seed>/config.yaml``  its resolved config: what a resume or ``reuse_from`` compares settings with
``runs/<label>/s<seed>/per_sample.npz`` its evaluation's per-draw rows: the pooled caption × seed cluster bootstrap
``runs/<label>/s<seed>/samples.*``    its fixed-noise sample images and their captions: the pages' image grids
``experiment.json``                   every invocation of the command (start, wall seconds, runs trained / copied)
``*.md``, ``*.json`` at the top       the section and the pages the experiment wrote, with their records
====================================  ============================================================================

The section's figures (``*.png``) are not kept: running the experiment's command on the records draws them again.

Only finished runs (an ``eval.json``) are kept; an unfinished run's checkpoint stays where it is. Because the records
are themselves an experiment directory, the one command works both ways:

- **keep** a finished or interrupted experiment: ``python -m benchmarks.records runs/<time>-leaderboard
  results/leaderboard_shapes_flow`` (commit the folder beside the page it backs: the page can be audited and
  re-rendered from a clean checkout);
- **continue** it on another machine: ``python -m benchmarks.records results/leaderboard_shapes_flow
  runs/lb_flow``, then run the experiment's command again with ``hydra.run.dir=runs/lb_flow``. The finished runs are
  reused (each one's ``config.yaml`` checked against today's composition, as for any resume), the rest are trained,
  and the page states the command's wall time over all its invocations. Keep again when it is done.

A result is never changed or lost silently. A run whose record in the destination differs from the source's is two
different runs under one name: refused, naming them (delete the destination's copy to replace it). The
destination's ``experiment.json`` must be an earlier state of the source's (its invocations a prefix of the
source's, the same experiment): otherwise the two directories are different experiments, and merging them would
rewrite one's history; refused too.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.experiments import previous_invocations
from benchmarks.lifecycle import ConfigError
from rlkit_diffusion.checkpoint import atomic_write

RUN_FILES = ("metrics.jsonl", "config.yaml", "per_sample.npz", "samples.json", "samples.safetensors", "eval.json")
"""The files of a finished run that the records keep: what `benchmarks.report.load_run`, the pooled win rates
(`benchmarks.protocol.load_per_sample`) and the image grids read; no checkpoint, event file or log. Copied in this
order, ``eval.json`` last: a run whose copy was interrupted is not a finished run in the destination."""
TOP_SUFFIXES = (".md", ".json")
"""Files at the top of an experiment directory that the records keep: ``experiment.json``, the section, the pages."""


def finished_runs(exp_dir: Path) -> list[Path]:
    """The run directories ``runs/<label>/s<seed>/`` of ``exp_dir`` that hold an ``eval.json``, in path order."""
    return sorted(p.parent for p in (exp_dir / "runs").glob("*/s*/eval.json"))


def _experiment_name(exp_dir: Path) -> str | None:
    f = exp_dir / "experiment.json"
    return json.loads(f.read_text()).get("experiment") if f.exists() else None


def check_continues(src: Path, dest: Path) -> None:
    """Refuse ``dest`` unless its ``experiment.json`` (if any) is an earlier state of ``src``'s: the same experiment,
    and its invocations (`benchmarks.experiments.previous_invocations`) the first ones of ``src``'s."""
    dest_name, dest_calls = _experiment_name(dest), previous_invocations(dest)
    if dest_name is None and not dest_calls:
        return
    src_name, src_calls = _experiment_name(src), previous_invocations(src)
    if None not in (src_name, dest_name) and src_name != dest_name:  # None: a record of interrupted invocations only
        raise ConfigError(f"{dest} holds the records of experiment={dest_name}, {src} is experiment={src_name}")
    if src_calls[: len(dest_calls)] != dest_calls:
        raise ConfigError(
            f"{dest}/experiment.json is not an earlier state of {src}/experiment.json (its {len(dest_calls)} "
            f"invocation(s) are not the first of the source's {len(src_calls)}): they are two experiments; keep the "
            "records in a new directory"
        )


def keep(src: Path | str, dest: Path | str) -> dict[str, Any]:
    """Copy the records of experiment directory ``src`` into ``dest`` (created if needed; see the module docstring
    for what is kept and what is refused). Every file is written atomically; files already equal are left alone.
    Returns ``{"runs", "added", "unchanged", "unfinished", "bytes"}``."""
    src, dest = Path(src).absolute(), Path(dest).absolute()
    if not (src / "runs").is_dir():
        raise ConfigError(f"{src}: not an experiment directory (no runs/ in it)")
    if src == dest or src in dest.parents or dest in src.parents:
        raise ConfigError(f"{dest}: the records go to a directory outside {src}, not into it or around it")
    check_continues(src, dest)
    runs = finished_runs(src)
    files = [run / name for run in runs for name in RUN_FILES if (run / name).exists()]
    files += sorted(f for f in src.iterdir() if f.is_file() and f.suffix in TOP_SUFFIXES)

    def same(f: Path) -> bool:
        target = dest / f.relative_to(src)
        return target.exists() and filecmp.cmp(f, target, shallow=False)

    to_write = [f for f in files if not same(f)]  # each file compared once, by contents
    clashes = [str(f.relative_to(src)) for f in to_write if f.parent != src and (dest / f.relative_to(src)).exists()]
    if clashes:
        raise ConfigError(
            f"{len(clashes)} run record(s) in {dest} differ from {src}'s (e.g. {clashes[0]}): two different runs "
            "under one name; delete the destination's run directory to replace it"
        )
    for f in to_write:
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp, f=f: shutil.copyfile(f, tmp))
    started = {p.parent for p in (src / "runs").glob("*/s*/config.yaml")}
    unfinished = len(started - set(runs))
    size = sum(f.stat().st_size for f in files)
    unchanged = len(files) - len(to_write)
    return {"runs": len(runs), "added": len(to_write), "unchanged": unchanged, "unfinished": unfinished, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.records",
        description="Copy an experiment's records (each finished run's eval.json, metrics.jsonl, config.yaml, "
        "per-draw rows and sample images, and "
        "the experiment's experiment.json and pages) into another directory, without checkpoints or logs. The "
        "records are an experiment directory themselves: copy them back into a working directory and run the "
        "experiment's command with hydra.run.dir=<it> to continue.",
    )
    parser.add_argument("src", type=Path, help="the experiment directory (or records) to copy from")
    parser.add_argument("dest", type=Path, help="the records directory (or a working directory) to copy into")
    args = parser.parse_args(argv)
    try:
        done = keep(args.src, args.dest)
    except ConfigError as err:
        print(f"records: {err}", file=sys.stderr)
        return 2
    print(
        f"records: {done['runs']} finished runs of {args.src} in {args.dest} ({done['added']} files written, "
        f"{done['unchanged']} already there, {done['bytes'] / 1e6:.1f} MB); {done['unfinished']} unfinished runs "
        "not kept (their checkpoints stay in the source)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
