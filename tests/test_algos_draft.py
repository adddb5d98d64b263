"""DRaFT-K, DRaFT-LV, AlignProp: golden loss, the differentiable-reward check, gradient routing (untracked steps, the
reward model, the reference), truncation draws, and learning on toy2d that fails when the sign flips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from algos.draft import AlignProp, AlignPropConfig, DRaFT, DRaFTConfig, DRaFTLV, DRaFTLVConfig, draft_loss
from rlkit_diffusion.mdp import DenoisingCore
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class ParamReward(nn.Module):
    """The toy reward times a learnable-looking scale: a reward model WITH parameters, to check none get gradient."""

    differentiable = True
    name = "param_reward"

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, prompts):
        return self.scale * self.inner(x, prompts)


class NoGradReward:
    differentiable = False
    name = "jpeg_like"

    def __call__(self, x, prompts):
        return torch.zeros(len(prompts))


def test_draft_loss_by_hand():
    out = draft_loss(torch.tensor([1.0, -3.0]))
    assert out["loss"].item() == pytest.approx(1.0)  # −mean(1, −3)
    lv = draft_loss(torch.tensor([[1.0, -3.0], [2.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.5, 1.5]]), kl_weight=2.0)
    assert lv["loss"].item() == pytest.approx(0.0)  # −mean of the (n+1) × B rewards
    assert lv["loss_kl"].item() == pytest.approx(2.0) and lv["reward_mean"].item() == pytest.approx(-1.0)


def test_non_differentiable_reward_is_refused_at_setup(toy_world):
    ctx = toy_context(toy_world)
    ctx.world.rewards["jpeg_like"] = NoGradReward()
    ctx.env = DenoisingCore(ctx.world, reward="jpeg_like")
    for algo in (DRaFT(), DRaFTLV(), AlignProp()):
        with pytest.raises(ValueError, match="reward 'jpeg_like'.*not differentiable"):
            algo.setup(ctx)


def test_gradient_routing(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    reward = ParamReward(ctx.world.rewards["proxy"])
    ctx.world.rewards["param"] = reward
    ctx.env = DenoisingCore(ctx.world, reward="param")
    grad_enabled = []
    ctx.policy.eps_model.register_forward_hook(lambda m, i, o: grad_enabled.append(o.requires_grad))
    algo = DRaFT(DRaFTConfig(k=3, kl_weight=1.0))
    algo.setup(ctx)
    out = algo.loss(algo.collect())
    n = len(ctx.env.schedule)
    # The rollout: only the last K of N forwards are tracked; then DRaFT+ re-evaluates ε_θ on the K tracked states.
    assert grad_enabled[:n] == [False] * (n - 3) + [True] * 3 and grad_enabled[n:] == [True]
    (out["loss"] + out["loss_kl"]).backward()
    assert all(p.grad is not None for p in ctx.policy.eps_model.parameters())
    assert reward.scale.grad is None  # the reward model is frozen at setup
    assert all(p.grad is None for p in ctx.base.network.parameters())  # the reference never gets gradient


def test_k1_has_no_gradient_on_toy2d_because_the_last_step_is_the_identity(toy_world):
    """DDIM from t = 0 to ᾱ_final = ᾱ_0 returns x_t unchanged, so the ε of that step cannot move x_0: set-up refuses
    K = 1 with the fix in the message, and forcing it shows the gradient is exactly zero."""
    from algos.draft import identity_tail

    ctx = toy_context(toy_world, batch_size=8)
    assert identity_tail(ctx.policy, ctx.env.schedule) == 1
    with pytest.raises(ValueError, match=r"draft: the last 1 step\(s\) .* are the identity .* use K ≥ 2 \(algo.k"):
        DRaFT(DRaFTConfig(k=1)).setup(ctx)
    with pytest.raises(ValueError, match="algo.k_min for randomised truncation"):
        AlignProp(AlignPropConfig(truncation="uniform", k_min=1)).setup(ctx)
    algo = DRaFT(DRaFTConfig(k=1, allow_gradient_free=True))
    algo.setup(ctx)
    algo.loss(algo.collect())["loss"].backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in ctx.policy.eps_model.parameters())


def test_draft_lv_scores_n_plus_one_copies(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    algo = DRaFTLV(DRaFTLVConfig(k=2, n=3))
    algo.setup(ctx)
    nfe0 = ctx.policy.nfe
    algo.loss(algo.collect())["loss"].backward()
    assert ctx.counters.reward_queries == 4 * 8  # the sample and its n = 3 re-noised copies
    assert ctx.policy.nfe - nfe0 == 8 * len(ctx.env.schedule) + 3 * 8 * 2  # rollout + K steps per copy


def test_alignprop_truncation_draws(toy_world):
    ctx = toy_context(toy_world)
    n = len(ctx.env.schedule)
    cases = [
        (AlignPropConfig(truncation="uniform", k_min=2, k_max=5), {2, 3, 4, 5}),
        (AlignPropConfig(truncation="gaussian", k_min=2, k_mean=10.0, k_std=30.0), {2, n}),  # wide: both ends hit
        (AlignPropConfig(truncation="fixed", k=4), {4}),
    ]
    for cfg, must in cases:
        algo = AlignProp(cfg)
        algo.setup(ctx)
        ks = {algo.draw_k() for _ in range(200)}
        assert must <= ks and min(ks) >= algo.k_range()[0] and max(ks) <= algo.k_range()[1], cfg.truncation
    with pytest.raises(ValueError, match="K must be in"):
        DRaFT(DRaFTConfig(k=n + 1)).setup(ctx)


def test_reward_backprop_learns_and_flipped_does_not(tmp_path, monkeypatch):
    good = {algo: learn(tmp_path, algo, name=algo) for algo in ("draft", "draft_lv", "alignprop")}
    for algo, res in good.items():
        assert res["gold_reward_trained"] > res["gold_reward_base"] + 0.5, algo
    plus = learn(tmp_path, "draft", "algo.kl_weight=1.0", name="draft_plus")  # DRaFT+: the ε-penalty limits drift
    assert plus["kl_to_ref"] < 0.2 * good["draft"]["kl_to_ref"]
    assert plus["distance_to_optimum_trained"] < 0.6 * plus["distance_to_optimum_base"]
    flip_objective(monkeypatch)
    for algo in ("draft", "draft_lv", "alignprop"):
        assert did_not_learn(tmp_path, algo, "train.steps=20", name=f"{algo}-flipped"), algo
