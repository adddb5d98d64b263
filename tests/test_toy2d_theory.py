"""The closed forms of docs/derivation.md §16 (benchmarks/toy2d_theory.py) against quadrature and Monte Carlo on toy2d.

* (D6)-(D7) against numerical integration of the von Mises density, and against importance sampling of points on the
  unit ring scored by the world's own reward (`Toy2dReward`), for two prompts.
* The radius-averaged closed forms against importance sampling of the SHIPPED reference's samples (the estimator of
  `TiltedOptimum`), and the shipped reference against the uniform-ring assumption itself.
* The derived β scale (2·D·Σ_t c_t ≈ 41), the off-data mass against sampling, the angle-KL lower bound.
* The block pasted into docs/derivation.md carries the numbers these functions compute.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from benchmarks import toy2d_theory as th
from rlkit_diffusion.worlds.toy2d import Toy2dEncoder, Toy2dReward, make_scheduler

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0, 2.0, 8.0])
def test_closed_forms_match_quadrature(beta: float):
    density = lambda psi: th.ring_density(np.asarray(psi), beta)  # noqa: E731
    assert integrate.quad(density, -math.pi, math.pi)[0] == pytest.approx(1.0, abs=1e-10)
    reward = integrate.quad(lambda p: density(p) * (2 * math.cos(p) - 2), -math.pi, math.pi)[0]
    kl = integrate.quad(lambda p: density(p) * math.log(2 * math.pi * density(p)), -math.pi, math.pi)[0]
    assert th.ring_expected_reward(beta) == pytest.approx(reward, abs=1e-9)
    assert th.ring_kl(beta) == pytest.approx(kl, abs=1e-9)
    # The optimal value of eq. 5: E[r] − β KL = β log Z.
    assert th.ring_value(beta) == pytest.approx(reward - beta * kl, abs=1e-9)


@pytest.mark.parametrize("angle", [0, 60])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_closed_forms_match_monte_carlo_with_the_world_reward(angle: int, beta: float):
    """Uniform points on the unit ring, scored by toy2d's reward, re-weighted by e^{r/β} (eq. 6)."""
    g = torch.Generator().manual_seed(angle + int(10 * beta))
    theta = torch.rand(200_000, generator=g, dtype=torch.float64) * 2 * math.pi
    x = torch.stack([theta.cos(), theta.sin()], 1)
    prompt = f"angle {angle}"
    r = Toy2dReward(Toy2dEncoder())(x, [prompt] * len(x)).numpy()
    r_is, kl_is, _ = th.importance_estimates(r, beta)
    assert r_is == pytest.approx(th.ring_expected_reward(beta), abs=0.01)
    assert kl_is == pytest.approx(th.ring_kl(beta), abs=0.01)
    # Direct draws from the von Mises of (D6), rotated to the prompt's angle, have the closed-form mean reward.
    psi = stats.vonmises.rvs(th.kappa(beta), size=200_000, random_state=angle)
    phi = math.radians(angle) + torch.as_tensor(psi)
    r_vm = Toy2dReward(Toy2dEncoder())(torch.stack([phi.cos(), phi.sin()], 1), [prompt] * len(psi))
    assert float(r_vm.mean()) == pytest.approx(th.ring_expected_reward(beta), abs=0.01)


def test_radius_makes_kappa_scale_and_the_radial_forms_reduce_to_the_ring():
    assert th.kappa(0.5, radius=0.5) == pytest.approx(th.kappa(1.0))
    r, kl = th.radial_closed_forms(np.ones(10), 0.5)
    assert r == pytest.approx(th.ring_expected_reward(0.5)) and kl == pytest.approx(th.ring_kl(0.5))


def test_derived_beta_scale_is_about_41():
    scale = th.derived_beta_scale(make_scheduler().alphas_cumprod, dim=2)
    assert 40.0 < scale < 41.5


def test_mass_off_data_matches_sampling():
    psi = stats.vonmises.rvs(th.kappa(0.5), size=400_000, random_state=0)
    centres = np.array([0.0, 2 * math.pi / 3, -2 * math.pi / 3])
    dist = np.abs(np.angle(np.exp(1j * (psi[:, None] - centres[None]))))  # wrapped distance to each mode
    off = float((dist.min(1) > 3 * 0.12).mean())
    assert th.mass_off_data(0.5) == pytest.approx(off, abs=0.003)
    assert 0.0 < th.mass_off_data(0.5) < th.mass_off_data(2.0) < 1.0  # a flatter p* has more mass off the data


def test_angle_kl_is_zero_for_equal_laws_and_grows_with_the_tilt():
    rng = np.random.default_rng(0)
    ring = lambda a: np.stack([np.cos(a), np.sin(a)], 1)  # noqa: E731
    ref = ring(rng.uniform(-math.pi, math.pi, 50_000))
    same = ring(rng.uniform(-math.pi, math.pi, 50_000))
    tilted = ring(stats.vonmises.rvs(th.kappa(0.5), size=50_000, random_state=1))
    assert th.angle_kl(same, ref) < 0.005
    # The histogram KL of von Mises draws approaches (D7) from below (binning can only lose information).
    assert th.ring_kl(0.5) - 0.03 < th.angle_kl(tilted, ref) <= th.ring_kl(0.5) + 0.01


@pytest.fixture(scope="module")
def world():
    from rlkit_diffusion.worlds import build_world

    return build_world("toy2d", device="cpu", optimum_pool=2048)


def test_shipped_reference_is_close_to_a_uniform_ring(world):
    ref = th.reference_check(world)
    assert abs(ref.radius_mean - 1.0) < 0.1 and ref.radius_std < 0.2
    assert ref.harmonic3 < 0.05  # the data's three modes would give e^{-9·0.12²/2} ≈ 0.94


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_radial_closed_forms_match_the_tilted_optimum_of_the_shipped_reference(world, beta: float):
    pool = world.optimum.pool[th.PROMPT]
    r = world.reward("gold")(pool, [th.PROMPT] * len(pool)).double().numpy()
    r_is, kl_is, _ = th.importance_estimates(r, beta)
    r_rad, kl_rad = th.radial_closed_forms(pool.double().norm(dim=1).numpy(), beta)
    # The world's own importance weights are the ones of `importance_estimates`.
    w = world.optimum.weights(th.PROMPT, beta).numpy()
    assert float((w * r).sum()) == pytest.approx(r_is, abs=1e-9)
    standard_error = float(np.sqrt((w**2 * (r - r_is) ** 2).sum()))  # of the self-normalised estimate
    assert r_rad == pytest.approx(r_is, abs=4 * standard_error + 0.01)
    assert kl_rad == pytest.approx(kl_is, abs=0.08)


def test_the_pasted_block_carries_these_closed_forms():
    """docs/derivation.md §16's block was written by the command: its ring columns are the functions' values."""
    from benchmarks.docs_tables import BLOCK

    (block,) = BLOCK.findall((REPO / "docs" / "derivation.md").read_text())
    assert "Computed by `python -m benchmarks.toy2d_theory" in block
    for beta in (0.5, 2.0):
        row = re.search(rf"^\| {beta:g} \| (.*)$", block, flags=re.MULTILINE)
        assert row, beta
        cells = [c.strip() for c in row.group(1).split("|")]
        assert cells[0] == f"{th.kappa(beta):.2f}"
        assert cells[1] == f"{th.ring_expected_reward(beta):.3f}"
        assert cells[4] == f"{th.ring_kl(beta):.3f}"
        assert cells[7] == f"{th.ring_value(beta):.3f}"
        assert cells[8] == f"{100 * th.mass_off_data(beta):.1f}%"
