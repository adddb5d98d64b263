"""D3PO: golden per-step DPO loss with its ratio clamp, pair labels, the pairs' structure (same caption, same x_T,
winner and loser trained at the same step), both references, gradient routing, and learning on toy2d that fails
when the sign flips."""

from __future__ import annotations

import math

import pytest
import torch

from algos.d3po import D3PO, D3POConfig, d3po_loss, pair_labels
from tests.zoo_helpers import did_not_learn, flip_objective, learn, one_thread, sgd_steps, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TOY = dict(ratio_clip=0.2, log_prob_reduction="sum", min_std=0.05)


def test_d3po_loss_by_hand():
    lp_w, lp_l = torch.tensor([0.05, 0.3, -0.5]), torch.tensor([-0.02, 0.0, 0.0])
    ref = torch.zeros(3)
    out = d3po_loss(lp_w, lp_l, ref, ref, beta=2.0, ratio_clip=0.1)
    # ρ_w = e^0.05, clamp(e^0.3) = 1.1, clamp(e^-0.5) = 0.9; ρ_l = e^-0.02, 1, 1
    inside = [2 * (0.05 + 0.02), 2 * math.log(1.1), 2 * math.log(0.9)]
    nll = [math.log1p(math.exp(-x)) for x in inside]  # −log σ(x)
    assert out["loss"].item() == pytest.approx(sum(nll) / 3, abs=1e-6)
    assert out["reward_margin"].item() == pytest.approx(sum(inside) / 3, abs=1e-6)
    assert out["implicit_acc"].item() == pytest.approx(2 / 3)
    assert out["clipfrac"].item() == pytest.approx(2 / 6)  # e^0.3 and e^-0.5 are outside [0.9, 1.1]
    # The clamp is a trust region: a clamped ratio carries no gradient.
    lp = lp_w.clone().requires_grad_(True)
    d3po_loss(lp, lp_l, ref, ref, beta=2.0, ratio_clip=0.1)["loss"].backward()
    assert lp.grad[0] < 0 and lp.grad[1] == 0 and lp.grad[2] == 0


def test_pair_labels():
    labels = pair_labels(torch.tensor([1.0, 2.0, 5.0, -1.0, 3.0, 3.0]))
    assert labels.tolist() == [-1.0, 1.0, 1.0, -1.0, 1.0, -1.0]  # a tie goes to the first row


def test_pairs_share_caption_and_noise_and_train_together(toy_world):
    ctx = toy_context(toy_world, batch_size=16)
    algo = D3PO(D3POConfig(num_minibatches=2, **TOY))
    algo.setup(ctx)
    batch = algo.collect()
    assert batch.prompts[0::2] == batch.prompts[1::2]
    assert torch.equal(batch.latents[0::2, 0], batch.latents[1::2, 0])  # same x_T, different chains
    assert not torch.equal(batch.latents[0::2, -1], batch.latents[1::2, -1])
    outs = sgd_steps(ctx, algo, batch)
    pairs = next(iter(algo.minibatches(batch))).batch  # every minibatch of a batch holds the same pairs
    r = batch.rewards
    assert (r[pairs.winner] >= r[pairs.loser]).all() and ((pairs.winner - pairs.loser).abs() == 1).all()
    first = outs[0]  # reference = sampler: ratio exactly 1 on a fresh batch, so the loss is log 2
    assert first["fresh_ratio_max_dev"].item() == 0.0
    assert first["loss"].item() == pytest.approx(math.log(2), abs=1e-7) and first["reward_margin"].item() == 0
    assert outs[1]["reward_margin"].item() != 0


def test_base_reference_is_rescored_and_gets_no_gradient(toy_world):
    ctx = toy_context(toy_world, batch_size=8)
    algo = D3PO(D3POConfig(reference="base", **TOY))
    algo.setup(ctx)
    batch = algo.collect()
    out = algo.loss(next(iter(algo.minibatches(batch))))
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-5)  # policy = base at the start
    with torch.no_grad():  # move the policy off the base: the margin is now against the base, not θ_old
        for p in ctx.policy.eps_model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    out = algo.loss(next(iter(algo.minibatches(algo.collect()))))
    assert out["reward_margin"].item() != 0
    out["loss"].backward()
    assert all(p.grad is not None for p in ctx.policy.eps_model.parameters())
    assert all(p.grad is None for p in ctx.base.network.parameters())


def test_d3po_learns_and_flipped_does_not(tmp_path, monkeypatch):
    res = learn(tmp_path, "d3po", name="d3po")
    assert res["gold_reward_trained"] > res["gold_reward_base"] + 0.3
    assert res["win_rate_vs_base"] > 0.6
    flip_objective(monkeypatch)
    assert did_not_learn(tmp_path, "d3po", name="d3po-flipped")
