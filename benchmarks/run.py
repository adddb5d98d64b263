"""``python -m benchmarks.run algo=dpo`` — build the world once, train one algorithm, evaluate it against the base.

Every run directory gets ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and
``eval.json``. Multi-run: ``python -m benchmarks.run -m algo=dpo,ddpo seed=0,1,2``. Multi-process:
``accelerate launch -m benchmarks.run algo=dpo`` (only the main process writes).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import benchmarks.schema  # noqa: F401  (registers the structured-config schemas)
from algos import algo_config_class, build_algo
from benchmarks.eval_schema import SCHEMA_VERSION
from benchmarks.lifecycle import (
    ConfigError,
    ExperimentStopped,
    Interrupted,
    check_experiment_source,
    is_finished,
    record_resume,
    resolve_run,
    resume_checkpoint,
    resume_config,
    source_fingerprint,
    terminate_as_interrupt,
    validate,
)
from benchmarks.wiring import (
    base_eval_cache,
    build_run,
    check_tuning,
    new_run_dir,
    refuse_existing_run,
    resume_if_started,
    save_config,
    save_eval,
    save_per_sample,
    save_samples,
    to_dataclass,
)
from rlkit_diffusion.algorithm import AlgoContext
from rlkit_diffusion.checkpoint import atomic_write_json, latest_checkpoint, read_state
from rlkit_diffusion.evaluate import EvalConfig, evaluate
from rlkit_diffusion.logging import MetricLogger, make_logger, tracker_names
from rlkit_diffusion.train import BudgetConfig, ResumeError, TrainConfig, check_resume_layout, train

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Settings:
    """The run's dataclass configs (validated by the structured schemas)."""

    train: TrainConfig
    budget: BudgetConfig
    eval: EvalConfig
    algo: Any

    @classmethod
    def of(cls, cfg: DictConfig) -> Settings:
        return cls(
            train=to_dataclass(TrainConfig, cfg.train),
            budget=to_dataclass(BudgetConfig, cfg.budget),
            eval=to_dataclass(EvalConfig, cfg.eval),
            algo=to_dataclass(algo_config_class(cfg.algo.name), cfg.algo),
        )


def prepare_run_dir(cfg: DictConfig, run_dir: Path | None, main: bool) -> Path | None:
    """A new run's directory, with its resolved ``config.yaml`` (a resumed run keeps its own)."""
    if cfg.resume:
        return Path(run_dir)
    run_dir = run_dir or (new_run_dir(cfg) if main else None)
    if run_dir is not None and main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir)
    return run_dir


def plan_resume(cfg: DictConfig, overrides: list[str] | None) -> tuple[DictConfig, Path, Path | None, dict]:
    """``resume=<dir>|latest``: the run, its own config (with the budget extensions of ``resume_override``), and the
    newest intact checkpoint — None when the run is finished and nothing extends it (then nothing is changed)."""
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides or []]
    world = cfg.world.name if "world" in keys else None
    algo = cfg.algo.name if "algo" in keys else None
    run_dir = (
        Path(cfg.resume)
        if Path(str(cfg.resume)).is_dir()
        else resolve_run(str(cfg.resume), str(cfg.out_dir), world, algo)
    )
    effective, extend = resume_config(cfg, run_dir, overrides)
    if is_finished(run_dir) and not extend:
        return effective, run_dir, None, extend
    validate(effective)
    return effective, run_dir, resume_checkpoint(run_dir), extend


