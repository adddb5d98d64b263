"""DiffusionNFT: the loss and the optimality probability by hand, the velocity ↔ ε conversion, and learning on
toy2d that fails when the sign flips."""

from __future__ import annotations

import math

import pytest
import torch

from algos.nft import NFT, NFTConfig, flow_residual_scale, nft_loss, optimality_probability, residual_scale
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nft_loss_by_hand():
    theta, old, eps, r = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), 0.75
    # β = ½: ε⁺ = ½ θ = [.5, .5] → L⁺ = .25; ε⁻ = −½ θ = [−.5, −.5] → L⁻ = 2.25; L = (.75·.25 + .25·2.25)/.5
    out = nft_loss(theta, old, eps, torch.tensor([r]), beta=0.5)
    assert out["loss"].item() == pytest.approx(1.5)
    assert out["loss_pos"].item() == pytest.approx(0.25) and out["loss_neg"].item() == pytest.approx(2.25)
    # adaptive, scale 2: d⁺ = [−1, −1] → 1/1; d⁻ = [−3, −3] → 9/3; L = (.75·1 + .25·3)/.5
    out = nft_loss(theta, old, eps, torch.tensor([r]), beta=0.5, scale=torch.tensor([2.0]), adaptive=True)
    assert out["loss"].item() == pytest.approx(3.0)


def test_optimality_probability_by_hand():
    rewards, prompts = torch.tensor([1.0, 3.0, 5.0, 5.0]), ["a", "a", "b", "b"]
    # centred [−1, 1, 0, 0], Z = √½ → r_norm = [−√2, √2, 0, 0]
    torch.testing.assert_close(optimality_probability(rewards, prompts), torch.tensor([0.0, 1.0, 0.5, 0.5]))
    h = 0.5 * math.sqrt(2) / 2
    expected = torch.tensor([0.5 - h, 0.5 + h, 0.5, 0.5])
    torch.testing.assert_close(optimality_probability(rewards, prompts, clip=2.0), expected)


def test_velocity_and_x0_errors_are_weighted_eps_errors():
    """v̂ − v = (ε̂ − ε)/α_t and x̂_0 − x_0 = −(σ_t/α_t)(ε̂ − ε) at fixed x_t (the module docstring's conversion)."""
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_hat = (torch.randn(5, 3, generator=g) for _ in range(3))
    a_bar = torch.tensor([0.9, 0.5, 0.1, 0.01, 0.999])[:, None]
    alpha, sigma = a_bar.sqrt(), (1 - a_bar).sqrt()
    x_t = alpha * x0 + sigma * eps
    x0_hat = (x_t - sigma * eps_hat) / alpha
    v, v_hat = alpha * eps - sigma * x0, alpha * eps_hat - sigma * x0_hat  # v-prediction (Salimans & Ho)
    torch.testing.assert_close(v_hat - v, residual_scale(a_bar[:, 0], "velocity")[:, None] * (eps_hat - eps))
    torch.testing.assert_close(x0 - x0_hat, residual_scale(a_bar[:, 0], "adaptive")[:, None] * (eps_hat - eps))


def test_flow_residuals_are_the_x0_and_eps_errors_of_the_velocity():
    """On a flow policy (x_σ = (1 − σ) x_0 + σ ε, v = ε − x_0): x̂_0 − x_0 = −σ(v̂ − v) and ε̂ − ε = (1 − σ)(v̂ − v) at
    fixed x_σ, so `flow_residual_scale` puts the same x_0- and ε-space errors on the velocity residual."""
    g = torch.Generator().manual_seed(1)
    x0, eps, v_hat = (torch.randn(5, 3, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.5, 0.1, 0.01, 0.999])
    s = sigma[:, None]
    x = (1 - s) * x0 + s * eps
    x0_hat, eps_hat, v = x - s * v_hat, x + (1 - s) * v_hat, eps - x0
    torch.testing.assert_close(x0 - x0_hat, flow_residual_scale(sigma, "adaptive")[:, None] * (v_hat - v))
    torch.testing.assert_close(eps_hat - eps, flow_residual_scale(sigma, "eps")[:, None] * (v_hat - v))
    assert torch.equal(flow_residual_scale(sigma, "velocity"), torch.ones(5))


def test_gradient_fits_good_samples_and_avoids_bad_ones():
    """At θ = θ_old the gradient is (2r − 1) times the plain diffusion loss's: r = 1 fits, r = 0 anti-fits."""
    eps = torch.tensor([[1.0, -1.0]])
    for r, sign in ((1.0, 1.0), (0.0, -1.0), (0.5, 0.0)):
        theta = torch.zeros(1, 2, requires_grad=True)
        nft_loss(theta, torch.zeros(1, 2), eps, torch.tensor([r]), beta=1.0)["loss"].backward()
        torch.testing.assert_close(theta.grad, sign * (theta.detach() - eps))  # d/dθ mean‖θ − ε‖² = (θ − ε)


def test_nft_learns_and_flipped_does_not(tmp_path, monkeypatch):
    """NFT maximises the reward (no KL target): its objective is the gold = proxy reward of toy2d."""
    good = learn(tmp_path, "nft", name="good")
    assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.5
    assert good["win_rate_vs_base"] > 0.6
    flip_objective(monkeypatch)
    assert did_not_learn(tmp_path, "nft")


def test_a_collected_batch_holds_groups_of_one_caption(toy_world):
    """Each caption's mean reward is its samples' baseline (detail 2), so a batch holds B/G captions G times each:
    every row gets a signal (r ≠ ½ unless it equals its group's mean). With group_size=1 captions are drawn
    independently: on a world with more captions than the batch, most rows would get r = ½ exactly."""
    ctx = toy_context(toy_world, batch_size=16)
    algo = NFT(NFTConfig(group_size=4))
    algo.setup(ctx)
    batch = algo.collect()
    groups = [batch.prompts[i : i + 4] for i in range(0, 16, 4)]
    assert all(len(set(g)) == 1 for g in groups)
    assert (batch.r != 0.5).float().mean() > 0.9
    r = batch.r.reshape(4, 4)
    assert ((r > 0.5).any(1) & (r < 0.5).any(1)).all()  # each group has a better and a worse half
    with pytest.raises(ValueError, match="must be a multiple of algo.group_size"):
        NFT(NFTConfig(group_size=3)).setup(toy_context(toy_world, batch_size=16))
