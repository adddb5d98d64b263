"""world=shapes_flow end to end: `benchmarks.prepare world=shapes_flow quick=true` writes a flow-matching base of
shapes' architecture, the world builds from it (a `FlowMatchingPolicy` with the SDE sampler over shapes' captions,
rewards, pairs and prompts), and one DPO and one GRPO update run through `benchmarks.run`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from benchmarks.prepare import main as prepare_main
from rlkit_diffusion.policy import FlowMatchingPolicy
from rlkit_diffusion.worlds.shapes.base_model import BASE_DIR, FLOW_BASE_DIR, UNET_CONFIG, PretrainConfig
from tests.helpers import compose_cfg

TINY_FLOW = [
    "world=shapes_flow",
    "world.num_inference_steps=2",
    "world.n_train_prompts=2",
    "world.n_heldout_prompts=2",
    "eval.implicit_pairs=4",
    "eval.implicit_draws=1",
    "eval.samples_per_prompt=1",
    "eval.heldout=false",
    "eval.bootstrap=10",
    "train.steps=1",
    "train.batch_size=2",
    "device=cpu",
]


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_flow_quick")
    torch.set_num_threads(1)
    prepare_main(["world=shapes_flow", "stage=base", "quick=true", f"out={out}"])
    return out / "shapes_flow_base"


def test_prepare_quick_writes_a_flow_base_of_shapes_architecture(quick_base):
    assert (quick_base / "diffusion_pytorch_model.safetensors").exists()
    recipe = json.loads((quick_base / "recipe.json").read_text())
    assert recipe["command"] == "python -m benchmarks.prepare world=shapes_flow"
    assert recipe["objective"].startswith("flow matching") and recipe["config"]["steps"] == 4
    assert recipe["pretrain_seconds_this_session"] >= 0
    config = UNet2DConditionModel.load_config(str(quick_base))
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in UNET_CONFIG} == UNET_CONFIG
    shapes_params = json.loads((BASE_DIR / "recipe.json").read_text())["params"]
    assert recipe["params"] == shapes_params  # the same size as the shapes ε-UNet


def test_prepare_grid_samples_the_flow_base(quick_base):
    prepare_main(["world=shapes_flow", "stage=grid", "quick=true", f"out={quick_base.parent}"])
    assert (quick_base.parent / "images" / "shapes_flow_base_grid.png").exists()
    figures = json.loads((quick_base.parent / "images" / "shapes_flow_base_figures.json").read_text())
    assert figures["params"] == json.loads((quick_base / "recipe.json").read_text())["params"]
    assert math.isfinite(figures["gold_reward_mean"]) and figures["sampling_images_per_s_20_sde_steps"] > 0
    with pytest.raises(SystemExit, match="stage must be one of"):  # pairs and proxy are shapes' own
        prepare_main(["world=shapes_flow", "stage=pairs", "quick=true", f"out={quick_base.parent}"])


def test_world_builds_from_the_quick_base_with_shapes_everything_else(quick_base):
    from rlkit_diffusion.worlds import build_world
    from rlkit_diffusion.worlds.shapes.world import eval_prompts

    world = build_world("shapes_flow", weights=str(quick_base), num_inference_steps=3, n_train_prompts=4)
    policy = world.policy
    assert world.name == "shapes_flow" and isinstance(policy, FlowMatchingPolicy)
    assert (policy.sampler, policy.noise_level, policy.guidance_scale) == ("sde", 0.7, 2.0) and policy.stochastic
    assert (world.train_prompts, world.heldout_prompts) == eval_prompts(4, 64, 0)
    assert {"gold", "proxy", "clip", "aesthetic", "jpeg"} <= set(world.rewards)
    prompts, x_w, _ = world.pairs.next_batch(3)
    assert x_w.shape == (3, 3, 16, 16) and len(prompts) == 3
    g = torch.Generator().manual_seed(0)
    ro = world.denoise(policy, torch.randn(2, 3, 16, 16, generator=g), world.encoder(prompts[:2]), generator=g)
    gold = world.rewards["gold"](world.decode(ro.x0), prompts[:2])
    assert ro.x0.shape == (2, 3, 16, 16) and torch.isfinite(gold).all()


def test_the_shipped_flow_base_was_made_by_shapes_recipe():
    """assets/shapes_flow_base: written by `prepare world=shapes_flow` with shapes' pretraining config, same size."""
    from dataclasses import asdict

    flow, eps = (json.loads((d / "recipe.json").read_text()) for d in (FLOW_BASE_DIR, BASE_DIR))
    assert flow["command"] == "python -m benchmarks.prepare world=shapes_flow"
    assert flow["config"] == eps["config"] == asdict(PretrainConfig()) and flow["params"] == eps["params"]
    assert flow["objective"].startswith("flow matching") and flow["pretrain_seconds_this_session"] > 0
    flow_arch, eps_arch = (
        {k: v for k, v in UNet2DConditionModel.load_config(str(d)).items() if not k.startswith("_")}
        for d in (FLOW_BASE_DIR, BASE_DIR)
    )
    assert flow_arch == eps_arch  # the architecture (config.json less its bookkeeping keys)


def test_missing_flow_weights_name_the_prepare_command(tmp_path):
    from rlkit_diffusion.worlds.shapes import build_shapes_flow

    with pytest.raises(FileNotFoundError, match="prepare world=shapes_flow"):
        build_shapes_flow(weights=str(tmp_path / "nowhere"))


def test_default_dpo_settings_are_shapes_own():
    """The flow base is compared with the ε base at one budget: DPO's algo/train nodes are shapes'."""
    flow, eps = compose_cfg(["world=shapes_flow", "algo=dpo"]), compose_cfg(["world=shapes", "algo=dpo"])
    assert OmegaConf.to_container(flow.algo) == OmegaConf.to_container(eps.algo)
    assert OmegaConf.to_container(flow.train) == OmegaConf.to_container(eps.train)
    assert OmegaConf.to_container(flow.eval) == OmegaConf.to_container(eps.eval)


@pytest.mark.parametrize("algo,extra", [("dpo", []), ("grpo", ["algo.group_size=2"])])
def test_one_update_runs_end_to_end(quick_base, tmp_path, algo, extra):
    from benchmarks.run import run

    cfg = compose_cfg([*TINY_FLOW, f"algo={algo}", f"out_dir={tmp_path}", f"world.weights={quick_base}", *extra])
    result = run(cfg, run_dir=tmp_path / algo)
    assert result["world"] == "shapes_flow" and result["updates"] == 1
    assert 0 <= result["win_rate_vs_base"] <= 1 and math.isfinite(result["gold_reward_trained"])
