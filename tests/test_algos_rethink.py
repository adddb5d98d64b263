"""Rethinking-DPO. The paper's variant (default): the timestep distribution (P3), λ(t) (P4) and the monitor's KL
(M1) by hand, the copy every τ steps and the freeze (P1-P2), learning that fails when the sign flips. The project
variant (``variant=project``): the reference update (R1/R2) and the timestep-aware scale (T1-T4) by hand, each
part's effect on toy2d, equivalence to DPO with both parts off, and learning that fails when the sign flips."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from algos.dpo import DPO, DPOConfig
from algos.rethink_dpo import (
    RethinkDPO,
    RethinkDPOConfig,
    TimestepScaler,
    kl_to_init_estimate,
    posterior_kl_coef,
    regularise_reference,
    snr_lambda,
    timestep_probs,
    timestep_scale,
)
from rlkit_diffusion.reference import Reference
from rlkit_diffusion.train import TrainConfig, train
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_update_then_shrink_by_hand():
    net = nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    anchor = {"weight": torch.tensor([[2.0]])}  # θ_0 = 2
    ema = Reference(SimpleNamespace(eps_model=net), "ema", ema_decay=0.9)  # φ = 0
    hard = Reference(SimpleNamespace(eps_model=net), "hard", tau=2)
    net.weight.data.fill_(1.0)  # θ = 1
    # (R1): φ ← (1 − γ)[α φ + (1 − α) θ] + γ θ_0 = 0.9 · (0.9·0 + 0.1·1) + 0.1 · 2 = 0.29
    assert ema.update(1)
    regularise_reference(ema.network, anchor, 0.1)
    assert ema.network.weight.item() == pytest.approx(0.29)
    # (R2): nothing at step 1, then φ ← (1 − γ) θ + γ θ_0 = 0.9 + 0.2 = 1.1 at step τ = 2
    assert not hard.update(1) and hard.network.weight.item() == 0.0
    assert hard.update(2)
    regularise_reference(hard.network, anchor, 0.1)
    assert hard.network.weight.item() == pytest.approx(1.1)


def test_timestep_scale_by_hand():
    t = torch.tensor([100, 900])  # buckets 0 and 1 of K = 2
    both = torch.tensor([True, True])
    # κ = 0: s̄ = (1 + 4)/2 = 2.5 → λ = [2.5/1, 2.5/4]
    lam = timestep_scale(t, torch.tensor([1.0, 4.0]), both, 1000, kappa=0.0, max_scale=10.0)
    torch.testing.assert_close(lam, torch.tensor([2.5, 0.625], dtype=lam.dtype))
    # κ = 1: e = [1.25, 1.75] / 1.5; clipped to [1/2, 2]
    lam = timestep_scale(t, torch.tensor([1.0, 4.0]), both, 1000, kappa=1.0, max_scale=2.0)
    torch.testing.assert_close(lam, torch.tensor([2.0, 0.625 * 1.75 / 1.5], dtype=lam.dtype))
    # an unvisited bucket counts as the mean scale
    lam = timestep_scale(t, torch.tensor([1.0, 0.0]), torch.tensor([True, False]), 1000, 0.0, 10.0)
    torch.testing.assert_close(lam, torch.tensor([1.0, 1.0], dtype=lam.dtype))

    scaler = TimestepScaler(2, 1000, decay=0.5, kappa=0.0, max_scale=10.0)
    scaler.update(torch.tensor([100, 150, 900]), torch.tensor([1.0, 3.0, 8.0]))  # first visits: the means 2 and 8
    scaler.update(torch.tensor([100]), torch.tensor([4.0]))  # 0.5 · 2 + 0.5 · 4 = 3
    assert scaler.scales.tolist() == [3.0, 8.0]
    copy = TimestepScaler(2, 1000, decay=0.5, kappa=0.0, max_scale=10.0)
    copy.load_state_dict(scaler.state_dict())
    torch.testing.assert_close(copy(t), scaler(t))


def test_with_both_parts_off_it_is_dpo(toy_world):
    outs = []
    for algo in (
        DPO(DPOConfig(beta=20.0)),
        RethinkDPO(RethinkDPOConfig(beta=20.0, variant="project", ref_update="none", timestep_aware=False)),
    ):
        ctx = toy_context(toy_world, batch_size=64)
        algo.setup(ctx)
        outs.append(algo.loss(algo.collect())["loss"])
    assert torch.equal(outs[0], outs[1])


def _train(world, steps: int = 30, **cfg) -> RethinkDPO:
    ctx = toy_context(world, batch_size=128)
    algo = RethinkDPO(RethinkDPOConfig(beta=20.0, variant="project", **cfg))
    train(algo, ctx, TrainConfig(steps=steps, lr=1e-3, batch_size=128), progress=False)
    return algo


def _ref_to_base(algo: RethinkDPO) -> float:
    ref = dict(algo.reference.network.named_parameters())
    return sum(float((ref[n] - a).pow(2).sum()) for n, a in algo.anchor.items())


def test_each_part_acts_on_toy2d(toy_world):
    # (a) the EMA reference leaves the base; the regulariser γ keeps it closer.
    free = _train(toy_world, ref_update="ema", ref_ema_decay=0.9, ref_reg=0.0, timestep_aware=False)
    anchored = _train(toy_world, ref_update="ema", ref_ema_decay=0.9, ref_reg=0.2, timestep_aware=False)
    assert 0 < _ref_to_base(anchored) < 0.5 * _ref_to_base(free)
    # (b) the implicit-reward scale is imbalanced across t (large at low noise), so λ(t) lifts the high-noise steps.
    ts = _train(toy_world, ref_update="none", timestep_aware=True, ts_emphasis=0.0)
    s = ts.scaler.scales
    assert ts.scaler.visited.all() and s[0] > 10 * s[-1]
    lam = ts.scaler(torch.tensor([50, 950]))
    assert lam[1] > 1.0 > lam[0]


# The project variant's toy2d settings (its tuning file before the paper's variant became the default).
PROJECT = [
    "algo.variant=project",
    "algo.beta=20.0",
    "algo.ref_update=ema",
    "algo.ref_ema_decay=0.99",
    "algo.ref_reg=0.05",
    "algo.timestep_aware=true",
    "train.steps=200",
    "train.lr=1e-3",
    "train.batch_size=256",
]


def test_rethink_dpo_learns_and_flipped_does_not(tmp_path, monkeypatch):
    good = learn(tmp_path, "rethink_dpo", *PROJECT, name="good")
    assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.5
    assert good["distance_to_optimum_trained"] < 0.5 * good["distance_to_optimum_base"]
    flip_objective(monkeypatch)
    assert did_not_learn(tmp_path, "rethink_dpo", *PROJECT, "train.steps=100")


# ------------------------------------------------------------------------------------------------------------------
# The paper's variant
# ------------------------------------------------------------------------------------------------------------------
def test_timestep_distribution_and_snr_scale_by_hand():
    # T = 4, K = 2, γ = ½: bin 0 = {3, 2} (high noise) has mass 1/1.5, bin 1 = {1, 0} has ½/1.5, spread evenly
    torch.testing.assert_close(
        timestep_probs(4, 0.5, 2), torch.tensor([1 / 6, 1 / 6, 1 / 3, 1 / 3], dtype=torch.float64)
    )
    p = timestep_probs(1000, 0.9, 1000)  # the literal per-timestep reading: p(t) ∝ 0.9^(T − 1 − t)
    assert p.sum().item() == pytest.approx(1.0) and p[999] / p[998] == pytest.approx(1 / 0.9)
    a_bar = torch.tensor([0.99, 0.5, 0.2])  # 1/√SNR = √((1 − ᾱ)/ᾱ) = [0.1005, 1, 2] → min-max → [0, 0.4972, 1]
    torch.testing.assert_close(
        snr_lambda(a_bar), torch.tensor([1.0, 1 + (1 - 0.1005) / (2 - 0.1005), 2.0]), atol=1e-4, rtol=0
    )


def test_monitor_kl_is_the_posterior_gaussian_kl(toy_world):
    """c_t ‖ε − ε_θ‖² equals KL(q(x_{t−1}|x_0,x_t) ‖ p_θ(x_{t−1}|x_t)) computed from the DDPM means and variance."""
    a = toy_world.policy.alphas_cumprod.double()
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_theta = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([1, 400, 999])
    a_t, a_prev = a[t][:, None], a[t - 1][:, None]
    alpha, beta = a_t / a_prev, 1 - a_t / a_prev
    x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    mu_q = a_prev.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_prev) / (1 - a_t) * x_t
    mu_p = (x_t - beta / (1 - a_t).sqrt() * eps_theta) / alpha.sqrt()
    var = beta * (1 - a_prev) / (1 - a_t)
    kl = ((mu_q - mu_p) ** 2 / (2 * var)).sum(1)
    coef = posterior_kl_coef(toy_world.policy.alphas_cumprod, t).double()
    torch.testing.assert_close(coef * ((eps - eps_theta) ** 2).sum(1), kl, rtol=1e-5, atol=0)
    # D̂ = T · mean c_t (err_init − err_ref) = 10 · mean([0.5 · 1, 1 · 0])
    est = kl_to_init_estimate(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0]), torch.tensor([0.5, 1.0]), 10)
    assert est.item() == pytest.approx(2.5)


def _paper(world, steps: int, **cfg) -> tuple[RethinkDPO, list[dict]]:
    ctx = toy_context(world, batch_size=64)
    algo = RethinkDPO(RethinkDPOConfig(beta=20.0, **cfg))
    logs = []
    original = algo.after_update
    algo.after_update = lambda update: logs.append(original(update)) or logs[-1]
    train(algo, ctx, TrainConfig(steps=steps, lr=1e-3, batch_size=64), progress=False)
    return algo, logs


def _params(net) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_reference_is_copied_every_tau_steps_until_the_monitor_freezes_it(toy_world):
    free, logs = _paper(toy_world, 8, tau=4, kl_threshold=1e9)
    assert [i + 1 for i, log in enumerate(logs) if log] == [4, 8]  # a copy (and a monitor reading) every τ steps
    assert not free.frozen and logs[3]["ref_kl_to_init"] > 0  # the reference fits the winners better than p_init
    torch.testing.assert_close(_params(free.reference.network), _params(free.ctx.policy.eps_model))  # copy at 8
    frozen, logs = _paper(toy_world, 8, tau=4, kl_threshold=0.0)
    assert frozen.frozen and [i + 1 for i, log in enumerate(logs) if log] == [4]  # frozen after the first copy
    assert not torch.equal(_params(frozen.reference.network), _params(frozen.ctx.policy.eps_model))
    state = frozen.state_dict()
    again = RethinkDPO(RethinkDPOConfig(beta=20.0, tau=4))
    again.setup(toy_context(toy_world))
    again.load_state_dict(state)
    assert again.frozen and again.ref_kl == frozen.ref_kl


def test_paper_variant_learns_and_flipped_does_not(tmp_path, monkeypatch):
    good = learn(tmp_path, "rethink_dpo", name="paper")
    assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.2
    assert good["distance_to_optimum_trained"] < 0.8 * good["distance_to_optimum_base"]
    flip_objective(monkeypatch)
    assert did_not_learn(tmp_path, "rethink_dpo", name="paper_flipped")


@pytest.fixture(scope="module")
def toy_flow_world():
    from rlkit_diffusion.worlds.toy2d import build_toy2d_flow

    return build_toy2d_flow(optimum_pool=256)


def test_the_paper_variant_trains_through_sigma_one_of_a_flow_policy(toy_flow_world):
    """σ = 1 of a flow policy has zero SNR: λ takes the largest finite 1/√SNR there (not NaN, and the other
    timesteps keep their spread instead of collapsing to 1), and the monitor draws only timesteps with a finite c_t.
    Training with nearly every draw at σ = 1 stays finite (on shapes_flow every seed of the shapes tuning diverged
    at its first such draw before)."""
    a_bar = toy_flow_world.policy.alphas_cumprod  # (T,), 0 at σ = 1
    T = a_bar.shape[0]
    assert a_bar[-1] == 0 and (a_bar[:-1] > 0).all()
    lam = snr_lambda(a_bar)
    assert torch.isfinite(lam).all() and lam.min() == 1.0 and lam[-1] == 2.0 and lam[-2] == 2.0
    assert torch.all(lam[1:] >= lam[:-1]) and lam[T // 2] > 1.0  # still ascending in noise, not flat
    with pytest.raises(ValueError, match="alphas_cumprod > 0"):
        posterior_kl_coef(a_bar, torch.tensor([T - 1]))
    algo, logs = _paper(toy_flow_world, 8, tau=4, kl_threshold=1e9, ts_gamma=0.01, ts_bins=T)  # p(σ = 1) ≈ 0.99
    assert int(algo.monitor_t.max()) < T - 1
    readings = [log["ref_kl_to_init"] for log in logs if log]
    assert len(readings) == 2 and all(torch.isfinite(torch.tensor(readings)))
    assert all(torch.isfinite(p).all() for p in algo.ctx.policy.eps_model.parameters())
