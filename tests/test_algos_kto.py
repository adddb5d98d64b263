"""Diffusion-KTO: the loss by hand, reward-threshold labels, and learning on toy2d that fails when the sign flips."""

from __future__ import annotations

import math

import pytest
import torch

from algos.kto import KTO, KTOConfig, kto_loss
from rlkit_diffusion.preference import implicit_scale
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_loss_by_hand():
    model, ref = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.4])
    desirable = torch.tensor([True, False])
    # g = β (ref − model) = [0.2, −0.1]; Q_ref = max(0, mean g) = 0.05; y (g − Q) = [0.15, 0.15]
    out = kto_loss(model, ref, desirable, torch.ones(2), lambda_desirable=2.0, lambda_undesirable=1.0)
    assert out["kl"].item() == pytest.approx(0.05)
    assert out["loss"].item() == pytest.approx((2 * (1 - sigmoid(0.15)) + (1 - sigmoid(0.15))) / 2, abs=1e-6)
    assert out["implicit_acc"].item() == 1.0
    assert out["reward_desirable"].item() == pytest.approx(0.2)
    # a negative batch mean is clamped: Q_ref = 0; official scale s = ½ halves g
    out = kto_loss(torch.tensor([0.6, 0.6]), ref, desirable, implicit_scale(2.0, "official", None, ref))
    assert out["kl"].item() == 0.0  # g = [−0.2, −0.2]
    assert out["loss"].item() == pytest.approx(((1 - sigmoid(-0.2)) + (1 - sigmoid(0.2))) / 2, abs=1e-6)


def test_gradient_raises_desirable_and_lowers_undesirable_rewards():
    model = torch.tensor([0.4, 0.4], requires_grad=True)
    kto_loss(model, torch.tensor([0.4, 0.4]), torch.tensor([True, False]), torch.ones(2))["loss"].backward()
    assert model.grad[0] > 0 > model.grad[1]  # descent lowers the desirable image's error, raises the other's


def test_labels_from_a_reward_threshold_count_queries(toy_world):
    ctx = toy_context(toy_world, batch_size=16)
    algo = KTO(KTOConfig(labels="proxy", threshold=-1.0, beta=5.0))
    algo.setup(ctx)
    prompts, x, desirable = algo.collect()
    assert len(prompts) == 32 and x.shape == (32, 2) and ctx.counters.reward_queries == 32
    r = ctx.world.reward("proxy")(x, prompts)
    assert torch.equal(desirable, r > -1.0)
    assert torch.isfinite(algo.loss((prompts, x, desirable))["loss"])
    with pytest.raises(ValueError, match="labels='aesthetic'"):
        KTO(KTOConfig(labels="aesthetic")).setup(ctx)


def test_kto_learns_and_flipped_does_not(tmp_path, monkeypatch):
    good = learn(tmp_path, "kto", name="good")
    assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.2
    assert good["distance_to_optimum_trained"] < 0.8 * good["distance_to_optimum_base"]
    flip_objective(monkeypatch)
    assert did_not_learn(tmp_path, "kto")
