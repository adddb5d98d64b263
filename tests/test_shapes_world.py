"""The shapes world end to end: `benchmarks.prepare world=shapes quick=true`, the world builder, a tiny run."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.prepare import main as prepare_main


@pytest.fixture(scope="module")
def quick_assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_quick")
    torch.set_num_threads(1)
    prepare_main(["world=shapes", "quick=true", f"out={out}"])
    return out


def test_prepare_quick_writes_every_stage(quick_assets):
    assert (quick_assets / "shapes_base" / "config.json").exists()
    assert (quick_assets / "shapes_base" / "diffusion_pytorch_model.safetensors").exists()
    assert (quick_assets / "shapes_pairs" / "train.parquet").exists()
    assert (quick_assets / "shapes_proxy" / "config.json").exists()
    assert (quick_assets / "images" / "shapes_base_grid.png").exists()
    figures = json.loads((quick_assets / "images" / "shapes_base_figures.json").read_text())
    assert 0.0 <= figures["match_colour_and_shape"] <= 1.0


def test_world_builds_from_local_assets(quick_assets):
    from rlkit_diffusion.worlds.shapes import build_shapes

    world = build_shapes(
        weights=str(quick_assets / "shapes_base"),
        proxy_weights=str(quick_assets / "shapes_proxy"),
        pairs_dir=str(quick_assets / "shapes_pairs"),
        num_inference_steps=3,
        n_train_prompts=4,
        n_heldout_prompts=4,
    )
    assert set(world.heldout_prompts).isdisjoint(world.train_prompts)
    prompts, x_w, x_l = world.pairs.next_batch(5)
    assert x_w.shape == (5, 3, 16, 16) and x_w.min() >= -1 and x_w.max() <= 1 and len(prompts) == 5
    x0 = world.policy.sample(torch.randn(2, 3, 16, 16), world.encoder(world.train_prompts[:2])).x0
    images = world.decode(x0)
    for name in ("gold", "proxy", "clip", "aesthetic", "jpeg"):
        r = world.rewards[name](images, world.train_prompts[:2])
        assert r.shape == (2,) and torch.isfinite(r).all(), name


def test_missing_weights_are_one_line_errors(tmp_path):
    from rlkit_diffusion.worlds.shapes import build_shapes

    with pytest.raises(FileNotFoundError, match="shapes base model not found"):
        build_shapes(weights=str(tmp_path / "nowhere"))


def test_settings_come_as_a_config_or_as_keywords_not_both():
    from rlkit_diffusion.worlds.shapes import ShapesFlowWorldConfig, ShapesWorldConfig, build_shapes, build_shapes_flow

    with pytest.raises(TypeError, match="not both"):
        build_shapes(ShapesWorldConfig(), n_train_prompts=3)
    with pytest.raises(TypeError, match="not both"):
        build_shapes_flow(ShapesFlowWorldConfig(), sampler="ode")
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_shapes(sampler="ode")  # a flow setting: not one of the ε-world's


@pytest.mark.parametrize("world, override", [("shapes", "world.n_train_promptz=3"), ("shapes_flow", "world.eta=0.5")])
def test_world_setting_typos_fail_at_composition(world, override):
    from hydra.errors import ConfigCompositionException

    from tests.helpers import compose_cfg

    with pytest.raises(ConfigCompositionException):
        compose_cfg([f"world={world}", override])


def test_tiny_dpo_run_on_shapes(quick_assets, tmp_path):
    from benchmarks.run import run
    from tests.helpers import compose_cfg

    cfg = compose_cfg(
        [
            "world=shapes",
            "algo=dpo",
            f"out_dir={tmp_path}",
            "train.steps=2",
            "train.batch_size=2",
            f"world.weights={quick_assets / 'shapes_base'}",
            f"world.proxy_weights={quick_assets / 'shapes_proxy'}",
            f"world.pairs_dir={quick_assets / 'shapes_pairs'}",
            "world.num_inference_steps=2",
            "world.n_train_prompts=3",
            "world.n_heldout_prompts=3",
            "eval.samples_per_prompt=2",
            "eval.bootstrap=20",
        ]
    )
    result = run(cfg, run_dir=tmp_path / "run")
    assert result["updates"] == 2 and 0 <= result["win_rate_vs_base"] <= 1
    assert "diversity" in result and "proxy_reward_trained" in result
