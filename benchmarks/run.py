"""``python -m benchmarks.run algo=dpo`` — build the world once, train one algorithm, evaluate it against the base.

Every run directory gets ``config.yaml`` (resolved), ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and
``eval.json``. Multi-run: ``python -m benchmarks.run -m algo=dpo,ddpo seed=0,1,2``. Multi-process:
``accelerate launch -m benchmarks.run algo=dpo`` (only the main process writes).
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import benchmarks.schema  # noqa: F401  (registers the structured-config schemas)
from algos import algo_config_class, build_algo
from rlkit_diffusion.algorithm import AlgoContext, Counters
from rlkit_diffusion.checkpoint import latest_checkpoint
from rlkit_diffusion.evaluate import EvalConfig, evaluate
from rlkit_diffusion.logging import make_logger, tracker_names
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference, add_lora
from rlkit_diffusion.train import BudgetConfig, TrainConfig, train
from rlkit_diffusion.worlds import build_world
from rlkit_diffusion.worlds.base import shard_pairs

EVAL_SCHEMA_VERSION = 1
DEFAULT_LORA_TARGETS = {
    "toy2d": ["net.0", "net.2", "net.4"],
    "shapes": ["to_q", "to_k", "to_v", "to_out.0"],
    "sd15": ["to_q", "to_k", "to_v", "to_out.0"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_dataclass(cls: type, node: Any) -> Any:
    """OmegaConf node → plain dataclass instance (validated by the structured schema already)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data.pop("name", None)
    return cls(**data)


def _new_run_dir(cfg: DictConfig) -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # not under @hydra.main (e.g. called from a test with compose())
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.out_dir) / f"{stamp}-{cfg.algo.name}-{cfg.world.name}-s{cfg.seed}"
    refuse_existing_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a directory that holds a run (its eval.json or checkpoints)."""
    if (run_dir / "eval.json").exists() or (run_dir / "checkpoints").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; refusing to overwrite it")


def save_samples(world, policy, base_policy, eval_cfg: EvalConfig, run_dir: Path, algo_sampler=None, n: int = 8):
    """Base and trained samples for the first ``n`` training prompts, with the evaluation's noises and their gold
    scores (``samples.safetensors`` + ``samples.json``): the report's side-by-side image grids."""
    from safetensors.torch import save_file

    from rlkit_diffusion.evaluate import edit_inputs, sample_split, score

    prompts = world.train_prompts[:n]
    cfg = EvalConfig(**{**vars(eval_cfg), "samples_per_prompt": 1})
    x_in = edit_inputs(world, prompts, cfg)  # eval.mode=sdedit: the images being edited
    edit = {"x_input": x_in, "strength": cfg.strength if x_in is not None else 1.0}
    base = sample_split(world, base_policy, prompts, cfg, desc="grid base", **edit)["x0"]
    trained = sample_split(world, policy, prompts, cfg, desc="grid policy", sampler=algo_sampler, **edit)["x0"]
    tensors = {
        "base": world.decode(base).float().cpu().contiguous(),
        "trained": world.decode(trained).float().cpu().contiguous(),
        "base_gold": torch.as_tensor(score(world, eval_cfg.reward, base, prompts)).float(),
        "trained_gold": torch.as_tensor(score(world, eval_cfg.reward, trained, prompts)).float(),
    }
    if x_in is not None:
        tensors["input"] = world.decode(x_in).float().cpu().contiguous()
    save_file(tensors, str(run_dir / "samples.safetensors"))
    (run_dir / "samples.json").write_text(json.dumps({"prompts": prompts}))


