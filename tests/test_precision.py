"""Precision and compilation settings: bf16 autocast runs on CPU, only the network forward changes precision, and
the log-probabilities, losses and the step maths stay fp32."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit_diffusion.train import TrainConfig
from rlkit_diffusion.worlds import build_world
from tests.helpers import run_toy


def test_bf16_forward_is_autocast_and_log_probs_stay_fp32():
    torch.manual_seed(0)
    world = build_world("toy2d", device="cpu")
    policy = world.policy
    prompts = [world.train_prompts[i % len(world.train_prompts)] for i in range(8)]
    cond = world.encoder(prompts)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 500)
    out32 = policy.model_output(x_T, t, cond)
    fp32 = world.denoise(policy, x_T, cond, generator=torch.Generator().manual_seed(1))
    policy.set_precision("bf16")
    out16 = policy.model_output(x_T, t, cond)
    with torch.enable_grad():
        out16_grad = policy.model_output(x_T, t, cond)
    bf16 = world.denoise(policy, x_T, cond, generator=torch.Generator().manual_seed(1))
    assert out16.dtype == out16_grad.dtype == torch.float32  # cast back after the forward
    assert not torch.equal(out16, out32)  # the forward did run in bf16 ...
    torch.testing.assert_close(out16, out32, atol=0.05, rtol=0.05)  # ... and stays close to fp32
    assert bf16.log_probs.dtype == fp32.log_probs.dtype == torch.float32
    assert torch.isfinite(bf16.log_probs).all()
    # fp32 is the untouched path: back to fp32, the same numbers bit for bit.
    policy.set_precision("fp32")
    assert torch.equal(policy.model_output(x_T, t, cond), out32)
    with pytest.raises(ValueError, match="precision"):
        policy.set_precision("fp8")
    with pytest.raises(ValueError, match="train.precision"):
        TrainConfig(precision="int8")


def test_a_bf16_dpo_run_on_toy2d(tmp_path):
    result, run_dir = run_toy(
        tmp_path,
        ["algo=dpo", "train.steps=3", "train.precision=bf16", "eval.samples_per_prompt=4", "eval.bootstrap=20"],
        "bf16",
    )
    assert result["updates"] == 3
    assert all(math.isfinite(result[k]) for k in ("win_rate_vs_base", "kl_to_ref", "gold_reward_trained"))
    assert "precision: bf16" in (run_dir / "config.yaml").read_text()
