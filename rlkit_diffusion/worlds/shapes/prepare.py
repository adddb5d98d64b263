"""The stages of ``python -m benchmarks.prepare world=shapes``: base UNet → pairs → proxy reward → picture.

Every stage is deterministic in ``seed``; ``stage=all`` runs the stages whose outputs are missing, in order.
``quick=True`` runs each at a tiny size into a temporary directory (the test suite's smoke test).

``world=shapes_flow`` (``flow=True``) has the stages base (the flow-matching UNet, `base_model.pretrain` with
``flow=True`` → ``assets/shapes_flow_base``) and grid (its samples through the world's SDE sampler); its pairs and
proxy reward are shapes' own.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from rlkit_diffusion.checkpoint import atomic_write_json
from rlkit_diffusion.worlds.shapes.base_model import BASE_DIR, FLOW_BASE_DIR, PretrainConfig, pretrain
from rlkit_diffusion.worlds.shapes.captions import caption_targets
from rlkit_diffusion.worlds.shapes.gold import measure
from rlkit_diffusion.worlds.shapes.pairs import calibration_temperature, make_shapes_pairs
from rlkit_diffusion.worlds.shapes.proxy_train import train_proxy
from rlkit_diffusion.worlds.shapes.world import PAIRS_DIR, PROXY_DIR, base_sampler, build_shapes, build_shapes_flow

STAGES = ("base", "pairs", "proxy", "grid")
FLOW_STAGES = ("base", "grid")  # shapes_flow shares shapes' pairs and proxy reward
GRID_CAPTIONS = [
    "a red circle",
    "a small blue square at the top on a white background",
    "a large yellow triangle on a navy background",
    "a green cross at the left",
    "a purple diamond on a gray background",
    "a large orange circle at the bottom right",
    "a white square on a black background",
    "a pink triangle",
]


def _paths(out: Path | None, flow: bool = False) -> dict[str, Path]:
    name = "shapes_flow" if flow else "shapes"
    if out is None:
        return {
            "name": Path(name),
            "base": FLOW_BASE_DIR if flow else BASE_DIR,
            "pairs": PAIRS_DIR,
            "proxy": PROXY_DIR,
            "grid": Path(__file__).resolve().parents[3] / "docs" / "images",
        }
    return {
        "name": Path(name),
        "base": out / f"{name}_base",
        "pairs": out / "shapes_pairs",
        "proxy": out / "shapes_proxy",
        "grid": out / "images",
    }


def _done(stage: str, p: dict[str, Path]) -> bool:
    return {
        "base": (p["base"] / "config.json").exists(),
        "pairs": (p["pairs"] / "train.parquet").exists(),
        "proxy": (p["proxy"] / "config.json").exists(),
        "grid": (p["grid"] / f"{p['name']}_base_grid.png").exists(),
    }[stage]


def stage_pairs(p: dict[str, Path], quick: bool, seed: int) -> dict:
    """Pick-a-Pic-format pairs: renders at several corruption levels (90%) and base-model samples (10%).

    The Bradley–Terry temperature is calibrated on the render-only zoo (cheap) to a 70% label/gold agreement.
    """
    world = build_shapes(weights=str(p["base"]), proxy_weights=None, num_inference_steps=4 if quick else 20)
    world.pairs = None
    n_train, n_val = (48, 8) if quick else (10_000, 500)
    temperature = 2.0 if quick else calibration_temperature(seed)
    return make_shapes_pairs(
        p["pairs"],
        n_train_pairs=n_train,
        n_val_captions=n_val,
        seed=seed,
        base_sampler=base_sampler(world, seed=seed),
        base_weight=0.1,
        temperature=temperature,
    )


def stage_proxy(p: dict[str, Path], quick: bool, seed: int) -> dict:
    return train_proxy(p["pairs"], p["proxy"], seed=seed, quick=quick)


@torch.no_grad()
def stage_grid(p: dict[str, Path], quick: bool, seed: int) -> dict:
    """Base-model samples for fixed captions with gold (and proxy) scores, plus the base model's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = str(p["name"])
    proxy = str(p["proxy"]) if (p["proxy"] / "config.json").exists() else None
    build = build_shapes_flow if name == "shapes_flow" else build_shapes
    world = build(weights=str(p["base"]), proxy_weights=proxy, num_inference_steps=4 if quick else 20)
    sample = base_sampler(world, seed=seed)
    n_cols = 6
    caps = [c for c in GRID_CAPTIONS for _ in range(n_cols)]
    t0 = time.perf_counter()
    images = sample(caps)
    per_s = len(caps) / (time.perf_counter() - t0)
    gold = world.rewards["gold"](images, caps)
    proxy_scores = world.rewards["proxy"](images.to(world.device), caps).cpu() if "proxy" in world.rewards else None
    fig, axes = plt.subplots(len(GRID_CAPTIONS), n_cols, figsize=(n_cols * 1.3, len(GRID_CAPTIONS) * 1.45))
    for i, ax in enumerate(axes.flat):
        ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        label = f"g {gold[i]:.1f}" + (f" p {proxy_scores[i]:.1f}" if proxy_scores is not None else "")
        ax.set_xlabel(label, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
        if i % n_cols == 0:
            ax.set_title(caps[i], fontsize=6, loc="left")
    fig.suptitle(f"{name} base model (g = gold reward, p = proxy reward)", fontsize=8)
    fig.tight_layout()
    p["grid"].mkdir(parents=True, exist_ok=True)
    fig.savefig(p["grid"] / f"{name}_base_grid.png", dpi=110)
    plt.close(fig)

    # The base model's figures on the evaluation captions (4 samples each).
    caps = [c for c in world.train_prompts for _ in range(4)]
    images = sample(caps)
    m = measure(images).predicted()
    tgt = caption_targets(caps)
    colour_ok = (tgt["colour"] < 0) | (m["colour"] == tgt["colour"])
    shape_ok = m["shape"] == tgt["shape"]
    figures = {
        "gold_reward_mean": float(world.rewards["gold"](images, caps).mean()),
        "match_colour_and_shape": float((colour_ok & shape_ok).float().mean()),
        "match_shape": float(shape_ok.float().mean()),
        f"sampling_images_per_s_20_{world.policy.sampler}_steps": per_s,
        "params": sum(x.numel() for x in world.policy.eps_model.parameters()),
    }
    atomic_write_json(p["grid"] / f"{name}_base_figures.json", figures)
    return figures


def main(stage: str = "all", quick: bool = False, out: Path | None = None, seed: int = 0, flow: bool = False) -> None:
    """Run ``stage`` (or every missing stage) of world shapes, or of shapes_flow when ``flow``."""
    stages = FLOW_STAGES if flow else STAGES
    if stage != "all" and stage not in stages:
        raise SystemExit(f"prepare: stage must be one of {('all', *stages)}, got {stage!r}")
    if quick and out is None:
        out = Path(tempfile.mkdtemp(prefix="shapes_flow_quick_" if flow else "shapes_quick_"))
    p = _paths(out, flow)
    for name in stages if stage == "all" else (stage,):
        if stage == "all" and _done(name, p):
            print(f"[prepare] {name}: already done ({p[name]})", flush=True)
            continue
        t0 = time.perf_counter()
        if name == "base":
            cfg = PretrainConfig(seed=seed)
            if quick:
                cfg = PretrainConfig(steps=4, batch_size=8, warmup=2, checkpoint_every=2, seed=seed)
            pretrain(p["base"], cfg, flow=flow)
            result: dict = {"dir": str(p["base"])}
        elif name == "pairs":
            result = stage_pairs(p, quick, seed)
        elif name == "proxy":
            result = stage_proxy(p, quick, seed)
        else:
            result = stage_grid(p, quick, seed)
        short = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
        print(f"[prepare] {name}: {time.perf_counter() - t0:.0f}s {json.dumps(short)}", flush=True)
