"""toy2d made quantitative: the closed forms of the KL-optimal policy on the ring, and the runs next to them.

::

    python -m benchmarks.toy2d_theory                    # closed forms + checks on the shipped reference (seconds)
    python -m benchmarks.toy2d_theory --train            # + DPO at the tuned and the derived β scale, and DPOK
    python -m benchmarks.toy2d_theory --train --write    # ... and paste the block into docs/derivation.md §16

The world (`rlkit_diffusion.worlds.toy2d`): reward r(x, φ) = −‖x − u(φ)‖² with u(φ) = (cos φ, sin φ); data = three
Gaussian modes (std 0.12) on the unit circle at φ, φ ± 120°; the shipped reference p_ref is close to a UNIFORM ring
(it did not learn the three modes: this module measures how close). Write ψ for a sample's angle relative to φ and ρ
for its radius. On the unit ring r = 2 cos ψ − 2, so with p_ref uniform in ψ the tilted optimum of eq. 6 is a von
Mises distribution,

    p*(ψ) = exp(κ cos ψ) / (2π I₀(κ)),        κ = 2/β   (2ρ/β on a ring of radius ρ),

and, with A(κ) = I₁(κ)/I₀(κ) = E_{p*}[cos ψ],

    E_{p*}[r]         = 2 A(κ) − 2
    KL(p* ‖ p_ref)    = κ A(κ) − log I₀(κ)
    β log Z           = −2 + β log I₀(κ)        (= E_{p*}[r] − β KL, the optimal value of eq. 5).

Everything printed is computed by this command; ``--write`` pastes it between the ``<!-- results:start -->`` and
``<!-- results:end -->`` markers of docs/derivation.md (the markers of `benchmarks.docs_tables`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import special, stats

from rlkit_diffusion.mdp import rescore_at
from rlkit_diffusion.worlds.toy2d import MODE_STD

REPO_ROOT = Path(__file__).resolve().parent.parent
DERIVATION = REPO_ROOT / "docs" / "derivation.md"
PROMPT = "angle 0"


# ----------------------------------------------------------------------------------------------------------------
# Closed forms on the ring
# ----------------------------------------------------------------------------------------------------------------
def kappa(beta: float, radius: float = 1.0) -> float:
    """Concentration of p*(ψ) ∝ exp(κ cos ψ) on a ring of radius ρ: r = −(ρ² + 1) + 2ρ cos ψ, so κ = 2ρ/β."""
    return 2.0 * radius / beta


def log_i0(k: float | np.ndarray) -> float | np.ndarray:
    """log I₀(κ), stable for large κ (I₀ grows like e^κ)."""
    return np.log(special.i0e(k)) + k


def mean_cos(k: float | np.ndarray) -> float | np.ndarray:
    """A(κ) = I₁(κ)/I₀(κ) = E[cos ψ] under the von Mises distribution (the mean resultant length)."""
    return special.i1e(k) / special.i0e(k)


def ring_expected_reward(beta: float) -> float:
    """E_{p*}[r] = 2A(κ) − 2 on the unit ring."""
    return float(2 * mean_cos(kappa(beta)) - 2)


def ring_kl(beta: float) -> float:
    """KL(p* ‖ p_ref) = κA(κ) − log I₀(κ) on the unit ring (p_ref uniform in angle)."""
    k = kappa(beta)
    return float(k * mean_cos(k) - log_i0(k))


def ring_value(beta: float) -> float:
    """β log Z = β log E_ref[e^{r/β}] = −2 + β log I₀(κ): the optimal value of eq. 5 on the unit ring."""
    return float(-2 + beta * log_i0(kappa(beta)))


def ring_density(psi: np.ndarray, beta: float) -> np.ndarray:
    """The von Mises density p*(ψ) of the unit ring."""
    k = kappa(beta)
    return np.exp(k * (np.cos(psi) - 1)) / (2 * math.pi * special.i0e(k))


def radial_closed_forms(radii: np.ndarray, beta: float) -> tuple[float, float]:
    """(E_{p*}[r], KL(p* ‖ p_ref)) for a reference that is uniform in angle with the given radii (independent).

    Given ρ, ψ is von Mises with κ = 2ρ/β and E[r | ρ] = −(ρ² + 1) + 2ρ A(κ); the radius is re-weighted by
    Z(ρ) = e^{−(ρ²+1)/β} I₀(2ρ/β). KL = E_{p*}[r]/β − log Z with Z = mean over radii of Z(ρ) (eq. 6 taken to logs).
    """
    rho = np.asarray(radii, dtype=np.float64)
    k = 2 * rho / beta
    log_z = -(rho**2 + 1) / beta + log_i0(k)  # (n,)
    w = np.exp(log_z - log_z.max())
    w /= w.sum()
    reward = float((w * (-(rho**2 + 1) + 2 * rho * mean_cos(k))).sum())
    log_z_mean = float(log_z.max() + np.log(np.exp(log_z - log_z.max()).mean()))
    return reward, reward / beta - log_z_mean


def importance_estimates(rewards: np.ndarray, beta: float) -> tuple[float, float, float]:
    """Self-normalised importance sampling from reference draws: (E_{p*}[r], KL(p* ‖ p_ref), effective sample size).

    w_i = e^{r_i/β} / Σ_j e^{r_j/β} (`TiltedOptimum.weights`); KL ≈ Σ w_i log(n w_i), E[r] ≈ Σ w_i r_i.
    """
    r = np.asarray(rewards, dtype=np.float64)
    logw = r / beta - (r / beta).max()
    w = np.exp(logw) / np.exp(logw).sum()
    kl = float((w * np.log(len(r) * w + 1e-300)).sum())
    return float((w * r).sum()), kl, float(1.0 / (w**2).sum())


def mass_off_data(beta: float, width: float = 3 * MODE_STD) -> float:
    """P_{p*}(ψ is more than ``width`` radians from every data mode 0°, ±120°): p*'s mass the pairs barely cover.

    The data modes have std 0.12 along the ring, so ``width`` = 3·0.12 rad ≈ 21° leaves out ≈ 0.3% of the data.
    """
    k = kappa(beta)
    on = 0.0
    for centre in (0.0, 2 * math.pi / 3, -2 * math.pi / 3):
        on += stats.vonmises.cdf(centre + width, k) - stats.vonmises.cdf(centre - width, k)
    return float(1.0 - on)


def derived_beta_scale(alphas_cumprod: torch.Tensor, dim: int) -> float:
    """The official-convention β per unit of the KL weight: 2·D·Σ_{t≥1} c_t with c_t = b_t / (2a_t(1 − ᾱ_{t−1}))
    (docs/derivation.md §7: ½ of the official code, pixel mean over D, T and the literal weights ω = c_t)."""
    a = alphas_cumprod.double()
    b = 1 - a[1:] / a[:-1]  # b_t for t = 1..T-1
    c = b / (2 * (1 - b) * (1 - a[:-1]))
    return float(2 * dim * c.sum())


def angle_kl(x: np.ndarray, x_ref: np.ndarray, bins: int = 36) -> float:
    """Plug-in KL between the angle histograms of two sample sets (add-½ smoothing).

    The angle is a function of x_0, so the true angle-marginal KL is a LOWER bound of KL(p_θ(x_0) ‖ p_ref(x_0))
    (data processing), which is itself at most the path KL (chain rule, §4).
    """
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    p = np.histogram(np.arctan2(x[:, 1], x[:, 0]), edges)[0] + 0.5
    q = np.histogram(np.arctan2(x_ref[:, 1], x_ref[:, 0]), edges)[0] + 0.5
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Measurements on the shipped world
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReferenceCheck:
    radius_mean: float
    radius_std: float
    harmonic3: float  # |E e^{3iψ}|: 0 for a uniform ring, e^{−9·0.12²/2} ≈ 0.94 for the data's modes
    pool: int


def reference_check(world, prompt: str = PROMPT) -> ReferenceCheck:
    """How close the shipped reference is to a uniform ring (from the optimum's pool of reference samples)."""
    x = world.optimum.pool[prompt].double().cpu().numpy()
    rho, psi = np.hypot(x[:, 0], x[:, 1]), np.arctan2(x[:, 1], x[:, 0])
    return ReferenceCheck(float(rho.mean()), float(rho.std()), float(abs(np.exp(3j * psi).mean())), len(x))


def step_kls(world, policy, ref_policy, prompt: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean per-step KL(π_θ ‖ π_ref) along n policy samples, and each step's σ_t: ((N,), (N,)) — the terms of the
    evaluation's path KL (`rlkit_diffusion.mdp.DenoisingCore.path_kl`)."""
    g = torch.Generator().manual_seed(seed)
    schedule = policy.schedule()
    cond = world.encoder([prompt] * n)
    x_T = torch.randn(n, *world.sample_shape, generator=g)
    with torch.no_grad():
        out = world.denoise(policy, x_T, cond, schedule=schedule, generator=g, return_trajectory=True)
        kls = []
        for i in range(len(schedule)):
            x_t, t = out.latents[i], schedule.timesteps[i]
            mean_ref = rescore_at(world, ref_policy, x_t, t, schedule.prev_timesteps[i], cond).mean
            kls.append(float(policy.gaussian_kl(out.means[i], mean_ref, out.stds[:, i]).mean()))
    return np.array(kls), out.stds[0].double().cpu().numpy()


@dataclass
class RunRow:
    algo: str
    beta_star: float
    typed_beta: float  # the algorithm's own KL weight: official β for DPO, kl_coef for DPOK
    scale_note: str
    distance: float
    reward: float
    angle_kl: float
    path_kl: float
    last_step_share: float  # share of the path KL from the last stochastic step (σ ≈ 0.01)
    wall_s: float


def compose_tutorial(overrides: list[str]):
    """The tutorial's Hydra config (experiment=toy2d_tutorial), composed like the runner does."""
    from hydra import compose, initialize_config_module

    import benchmarks.schema  # noqa: F401  (registers the structured schemas)

    with initialize_config_module("benchmarks.conf", version_base="1.3"):
        return compose("config", overrides=["experiment=toy2d_tutorial", *overrides])


def train_rows(cfg, derived_scale: float) -> list[RunRow]:
    """DPO at the tutorial's tuned scale and at the derived one, and DPOK, at each β* of the tutorial."""
    from omegaconf import OmegaConf

    from benchmarks.tutorial import distance_to_optimum, draw, train_panel

    t = cfg.tutorial
    n, seed = int(t.samples), int(t.sample_seed)
    rows: list[RunRow] = []
    dpo = t.algos.dpo
    tuned = float(dpo.beta_scale)
    derived = OmegaConf.merge(dpo, {"beta_scale": round(derived_scale, 1)})
    specs = [
        ("dpo", dpo, f"tuned ×{tuned:g}"),
        ("dpo", derived, f"derived ×{round(derived_scale, 1):g}"),
        ("dpok", t.algos.dpok, "kl_coef = β*"),
    ]
    for beta in [float(b) for b in t.betas]:
        for name, spec, note in specs:
            world, base, wall = train_panel(cfg, name, spec, beta)
            x0, reward, kl = draw(world, world.policy, base, PROMPT, n, seed)
            per_step, stds = step_kls(world, world.policy, base.policy, PROMPT, n, seed)
            last = int(np.where(stds > 0, stds, np.inf).argmin())  # the last stochastic step (σ ≈ 0.01)
            x_ref = world.optimum.pool[PROMPT].cpu().numpy()
            rows.append(
                RunRow(
                    algo=name,
                    beta_star=beta,
                    typed_beta=float(spec.get("beta_scale", 1.0)) * beta,
                    scale_note=note,
                    distance=distance_to_optimum(world, x0, PROMPT, beta),
                    reward=reward,
                    angle_kl=angle_kl(x0, x_ref),
                    path_kl=kl,
                    last_step_share=float(per_step[last] / max(per_step.sum(), 1e-12)),
                    wall_s=wall,
                )
            )
            print(f"toy2d_theory: {name} {note} β*={beta:g}: reward {reward:.3f}, path KL {kl:.3g}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------------------------
def render(world, betas: list[float], rows: list[RunRow] | None, command: str) -> str:
    from benchmarks.docs_tables import END, START

    ref = reference_check(world)
    scale = derived_beta_scale(world.policy.alphas_cumprod, int(np.prod(world.sample_shape)))
    pool = world.optimum.pool[PROMPT]
    r_pool = world.reward("gold")(pool, [PROMPT] * len(pool)).double().cpu().numpy()
    radii = pool.double().norm(dim=1).cpu().numpy()
    lines = [
        START,
        f"Computed by `{command}`.",
        "",
        f"Shipped reference, prompt `{PROMPT}` ({ref.pool} samples of the optimum's pool): radius "
        f"{ref.radius_mean:.3f} ± {ref.radius_std:.3f}; third angular harmonic |E e^{{3iψ}}| = {ref.harmonic3:.3f} "
        f"(0 for a uniform ring, {math.exp(-4.5 * MODE_STD**2):.2f} for the data's three modes). "
        f"Derived official-β scale 2·D·Σ_t c_t = {scale:.1f}.",
        "",
        "| β* | κ = 2/β* | E_p*[r], ring | E_p*[r], reference radii | E_p*[r], importance sampling (ESS) "
        "| KL(p*‖p_ref), ring | KL, reference radii | KL, importance sampling | β log Z, ring "
        "| p* mass off the data modes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for beta in betas:
        r_rad, kl_rad = radial_closed_forms(radii, beta)
        r_is, kl_is, ess = importance_estimates(r_pool, beta)
        lines.append(
            f"| {beta:g} | {kappa(beta):.2f} | {ring_expected_reward(beta):.3f} | {r_rad:.3f} "
            f"| {r_is:.3f} ({ess:.0f}) "
            f"| {ring_kl(beta):.3f} | {kl_rad:.3f} | {kl_is:.3f} | {ring_value(beta):.3f} "
            f"| {100 * mass_off_data(beta):.1f}% |"
        )
    if rows:
        lines += [
            "",
            "| algorithm | β* | typed β (scale) | energy distance to p* | mean reward | angle KL to p_ref | path KL "
            "| share of path KL in the σ = 0.01 step | train s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r.algo} | {r.beta_star:g} | {r.typed_beta:.3g} ({r.scale_note}) | {r.distance:.3f} "
                f"| {r.reward:.3f} | {r.angle_kl:.3f} | {r.path_kl:.3g} | {100 * r.last_step_share:.0f}% "
                f"| {r.wall_s:.0f} |"
            )
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", action="store_true", help="also train DPO (tuned and derived β scale) and DPOK")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every run's train.steps")
    p.add_argument("--write", action="store_true", help="paste the block into docs/derivation.md")
    p.add_argument("--doc", default=str(DERIVATION), help="the page whose results block is rewritten")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    overrides = ["tutorial.progress=false", f"tutorial.steps_scale={args.steps_scale}"]
    cfg = compose_tutorial(overrides)
    from benchmarks.tutorial import build

    t0 = time.perf_counter()
    world = build(cfg)
    betas = [float(b) for b in cfg.tutorial.betas]
    derived = derived_beta_scale(world.policy.alphas_cumprod, int(np.prod(world.sample_shape)))
    rows = train_rows(cfg, derived) if args.train else None
    command = " ".join(
        ["python -m benchmarks.toy2d_theory"]
        + (["--train"] if args.train else [])
        + ([f"--steps-scale {args.steps_scale:g}"] if args.steps_scale != 1.0 else [])
    )
    block = render(world, betas, rows, command)
    print(block)
    if args.write:
        from benchmarks.docs_tables import replace_block

        replace_block(Path(args.doc), block)
        print(f"pasted into {args.doc} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
