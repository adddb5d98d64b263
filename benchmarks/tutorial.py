"""The toy2d tutorial: ``python -m benchmarks.run experiment=toy2d_tutorial``.

For each algorithm of ``tutorial.algos`` (conf/experiment/toy2d_tutorial.yaml) and each β* of ``tutorial.betas``,
train the algorithm on toy2d from the same pretrained weights and draw its samples for one prompt over

* the density of the reference p_ref (grey contour lines), and
* the density of the KL-optimal policy p*(x | c) ∝ p_ref(x | c) exp(r(x, c)/β*) of eq. 5-6 (filled colours),

one row per algorithm and one column per β*, into ``toy2d_tutorial.png`` in the run directory (copied to
``tutorial.copy_to``, the figure of docs/derivation.md). Algorithms with a KL weight (DPO's β, DPOK's ``kl_coef``)
are trained once per β*; algorithms without one (DDPO, DRaFT) are trained once and drawn in every column, so the
figure shows what the KL term buys: DPO and DPOK move with β* and track p*, DRaFT collapses onto the reward's
mode u(φ), and DDPO drifts as far from p_ref as the reward pays for.

Nothing here trains or samples by itself: every panel is `rlkit_diffusion.train.train` on a freshly built world
(identical initial weights) with an algorithm from the `algos` registry, sampled by the evaluation's own sampler
(`rlkit_diffusion.evaluate.sample_split`, which also gives the path KL to the reference).
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from algos import algo_config_class, build_algo
from benchmarks.lifecycle import Interrupted
from benchmarks.wiring import build_context, build_world_from, new_run_dir, save_config
from rlkit_diffusion.checkpoint import atomic_write_json
from rlkit_diffusion.evaluate import EvalConfig, sample_split
from rlkit_diffusion.reference import Reference
from rlkit_diffusion.train import TrainConfig, train
from rlkit_diffusion.worlds.base import World

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Panel:
    """One algorithm at one β*: its samples and how far they are from p* and p_ref."""

    algo: str
    beta: float  # β* of the column
    x0: np.ndarray  # (n, 2) samples of the trained policy for the tutorial's prompt
    distance_to_optimum: float  # energy distance to draws from p*_β*
    reward: float  # mean r(x_0, c)
    kl_to_ref: float  # path KL Σ_t KL(π_θ ‖ π_ref) along the samples (evaluation's estimator)
    train_wall_s: float

    @property
    def spread(self) -> float:
        """Root mean squared distance of the samples to their mean (≈ 0 for a collapsed policy)."""
        return float(np.sqrt(((self.x0 - self.x0.mean(0)) ** 2).sum(1).mean()))


def _settings(cfg: DictConfig) -> DictConfig:
    if cfg.get("tutorial") is None:
        raise ValueError("experiment=toy2d_tutorial needs the 'tutorial' settings of conf/experiment/toy2d_tutorial")
    return cfg.tutorial


def scaled_steps(steps: int, scale: float) -> int:
    """The optimizer steps of a panel under ``tutorial.steps_scale`` (at least one)."""
    if scale <= 0:
        raise ValueError(f"tutorial.steps_scale must be > 0, got {scale}")
    return max(1, round(steps * scale))


def algo_settings(name: str, spec: DictConfig, beta: float | None, steps_scale: float) -> tuple[Any, TrainConfig]:
    """The algorithm's config dataclass and the loop's `TrainConfig` for one panel.

    ``spec.algo`` and ``spec.train`` are merged over the schemas' defaults (a typo fails here, as in the runner);
    the panel's β* is written into ``spec.beta_key`` multiplied by ``spec.beta_scale`` (None: the algorithm has no
    KL weight).
    """
    algo_node = OmegaConf.merge(OmegaConf.structured(algo_config_class(name)), spec.get("algo") or {})
    if beta is not None:
        algo_node[spec.beta_key] = float(spec.get("beta_scale", 1.0)) * beta
    train_node = OmegaConf.merge(OmegaConf.structured(TrainConfig), spec.get("train") or {})
    train_node.steps = scaled_steps(train_node.steps, steps_scale)
    return OmegaConf.to_object(algo_node), OmegaConf.to_object(train_node)


def build(cfg: DictConfig) -> World:
    """A fresh toy2d world at the pretrained weights (seeded like the runner: identical for every panel)."""
    if cfg.world.name != "toy2d":
        raise ValueError(
            f"experiment=toy2d_tutorial draws 2-D densities and needs world=toy2d, got world={cfg.world.name}"
        )
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return build_world_from(cfg, "cuda" if cuda else "cpu")


def train_panel(cfg: DictConfig, name: str, spec: DictConfig, beta: float | None) -> tuple[World, Reference, float]:
    """Train algorithm ``name`` (at β* = ``beta``) with THE training loop. Returns (world, base reference, seconds)."""
    t = _settings(cfg)
    algo_cfg, train_cfg = algo_settings(name, spec, beta, float(t.steps_scale))
    world = build(cfg)
    base = Reference(world.policy, "frozen")
    ctx = build_context(world, world.policy, base, reward=cfg.reward, batch_size=train_cfg.batch_size, seed=cfg.seed)
    summary = train(build_algo(name, algo_cfg), ctx, train_cfg, progress=bool(t.progress))
    if summary.get("interrupted"):  # no half-trained panel in the figure: the tutorial stops (it keeps no checkpoint)
        signum = signal.Signals[summary["interrupted"]].value
        raise Interrupted(signum, f"tutorial stopped by {summary['interrupted']} while training {name}; run it again")
    return world, base, float(summary["train_wall_s"])


def draw(world: World, policy, base: Reference, prompt: str, n: int, seed: int) -> tuple[np.ndarray, float, float]:
    """n samples of ``policy`` for ``prompt`` with the evaluation noises of ``seed``: (x0, mean reward, path KL)."""
    ecfg = EvalConfig(samples_per_prompt=n, seed=seed, batch_size=n)
    out = sample_split(world, policy, [prompt] * n, ecfg, ref_policy=base.policy, desc="tutorial sample")
    with torch.no_grad():
        reward = world.reward("gold")(world.decode(out["x0"]), [prompt] * n)
    return out["x0"].cpu().numpy(), float(reward.mean()), float(out["kl"].mean())


def distance_to_optimum(world: World, x0: np.ndarray, prompt: str, beta: float) -> float:
    """Energy distance between the samples and at least as many draws from p*_β (importance resampling)."""
    target = world.optimum.samples(prompt, max(512, len(x0)), beta)
    return world.distance(torch.as_tensor(x0, dtype=target.dtype), target.cpu())


def densities(world: World, prompt: str, betas: list[float], grid: np.ndarray, bandwidth: float) -> dict:
    """Kernel density estimates on ``grid`` (G, 2) of p_ref (the optimum's reference pool) and of each p*_β (the
    same pool, weighted by the self-normalised importance weights exp(r/β)/Σ exp(r/β))."""
    pool = world.optimum.pool[prompt].double().cpu()  # (P, 2) ~ p_ref
    g = torch.as_tensor(grid, dtype=torch.float64)
    kernel = torch.cat([torch.exp(-(torch.cdist(c, pool) ** 2) / (2 * bandwidth**2)) for c in g.split(4096)])  # (G, P)
    out = {"ref": (kernel.mean(1) / (2 * math.pi * bandwidth**2)).numpy()}
    for b in betas:
        w = world.optimum.weights(prompt, b)  # (P,)
        out[b] = (kernel @ w / (2 * math.pi * bandwidth**2)).numpy()
    return out


def plot(panels: list[Panel], world: World, t: DictConfig, path: Path) -> None:
    """One row per algorithm (the reference first), one column per β*: samples over p_ref and p*_β* densities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = [float(b) for b in t.betas]
    names = list(dict.fromkeys(p.algo for p in panels))
    lim = float(t.plot_limit)
    axis = np.linspace(-lim, lim, int(t.grid))
    gx, gy = np.meshgrid(axis, axis)
    dens = densities(world, t.prompt, betas, np.stack([gx.ravel(), gy.ravel()], 1), float(t.bandwidth))
    u = world.encoder([t.prompt])[0].cpu().numpy()  # u(φ): the reward's mode
    fig, axes = plt.subplots(len(names), len(betas), figsize=(3.3 * len(betas), 3.1 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, beta in enumerate(betas):
            ax = axes[i, j]
            p = next(p for p in panels if p.algo == name and p.beta == beta)
            star = dens[beta].reshape(gx.shape)
            ax.imshow(star**0.5, extent=(-lim, lim, -lim, lim), origin="lower", cmap="Oranges", vmin=0)
            ax.contour(gx, gy, dens["ref"].reshape(gx.shape), levels=4, colors="0.45", linewidths=0.7)
            ax.scatter(p.x0[:, 0], p.x0[:, 1], s=2.5, c="tab:blue", alpha=0.6, linewidths=0, zorder=2)
            ax.plot(*u, marker="*", ms=12, mfc="none", mec="crimson", mew=1.0, zorder=3)  # hollow: a collapse shows
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(
                0.02,
                0.02,
                f"ED to p* {p.distance_to_optimum:.3f}\nKL to ref {p.kl_to_ref:.3g}\n"
                f"reward {p.reward:.2f}\nspread {p.spread:.2f}",
                transform=ax.transAxes,
                fontsize=7,
                va="bottom",
                bbox={"facecolor": "white", "alpha": 0.75, "lw": 0},
            )
            if i == 0:
                ax.set_title(f"β* = {beta:g}", fontsize=10)
            if j == 0:
                ax.set_ylabel(str(t.labels.get(name, name)), fontsize=9)
    fig.suptitle(
        f"toy2d, prompt '{t.prompt}': samples (blue) over p_ref (grey contours)\n"
        "and p* ∝ p_ref·exp(r/β*) (orange); ☆ = the reward's mode u",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=int(t.dpi))
    plt.close(fig)
    from PIL import Image

    with Image.open(path) as im:  # a 256-colour palette: the same picture at a fraction of the bytes
        im.convert("RGB").quantize(256).save(path, optimize=True)


def run(cfg: DictConfig, run_dir: Path | None = None) -> float:
    """Train every tutorial algorithm, draw the figure, write ``tutorial.json``.

    Returns the mean energy distance to p* over the panels of the KL-regularised algorithms (a sweepable score).
    """
    t0 = time.perf_counter()
    t = _settings(cfg)
    betas = [float(b) for b in t.betas]
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    n, prompt, seed = int(t.samples), str(t.prompt), int(t.sample_seed)

    world = build(cfg)
    base = Reference(world.policy, "frozen")
    x_ref, r_ref, _ = draw(world, world.policy, base, prompt, n, seed)
    panels = [
        Panel("reference", b, x_ref, distance_to_optimum(world, x_ref, prompt, b), r_ref, 0.0, 0.0) for b in betas
    ]
    for name, spec in t.algos.items():
        per_beta = spec.get("beta_key") is not None
        for beta in betas if per_beta else [None]:
            world, base, wall = train_panel(cfg, name, spec, beta)
            x0, reward, kl = draw(world, world.policy, base, prompt, n, seed)
            for b in [beta] if per_beta else betas:
                d = distance_to_optimum(world, x0, prompt, b)
                panels.append(Panel(name, b, x0, d, reward, kl, wall))
            print(f"tutorial: {name} β*={beta if per_beta else '-'}: reward {reward:.3f}, KL {kl:.3g}", flush=True)

    fig_path = run_dir / "toy2d_tutorial.png"
    plot(panels, world, t, fig_path)
    if t.get("copy_to"):
        dest = Path(str(t.copy_to))
        dest = dest if dest.is_absolute() else REPO_ROOT / dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fig_path, dest)
    rows = [{**{k: v for k, v in vars(p).items() if k != "x0"}, "spread": p.spread} for p in panels]
    summary = {"prompt": prompt, "betas": betas, "panels": rows, "wall_s": time.perf_counter() - t0}
    atomic_write_json(run_dir / "tutorial.json", summary)
    print(f"tutorial figure: {fig_path}" + (f" (copied to {t.copy_to})" if t.get("copy_to") else ""), flush=True)
    kl_panels = [p.distance_to_optimum for p in panels if t.algos.get(p.algo, {}).get("beta_key") is not None]
    return float(np.mean(kl_panels)) if kl_panels else float("nan")
