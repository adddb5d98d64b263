"""Paper-style experiments: ``python -m benchmarks.run experiment=<name>`` trains every run the experiment needs and
writes its report section.

==============  =================================================  ==================================================
experiment      runs (world=shapes; each an ordinary run directory)  section
==============  =================================================  ==================================================
table1          dpo, sft, ddpo, dpok, draft, best_of_n at equal      Table 1: open vocabulary / equal inference cost /
                UNet NFEs                                            divergence control per method, ✓/✗ + numbers
head_to_head    every module (sweep.grid) at 19,200 UNet NFEs        comparison table, Table 1, curves, frontier, grid
leaderboard     every module × two NFE budgets                       equal NFEs, matched KL, convergence; + the head
                                                                     to head of the same runs at the top budget
table2          dpo                                                  Table 2: preference accuracy on validation pairs
                                                                     of the implicit reward vs gold/proxy/clip/…
fig6            dpo on labels of each reward (AI feedback)           Fig. 6: win rate under each reward (matrix)
beta_sweep      dpo at several β                                     S5: gold reward and KL to the base vs β
best_of_n       dpo with 16 evaluation draws per caption             S8: best-of-N curve of the base vs the DPO model
sdedit          dpo evaluated in ``eval.mode=sdedit``                §5.3: win rate of edits vs the base's edits
paper_claims    dpo, sft, dpo at β/4 and 4β, proxy labels, SDEdit,  the paper's claims one by one: measured (95% CI
                draft, alignprop                                     over seeds) and holds / does not / inconclusive
flow_vs_eps     dpo, grpo, draft, ddpo, nft on toy2d and toy2d_flow  the same algorithm on the ε-policy and the flow
                                                                     policy side by side: gold, win rate, distance to
                                                                     the KL-optimal target p*, path KL
==============  =================================================  ==================================================

The experiment file (``conf/experiment/<name>.yaml``) lists its runs under ``sweep.runs`` as
``{label, overrides}``; each run is composed from the normal config with those overrides followed by the command
line's own overrides (so ``experiment=beta_sweep train.steps=20`` shortens every run) and ``label=<label>``, and
runs through `benchmarks.run.run` — the one training loop and the one evaluation. The experiment directory holds
``runs/<label>/s<seed>/`` for each reporting seed (``seeds=`` on the command line or ``sweep.seeds``; default
`benchmarks.protocol.REPORTING_SEEDS`, three seeds; sections show means over seeds with 95% intervals, win rates
pooled over seeds and captions; complete runs are reused and an interrupted one resumes from its last checkpoint
when the same directory is run again: ``hydra.run.dir=<experiment dir>``), ``section.md``, its figures,
``aggregate.json`` (`benchmarks.protocol.aggregate`) and ``experiment.json``;
``python -m benchmarks.report <dir>`` includes the section.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from benchmarks import leaderboard, protocol, report
from benchmarks.lifecycle import (
    EXPERIMENT_SOURCE_ENV,
    ConfigError,
    ExperimentStopped,
    config_differences,
    signals_deferred,
    source_fingerprint,
)
from benchmarks.wiring import hydra_output_dir
from rlkit_diffusion.checkpoint import atomic_write_json, atomic_write_text, latest_checkpoint

LOCATIONS = ("out_dir", "eval_cache_dir", "resume", "device", "report", "logger", "jobs")
"""Overrides that say where or how a run is carried out, not what it is: left out of the command a page names."""
SWEEP_LOCATIONS = ("sweep.params.docs_out",)
"""Sweep overrides that say where the page goes (the command a page names keeps the others: they change its runs)."""
STOP_FILE = "STOP"
"""``touch <experiment dir>/STOP``: the experiment starts no new run, lets the runs in flight finish, records its
invocation and stops (`ExperimentStopped`); the file is removed, so the same command then continues. For a machine
or a job slot about to end: nothing half-trained is lost."""
RunOne = Callable[[DictConfig, Path], dict[str, Any]]
"""One training run into a run directory (`benchmarks.run.run`)."""
Section = Callable[[list[dict[str, Any]], dict[str, Any], Path], list[str]]
"""(runs, params, experiment dir) -> markdown lines; figures are written into the experiment dir."""


# --------------------------------------------------------------------------------------------------------------
# Running the sweep
# --------------------------------------------------------------------------------------------------------------
def _user_overrides() -> list[str]:
    """The command line's overrides (except ``experiment=``), applied to every run of the experiment."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main
        return []
    return [o for o in task if o.split("=", 1)[0].lstrip("+~") not in ("experiment", "hydra.run.dir")]


