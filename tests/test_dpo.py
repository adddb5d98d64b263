"""Diffusion-DPO (eq. 14): golden values, the initial loss, and learning on toy2d that fails if the sign flips."""

from __future__ import annotations

import math

import pytest
import torch

import algos.dpo as dpo_module
from algos.dpo import dpo_loss
from rlkit_diffusion.preference import implicit_scale, per_sample_error
from tests.helpers import run_toy


def test_golden_value_by_hand():
    # Two pairs. Errors chosen so that the inside term is easy to do by hand.
    mw, ml = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5])
    rw, rl = torch.tensor([1.5, 0.25]), torch.tensor([1.5, 0.75])
    # Δθ = [-1, 0], Δref = [0, -0.5], Δθ − Δref = [-1, 0.5]
    # official, β = 2: inside = −½·2·[-1, 0.5] = [1, −0.5]
    model, ref = torch.cat([mw, ml]), torch.cat([rw, rl])  # (2B,): winners, then losers
    out = dpo_loss(model, ref, implicit_scale(2.0, "official", None, mw))
    want = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(0.5)))) / 2
    assert out["loss"].item() == pytest.approx(want, abs=1e-6)
    assert out["loss"].item() == pytest.approx(0.643669, abs=1e-5)  # (0.313262 + 0.974077) / 2
    assert out["implicit_acc"].item() == 0.5 and out["reward_margin"].item() == pytest.approx(0.25)
    # ω(λ_t) multiplies the inside term per sample.
    weighted = dpo_loss(model, ref, implicit_scale(2.0, "official", torch.tensor([2.0, 0.0]), mw))
    assert weighted["model_mse_w"].item() == 0.75 and weighted["ref_mse_l"].item() == pytest.approx(1.125)
    want_w = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(0.5)) / 2
    assert weighted["loss"].item() == pytest.approx(want_w, abs=1e-6)


def test_conventions_agree_at_matched_beta():
    g = torch.Generator().manual_seed(0)
    model, ref = torch.rand(16, generator=g), torch.rand(16, generator=g)
    off = dpo_loss(model, ref, implicit_scale(4000.0, "official", None, model[:8]))["loss"]
    dif = dpo_loss(model, ref, implicit_scale(2000.0, "diffusers", None, model[:8]))["loss"]
    torch.testing.assert_close(off, dif)
    # The paper form sums over pixels: with D pixels, paper(β) on sums == diffusers(β·D) on means.
    pred, target = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    s, m = per_sample_error(pred, target, "sum"), per_sample_error(pred, target, "mean")
    torch.testing.assert_close(s, m * 48)
    with pytest.raises(ValueError, match="beta_convention"):
        implicit_scale(1.0, "half", None, model[:8])


def test_initial_loss_is_log2_and_ties(toy_world):
    from algos.dpo import DPO
    from tests.zoo_helpers import toy_context

    ctx = toy_context(toy_world, batch_size=64)
    algo = DPO()
    algo.setup(ctx)
    out = algo.loss(algo.collect())
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-7)
    assert out["implicit_acc"].item() == 0.5  # every pair is a tie at θ = θ_ref


def test_dpo_learns_on_toy2d_and_flipped_sign_does_not(tmp_path, monkeypatch):
    common = ["algo=dpo", "train.steps=200", "eval.samples_per_prompt=128", "eval.heldout=false"]
    good, _ = run_toy(tmp_path, common, "good")
    assert good["gold_reward_trained"] > good["gold_reward_base"] + 0.3
    assert good["distance_to_optimum_trained"] < 0.5 * good["distance_to_optimum_base"]
    assert good["win_rate_vs_base"] > 0.75

    original = dpo_module.dpo_loss

    def flipped(*args, **kwargs):
        out = original(*args, **kwargs)
        out["loss"] = -out["loss"]
        return out

    monkeypatch.setattr(dpo_module, "dpo_loss", flipped)
    bad, _ = run_toy(tmp_path, [*common, "train.steps=60"], "flipped")
    # Ascending the loss pushes π_θ away from the preferred mode (or blows it up to NaN): never an improvement.
    assert not bad["gold_reward_trained"] > bad["gold_reward_base"]
    assert not bad["distance_to_optimum_trained"] < bad["distance_to_optimum_base"]