def train_run(cfg, s: Settings, algo, ctx: AlgoContext, run_dir, resume_from, logger: MetricLogger) -> dict[str, Any]:
    """THE training loop (with the learning-curve evaluation), or nothing for an evaluation-only run."""
    main = ctx.accelerator.is_main_process
    # The learning curve: the training split at a quarter of the draws, no held-out split, no implicit-reward
    # accuracy (what the curves, the budget tables and matched KL read; the final evaluation has everything). Its
    # generators are its own, so it leaves training alone (tests/test_train.py).
    curve_cfg = EvalConfig(
        **{
            **vars(s.eval),
            "samples_per_prompt": max(1, s.eval.samples_per_prompt // 4),
            "heldout": False,
            "implicit_pairs": 0,
        }
    )
    caches: list[Any] = []  # the base's cache, opened at the first evaluation (keyed by the base weights then)

    def eval_fn(update: int) -> dict[str, float]:
        if not caches:
            caches.append(base_eval_cache(cfg, ctx, curve_cfg) if main else {})
        m = evaluate(
            ctx.world,
            ctx.policy,
            ctx.base.policy,
            curve_cfg,
            proxy=cfg.reward,
            base_cache=caches[0],
            sampler=algo.sampler,
        )
        return {k: v for k, v in m.items() if isinstance(v, float) and not k.endswith(("_low", "_high"))}

    if s.train.steps == 0 and s.budget.kind == "steps" and s.budget.amount is None:
        algo.setup(ctx)  # evaluation only (e.g. of init_from's weights): no optimizer step, no checkpoint
        summary = {"train_nfe": 0, "reward_queries": 0, "updates": 0, "train_wall_s": 0.0, "checkpoint": None}
    else:
        summary = train(
            algo,
            ctx,
            s.train,
            budget=s.budget,
            run_dir=run_dir if main else None,
            logger=logger,
            eval_fn=logger.wrap_eval(eval_fn),
            resume_from=resume_from,
        )
    return summary


def evaluate_run(cfg: DictConfig, s: Settings, algo, ctx: AlgoContext, run_dir: Path) -> dict[str, Any]:
    """The final evaluation against the base (same prompts, same noises for every algorithm) and the sample grid."""
    world, policy, base_policy = ctx.world, ctx.policy, ctx.base.policy
    metrics = evaluate(
        world,
        policy,
        base_policy,
        s.eval,
        proxy=cfg.reward,
        base_cache=base_eval_cache(cfg, ctx, s.eval),
        sampler=algo.sampler,
        implicit_scale=algo.implicit_reward_scale(),
    )
    save_samples(world, policy, base_policy, s.eval, run_dir, algo.sampler)
    save_per_sample(metrics, run_dir, s.eval.samples_per_prompt)
    return metrics


def eval_record(
    cfg: DictConfig, metrics: dict, summary: dict, num_processes: int, t_start: float, code: dict | None = None
) -> dict[str, Any]:
    """The contents of eval.json (benchmarks/eval_schema.py); ``code``: the `source_fingerprint` at the start."""
    return {
        "schema_version": SCHEMA_VERSION,
        "algo": cfg.algo.name,
        "world": cfg.world.name,
        "seed": int(cfg.seed),
        **({"label": cfg.label} if cfg.get("label") else {}),
        **metrics,
        "unet_nfe": summary["train_nfe"],
        "reward_queries": summary["reward_queries"],
        "updates": summary["updates"],
        "train_wall_s": summary["train_wall_s"],
        "wall_s": time.perf_counter() - t_start,
        "checkpoint": summary["checkpoint"],
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "argv": sys.argv,
            "num_processes": num_processes,  # the effective batch is per-process batch × this
            **({"code": code} if code else {}),  # which sources made the run (lifecycle.source_fingerprint)
        },
    }