def compose_run(overrides: list[str]) -> DictConfig:
    """The config of one run of the experiment (the normal defaults plus ``overrides``)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_module("benchmarks.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def run_differences(run_dir: Path, overrides: list[str]) -> dict[str, tuple[Any, Any]]:
    """{setting: (the run's, today's)} between a run directory's ``config.yaml`` and the config ``overrides`` compose
    today; locations (``out_dir``, ``eval_cache_dir``, ...) and settings newer than the run do not count. A directory
    without ``config.yaml`` has none."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return {}
    diffs = config_differences(OmegaConf.load(saved_path), compose_run(overrides), None)
    return {k: v for k, v in diffs.items() if k != "eval_cache_dir"}


def copy_finished_run(run_dir: Path, overrides: list[str], sources: list[str]) -> Path | None:
    """``reuse_from``: the first finished run ``<source>/runs/<label>/s<seed>/`` of another experiment directory
    whose settings are this run's (`run_differences` empty), copied whole into ``run_dir`` (an unfinished
    ``run_dir`` without a checkpoint is replaced); None when no source has it. A run with other settings is
    never taken: the copy is the run this experiment would have made."""
    import shutil

    for source in sources:
        candidate = Path(source) / "runs" / run_dir.parent.name / run_dir.name
        if not (candidate / "eval.json").exists() or run_differences(candidate, overrides):
            continue
        staging = run_dir.with_name(run_dir.name + ".copying")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(candidate, staging)
        shutil.rmtree(run_dir, ignore_errors=True)
        staging.rename(run_dir)  # whole or not at all: an interrupted copy leaves no eval.json in run_dir
        return candidate
    return None


def check_same_run(run_dir: Path, overrides: list[str]) -> None:
    """A run that an experiment reuses (finished) or resumes (checkpointed) must be the run it would start now: its
    ``config.yaml`` against the config ``overrides`` compose today. A tuning file changed since, or other
    overrides on the command line, would otherwise mix two settings under one label without a word; refused with
    one line naming the differences. Locations (``out_dir``, ``eval_cache_dir``) and settings newer than the run do
    not count."""
    diffs = run_differences(run_dir, overrides)
    if diffs:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diffs.items())
        raise ConfigError(
            f"{run_dir} was run with other settings than this experiment gives it now ({listed}; a tuning file "
            "changed since?): run the experiment into a new directory, or delete that run to redo it"
        )


def experiment_dir(cfg: DictConfig) -> Path:
    return hydra_output_dir() or Path(cfg.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.experiment}"


