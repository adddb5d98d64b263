"""Small defects of the benchmark protocol: dpo_l2 cannot silently return the base model; DPOK's advantage clip is
in units of the advantages' std, so its kl_coef stays the β of its target for any reward scale."""

from __future__ import annotations

import math

import pytest
import torch

from algos.ddpo import DDPO, DPOK, DDPOConfig, DPOKConfig
from algos.dpo import DPOL2, DPOL2Config
from tests.zoo_helpers import one_thread, toy_context  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_dpo_l2_defaults_to_a_nonzero_sft_weight_and_refuses_zero(toy_world):
    assert DPOL2Config().sft_weight > 0
    algo = DPOL2(DPOL2Config(beta=20.0, sft_weight=0.0))
    with pytest.raises(ValueError, match="stationary point"):
        algo.setup(toy_context(toy_world))
    algo = DPOL2(DPOL2Config(beta=20.0))
    ctx = toy_context(toy_world, batch_size=32)
    algo.setup(ctx)
    out = algo.loss(algo.collect())
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    assert any(torch.count_nonzero(p.grad) > 0 for p in ctx.policy.eps_model.parameters())  # it moves


def test_advantage_clip_is_in_units_of_the_std():
    big = torch.tensor([-30.0, -10.0, 0.0, 10.0, 30.0])  # a reward spread far above 5
    dpok = DPOK(DPOKConfig())
    assert not dpok.config.advantage_std
    bound = dpok.advantage_clip(big)
    assert bound == pytest.approx(5.0 * float(big.std(unbiased=False)))
    assert float(big.abs().max()) < bound  # these advantages pass unclipped: kl_coef is the β of p* ∝ p_ref e^{r/β}
    assert math.isinf(dpok.advantage_clip(torch.zeros(4)))
    assert DDPO(DDPOConfig()).advantage_clip(big) == 5.0  # standardised advantages: ±5 as ddpo-pytorch


def test_dpok_loss_scales_linearly_with_the_reward(toy_world):
    """With no clip in reward units, multiplying the rewards by 10 multiplies DPOK's policy-gradient term by 10."""
    from algos.ddpo import ddpo_loss

    dpok = DPOK(DPOKConfig(mode="sf"))
    adv = torch.tensor([-8.0, -2.0, 1.0, 9.0])
    lp = torch.tensor([0.1, 0.2, 0.3, 0.4])
    losses = []
    for scale in (1.0, 10.0):
        a = adv * scale
        losses.append(
            float(
                ddpo_loss(lp, lp.detach(), a, clip_range=1e-4, adv_clip_max=dpok.advantage_clip(a), mode="sf")["loss"]
            )
        )
    assert losses[0] != 0 and losses[1] == pytest.approx(10 * losses[0])