def make_accelerator(cfg: DictConfig, s: Settings) -> Accelerator:
    """The run's accelerator: CPU when ``device=cpu`` (or ``auto`` without CUDA), the run's trackers, and the
    collective timeout ``train.collective_timeout_s``. A job that torchrun restarted first joins its own attempt's
    process group (`init_restarted_process_group`)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    init_restarted_process_group(timedelta(seconds=s.train.collective_timeout_s), cpu)
    return Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=s.train.grad_accum,
        log_with=tracker_names(cfg.get("logger")) or None,  # logger=tensorboard|wandb|trackio|mlflow|none (a list)
        project_dir=cfg.out_dir,
        # several processes: a rank that stops answering fails the collectives after this, instead of a hang
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=s.train.collective_timeout_s))],
    )


def mark_stopped(summary: dict[str, Any], run_dir: Path, main: bool) -> Interrupted:
    """A run that SIGINT/SIGTERM stopped (checkpointed by the loop): the main process writes ``STOPPED`` with the
    resume command and prints it. Returns the `Interrupted` to raise (its signal number ends a caller's loop over
    runs too)."""
    command = f"python -m benchmarks.run resume={run_dir}"
    stopped = f"STOPPED (interrupted at step {summary['updates']} by {summary['interrupted']})"
    if main:
        (run_dir / "STOPPED").write_text(f"{stopped}\nresume with: {command}\n")
        print(f"{stopped}; checkpoint {summary['checkpoint']}\nresume with: {command}", flush=True)
    signum = signal.Signals[summary["interrupted"]].value
    return Interrupted(signum, f"run {run_dir}: {stopped}; resume with: {command}" if main else stopped)


def run(cfg: DictConfig, run_dir: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train ``cfg.algo`` on ``cfg.world`` and evaluate it. Returns the eval.json contents. When SIGINT/SIGTERM
    stopped training the run is checkpointed and ``STOPPED``, and `Interrupted` is raised (a caller that loops over
    runs stops too).

    ``overrides`` are the command-line overrides (Hydra's): on ``resume=`` only those are compared with the run's
    config; None compares every key of ``cfg``."""
    t_start = time.perf_counter()
    phases = Phases()
    validate(cfg)  # before any work: nothing is built and no directory is made for a bad config
    code = source_fingerprint()
    check_experiment_source(code["source_sha256"])  # a run started by an experiment runs the experiment's code
    resume_from = None
    if cfg.resume:
        cfg, run_dir, resume_from, extend = plan_resume(cfg, overrides)
        if resume_from is None:
            done = json.loads((run_dir / "eval.json").read_text())
            print(
                f"resume: {run_dir} is finished ({done.get('updates')} updates, eval.json written); nothing changed."
                f" To train it longer: resume={run_dir} train.steps=<more> resume_override=[train.steps]",
                flush=True,
            )
            return done
    check_tuning(cfg.world.name, cfg.algo.name)
    s = Settings.of(cfg)
    accelerator = make_accelerator(cfg, s)
    main = accelerator.is_main_process
    ctx = build_run(cfg, accelerator, s.train.batch_size)
    run_dir = prepare_run_dir(cfg, run_dir, main)
    algo = build_algo(cfg.algo.name, s.algo)
    if resume_from is not None:  # another number of processes: refused before anything is recorded
        state = read_state(resume_from)
        check_resume_layout(state, resume_from.name, algo, s.train.batch_size, accelerator.num_processes)
        if main:
            record_resume(run_dir, cfg, resume_from, extend)
    logger = make_logger(
        run_dir,
        accelerator,
        config=OmegaConf.to_container(cfg, resolve=True),
        enabled=main,
        world=ctx.world,
        policy=ctx.policy,
        base_policy=ctx.base.policy,
        eval_cfg=s.eval,
        sampler=algo.sampler,
    )
    phases.end("build")
    summary = train_run(cfg, s, algo, ctx, run_dir, resume_from, logger)
    if summary.get("interrupted"):
        logger.close()
        raise mark_stopped(summary, run_dir, main)
    phases.end("train")
    if not main:
        # Rank 0 evaluates alone; the other ranks are done. No barrier here or after the evaluation: a long final
        # evaluation (real SD prompt sets) must not run into the collective timeout of ranks waiting at a barrier.
        logger.close()
        return {}
    metrics = evaluate_run(cfg, s, algo, ctx, run_dir)
    phases.end("evaluate")
    result = eval_record(cfg, metrics, summary, accelerator.num_processes, t_start, code)
    save_eval(result, run_dir)
    logger.log_final(result, run_dir)
    logger.close()
    report_path = None
    if cfg.get("report", True):
        from benchmarks.report import write_report

        report_path = write_report([run_dir], run_dir)  # report.md/html of this one run (figures, sample grid)
    phases.end("report")
    result.update(phases.record())
    save_eval(result, run_dir)
    print_summary(result, run_dir, report_path)
    return result


