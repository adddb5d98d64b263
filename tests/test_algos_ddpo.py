"""DDPO (IS / SF) and DPOK: golden surrogates, advantage normalisation, the fresh-batch ratio check, gradient
routing, and learning on toy2d that fails when the sign flips."""

from __future__ import annotations

import math

import pytest
import torch

from algos.ddpo import DDPO, DPOK, DDPOConfig, DPOKConfig, PerPromptStatTracker, ddpo_loss, dpok_loss
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, sgd_steps, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LOGP, OLD, ADV = [0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [1.0, -2.0, 6.0]


def test_ddpo_surrogates_by_hand():
    lp, old, adv = torch.tensor(LOGP), torch.tensor(OLD), torch.tensor(ADV)
    out = ddpo_loss(lp, old, adv, clip_range=0.2, adv_clip_max=5.0, mode="is")
    r = [math.exp(x) for x in LOGP]  # ratios 1.105, 0.819, 1.350; the last advantage is clipped to 5
    per = [max(-1 * r[0], -1 * r[0]), max(2 * r[1], 2 * min(max(r[1], 0.8), 1.2)), max(-5 * r[2], -5 * 1.2)]
    assert out["loss"].item() == pytest.approx(sum(per) / 3, abs=1e-6)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)  # only |1.350 − 1| > 0.2
    assert out["approx_kl"].item() == pytest.approx(0.5 * (0.01 + 0.04 + 0.09) / 3, abs=1e-7)
    sf = ddpo_loss(lp, old, adv, clip_range=0.2, adv_clip_max=5.0, mode="sf")
    assert sf["loss"].item() == pytest.approx(-(1 * 0.1 + -2 * -0.2 + 5 * 0.3) / 3, abs=1e-6)
    kl = torch.tensor([0.5, 1.0, 1.5])
    dk = dpok_loss(lp, old, adv, kl, kl_coef=2.0, clip_range=0.2, adv_clip_max=5.0, mode="is")
    assert dk["loss"].item() == pytest.approx(sum(per) / 3, abs=1e-6) and dk["loss_kl"].item() == pytest.approx(2.0)


def test_per_prompt_stat_tracker():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    prompts = ["a", "a", "b", "b", "b", "c"]
    r = torch.tensor([1.0, 3.0, 0.0, 1.0, 5.0, 7.0])
    adv = tracker.update(prompts, r)
    assert tracker.own_fraction == pytest.approx(5 / 6)  # all but "c"
    for p in ("a", "b"):  # enough samples: per-prompt statistics → mean 0 per prompt
        assert adv[[i for i, q in enumerate(prompts) if q == p]].mean().abs() < 1e-6
    torch.testing.assert_close(adv[:2], torch.tensor([-1.0, 1.0]), atol=1e-5, rtol=0)  # (r − 2) / 1
    # "c" has one reward < min_count: the batch statistics are the fallback.
    mean, std = r.mean(), r.std(unbiased=False)
    assert adv[5].item() == pytest.approx(((7.0 - mean) / (std + 1e-6)).item(), rel=1e-6)
    fresh = PerPromptStatTracker(buffer_size=4, min_count=2)  # one reward per prompt: all take the fallback
    assert fresh.update(["x", "y"], r[:2]).tolist() == pytest.approx([-1.0, 1.0], abs=1e-5) and fresh.own_fraction == 0
    tracker.update(["a"] * 3, torch.tensor([5.0, 5.0, 5.0]))  # buffer of 4: [3, 5, 5, 5]
    assert list(tracker.buffers["a"]) == [3.0, 5.0, 5.0, 5.0]
    restored = PerPromptStatTracker(buffer_size=4, min_count=2)
    restored.load_state_dict(tracker.state_dict())
    torch.testing.assert_close(restored.update(prompts, r), tracker.update(prompts, r))


def test_fresh_batch_has_ratio_one_and_no_clipping(toy_world):
    ctx = toy_context(toy_world, batch_size=16)
    algo = DDPO(DDPOConfig(clip_range=1e-4, num_minibatches=3))
    algo.setup(ctx)
    batch = algo.collect()
    assert batch.advantages.shape == (16,) and ctx.counters.reward_queries == 16
    outs = sgd_steps(ctx, algo, batch)
    first = outs[0]
    assert first["fresh_ratio_max_dev"].item() == 0.0  # θ = θ_old bit for bit
    assert first["ratio_mean"].item() == 1.0 and first["clipfrac"].item() == 0.0 and first["approx_kl"].item() == 0
    assert outs[1]["approx_kl"].item() > 0  # after an update the ratio moves
    # The check fires when collection and training disagree (here: the policy changed in between).
    stale = next(iter(algo.minibatches(batch)))
    with pytest.raises(RuntimeError, match="ratio must be 1"):
        algo.loss(stale)


def test_log_prob_conventions_and_stochastic_policy_required(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    outs = {}
    for red in ("sum", "mean"):
        algo = DDPO(DDPOConfig(log_prob_reduction=red, check_ratio=False))
        algo.setup(ctx)
        mb = next(iter(algo.minibatches(algo.collect())))
        outs[red] = algo.step_outputs(ctx.policy, mb).log_prob, algo.reduce(algo.step_outputs(ctx.policy, mb).log_prob)
    torch.testing.assert_close(outs["mean"][1], outs["mean"][0] / 2)  # D = 2 dims per toy sample
    ctx.policy.eta = 0.0
    with pytest.raises(ValueError, match="stochastic policy"):
        DDPO().setup(ctx)


def test_dpok_gradient_reaches_the_policy_only(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    algo = DPOK(DPOKConfig())
    algo.setup(ctx)
    with torch.no_grad():  # move the policy away from the reference so that the KL has a gradient
        for p in ctx.policy.eps_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    batch = algo.collect()
    out = algo.loss(next(iter(algo.minibatches(batch))))
    assert out["kl"].item() > 0
    (out["loss"] + out["loss_kl"]).backward()
    assert all(p.grad is not None for p in ctx.policy.eps_model.parameters())
    assert all(p.grad is None for p in ctx.base.network.parameters())


def test_ddpo_and_dpok_learn_and_flipped_do_not(tmp_path, monkeypatch):
    is_ = learn(tmp_path, "ddpo", name="is")
    assert is_["gold_reward_trained"] > is_["gold_reward_base"] + 0.5
    sf = learn(tmp_path, "ddpo", "algo.mode=sf", "algo.num_minibatches=1", "train.lr=1e-3", name="sf")
    assert sf["gold_reward_trained"] > sf["gold_reward_base"] + 0.5
    dpok = learn(tmp_path, "dpok", name="dpok")
    assert dpok["gold_reward_trained"] > dpok["gold_reward_base"] + 0.3
    assert dpok["distance_to_optimum_trained"] < 0.6 * dpok["distance_to_optimum_base"]
    assert dpok["kl_to_ref"] < 0.5 * is_["kl_to_ref"]  # the KL penalty holds the policy near the reference
    flip_objective(monkeypatch)
    for algo in ("ddpo", "dpok"):
        assert did_not_learn(tmp_path, algo, "train.steps=50", name=f"{algo}-flipped"), algo
