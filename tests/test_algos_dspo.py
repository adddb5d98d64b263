"""DSPO: the score-matching loss by hand, its relation to eq. 14 at the reference, and learning on toy2d that fails
when the sign flips."""

from __future__ import annotations

import pytest
import torch

from algos.dpo import dpo_loss
from algos.dspo import dspo_loss
from rlkit_diffusion.preference import implicit_scale, per_sample_error
from rlkit_diffusion.train import DivergenceError
from tests.zoo_helpers import flip_objective, learn, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dspo_loss_by_hand():
    t = torch.tensor
    # winner: target 0 + (2 − 0)/2 = 1 = ε_θ → 0; loser: target 1 − (3 − 1)/2 = 0, ε_θ = 1 → 1
    out = dspo_loss(t([[1.0], [1.0]]), t([[0.0], [1.0]]), t([[2.0], [3.0]]), beta=2.0)  # rows: winner, loser
    assert out["loss"].item() == pytest.approx(0.5)
    assert out["score_loss_w"].item() == 0.0 and out["score_loss_l"].item() == 1.0
    # β = 1: the winner's plain denoising loss; ω weights each pair
    out = dspo_loss(t([[1.0], [0.0]]), t([[0.0], [0.0]]), t([[3.0], [0.0]]), 1.0, weight=t([0.5]))
    assert out["loss"].item() == pytest.approx(0.5 * (4.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dspo_loss(t([[1.0], [1.0]]), t([[0.0], [1.0]]), t([[2.0], [3.0]]), beta=0.0)


def test_same_direction_as_eq14_at_the_reference():
    """At θ = θ_ref the DSPO gradient w.r.t. the predictions is parallel to eq. 14's (derivation, "DSPO")."""
    g = torch.Generator().manual_seed(0)
    ref_w, ref_l, eps = (torch.randn(8, 3, generator=g) for _ in range(3))
    grads = []
    for which in ("dspo", "dpo"):
        m_w, m_l = ref_w.clone().requires_grad_(True), ref_l.clone().requires_grad_(True)
        if which == "dspo":
            loss = dspo_loss(torch.cat([m_w, m_l]), torch.cat([ref_w, ref_l]), torch.cat([eps, eps]), beta=4.0)["loss"]
        else:
            target = torch.cat([eps, eps])  # (2B, 3): winners, then losers
            model, ref = (per_sample_error(torch.cat(p), target, "mean") for p in ((m_w, m_l), (ref_w, ref_l)))
            loss = dpo_loss(model, ref, implicit_scale(4.0, "official", None, model[:8]))["loss"]
        loss.backward()
        grads.append(torch.cat([m_w.grad.flatten(), m_l.grad.flatten()]))
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


def test_dspo_learns_and_flipped_does_not(tmp_path, monkeypatch):
    good = learn(tmp_path, "dspo", name="good")
    assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.2
    assert good["distance_to_optimum_trained"] < 0.8 * good["distance_to_optimum_base"]
    flip_objective(monkeypatch)
    # Ascending a quadratic sends ε_θ to infinity: the run either stops (divergence guard / reward check) or ends
    # with non-finite samples, whose NaN reward `did_not_learn` would not count as "below the base".
    try:
        bad = learn(tmp_path, "dspo", name="flipped")
    except (DivergenceError, ValueError):
        return
    assert not bad["gold_reward_trained"] >= bad["gold_reward_base"]  # lower, or NaN