def run_seeds(cfg: DictConfig, parent: Path, run_one=None) -> list[dict[str, Any]]:
    """``seeds=[..]`` (or a count): one run per seed into ``<parent>/s<seed>/`` (a finished one — with eval.json —
    is reused, so an interrupted multi-seed run continues), then ``aggregate.json`` and the report of all of them
    (mean and 95% interval over seeds, win rate pooled over seeds and captions; `benchmarks.protocol`)."""
    from benchmarks import protocol
    from benchmarks.report import load_run, write_report

    run_one = run_one or run
    seeds = protocol.resolve_seeds(OmegaConf.to_container(cfg.seeds) if OmegaConf.is_config(cfg.seeds) else cfg.seeds)
    protocol.check_reporting_seeds(seeds)
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        run_dir = parent / f"s{seed}"
        if (run_dir / "eval.json").exists():
            print(f"[seeds] {i + 1}/{len(seeds)} seed {seed}: complete already, reused {run_dir}", flush=True)
            continue
        print(f"[seeds] {i + 1}/{len(seeds)} seed {seed} -> {run_dir}", flush=True)
        sub = OmegaConf.merge(cfg, {"seed": seed, "seeds": None, "report": False})
        run_dir.mkdir(parents=True, exist_ok=True)
        run_one(resume_if_started(sub, run_dir), run_dir=run_dir)
    runs = [load_run(parent / f"s{seed}") for seed in seeds]
    rows = protocol.aggregate(runs)
    atomic_write_json(parent / "aggregate.json", rows)
    report = write_report([parent]) if cfg.get("report", True) else None
    for row in rows:
        win = row["pooled_win_rate"].get("train")
        print(
            f"{row['algo']} on {row['world']}, seeds {row['seeds']}: pooled win rate vs base "
            f"{protocol.fmt_ci(win, '{:.1%}')} (95% CI, captions × seeds); gold "
            f"{protocol.fmt_ci(row['metrics'].get('gold_reward_trained'))} (t-interval over seeds)",
            flush=True,
        )
    print(f"  aggregate: {parent / 'aggregate.json'}" + (f"   report: {report}" if report else ""), flush=True)
    return rows