def run(cfg: DictConfig, run_one: RunOne, exp_dir: Path | None = None, overrides: list[str] | None = None) -> float:
    """Run every run of ``cfg.sweep`` with ``run_one`` (`benchmarks.run.run`, passed in by the runner: this module
    does not import the runner), skipping complete ones, then write the section. Returns the wall seconds."""
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    if sweep["section"] not in SECTIONS:
        raise ValueError(f"sweep.section={sweep['section']!r} is not a valid choice; available: {', '.join(SECTIONS)}")
    exp_dir = Path(exp_dir or experiment_dir(cfg)).absolute()  # the same paths for runs in other processes
    exp_dir.mkdir(parents=True, exist_ok=True)
    stop = exp_dir / STOP_FILE
    if stop.exists():  # left by an earlier invocation or before this one started: not a request to this one
        stop.unlink()
        print(f"[{cfg.experiment}] removed {stop} (a stop request from before this invocation)", flush=True)
    if sweep.get("grid"):  # leaderboard: the run list is every module (benchmarks.leaderboard.expand_grid)
        sweep["runs"] = leaderboard.expand_grid(sweep)
    task = [o for o in (_user_overrides() if overrides is None else list(overrides)) if not _is_seeds(o)]
    extra = [o for o in task if not _is_sweep(o)]  # what every run takes; the sweep's own settings are not a run's
    seeds = experiment_seeds(cfg, sweep)
    reuse_from = [str(Path(d).absolute()) for d in (cfg.get("reuse_from") or [])]
    for d in reuse_from:
        if not (Path(d) / "runs").is_dir():
            raise ConfigError(f"reuse_from={d}: not an experiment directory (no runs/ in it)")
    cache_dir = cfg.get("eval_cache_dir") or Path(cfg.out_dir) / ".eval_cache"  # one base evaluation for all runs
    runs = []
    todo = [(spec, seed) for spec in sweep["runs"] for seed in seeds]
    run_dirs = [exp_dir / "runs" / _slug(spec["label"]) / f"s{seed}" for spec, seed in todo]
    finished_before = sum((d / "eval.json").exists() for d in run_dirs)

    def this_invocation() -> dict[str, Any]:  # runs made now = finished now − finished before; copies counted apart
        made_now = sum((d / "eval.json").exists() for d in run_dirs) - finished_before
        return {"started": started, "wall_s": time.perf_counter() - t0, "trained": made_now - copied, "copied": copied}

    pending: list[tuple[str, Path, list[str]]] = []
    copied = 0
    for i, ((spec, seed), run_dir) in enumerate(zip(todo, run_dirs, strict=True)):
        label = spec["label"]
        over = [*spec.get("overrides", []), *extra, label_override(label), f"seed={seed}"]
        over += [quoted_override("out_dir", exp_dir / "runs")]
        over += [quoted_override("eval_cache_dir", Path(cache_dir).absolute())]
        if (run_dir / "eval.json").exists():
            check_same_run(run_dir, over)
            print(
                f"[{cfg.experiment}] run {i + 1}/{len(todo)}: {label} seed {seed}: complete already, reused",
                flush=True,
            )
            continue
        if latest_checkpoint(run_dir / "checkpoints") is not None:
            check_same_run(run_dir, over)
            over.append(quoted_override("resume", run_dir))
        elif (source := copy_finished_run(run_dir, over, reuse_from)) is not None:
            print(f"[{cfg.experiment}] run {i + 1}/{len(todo)}: {label} seed {seed}: copied from {source}", flush=True)
            copied += 1
            continue
        pending.append((f"{label}/s{seed}", run_dir, over))
    jobs = int(cfg.get("jobs") or 1)
    # Every run, in this process or another, refuses to start if the code changed since the experiment started
    # (lifecycle.check_experiment_source): one experiment's runs are made by one version of the code.
    outer = os.environ.get(EXPERIMENT_SOURCE_ENV)
    os.environ[EXPERIMENT_SOURCE_ENV] = outer or source_fingerprint()["source_sha256"]
    try:
        timings = (
            run_processes(pending, jobs, tag=str(cfg.experiment), stop=stop)
            if jobs > 1
            else run_in_process(pending, run_one, tag=str(cfg.experiment), stop=stop)
        )
        left = [name for name, run_dir, _ in pending if not (run_dir / "eval.json").exists()]
        if left and stop.exists():
            stop.unlink()
            raise ExperimentStopped(
                f"experiment={cfg.experiment} stopped by {stop} after the runs in flight: {len(pending) - len(left)} "
                f"run(s) finished in this invocation, {len(left)} not started; run the same command (hydra.run.dir="
                f"{exp_dir}) to continue"
            )
    except BaseException:  # interrupted, stopped or failed: the invocation is still recorded (its runs, wall time)
        record = (
            json.loads((exp_dir / "experiment.json").read_text()) if (exp_dir / "experiment.json").exists() else {}
        )
        record.setdefault("experiment", str(cfg.experiment))  # a first invocation that never finished names it too
        record["invocations"] = [*previous_invocations(exp_dir), this_invocation()]
        atomic_write_json(exp_dir / "experiment.json", record)
        raise
    finally:
        if outer is None:
            os.environ.pop(EXPERIMENT_SOURCE_ENV, None)
    seed_runs = [report.load_run(run_dir) for run_dir in run_dirs]
    for spec in sweep["runs"]:  # one record per label: mean over seeds, pooled win rates (benchmarks.protocol)
        mine = [r for r in seed_runs if (r["eval"].get("label") or r["eval"]["algo"]) == spec["label"]]
        runs.append(protocol.merge_seeds(mine))
    shown = [o for o in task if _key(o) not in LOCATIONS + SWEEP_LOCATIONS and not o.startswith("hydra.")]
    shown += ["reuse_from=[<dir>]"] if reuse_from else []
    command = " ".join(["python -m benchmarks.run", f"experiment={cfg.experiment}", *shown])
    invocations = [*previous_invocations(exp_dir), this_invocation()]
    made = sum(int(v.get("trained", 0)) + int(v.get("copied", 0)) for v in invocations)
    params = {  # the pages name the command that wrote them, and its wall time when every run's is recorded
        **sweep.get("params", {}),
        "command": command,
        "command_wall_s": sum(float(v["wall_s"]) for v in invocations) if made >= len(run_dirs) else None,
        "invocations": len(invocations),
    }
    lines = SECTIONS[sweep["section"]](runs, params, exp_dir)
    rows = protocol.aggregate(seed_runs, tuple(sweep.get("params", {}).get("kl_levels", protocol.KL_LEVELS)))
    atomic_write_json(exp_dir / "aggregate.json", rows)
    wall = time.perf_counter() - t0
    title = sweep.get("title", cfg.experiment)
    runs_wall = sum(float(r["eval"].get("wall_s", 0.0)) for r in seed_runs)  # each run's build+train+eval time
    footer = (
        f"_{len(seed_runs)} runs ({len(runs)} configurations × seeds {seeds}; numbers are means over seeds with 95% "
        f"intervals: t over seeds, win rates pooled with a caption × seed cluster bootstrap), {runs_wall / 60:.1f} "
        f"min of run time (`experiment={cfg.experiment}`)._"
    )
    body = [f"## {title}", "", *lines, "", footer]
    atomic_write_text(exp_dir / "section.md", "\n".join(body) + "\n")
    record = {
        "experiment": cfg.experiment,
        "title": title,
        "section": sweep["section"],
        "runs": {
            f"{r['eval'].get('label', r['dir'].parent.name)}/s{r['eval']['seed']}": str(r["dir"].relative_to(exp_dir))
            for r in seed_runs
        },
        "seeds": seeds,
        "run_wall_s": timings,
        "wall_s": wall,
        "runs_wall_s": runs_wall,
        "invocations": [*invocations[:-1], {**invocations[-1], "wall_s": wall}],
    }
    atomic_write_json(exp_dir / "experiment.json", record)
    print(f"[{cfg.experiment}] section: {exp_dir / 'section.md'} ({wall:.0f} s)", flush=True)
    return wall


