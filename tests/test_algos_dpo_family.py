"""The DPO family beyond eq. 14: DPO-L2 (S2), SFT, AI-feedback labels (§5.4), the implicit reward (S4.1), β sweep."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from algos.dpo import DPO, DPOL2, DPOConfig, DPOL2Config, dpo_l2_loss, rank_pairs
from algos.sft import sft_loss
from rlkit_diffusion.preference import implicit_margin, implicit_reward_accuracy, implicit_scale
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_dpo_l2_golden_value_by_hand():
    d_w, d_l = torch.tensor([0.5, 0.1]), torch.tensor([0.2, 0.4])
    # official, β = 2: inside = −½·2·(d_w − d_l) = [−0.3, 0.3]; −log σ(x) = softplus(−x)
    dist = torch.cat([d_w, d_l])  # (2B,): winners, then losers
    out = dpo_l2_loss(dist, implicit_scale(2.0, "official", None, d_w))
    assert out["loss"].item() == pytest.approx((softplus(0.3) + softplus(-0.3)) / 2, abs=1e-6)
    assert out["implicit_acc"].item() == 0.5
    paper = dpo_l2_loss(dist, implicit_scale(2.0, "paper", torch.tensor([1.0, 0.0]), d_w))
    assert paper["loss"].item() == pytest.approx((softplus(0.6) + math.log(2)) / 2, abs=1e-6)


def test_sft_and_implicit_margin_golden_values():
    assert sft_loss(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 0.5]))["loss"].item() == pytest.approx(1.25)
    # The winner's error fell by 0.3 against the reference, the loser's did not: a positive reward margin.
    scale = implicit_scale(1.0, "official", None, torch.zeros(1))  # s β = ½
    m = implicit_margin(torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.4]), scale)  # errors: (winner, loser)
    assert m.item() == pytest.approx(0.15)  # −½·1·(−0.3 − 0)


def test_dpo_l2_is_stationary_at_the_reference(toy_world):
    """‖ε_θ − ε_ref‖² and its gradient vanish at θ = θ_ref: pure DPO-L2 cannot leave its starting point."""
    ctx = toy_context(toy_world, batch_size=64)
    algo = DPOL2(DPOL2Config(beta=20.0))
    algo.setup(ctx)
    batch = algo.collect()
    out = algo.loss(batch)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-7)
    out["loss"].backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in ctx.policy.eps_model.parameters())
    algo.config.sft_weight = 1.0  # the tie-breaker of the toy2d tuning
    ctx.policy.eps_model.zero_grad()
    sum(v for k, v in algo.loss(batch).items() if k.startswith("loss")).backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in ctx.policy.eps_model.parameters())


def test_ai_feedback_ranks_pairs_by_a_reward_and_counts_queries(toy_world):
    ctx = toy_context(toy_world)
    x_a = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    x_b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # r(x, angle 0) = −‖x − (1, 0)‖²: r_a = [−4, 0], r_b = [0, −4] → the first pair is swapped.
    x_w, x_l, swapped = rank_pairs(ctx, "proxy", ["angle 0", "angle 0"], x_a, x_b)
    assert swapped.tolist() == [True, False]
    torch.testing.assert_close(x_w, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(x_l, torch.tensor([[-1.0, 0.0], [-1.0, 0.0]]))
    assert ctx.counters.reward_queries == 4

    algo = DPO(DPOConfig(labels="proxy"))
    algo.setup(ctx)
    algo.loss(algo.collect())
    assert ctx.counters.reward_queries == 4 + 2 * ctx.batch_size
    with pytest.raises(ValueError, match="labels='aesthetic'"):
        DPO(DPOConfig(labels="aesthetic")).setup(ctx)


def test_implicit_accuracy_is_one_half_at_init_and_rewinds_the_stream(toy_world):
    ctx = toy_context(toy_world)
    pairs = ctx.world.val_pairs
    before = pairs.state_dict()["generator"].clone()
    res = implicit_reward_accuracy(ctx.policy, ctx.base.policy, ctx.world, n_pairs=96, n_draws=3)
    # θ = θ_ref: every pair is an exact tie, so the accuracy and both ends of its interval (over pairs) are ½
    assert res == {
        "implicit_acc": 0.5,
        "implicit_margin": 0.0,
        "implicit_acc_ci_low": 0.5,
        "implicit_acc_ci_high": 0.5,
    }
    assert torch.equal(pairs.state_dict()["generator"], before)
    # another stream may be scored instead; a world without validation pairs gets a one-line error
    again = implicit_reward_accuracy(ctx.policy, ctx.base.policy, ctx.world, pairs=pairs, n_pairs=96, n_draws=3)
    assert again == res
    with pytest.raises(ValueError, match="no validation pairs"):
        implicit_reward_accuracy(ctx.policy, ctx.base.policy, dataclasses.replace(ctx.world, val_pairs=None))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # a flipped run's samples may reach ±inf
def test_sft_and_dpo_l2_learn_and_flipped_do_not(tmp_path, monkeypatch):
    for algo in ("sft", "dpo_l2"):
        good = learn(tmp_path, algo, name=f"{algo}-good")
        assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.2, algo
        assert good["distance_to_optimum_trained"] < 0.8 * good["distance_to_optimum_base"], algo
        assert good["implicit_acc"] > 0.6, algo
    flip_objective(monkeypatch)
    for algo in ("sft", "dpo_l2"):
        assert did_not_learn(tmp_path, algo, "train.steps=100", name=f"{algo}-flipped"), algo


def test_dpo_from_ai_feedback_learns_and_scores_its_pairs(tmp_path):
    res = learn(tmp_path, "dpo", "algo.labels=proxy", "train.steps=100", name="aif")
    assert res["reward_queries"] == 2 * 256 * 100  # both images of every pair, every step
    assert res["gold_reward_trained"] > res["gold_reward_base"] + 0.3
    assert res["implicit_acc"] > 0.6


def test_beta_sweep_kl_to_reference_decreases_as_beta_grows(tmp_path):
    kls = [learn(tmp_path, "dpo", f"algo.beta={b}", name=f"beta{b}")["kl_to_ref"] for b in (5, 20, 80)]
    assert kls[0] > kls[1] > kls[2] > 0
