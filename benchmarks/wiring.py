"""The wiring shared by every entry point of benchmarks/ (run.py, experiments.py, tutorial.py, perf.py).

Top to bottom: seeding; run directories (naming, the guard against writing into a run);
the tuning-file check (a tuning file may set only ``algo.*``, ``train.*`` and ``reference.*``, so the world and
the evaluation cannot differ between algorithms); building the world, the reference π_ref and the `AlgoContext`;
saving a run's outputs (``config.yaml``, ``samples.*``, ``eval.json``).
"""

from __future__ import annotations

import random
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rlkit_diffusion.algorithm import AlgoContext, Counters
from rlkit_diffusion.checkpoint import atomic_write, atomic_write_json, latest_checkpoint
from rlkit_diffusion.eval_cache import open_base_cache
from rlkit_diffusion.evaluate import EvalConfig
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference, add_lora
from rlkit_diffusion.worlds import build_world
from rlkit_diffusion.worlds.base import World, shard_pairs

CONF_DIR = Path(__file__).parent / "conf"
TUNING_KEYS = ("algo", "train", "reference")  # what a conf/tuning/<world>_<algo>.yaml may set
DEFAULT_LORA_TARGETS = {
    "toy2d": ["net.0", "net.2", "net.4"],
    "toy2d_flow": ["net.0", "net.2", "net.4"],
    "shapes": ["to_q", "to_k", "to_v", "to_out.0"],
    "shapes_flow": ["to_q", "to_k", "to_v", "to_out.0"],
    "sd15": ["to_q", "to_k", "to_v", "to_out.0"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
    # SD3's joint attention: the image stream's and the text stream's projections (Flow-GRPO's SD3.5 targets)
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_dataclass(cls: type, node: Any) -> Any:
    """OmegaConf node → plain dataclass instance (validated by the structured schema already)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    data.pop("name", None)
    return cls(**data)


# ----------------------------------------------------------------------------------------------------------------
# Run directories
# ----------------------------------------------------------------------------------------------------------------
def hydra_output_dir() -> Path | None:
    """The directory @hydra.main made for this job (None when not under @hydra.main, e.g. a test's compose())."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def new_run_dir(cfg: DictConfig) -> Path:
    """Hydra's run directory (or ``<out_dir>/<time>-<algo>-<world>-s<seed>`` outside @hydra.main), created empty."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = hydra_output_dir() or Path(cfg.out_dir) / f"{stamp}-{cfg.algo.name}-{cfg.world.name}-s{cfg.seed}"
    refuse_existing_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def resume_if_started(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` with ``resume=<run_dir>`` when ``run_dir`` holds a checkpoint (a run stopped by a signal, or killed):
    a loop over runs (``seeds=``, tuning) continues such a run instead of refusing its directory."""
    if latest_checkpoint(run_dir / "checkpoints") is None:
        return cfg
    print(f"  resuming {run_dir} from its checkpoint", flush=True)
    return OmegaConf.merge(cfg, {"resume": str(run_dir)})


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a directory that holds a run (its eval.json or checkpoints)."""
    if (run_dir / "eval.json").exists() or (run_dir / "checkpoints").exists():
        raise FileExistsError(f"run directory {run_dir} already holds a run; refusing to overwrite it")


# ----------------------------------------------------------------------------------------------------------------
# Tuning files: per (world, algo) optimiser settings only
# ----------------------------------------------------------------------------------------------------------------
def check_tuning(world: str, algo: str, conf_dir: Path = CONF_DIR) -> None:
    """Refuse ``conf/tuning/<world>_<algo>.yaml`` if it sets a key outside algo/train/reference: the world and the
    evaluation (rewards, guidance, samples per prompt) live in ``conf/world/<world>.yaml``, the same for every
    algorithm; a recipe that changes them is a ``conf/experiment/`` file."""
    path = conf_dir / "tuning" / f"{world}_{algo}.yaml"
    if path.exists():
        _check_tuning_file(path)


def taken_whole(path: Path) -> list:
    """The entries of a tuning file's ``defaults`` (``_self_`` left out): the tuning files it takes whole."""
    return [e for e in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []) if e != "_self_"]


def _check_tuning_file(path: Path) -> None:
    """One tuning file: keys in `TUNING_KEYS`, or ``defaults`` naming other tuning files (checked the same way) that
    it takes whole — ``shapes_flow_<algo>.yaml`` is ``defaults: [shapes_<algo>]``."""
    for key in OmegaConf.load(path):
        if key == "defaults":
            for entry in taken_whole(path):
                other = path.parent / f"{entry}.yaml"
                if not isinstance(entry, str) or not other.exists():
                    raise ValueError(f"{path}: its defaults may name only other tuning files, got {entry!r}")
                _check_tuning_file(other)
        elif key not in TUNING_KEYS:
            raise ValueError(f"{path}: sets '{key}'; a tuning file may set only {', '.join(TUNING_KEYS)}")


# ----------------------------------------------------------------------------------------------------------------
# Building: world, reference, context
# ----------------------------------------------------------------------------------------------------------------
def build_world_from(cfg: DictConfig, device: Any) -> World:
    """Seed everything with ``cfg.seed`` (identical initial weights on every rank), then build ``cfg.world``.

    A world with a ``text_cache`` setting left unset (the shapes worlds) gets its caption embeddings persisted under
    the evaluation cache, ``<eval_cache_dir>/text``, when ``eval.cache`` is on (`SentenceEncoder`'s ``store``)."""
    seed_everything(cfg.seed)
    world_kwargs = OmegaConf.to_container(cfg.world, resolve=True)
    if "text_cache" in world_kwargs and world_kwargs["text_cache"] is None and cfg.eval.cache:
        world_kwargs["text_cache"] = str(eval_cache_dir(cfg) / "text")
    return build_world(world_kwargs.pop("name"), device=device, **world_kwargs)


def build_reference(cfg: DictConfig, world: World) -> Reference:
    """π_ref: LoRA adapters off (``reference.lora_rank > 0``, adapters added to the policy) or a frozen copy."""
    policy = world.policy
    if cfg.reference.lora_rank <= 0:
        return Reference(policy, "frozen")
    targets = list(cfg.reference.lora_targets) or DEFAULT_LORA_TARGETS[cfg.world.name]
    add_lora(policy.eps_model, rank=cfg.reference.lora_rank, alpha=cfg.reference.lora_alpha, target_modules=targets)
    return Reference(policy, "lora")


def build_context(world, policy, base, *, reward: str, batch_size: int, seed: int, accelerator=None) -> AlgoContext:
    """The algorithm's view of the run; the generator is per rank (``seed·1000 + rank``); with several processes the
    shared generator (world-size-invariant draws, `AlgoContext.global_rows`) is seeded ``seed·1000`` on every rank —
    with one process it is the generator itself."""
    rank = accelerator.process_index if accelerator is not None else 0
    processes = accelerator.num_processes if accelerator is not None else 1
    return AlgoContext(
        world=world,
        policy=policy,
        base=base,
        env=DenoisingCore(world, reward=reward),
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed * 1000 + rank),
        counters=Counters(),
        accelerator=accelerator,
        shared_generator=torch.Generator().manual_seed(seed * 1000) if processes > 1 else None,
    )


def build_run(cfg: DictConfig, accelerator, batch_size: int) -> AlgoContext:
    """The context of one training run: world (pairs sharded over the ranks), policy, reference, MDP, generator."""
    world = build_world_from(cfg, accelerator.device)
    # Data parallelism: every rank draws the global batch of pairs and keeps its slice (union = 1-process batch).
    world.pairs = shard_pairs(world.pairs, accelerator.process_index, accelerator.num_processes)
    base = build_reference(cfg, world)
    world.policy.set_precision(cfg.train.precision, cfg.train.compile)  # every view, the reference's included
    if cfg.get("init_from"):  # start from a finished run's weights (e.g. evaluate it in another mode, train.steps=0)
        init_from_run(world.policy, Path(cfg.init_from))
    return build_context(
        world, world.policy, base, reward=cfg.reward, batch_size=batch_size, seed=cfg.seed, accelerator=accelerator
    )


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


# ----------------------------------------------------------------------------------------------------------------
# Saving the run's outputs
# ----------------------------------------------------------------------------------------------------------------
def base_eval_cache(cfg: DictConfig, ctx: AlgoContext, eval_cfg: EvalConfig) -> MutableMapping:
    """The base model's evaluation cache: persistent under ``<out_dir>/.eval_cache/<key>/`` with ``eval.cache=true``
    (`rlkit_diffusion.eval_cache`: shared by every run, experiment and leaderboard of the same world, base weights,
    evaluation settings, rewards and sampler code), else a dict that lives as long as the run."""
    if not eval_cfg.cache:
        return {}
    world_config = OmegaConf.to_container(cfg.world, resolve=True)
    return open_base_cache(eval_cache_dir(cfg), ctx.world, ctx.base.policy, eval_cfg, cfg.reward, world_config)


def eval_cache_dir(cfg: DictConfig) -> Path:
    """``eval_cache_dir``, by default ``<out_dir>/.eval_cache``: the run root's evaluation cache (not a run: no
    eval.json, no checkpoints)."""
    if cfg.get("eval_cache_dir"):
        return Path(cfg.eval_cache_dir)
    return Path(cfg.out_dir) / ".eval_cache"


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The resolved config of a new run (a resumed run is its config.yaml: `benchmarks.lifecycle`)."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)


def save_per_sample(metrics: dict[str, Any], run_dir: Path, samples_per_prompt: int) -> None:
    """Move the evaluation's per-row arrays (``per_sample``, ``heldout_per_sample``) out of ``metrics`` into
    ``per_sample.npz`` (keys ``<split>/<name>``, plus ``samples_per_prompt``): pooled intervals over seeds resample
    their captions (`benchmarks.report.pooled_win_rate`)."""
    arrays = {"samples_per_prompt": np.array(samples_per_prompt)}
    for key in [k for k in metrics if k.endswith("per_sample") and isinstance(metrics[k], dict)]:
        split = "heldout" if key.startswith("heldout_") else "train"
        arrays.update({f"{split}/{name}": np.asarray(v) for name, v in metrics.pop(key).items()})

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(run_dir / "per_sample.npz", write)


def save_eval(result: dict[str, Any], run_dir: Path) -> None:
    atomic_write_json(run_dir / "eval.json", result)


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
    atomic_write_json(run_dir / "samples.json", {"prompts": prompts}, indent=None)