def _progress(tag: str, done: dict[str, float], name: str, left: int, workers: int = 1) -> None:
    eta = sum(done.values()) / len(done) * left / workers
    print(f"[{tag}]   {name}: {done[name]:.0f} s; {left} to go, ~{eta / 60:.0f} min left", flush=True)


def run_in_process(
    pending: list[tuple[str, Path, list[str]]], run_one: RunOne, tag: str, stop: Path | None = None
) -> dict[str, float]:
    """Each pending run, one after the other, in this process (``jobs=1``), until the file ``stop`` exists (checked
    before each run). Returns each run's wall seconds."""
    timings: dict[str, float] = {}
    for i, (name, run_dir, overrides) in enumerate(pending):
        if stop is not None and stop.exists():
            print(f"[{tag}] {stop} found: no new run started", flush=True)
            break
        print(f"[{tag}] run {i + 1}/{len(pending)}: {name}", flush=True)
        t_run = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        run_one(compose_run(overrides), run_dir=run_dir)
        timings[name] = time.perf_counter() - t_run
        _progress(tag, timings, name, len(pending) - i - 1)
    return timings


def run_processes(
    pending: list[tuple[str, Path, list[str]]], jobs: int, tag: str, stop: Path | None = None
) -> dict[str, float]:
    """Each pending run as its own ``python -m benchmarks.run <overrides> hydra.run.dir=<run_dir>`` process, ``jobs``
    at a time, each with ⌊cores / jobs⌋ intra-op threads; its output goes to ``<run_dir>/process.log``. The runs
    are the same as in-process ones (same config, same directory; an interrupted one resumes). Once the file
    ``stop`` exists no new process starts and the running ones finish. A failed run is named with its log after
    the others finish. On SIGINT/SIGTERM (`benchmarks.lifecycle.Interrupted`) the runs in flight are passed the
    signal and waited for (`stop_processes`): they checkpoint, and the experiment's next invocation resumes them.
    Returns each run's wall seconds."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    root = str(Path(__file__).resolve().parents[1])  # the checkout: `benchmarks` importable from any cwd
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": path}
    env["TQDM_DISABLE"] = "1"  # the logs hold no progress bars
    queue, running, timings, failed = list(pending), {}, {}, []
    try:
        while queue or running:
            if queue and stop is not None and stop.exists():
                print(f"[{tag}] {stop} found: {len(running)} run(s) in flight finish, {len(queue)} wait", flush=True)
                queue = []
            while queue and len(running) < jobs:
                name, run_dir, overrides = queue.pop(0)
                run_dir.mkdir(parents=True, exist_ok=True)
                log = open(run_dir / "process.log", "ab")  # noqa: SIM115 (closed when the process ends)
                cmd = [sys.executable, "-m", "benchmarks.run", *overrides, quoted_override("hydra.run.dir", run_dir)]
                # Its own session: a terminal's Ctrl-C reaches this process only, which passes one signal on.
                with signals_deferred():  # no process started and not kept in `running`
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                    running[proc] = (name, run_dir, log, time.perf_counter())
                print(f"[{tag}] started {name} ({threads} threads; {len(queue)} waiting)", flush=True)
            time.sleep(1.0)
            for proc in [p for p in running if p.poll() is not None]:
                name, run_dir, log, t_run = running.pop(proc)
                log.close()
                if proc.returncode != 0 or not (run_dir / "eval.json").exists():
                    failed.append(f"{name}: exit code {proc.returncode}, log {run_dir / 'process.log'}")
                    print(f"[{tag}]   {name} FAILED ({failed[-1]})", flush=True)
                    continue
                timings[name] = time.perf_counter() - t_run
                _progress(tag, timings, name, len(queue) + len(running), jobs)
    except BaseException as err:  # SIGINT/SIGTERM (or a failure here): the runs in flight checkpoint and stop too
        default = signal.SIGINT if isinstance(err, KeyboardInterrupt) else signal.SIGTERM
        stop_processes(running, getattr(err, "signum", default), tag)
        raise
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) failed (run the experiment again to retry them):\n" + "\n".join(failed)
        )
    return timings


def stop_processes(running: dict[subprocess.Popen, tuple], signum: int, tag: str) -> None:
    """Pass ``signum`` on to each run process in ``running`` (SIGTERM for a signal other than SIGINT/SIGTERM) and
    wait for them: each finishes its optimizer step, writes a checkpoint and exits (`rlkit_diffusion.train.Interrupt`),
    so that the experiment's next invocation resumes them. A further stop signal while waiting is passed on as well
    (the runs then exit at once, keeping their last checkpoint)."""
    if not running:
        return
    name = signal.Signals(signum).name
    print(f"[{tag}] {name}: the {len(running)} run(s) in flight checkpoint and stop", flush=True)
    while True:
        forward = signum if signum in (signal.SIGINT, signal.SIGTERM) else signal.SIGTERM  # a run may ignore SIGHUP
        try:
            with signals_deferred():  # every process gets the signal
                for proc in running:
                    if proc.poll() is None:
                        proc.send_signal(forward)
            for proc in running:
                proc.wait()
            break
        except KeyboardInterrupt as again:  # another signal: pass it on too
            signum = getattr(again, "signum", signal.SIGINT)
    for _, _, log, _ in running.values():
        log.close()


def experiment_seeds(cfg: DictConfig, sweep: dict[str, Any]) -> list[int]:
    """The reporting seeds: ``seeds=`` on the command line, else the experiment's ``sweep.seeds``, else
    `benchmarks.protocol.REPORTING_SEEDS`; never a tuning seed."""
    value = cfg.get("seeds")
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    seeds = protocol.resolve_seeds(value if value is not None else sweep.get("seeds"))
    protocol.check_reporting_seeds(seeds)
    return seeds


def previous_invocations(exp_dir: Path) -> list[dict[str, Any]]:
    """The earlier invocations of the experiment command in ``exp_dir`` (``experiment.json``): each one's start, wall
    seconds, runs trained and runs copied. A record written before invocations were kept counts as one invocation
    with its ``wall_s`` and the runs it trained (``run_wall_s``)."""
    f = exp_dir / "experiment.json"
    if not f.exists():
        return []
    old = json.loads(f.read_text())
    if "invocations" in old:
        return list(old["invocations"])
    if "wall_s" not in old:
        return []
    return [{"started": None, "wall_s": float(old["wall_s"]), "trained": len(old.get("run_wall_s", {}))}]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_seeds(override: str) -> bool:
    """An override that the experiment itself takes (its seeds, the directories it copies from), not its runs."""
    return _key(override) in ("seed", "seeds", "reuse_from")


def _is_sweep(override: str) -> bool:
    """An override of the experiment's sweep (``sweep.grid.algos=[...]``, ``sweep.params.budgets=[...]``,
    ``sweep.params.docs_out=...``): it changes the run list or the page, and is no setting of a run (a run's config
    has no ``sweep``, so passing it on would fail every run)."""
    return _key(override) == "sweep" or _key(override).startswith("sweep.")


def quoted_override(key: str, value: Any) -> str:
    """``key=value`` with the value quoted for Hydra's override grammar (labels such as ``beta=500``, and the run
    directories named after them, contain ``=``)."""
    escaped = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{escaped}'"


def label_override(label: str) -> str:
    return quoted_override("label", label)


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------
def _pct(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.1%}"


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, fmt)


def _cfg(r: dict[str, Any], key: str) -> Any:
    """A value of the run's resolved config (``config.yaml``), e.g. ``algo.beta``."""
    return OmegaConf.select(OmegaConf.load(r["dir"] / "config.yaml"), key)