class Phases:
    """Wall and CPU seconds of a run's phases (build, train, evaluate, report): ``phases_wall_s``/``phases_cpu_s``
    in eval.json. The CPU clock is the process's (all threads): a busy neighbour on a shared machine inflates the
    wall clock, not it."""

    def __init__(self) -> None:
        self.wall, self.cpu = {}, {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def end(self, name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        self.wall[name], self.cpu[name] = t - self._t, c - self._c
        self._t, self._c = t, c

    def record(self) -> dict[str, dict[str, float]]:
        return {"phases_wall_s": dict(self.wall), "phases_cpu_s": dict(self.cpu)}


def print_summary(r: dict[str, Any], run_dir: Path, report_path: Path | None = None) -> None:
    def f(key: str) -> str:
        return f"{r[key]:.3f}" if key in r else "n/a"

    lines = [
        f"{r['algo']} on {r['world']} (seed {r['seed']}): {r['updates']} updates in {r['train_wall_s']:.1f}s",
        f"  win rate vs base (gold): {r['win_rate_vs_base']:.1%} "
        f"[95% CI over captions {r['win_rate_vs_base_ci_low']:.1%}, {r['win_rate_vs_base_ci_high']:.1%}]",
    ]
    if "heldout_win_rate_vs_base" in r:
        lines.append(
            f"  held-out win rate:       {r['heldout_win_rate_vs_base']:.1%} "
            f"[95% CI {r['heldout_win_rate_vs_base_ci_low']:.1%}, {r['heldout_win_rate_vs_base_ci_high']:.1%}]"
        )
    lines.append(f"  gold reward:  {f('gold_reward_base')} -> {f('gold_reward_trained')}")
    if "proxy_reward_base" in r:
        lines.append(f"  proxy reward: {f('proxy_reward_base')} -> {f('proxy_reward_trained')}")
    if "distance_to_optimum_base" in r:
        lines.append(f"  distance to p*: {f('distance_to_optimum_base')} -> {f('distance_to_optimum_trained')}")
    if "implicit_acc" in r:
        lines.append(f"  implicit-reward accuracy (val pairs): {f('implicit_acc')}")
    if "best_of_n_equivalent" in r:
        bound = "≥ " if r.get("best_of_n_equivalent_censored") else ""
        lines.append(f"  matches best-of-N of the base (by gold) at N = {bound}{r['best_of_n_equivalent']:.2f} (S8)")
    lines.append(f"  KL to reference: {f('kl_to_ref')}   inference NFE/sample: {f('inference_nfe_per_sample')}")
    lines.append(f"  wall: {r['wall_s']:.1f}s")
    if "phases_wall_s" in r:
        lines.append(
            "  phases (wall / cpu s): "
            + ", ".join(f"{k} {r['phases_wall_s'][k]:.1f} / {r['phases_cpu_s'][k]:.1f}" for k in r["phases_wall_s"])
        )
    lines.append(f"  run directory: {run_dir}")
    if report_path is not None:
        lines.append(f"  report: {report_path}  (compare runs: python -m benchmarks.report <dirs>)")
    print("\n".join(lines), flush=True)


CONFIG_GROUPS = ("algo", "world", "experiment")


def group_choices(group: str) -> list[str]:
    """The options of a config group (the yaml files of ``benchmarks/conf/<group>``)."""
    return sorted(p.stem for p in (Path(__file__).parent / "conf" / group).glob("*.yaml"))


def check_overrides(overrides: list[str]) -> None:
    """Reject a malformed config-group choice with a one-line error listing the valid ones (before Hydra sees it;
    Hydra itself crashes with a TypeError on e.g. ``algo=[1,2]``). Multirun lists ``algo=dpo,ddpo`` are fine."""
    for o in overrides:
        if o.startswith("-") or "=" not in o:
            continue
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key not in CONFIG_GROUPS:
            continue
        choices = group_choices(key)
        for v in value.split(","):
            if v not in choices:
                raise ValueError(f"{key}={v!r} is not a valid choice; available: {', '.join(choices)}")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    # A user error: one line on stderr (the traceback in the run's run.log). SIGINT/SIGTERM: the run checkpoints, an
    # experiment records its invocation and stops its runs in other processes; then one line, exit 128 + signal.
    try:
        with terminate_as_interrupt():
            check_tuning(cfg.world.name, cfg.algo.name)
            if cfg.get("experiment") == "toy2d_tutorial":  # not a single run: train several algorithms, one figure
                from benchmarks import tutorial

                return tutorial.run(cfg)
            if cfg.get("experiment") == "tune":  # the recorded tuning sweep of one algorithm (benchmarks/tune.py)
                from benchmarks import tune

                return float(tune.run(cfg, run_one=run)["chosen"])
            if cfg.get("sweep"):  # a paper-style experiment: several runs, then one report section
                from benchmarks import experiments

                return experiments.run(cfg, run_one=run)
            if cfg.get("seeds") is not None:  # one run per seed, then their aggregate
                from benchmarks.wiring import hydra_output_dir

                rows = run_seeds(cfg, hydra_output_dir() or new_run_dir(cfg))
                return float(rows[0]["pooled_win_rate"].get("train", {}).get("mean", float("nan")))
            result = run(cfg, overrides=list(HydraConfig.get().overrides.task))
    except (ConfigError, ResumeError, ExperimentStopped) as err:
        logging.getLogger("benchmarks.run").debug("user error or stop request", exc_info=True)
        sys.exit(f"benchmarks.run: {err}")
    except KeyboardInterrupt as err:  # Interrupted, or a SIGINT outside training
        print(f"benchmarks.run: {str(err) or 'stopped by SIGINT'}", file=sys.stderr, flush=True)
        sys.exit(128 + getattr(err, "signum", signal.SIGINT))
    return float(result.get("win_rate_vs_base", float("nan")))


def preflight(argv: list[str]) -> list[str]:
    """Everything checkable before Hydra makes a run directory: the config groups, an explicit ``hydra.run.dir``
    naming a run, every config value (`benchmarks.lifecycle.validate`) and, for ``resume=``, the run's own config.
    Returns the argv to give Hydra: a resume runs in its own directory (no new folder, no new ``.hydra/``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    check_overrides(argv)
    argv = elastic_resume(argv)
    for o in argv:  # an explicit hydra.run.dir naming a run: refuse before Hydra writes .hydra/ into it
        if o.lstrip("+").startswith("hydra.run.dir=") and not any(a.startswith("resume=") for a in argv):
            refuse_existing_run(Path(o.partition("=")[2]))
    if any(a in ("-m", "--multirun") or a.startswith("-") for a in argv):
        return argv  # sweeps and Hydra's own flags: each run validates itself
    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    with initialize_config_dir(str(Path(__file__).parent / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    GlobalHydra.instance().clear()
    validate(cfg)
    if not cfg.resume or cfg.get("sweep") or cfg.get("experiment") == "toy2d_tutorial":
        return argv
    keys = [o.partition("=")[0].lstrip("+~") for o in overrides]
    world = cfg.world.name if "world" in keys else None
    algo = cfg.algo.name if "algo" in keys else None
    run_dir = resolve_run(str(cfg.resume), str(cfg.out_dir), world, algo)
    validate(resume_config(cfg, run_dir, overrides)[0])  # refuses a changed config before anything is written
    rest = [a for a in argv if not a.lstrip("+").startswith(("hydra.run.dir=", "hydra.output_subdir=", "resume="))]
    return [*rest, f"resume={run_dir}", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def init_restarted_process_group(timeout: timedelta, cpu: bool) -> None:
    """A job restarted by torchrun (``TORCHELASTIC_RESTART_COUNT`` > 0) joins its process group under a key prefix of
    its own attempt. Without it the ranks would meet in the elastic agent's store, which still holds the first
    attempt's addresses: gloo's rank 0 then connects to the killed rank's old port ("Connection refused"). The
    first attempt (and every other launcher) lets accelerate create the group as usual."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or torch.distributed.is_initialized():
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent serves MASTER_ADDR:PORT
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=rank == 0 and not agent_store,
        timeout=timeout,
    )
    backend = "gloo" if cpu or not torch.cuda.is_available() else "cpu:gloo,cuda:nccl"
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"restart_{attempt}/", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


def release_process_group() -> None:
    """Destroy the process group before the interpreter exits. Left to finalisation, gloo's worker threads can still
    hold finished work whose tensors need the GIL while the interpreter is torn down: the process aborts
    ("terminate called without an active exception", SIGABRT) and torchrun fails a job that had succeeded — seen on
    rank 1 exiting while rank 0 evaluated (pytorch/pytorch#190489). Local for gloo: no other rank is waited for."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def elastic_resume(argv: list[str]) -> list[str]:
    """Under torchrun's elastic agent (``--max-restarts``), a restarted job (``TORCHELASTIC_RESTART_COUNT`` > 0) gets
    the first attempt's command line again: if it names its run (``hydra.run.dir=``) and that run has a complete
    checkpoint, continue it (``resume=<run>``) instead of refusing to overwrite it. Anything else is unchanged."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0 or any(a.startswith("resume=") for a in argv):
        return argv
    dirs = [o.partition("=")[2] for o in argv if o.lstrip("+").startswith("hydra.run.dir=")]
    if dirs and latest_checkpoint(Path(dirs[-1]) / "checkpoints") is not None:
        print(f"elastic restart: continuing {dirs[-1]} from its last checkpoint", file=sys.stderr, flush=True)
        return [*argv, f"resume={dirs[-1]}"]
    return argv


if __name__ == "__main__":
    try:
        sys.argv[1:] = preflight(sys.argv[1:])
    except (ValueError, FileExistsError) as err:
        sys.exit(f"benchmarks.run: {err}")
    try:
        main()
    finally:
        release_process_group()
