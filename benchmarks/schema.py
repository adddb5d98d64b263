"""Structured-config schemas registered with Hydra's ConfigStore, so that a typo or a wrong type fails at start-up.

* ``run_schema``: the top level (`RunConfig`): seed, device, reward, train (`TrainConfig`), eval (`EvalConfig`), ...
* ``algo/<name>_schema``: each algorithm's config dataclass plus its ``name``.
* ``world/<name>_schema``: the world's config dataclass, else generated from its builder's keyword arguments.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from algos import ALGOS, algo_config_class
from rlkit_diffusion.evaluate import EvalConfig
from rlkit_diffusion.train import BudgetConfig, TrainConfig
from rlkit_diffusion.worlds import WORLDS, world_config_class


@dataclass
class ReferenceConfig:
    """How π_ref is held for the algorithms that need it."""

    lora_rank: int = 0
    """> 0: train LoRA adapters of this rank (peft) and use adapters-off as the reference (one network)."""
    lora_alpha: float | None = None
    """LoRA α (None = rank)."""
    lora_targets: list[str] = field(default_factory=list)
    """Module names to adapt (empty = the world's default: attention projections for UNets, Linear for MLPs)."""


@dataclass
class RunConfig:
    """Top-level settings of ``python -m benchmarks.run``."""

    seed: int = 0
    """Seed of training randomness (evaluation noises have their own fixed seed: eval.seed)."""
    seeds: Any = None
    """Several seeds (a list, or a count n = seeds 0..n−1): one run directory per seed (``s<seed>/``), then their
    aggregate (mean and 95% interval over seeds; `benchmarks.protocol`). Experiments default to 3 reporting seeds."""
    device: str = "auto"
    """``auto`` (accelerate picks CUDA when present), ``cpu`` or ``cuda``."""
    reward: str = "proxy"
    """The reward online algorithms optimise (never ``gold`` unless asked: gold is the evaluation truth)."""
    resume: str | None = None
    """A run directory (or ``latest``) to resume from its last checkpoint."""
    resume_override: list[str] = field(default_factory=list)
    """With ``resume=``: the budget keys the resume may change (``train.steps``, ``budget.amount``, ``budget.kind``)
    and the layout over processes (``train.batch_size``, to keep the global batch on another number of processes;
    ``train.parallel``); any other difference from the run's config.yaml is refused (a run is its config)."""
    report: bool = True
    """Write ``report.md``/``report.html`` of the run into its directory at the end."""
    init_from: str | None = None
    """A run directory (or checkpoint directory) whose trained weights initialise the policy — with
    ``train.steps=0``, evaluates a finished run again in another mode (e.g. ``eval.mode=sdedit``)."""
    out_dir: str = "runs"
    """Parent folder of run directories."""
    eval_cache_dir: str | None = None
    """The cross-run evaluation cache (``eval.cache=true``); None = ``<out_dir>/.eval_cache``. An experiment's runs
    share the experiment's root cache."""
    reuse_from: list[str] = field(default_factory=list)
    """Experiments: other experiment directories whose finished runs are copied in instead of trained again, when a
    run there has this run's label, seed and settings (`benchmarks.experiments.copy_finished_run`); e.g.
    ``experiment=paper_claims reuse_from=[<leaderboard dir>]`` takes the DPO, SFT, DRaFT and AlignProp runs."""
    jobs: int = 1
    """Experiments (``experiment=<name>`` with a sweep, the leaderboard): how many runs train at once, each a
    ``python -m benchmarks.run`` process with ⌊CPU cores / jobs⌋ threads (`benchmarks.experiments.run_processes`).
    1 = one after the other in this process. On a 2-core CPU two one-thread runs do more work per hour than one
    two-thread run: two default DPO runs at once, one thread each, finished in 248 and 261 s wall; one two-thread
    run took 153.5 s (docs/perf.md, "Measured on a quiet machine"). On one GPU keep 1."""
    logger: Any = "tensorboard"
    """Trackers, through accelerate: ``tensorboard | wandb | trackio | mlflow | none`` or a list
    (``logger=[tensorboard,wandb]``); ``metrics.jsonl`` is always written (`rlkit_diffusion.logging.make_logger`)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    world: Any = None
    algo: Any = None
    experiment: str | None = None
    """Set by an ``experiment=<name>`` config: ``toy2d_tutorial`` is dispatched by ``benchmarks.run.main`` to
    `benchmarks.tutorial.run`, one with a ``sweep`` to `benchmarks.experiments.run`; any other (e.g.
    ``sd15_ddpo_aesthetic``, a recipe that changes the world or the evaluation) is one training run."""
    label: str | None = None
    """A name for this run inside a comparison (e.g. ``beta=5000`` in an experiment); the report groups by
    (world, algo, label)."""
    sweep: Any = None
    """Set by the paper-style ``experiment=<name>`` configs: the runs of the experiment and its report section
    (`benchmarks.experiments`); None = one training run."""
    tune: Any = None
    """Settings of ``experiment=tune`` (``conf/experiment/tune.yaml``; `benchmarks.tune`); None otherwise."""
    tutorial: Any = None
    """Settings of ``experiment=toy2d_tutorial`` (``conf/experiment/toy2d_tutorial.yaml``); None otherwise."""


def algo_schema(name: str) -> type:
    base = algo_config_class(name)
    return dataclasses.make_dataclass(f"{base.__name__}Schema", [("name", str, field(default=name))], bases=(base,))


def world_schema(name: str) -> type:
    config = world_config_class(name)
    if config is not None:  # the builder takes one config dataclass: the schema is that class plus ``name``
        return dataclasses.make_dataclass(
            f"{config.__name__}Schema", [("name", str, field(default=name))], bases=(config,)
        )
    module, fn = WORLDS[name].split(":")
    builder = getattr(importlib.import_module(module), fn)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for p in inspect.signature(builder).parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name == "device":
            continue
        ann = p.annotation
        if isinstance(ann, str):
            ann = {"int": int, "float": float, "str": str, "bool": bool}.get(ann.split(" ")[0], Any)
            if "None" in p.annotation and ann is not Any:
                ann = Optional[ann]  # noqa: UP045 (OmegaConf needs typing.Optional)
        fields.append((p.name, ann, field(default=p.default)))
    return dataclasses.make_dataclass(f"{name.capitalize()}WorldSchema", fields)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name in ALGOS:
        cs.store(group="algo", name=f"{name}_schema", node=algo_schema(name))
    for name in WORLDS:
        cs.store(group="world", name=f"{name}_schema", node=world_schema(name))


register()