def _label(r: dict[str, Any]) -> str:
    return r["eval"].get("label") or r["eval"]["algo"]


def _win(e: dict[str, Any], pre: str = "") -> str:
    return (
        f"{_pct(e.get(f'{pre}win_rate_vs_base'))} [{_pct(e.get(f'{pre}win_rate_vs_base_ci_low'))}, "
        f"{_pct(e.get(f'{pre}win_rate_vs_base_ci_high'))}]"
    )


def table1_marks(e: dict[str, Any], kl_budget: float) -> dict[str, tuple[bool, str]]:
    """Table 1's three properties of one run, each ``(holds, the number behind the mark)``.

    * open vocabulary: the gain carries to held-out captions — held-out win rate vs base with its 95% CI above ½;
    * equal inference cost: sampling costs what the base's does — UNet NFEs per sample ≤ the base's, no reward
      queries at inference;
    * divergence control: the policy stays near the reference — path KL to the base ≤ ``kl_budget`` nats.
    """
    held_lo = e.get("heldout_win_rate_vs_base_ci_low", float("nan"))
    nfe, nfe_base = e.get("inference_nfe_per_sample", float("nan")), e.get("inference_nfe_per_sample_base")
    ratio = nfe / nfe_base if nfe_base else float("nan")
    queries = e.get("inference_reward_queries_per_sample", 0.0)
    kl = e.get("kl_to_ref", float("nan"))
    return {
        "open vocabulary": (held_lo > 0.5, f"held-out win {_win(e, 'heldout_')}"),
        "equal inference cost": (ratio <= 1.0 + 1e-9 and queries == 0, f"{ratio:.0f}× NFE, {queries:.0f} reward q."),
        "divergence control": (kl <= kl_budget, f"KL {_num(kl, '.0f')}"),
    }