def resolve_resume(cfg: DictConfig) -> tuple[Path, Path]:
    """``resume=<run dir>`` or ``resume=latest`` (the newest run under ``out_dir`` with a checkpoint)."""
    if cfg.resume == "latest":
        runs = sorted(
            (p for p in Path(cfg.out_dir).glob("*") if latest_checkpoint(p / "checkpoints") is not None),
            key=lambda p: p.stat().st_mtime,
        )
        if not runs:
            raise FileNotFoundError(f"resume=latest: no run with a checkpoint under {cfg.out_dir}")
        run_dir = runs[-1]
    else:
        run_dir = Path(cfg.resume)
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise FileNotFoundError(f"resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    return run_dir, ckpt


def init_from_run(policy, path: Path) -> None:
    """Load the trainable weights of a run directory's last checkpoint (or of a checkpoint directory) into the
    policy; the reference stays the world's base model."""
    from rlkit_diffusion.checkpoint import load_checkpoint, load_trainable_state
    from rlkit_diffusion.reference import unwrap

    ckpt = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else path
    if ckpt is None:
        raise FileNotFoundError(f"init_from: no complete checkpoint under {path / 'checkpoints'}")
    load_trainable_state(unwrap(policy.eps_model), load_checkpoint(ckpt)["model"])
    print(f"init_from: policy weights from {ckpt}", flush=True)


def run(cfg: DictConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Train ``cfg.algo`` on ``cfg.world`` and evaluate it. Returns the eval.json contents."""
    from accelerate import Accelerator

    t_start = time.perf_counter()
    train_cfg = _to_dataclass(TrainConfig, cfg.train)
    budget_cfg = _to_dataclass(BudgetConfig, cfg.budget)
    eval_cfg = _to_dataclass(EvalConfig, cfg.eval)
    algo_cfg = _to_dataclass(algo_config_class(cfg.algo.name), cfg.algo)

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(
        cpu=cpu,
        gradient_accumulation_steps=train_cfg.grad_accum,
        log_with=tracker_names(cfg.get("logger")) or None,  # trackers write into the run directory (make_logger)
        project_dir=cfg.out_dir,
    )
    main = accelerator.is_main_process
    seed_everything(cfg.seed)  # identical initial weights on every rank

    world_kwargs = OmegaConf.to_container(cfg.world, resolve=True)
    world_name = world_kwargs.pop("name")
    world = build_world(world_name, device=accelerator.device, **world_kwargs)
    # Data parallelism: every rank draws the global batch of pairs and keeps its slice (union = 1-process batch).
    world.pairs = shard_pairs(world.pairs, accelerator.process_index, accelerator.num_processes)
    policy = world.policy
    if cfg.reference.lora_rank > 0:
        targets = list(cfg.reference.lora_targets) or DEFAULT_LORA_TARGETS[world_name]
        add_lora(
            policy.eps_model, rank=cfg.reference.lora_rank, alpha=cfg.reference.lora_alpha, target_modules=targets
        )
        base = Reference(policy, "lora")
    else:
        base = Reference(policy, "frozen")

    if cfg.get("init_from"):  # start from a finished run's weights (e.g. evaluate it in another mode, train.steps=0)
        init_from_run(policy, Path(cfg.init_from))

    resume_from = None
    if cfg.resume:
        run_dir, resume_from = resolve_resume(cfg)
    run_dir = run_dir or (_new_run_dir(cfg) if main else None)
    if run_dir is not None and main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    if main:  # a resume keeps the run's config.yaml: a resume that fails (e.g. a mismatched config) changes nothing
        OmegaConf.save(cfg, run_dir / ("config.resume.yaml" if resume_from else "config.yaml"), resolve=True)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + accelerator.process_index)
    ctx = AlgoContext(
        world=world,
        policy=policy,
        base=base,
        env=DenoisingCore(world, reward=cfg.reward),
        batch_size=train_cfg.batch_size,
        generator=generator,
        counters=Counters(),
        accelerator=accelerator,
    )
    algo = build_algo(cfg.algo.name, algo_cfg)
    logger = make_logger(
        run_dir,
        accelerator,
        config=OmegaConf.to_container(cfg, resolve=True),
        enabled=main,
        world=world,
        policy=policy,
        base_policy=base.policy,
        eval_cfg=eval_cfg,
        sampler=sampler(algo),
    )
    base_cache: dict[str, Any] = {}
    curve_cfg = EvalConfig(**{**vars(eval_cfg), "samples_per_prompt": max(1, eval_cfg.samples_per_prompt // 4)})

    def eval_fn(update: int) -> dict[str, float]:
        m = evaluate(
            world, policy, base.policy, curve_cfg, proxy=cfg.reward, base_cache=base_cache, sampler=sampler(algo)
        )
        return {k: v for k, v in m.items() if isinstance(v, float) and not k.endswith(("_low", "_high"))}

    if train_cfg.steps == 0 and budget_cfg.kind == "steps" and budget_cfg.amount is None:
        algo.setup(ctx)  # evaluation only (e.g. of init_from's weights): no optimizer step, no checkpoint
        summary = {"train_nfe": 0, "reward_queries": 0, "updates": 0, "train_wall_s": 0.0, "checkpoint": None}
    else:
        summary = train(
            algo,
            ctx,
            train_cfg,
            budget=budget_cfg,
            run_dir=run_dir if main else None,
            logger=logger,
            eval_fn=logger.wrap_eval(eval_fn),
            resume_from=resume_from,
        )
    if not main:
        logger.close()
        # Rank 0 evaluates alone; the other ranks are done. No barrier here or after the evaluation: a long final
        # evaluation (real SD prompt sets) must not run into the collective timeout of ranks waiting at a barrier.
        return {}
    metrics = evaluate(world, policy, base.policy, eval_cfg, proxy=cfg.reward, sampler=sampler(algo))
    if hasattr(algo, "eval_metrics"):  # algorithm-specific evaluation, e.g. the DPO implicit-reward accuracy
        metrics.update(algo.eval_metrics())
    save_samples(world, policy, base.policy, eval_cfg, run_dir, sampler(algo))
    result = {
        "schema_version": EVAL_SCHEMA_VERSION,
        "algo": cfg.algo.name,
        "world": world_name,
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
            "num_processes": accelerator.num_processes,  # the effective batch is per-process batch × this
        },
    }
    tmp = run_dir / "eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, run_dir / "eval.json")
    logger.log_final(result, run_dir)  # the trackers get eval.json and the final sample grid
    logger.close()
    report_path = None
    if cfg.get("report", True):
        from benchmarks.report import write_report

        report_path = write_report([run_dir])  # report.md/html of this one run (figures, sample grid)
    print_summary(result, run_dir, report_path)
    return result


def sampler(algo: Any) -> Any:
    """The algorithm's inference-time procedure (best-of-N), if any, used by the evaluation instead of sampling."""
    return getattr(algo, "sampler", None)


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
    if cfg.get("experiment") == "toy2d_tutorial":  # not a single run: train several algorithms, draw one figure
        from benchmarks import tutorial

        return tutorial.run(cfg)
    if cfg.get("sweep"):  # a paper-style experiment: several runs, then one report section (benchmarks/experiments.py)
        from benchmarks import experiments

        return experiments.run(cfg)
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
