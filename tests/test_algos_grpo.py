"""GRPO and MixGRPO: golden group advantages and loss, the on-policy ratio of exactly 1, batch-invariant log-probs,
denoising reduction, MixGRPO's window, gradient routing, and learning on toy2d that fails when the sign flips."""

from __future__ import annotations

import math

import pytest
import torch

from algos.ddpo import Transitions
from algos.grpo import GRPO, GRPOConfig, MixGRPO, MixGRPOConfig, group_advantages, grpo_loss, mix_window
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, sgd_steps, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = dict(clip_range=0.2, log_prob_reduction="sum", min_std=0.05)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    adv = group_advantages(r, 4, eps=1e-4)
    std = math.sqrt(1.25)  # population std of 1, 2, 3, 4
    expected = [x / (std + 1e-4) for x in (-1.5, -0.5, 0.5, 1.5)] + [0.0] * 4  # a flat group has no signal
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(group_advantages(r, 4, use_std=False)[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)


def test_grpo_loss_by_hand():
    lp, old, adv, kl = [0.1, -0.2, 0.3], [0.0, 0.0, 0.0], [1.0, -2.0, 6.0], [0.5, 1.0, 1.5]
    out = grpo_loss(*map(torch.tensor, (lp, old, adv, kl)), kl_coef=0.1, clip_range=0.2, adv_clip_max=5.0)
    r = [math.exp(x) for x in lp]  # 1.105, 0.819, 1.350; the advantage 6 is clipped to 5
    per = [-1 * r[0], max(2 * r[1], 2 * 0.8), max(-5 * r[2], -5 * 1.2)]
    assert out["loss"].item() == pytest.approx(sum(per) / 3, abs=1e-6)
    assert out["loss_kl"].item() == pytest.approx(0.1 * 1.0) and out["kl"].item() == pytest.approx(1.0)
    assert out["clipfrac"].item() == pytest.approx(1 / 3)


def test_mix_window_slides_and_stops_at_the_end():
    assert mix_window(0, 10, 4, 1, 2)[0] == 0 and mix_window(5, 10, 4, 1, 2)[0] == 2
    assert mix_window(100, 10, 4, 2, 2)[0] == 6  # clamped at N − w
    assert mix_window(3, 10, 4, 1, 2)[1].tolist() == [False, True, True, True, True] + [False] * 5


def test_groups_denoising_reduction_and_on_policy_ratio_of_one(toy_world):
    ctx = toy_context(toy_world, batch_size=16)
    algo = GRPO(GRPOConfig(group_size=4, num_minibatches=3, sampling_steps=10, shared_noise=True, **TOY))
    algo.setup(ctx)
    batch = algo.collect()
    assert batch.latents.shape == (16, 11, 2)  # 10 training steps; the world (evaluation) keeps 20
    assert batch.prompts[::4] == batch.prompts[1::4] == batch.prompts[3::4]
    assert torch.equal(batch.latents[0::4, 0], batch.latents[1::4, 0])  # shared x_T within a group
    assert not torch.equal(batch.latents[0::4, 1], batch.latents[1::4, 1])  # per-step noise differs
    assert batch.advantages.reshape(4, 4).sum(1).abs().max() < 1e-5  # zero-mean within each group
    outs = sgd_steps(ctx, algo, batch)  # steps loss + loss_kl
    first = outs[0]  # on-policy: θ = θ_old bit for bit, so the ratio is exactly 1 and nothing is clipped
    assert first["fresh_ratio_max_dev"].item() == 0.0 and first["ratio_mean"].item() == 1.0
    assert first["clipfrac"].item() == 0.0 and first["kl"].item() == 0.0  # the policy is still the reference
    assert outs[1]["approx_kl"].item() > 0
    assert sum(o["transitions"].item() for o in outs) == 16 * int((batch.stds[0] > 0.05).sum())


def test_log_prob_is_batch_invariant(toy_world):
    """The per-sample log-probability of a stored transition does not depend on the batch it is re-scored in:
    batches of 1, of 3, all at once and shuffled (and the log-prob recorded at sampling) agree to a relative 1e-5
    (float32 matmuls of different shapes may round differently in the last bit of μ, and the low-noise steps
    amplify that by 1/σ_t²: observed up to 7e-6 relative, 4e-5 nats on a log-prob of ~6 nats at σ_t = 0.02)."""
    ctx = toy_context(toy_world, batch_size=8)
    algo = GRPO(GRPOConfig(group_size=4, **TOY))
    algo.setup(ctx)
    batch = algo.collect()
    n = batch.log_probs.shape[1]
    sample = torch.arange(8).repeat_interleave(n)
    step = torch.arange(n).repeat(8)
    score = lambda idx: algo.step_outputs(ctx.policy, Transitions(batch, sample[idx], step[idx], False)).log_prob  # noqa: E731
    with torch.no_grad():
        full = score(torch.arange(len(sample)))
        ones = torch.cat([score(torch.tensor([i])) for i in range(len(sample))])
        threes = torch.cat([score(c) for c in torch.arange(len(sample)).split(3)])
        perm = torch.randperm(len(sample), generator=torch.Generator().manual_seed(0))
        shuffled = torch.empty_like(full)
        shuffled[perm] = score(perm)
    recorded = batch.log_probs[sample, step]
    for other in (ones, threes, shuffled, recorded):
        torch.testing.assert_close(other, full, atol=1e-5, rtol=1e-5)


def test_mix_grpo_samples_sde_only_in_the_window_and_trains_only_there(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    algo = MixGRPO(MixGRPOConfig(group_size=4, window_size=3, window_shift_every=1, sampling_steps=10, **TOY))
    algo.setup(ctx)
    for start in (0, 1):
        batch = algo.collect()
        assert algo.window_start == start
        stochastic = (batch.stds > 0).all(0)
        assert stochastic.tolist() == [start <= i < start + 3 for i in range(10)]
        trained = torch.cat([mb.step for mb in algo.minibatches(batch)])
        assert set(trained.tolist()) == set(range(start, start + 3)) and len(trained) == 8 * 3
    assert algo.state_dict() == {"iteration": 2}


def test_kl_gradient_reaches_the_policy_only(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    algo = GRPO(GRPOConfig(group_size=4, kl_coef=0.5, **TOY))
    algo.setup(ctx)
    with torch.no_grad():  # move the policy off the reference so that the KL has a gradient
        for p in ctx.policy.eps_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = algo.loss(next(iter(algo.minibatches(algo.collect()))))
    assert out["kl"].item() > 0
    (out["loss"] + out["loss_kl"]).backward()
    assert all(p.grad is not None for p in ctx.policy.eps_model.parameters())
    assert all(p.grad is None for p in ctx.base.network.parameters())
    with pytest.raises(ValueError, match="multiple of group_size"):
        GRPO(GRPOConfig(group_size=3)).setup(toy_context(toy_world, batch_size=8))


@pytest.mark.filterwarnings("error:invalid value encountered:RuntimeWarning")  # the flipped runs' −inf rewards: no NaN
def test_grpo_and_mix_grpo_learn_and_flipped_do_not(tmp_path, monkeypatch):
    for algo in ("grpo", "mix_grpo"):
        res = learn(tmp_path, algo, name=algo)
        assert res["gold_reward_trained"] > res["gold_reward_base"] + 0.5, algo
        assert res["win_rate_vs_base"] > 0.7, algo
    flip_objective(monkeypatch)
    for algo in ("grpo", "mix_grpo"):
        assert did_not_learn(tmp_path, algo, name=f"{algo}-flipped"), algo
