"""``python -m benchmarks.run algo=dpo`` — build the world once, train one algorithm, evaluate it against the base.

Every run directory gets ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and
``eval.json``. Multi-run: ``python -m benchmarks.run -m algo=dpo,ddpo seed=0,1,2``. Multi-process:
``accelerate launch -m benchmarks.run algo=dpo`` (only the main process writes).
"""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import benchmarks.schema  # noqa: F401  (registers the structured-config schemas)
from algos import algo_config_class, build_algo
from benchmarks.eval_schema import SCHEMA_VERSION
from benchmarks.wiring import (
    base_eval_cache,
    build_run,
    check_tuning,
    new_run_dir,
    refuse_existing_run,
    resolve_resume,
    save_config,
    save_eval,
    save_samples,
    to_dataclass,
)
from rlkit_diffusion.algorithm import AlgoContext
from rlkit_diffusion.evaluate import EvalConfig, evaluate
from rlkit_diffusion.logging import MetricLogger, make_logger, tracker_names
from rlkit_diffusion.train import BudgetConfig, TrainConfig, train


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


def prepare_run_dir(cfg: DictConfig, run_dir: Path | None, main: bool) -> tuple[Path | None, Path | None]:
    """The run directory and the checkpoint to resume from (``resume=<dir>|latest``); saves the config."""
    resume_from = None
    if cfg.resume:
        run_dir, resume_from = resolve_resume(cfg)
    run_dir = run_dir or (new_run_dir(cfg) if main else None)
    if run_dir is not None and main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    if main:  # a resume keeps the run's config.yaml: a resume that fails (e.g. a mismatched config) changes nothing
        save_config(cfg, run_dir, resumed=resume_from is not None)
    return run_dir, resume_from


def train_run(cfg, s: Settings, algo, ctx: AlgoContext, run_dir, resume_from, logger: MetricLogger) -> dict[str, Any]:
    """THE training loop (with the learning-curve evaluation), or nothing for an evaluation-only run."""
    main = ctx.accelerator.is_main_process
    curve_cfg = EvalConfig(**{**vars(s.eval), "samples_per_prompt": max(1, s.eval.samples_per_prompt // 4)})
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
    return metrics


def eval_record(cfg: DictConfig, metrics: dict, summary: dict, num_processes: int, t_start: float) -> dict[str, Any]:
    """The contents of eval.json (benchmarks/eval_schema.py)."""
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
        },
    }


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Train ``cfg.algo`` on ``cfg.world`` and evaluate it. Returns the eval.json contents."""
    from accelerate import Accelerator

    t_start = time.perf_counter()
    phases = Phases()
    check_tuning(cfg.world.name, cfg.algo.name)
    s = Settings.of(cfg)
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=s.train.grad_accum,
        log_with=tracker_names(cfg.get("logger")) or None,  # logger=tensorboard|wandb|trackio|mlflow|none (a list)
        project_dir=cfg.out_dir,
    )
    main = accelerator.is_main_process
    ctx = build_run(cfg, accelerator, s.train.batch_size)
    run_dir, resume_from = prepare_run_dir(cfg, run_dir, main)
    algo = build_algo(cfg.algo.name, s.algo)
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
    phases.end("train")
    if not main:
        # Rank 0 evaluates alone; the other ranks are done. No barrier here or after the evaluation: a long final
        # evaluation (real SD prompt sets) must not run into the collective timeout of ranks waiting at a barrier.
        logger.close()
        return {}
    metrics = evaluate_run(cfg, s, algo, ctx, run_dir)
    phases.end("evaluate")
    result = eval_record(cfg, metrics, summary, accelerator.num_processes, t_start)
    save_eval(result, run_dir)
    logger.log_final(result, run_dir)
    logger.close()
    report_path = None
    if cfg.get("report", True):
        from benchmarks.report import write_report

        report_path = write_report([run_dir])  # report.md/html of this one run (figures, sample grid)
    phases.end("report")
    result.update(phases.record())
    save_eval(result, run_dir)
    print_summary(result, run_dir, report_path)
    return result


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
        f"[95% CI {r['win_rate_vs_base_ci_low']:.1%}, {r['win_rate_vs_base_ci_high']:.1%}]",
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
    try:  # a tuning file that sets the world or the evaluation: one line, not a traceback
        check_tuning(cfg.world.name, cfg.algo.name)
    except ValueError as err:
        sys.exit(f"benchmarks.run: {err}")
    if cfg.get("experiment") == "toy2d_tutorial":  # not a single run: train several algorithms, draw one figure
        from benchmarks import tutorial

        return tutorial.run(cfg)
    if cfg.get("sweep"):  # a paper-style experiment: several runs, then one report section (benchmarks/experiments.py)
        from benchmarks import experiments

        return experiments.run(cfg, run_one=run)
    result = run(cfg)
    return float(result.get("win_rate_vs_base", float("nan")))


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:])
        for o in sys.argv[1:]:  # an explicit hydra.run.dir naming a run: refuse before Hydra writes .hydra/ into it
            if o.lstrip("+").startswith("hydra.run.dir="):
                refuse_existing_run(Path(o.partition("=")[2]))
    except (ValueError, FileExistsError) as err:
        sys.exit(f"benchmarks.run: {err}")
    main()
