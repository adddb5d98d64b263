"""``benchmarks.peers``: the re-created diffusers Diffusion-DPO example computes the project's DPO loss, and runs.

The parity: on the same UNet weights (base and LoRA), the same pairs, ε, t and text conditioning, the example's
``-logsigmoid(beta_dpo * (ref_diff - model_diff))`` (`benchmarks.peers.example_dpo_loss`, the example's lines
828-890) equals the project's ``DPO.loss`` with ``beta_convention="diffusers"`` at β = beta_dpo, and equals it with
``official`` at β = 2·beta_dpo (``official``'s −½β): loss, implicit accuracy and the LoRA gradients. No timed asserts.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BETA_DPO = 2500.0


@pytest.fixture(scope="module")
def sd_tiny(tmp_path_factory):
    from benchmarks.perf import build_sd_tiny

    root = tmp_path_factory.mktemp("peers_sd_tiny")
    return build_sd_tiny(torch.device("cpu"), 2, root=root), root


def lora_params(unet) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def project_dpo(world, convention: str, beta: float):
    """The project's DPO on a LoRA copy of the world's policy whose adapters are moved off zero (B ≠ 0), so the
    policy differs from its adapters-off reference and the loss is not log 2."""
    from benchmarks.peers import project_lora_policy
    from benchmarks.perf import make_ctx, setup_algo, unet_of

    policy = project_lora_policy(world)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(lora_params(unet_of(policy.eps_model)).items()):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    ctx = make_ctx(world, policy, "lora", 4)
    return ctx, setup_algo("dpo", ctx, beta=beta, beta_convention=convention)


@pytest.mark.parametrize(("convention", "beta"), [("diffusers", BETA_DPO), ("official", 2 * BETA_DPO)])
def test_the_example_loss_is_the_project_dpo_loss(sd_tiny, convention: str, beta: float):
    from benchmarks.peers import ExampleDPO, example_dpo_loss, example_encode_prompt
    from benchmarks.perf import unet_of

    world, root = sd_tiny
    ctx, algo = project_dpo(world, convention, beta)
    prompts, x_w, x_l = batch = algo.collect()
    replay = torch.Generator().set_state(ctx.generator.get_state())
    ours = algo.loss(batch)  # draws t, then ε, from ctx.generator (DPO.predictions)
    ours["loss"].backward()
    b = len(prompts)
    t = torch.randint(0, ctx.policy.num_train_timesteps, (b,), generator=replay)
    noise = torch.randn(x_w.shape, generator=replay)

    peer = ExampleDPO(str(root / "sd15"), world.device, beta_dpo=BETA_DPO, lr=5e-4, weight_decay=1e-2)
    unet = unet_of(ctx.policy.eps_model)
    theirs_lora, ours_lora = lora_params(peer.unet), lora_params(unet)
    assert set(theirs_lora) == set(ours_lora) and theirs_lora  # the same adapters on the same modules
    with torch.no_grad():
        for name, p in theirs_lora.items():
            p.copy_(ours_lora[name])
    cond = world.encoder(prompts)  # (B, L, D)
    assert torch.allclose(example_encode_prompt(peer.text_encoder, peer.input_ids(prompts)), cond, atol=1e-6)
    theirs = example_dpo_loss(
        peer.unet,
        peer.noise_scheduler,
        torch.cat([x_w, x_l]),
        torch.cat([noise, noise]),
        t.repeat(2),
        cond.repeat(2, 1, 1),
        BETA_DPO,
    )
    theirs["loss"].backward()

    assert abs(ours["loss"].item() - math.log(2)) > 1e-3  # the policy is not its reference
    torch.testing.assert_close(theirs["loss"], ours["loss"], rtol=1e-5, atol=1e-6)
    assert float(theirs["implicit_acc"]) == float(ours["implicit_acc"])
    for name, p in theirs_lora.items():
        torch.testing.assert_close(p.grad, ours_lora[name].grad, rtol=1e-4, atol=1e-7)


def test_help():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--venv" in out and "--items" in out


def test_dpo_item_runs(sd_tiny):
    """The in-process DPO comparison at one repeat: both steps run and every field is there and finite."""
    from benchmarks.peers import FIELDS, dpo_item

    world, root = sd_tiny
    out = dpo_item(world, root / "sd15", 2, repeats=1)
    assert all(math.isfinite(out[k]) and out[k] > 0 for k in FIELDS)


@pytest.mark.slow
def test_trl_side_by_side():
    """The whole benchmark at a tiny size, TRL included (creates the peers' venv on first use: needs PyPI)."""
    cmd = [sys.executable, "-m", "benchmarks.peers", "--steps", "2", "--repeats", "1", "--batch-size", "2", "--json"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result = json.loads(out[out.index("{") :])
    for item in ("dpo", "ddpo"):
        assert all(math.isfinite(result["items"][item][k]) for k in ("project_ms", "peer_ms", "ratio"))
    assert result["items"]["ddpo"]["peer"] == "trl==0.23.1"