def section_table1(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    kl_budget = float(params.get("kl_budget", 200.0))
    props = ["open vocabulary", "equal inference cost", "divergence control"]
    lines = [
        "| method | " + " | ".join(props) + " | win rate vs base | gold |",
        "|---|" + "---|" * (len(props) + 2),
    ]
    for r in runs:
        e = r["eval"]
        marks = table1_marks(e, kl_budget)
        cells = [f"{'✓' if ok else '✗'} ({why})" for ok, why in (marks[p] for p in props)]
        gold = f"{_num(e.get('gold_reward_base'))} → {_num(e.get('gold_reward_trained'))}"
        lines.append(f"| {_label(r)} | " + " | ".join(cells) + f" | {_win(e)} | {gold} |")
    lines += [
        "",
        "Marks are measured: open vocabulary = held-out win rate's 95% CI above 50%; equal inference cost = UNet "
        "NFEs per sample ≤ the base's and no reward queries at inference; divergence control = path KL to the base "
        f"≤ {kl_budget:.0f} nats (`sweep.params.kl_budget`).",
    ]
    return lines


def section_head_to_head(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    """The comparison table (each label's seeds grouped: t-intervals over seeds, win rates pooled over seeds and
    captions), Table 1 on the merged runs, and the figures. Grouped by the experiment's labels, as Table 1 and the
    leaderboard are: a seed copied from another experiment (``reuse_from``) stays in its label's group."""
    groups = {(r["eval"]["world"], _label(r)): r.get("seed_runs", [r]) for r in runs}
    budgets = sorted({int(s["eval"].get("unet_nfe", 0)) for rs in groups.values() for s in rs})
    lines = [report.table(groups), "", f"Training UNet NFEs per run: {budgets}.", ""]
    lines += ["### Table 1 (measured on these runs)", "", *section_table1(runs, params, out), ""]
    for title, path in report.figures(groups, out):
        lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return lines


def section_table2(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    lines = ["| scorer | preference accuracy on validation pairs |", "|---|---|"]
    for r in runs:
        e = r["eval"]
        if "implicit_acc" in e:
            lines.append(f"| implicit reward of {_label(r)} (S4.1) | {_pct(e['implicit_acc'])} |")
    e = runs[0]["eval"]
    for key in sorted(k for k in e if k.startswith("reward_acc_")):
        name = key.removeprefix("reward_acc_")
        note = " (the hidden truth: label-noise ceiling)" if name == "gold" else ""
        lines.append(f"| {name} reward{note} | {_pct(e[key])} |")
    lines += [
        "| the base model (θ = θ_ref: every margin is 0) | 50.0% |",
        "",
        "Accuracy = fraction of held-out labelled pairs (c, x^w, x^l) the scorer ranks x^w above x^l (ties ½); the "
        "implicit reward is −½β·E_{t,ε}[(‖ε−ε_θ(x^w_t)‖² − ‖ε−ε_ref(x^w_t)‖²) − (same for x^l)] (supp. S4.1).",
    ]
    return lines


def section_fig6(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    names = list(params.get("rewards") or runs[0]["eval"].get("win_rate_vs_base_by_reward", {}).keys())
    matrix = np.full((len(runs), len(names)), np.nan)
    for i, r in enumerate(runs):
        by = r["eval"].get("win_rate_vs_base_by_reward", {})
        for j, n in enumerate(names):
            if n in by:
                matrix[i, j] = by[n]["win_rate"]
    lines = [
        "| trained on labels of ↓ / win rate under → | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for i, r in enumerate(runs):
        lines.append(f"| {_label(r)} | " + " | ".join(_pct(v) for v in matrix[i]) + " |")
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 0.6 * len(runs) + 1.6))
    im = ax.imshow(matrix, cmap="RdYlGn", vmin=0.2, vmax=0.8)
    for i in range(len(runs)):
        for j in range(len(names)):
            if math.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(runs)), [_label(r) for r in runs])
    ax.set_xlabel("evaluated by (win rate vs base)")
    ax.set_ylabel("DPO trained on labels of")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(out / "fig6_ai_feedback.png", dpi=110)
    plt.close(fig)
    return [*lines, "", "![AI feedback matrix](fig6_ai_feedback.png)"]


def section_beta_sweep(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    betas, rows = zip(*sorted(((float(_cfg(r, "algo.beta")), r) for r in runs), key=lambda p: p[0]))
    lines = ["| β | gold reward (95% CI) | win rate vs base | KL to base | proxy |", "|---|---|---|---|---|"]
    for beta, r in zip(betas, rows):
        e = r["eval"]
        lines.append(
            f"| {beta:g} | {_num(e['gold_reward_trained'])} [{_num(e['gold_reward_trained_ci_low'])},"
            f" {_num(e['gold_reward_trained_ci_high'])}] | {_win(e)} | {_num(e['kl_to_ref'], '.1f')} |"
            f" {_num(e.get('proxy_reward_trained'))} |"
        )
    plt = report._plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    gold = [r["eval"]["gold_reward_trained"] for r in rows]
    err = np.array(
        [
            [g - r["eval"]["gold_reward_trained_ci_low"], r["eval"]["gold_reward_trained_ci_high"] - g]
            for g, r in zip(gold, rows)
        ]
    ).T
    axes[0].errorbar(betas, gold, yerr=err, marker="o", capsize=3)
    axes[0].axhline(rows[0]["eval"]["gold_reward_base"], color="k", ls="--", lw=0.8, label="base")
    axes[0].set_ylabel("gold reward")
    axes[1].plot(betas, [r["eval"]["kl_to_ref"] for r in rows], marker="o")
    axes[1].set_ylabel("path KL to base (nats)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("β (official convention)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "beta_sweep.png", dpi=110)
    plt.close(fig)
    return [*lines, "", "![beta sweep](beta_sweep.png)"]


def section_best_of_n(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    e = runs[0]["eval"]
    oracle, by_proxy = e["best_of_n_curve"], e.get("best_of_n_curve_by_proxy")
    n = np.arange(1, len(oracle) + 1)
    plt = report._plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(n, oracle, marker="o", label="best of N base draws, picked by gold (oracle)")
    if by_proxy:
        ax.plot(n, by_proxy, marker="s", label="best of N base draws, picked by proxy")
    for r in runs:
        ax.axhline(r["eval"]["gold_reward_trained"], ls="--", color="C3", lw=1)
        ax.text(n[-1], r["eval"]["gold_reward_trained"], f" {_label(r)}", va="bottom", ha="right", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (base draws per caption)")
    ax.set_ylabel("gold reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "best_of_n.png", dpi=110)
    plt.close(fig)
    lines = ["| model | gold reward | ≙ best-of-N by gold | ≙ best-of-N by proxy |", "|---|---|---|---|"]
    for r in runs:
        e = r["eval"]
        cens = "≥ " if e.get("best_of_n_equivalent_censored") else ""
        lines.append(
            f"| {_label(r)} | {_num(e['gold_reward_trained'])} | {cens}{_num(e['best_of_n_equivalent'], '.2f')} |"
            f" {_num(e.get('best_of_n_equivalent_by_proxy', math.nan), '.2f')} |"
        )
    lines += ["", "| N | " + " | ".join(str(i) for i in n) + " |", "|---|" + "---|" * len(n)]
    lines.append("| by gold | " + " | ".join(f"{v:.2f}" for v in oracle) + " |")
    if by_proxy:
        lines.append("| by proxy | " + " | ".join(f"{v:.2f}" for v in by_proxy) + " |")
    return [*lines, "", "![best of N](best_of_n.png)"]


def section_sdedit(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    lines = ["| model | edit win rate vs base's edits | held-out | gold of edits: base → model |", "|---|---|---|---|"]
    for r in runs:
        e = r["eval"]
        gold = f"{_num(e['gold_reward_base'])} → {_num(e['gold_reward_trained'])}"
        name = f"{_label(r)} (strength {e.get('eval_strength', math.nan):g})"
        lines.append(f"| {name} | {_win(e)} | {_win(e, 'heldout_')} | {gold} |")
    grid = sdedit_grid(runs[0], out)
    if grid is not None:
        lines += ["", f"![SDEdit grid]({grid.name})"]
    return lines


def sdedit_grid(r: dict[str, Any], out: Path) -> Path | None:
    """Rows: the corrupted input, the base's edit, the model's edit (gold under each edit); columns: captions."""
    from safetensors.torch import load_file

    f = r["dir"] / "samples.safetensors"
    if not f.exists():
        return None
    t = load_file(str(f))
    if "input" not in t or t["base"].ndim != 4:
        return None
    prompts = json.loads((r["dir"] / "samples.json").read_text())["prompts"]
    rows = [("input", t["input"], None), ("base edit", t["base"], t["base_gold"])]
    rows.append((f"{_label(r)} edit", t["trained"], t["trained_gold"]))
    return report.draw_grid(rows, prompts, out / "sdedit_grid.png")


def section_flow_vs_eps(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    """Each algorithm on the ε-policy world and on its flow twin (same data, reward, pairs, prompts and p*): the gold
    reward, the win rate vs the world's own base, and the distance to the KL-optimal target before and after, with
    t-intervals over seeds."""
    from rlkit_diffusion.intervals import t_interval

    def interval(r: dict[str, Any], key: str) -> str:
        m, lo, hi = t_interval([s["eval"][key] for s in r["seed_runs"]], key)
        return f"{_num(m)} [{_num(lo)}, {_num(hi)}]"

    lines = [
        "| algorithm | policy | gold reward: base → trained [95% CI] | win rate vs base | "
        "distance to p*: base → trained [95% CI] | path KL |",
        "|---|---|---|---|---|---|",
    ]
    kinds = {"toy2d": "ε (DDIM η = 1)", "toy2d_flow": "flow (SDE, a = 0.7)"}
    for r in sorted(runs, key=lambda r: (r["eval"]["algo"], r["eval"]["world"])):
        e = r["eval"]
        lines.append(
            f"| {e['algo']} | {kinds.get(e['world'], e['world'])} | {_num(e['gold_reward_base'])} → "
            f"{interval(r, 'gold_reward_trained')} | {_win(e)} | {_num(e['distance_to_optimum_base'])} → "
            f"{interval(r, 'distance_to_optimum_trained')} | {_num(e['kl_to_ref'], '.2f')} |"
        )
    return lines


def section_leaderboard(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    """The leaderboard's tables (`benchmarks.leaderboard.section_leaderboard`, also written to ``docs_out``), then the
    head-to-head view of the same runs at the top budget: one measurement serves both pages."""
    lines = leaderboard.section_leaderboard(runs, params, out)
    top = max(float(b) for b in params.get("budgets", [19200]))
    return [
        *lines,
        "",
        f"### Head to head at {top:,.0f} training UNet NFEs",
        "",
        *section_head_to_head(runs, params, out),
    ]


SECTIONS: dict[str, Section] = {
    "table1": section_table1,
    "head_to_head": section_head_to_head,
    "table2": section_table2,
    "fig6": section_fig6,
    "beta_sweep": section_beta_sweep,
    "best_of_n": section_best_of_n,
    "sdedit": section_sdedit,
    "flow_vs_eps": section_flow_vs_eps,
    "leaderboard": section_leaderboard,
    "paper_claims": leaderboard.section_paper_claims,
}
