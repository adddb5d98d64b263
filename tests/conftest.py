"""Shared fixtures: tiny seeded models built in the test (diffusers' ``get_dummy_components`` habit)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and robust on a shared machine


@pytest.fixture(scope="session")
def toy_world():
    """The toy2d world with its shipped base weights (a small optimum pool keeps it fast)."""
    from rlkit_diffusion.worlds.toy2d import build_toy2d

    return build_toy2d(optimum_pool=2048)


@pytest.fixture(scope="session")
def shapes_world_small():
    """The shapes world with its shipped assets, 8 training captions and a 10-step sampler (fast evaluations)."""
    from rlkit_diffusion.worlds.shapes import build_shapes

    return build_shapes(n_train_prompts=8, n_heldout_prompts=4, num_inference_steps=10)


def tiny_unet(cross_attention_dim: int = 8, sample_size: int = 8, seed: int = 0):
    """A tiny random 3-channel UNet2DConditionModel (`rlkit_diffusion.tiny.tiny_unet`, block_out_channels (8, 16))."""
    from rlkit_diffusion import tiny

    torch.manual_seed(seed)
    return tiny.tiny_unet(
        cross_attention_dim,
        sample_size=sample_size,
        channels=3,
        block_out_channels=(8, 16),
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


@pytest.fixture
def unet_factory():
    return tiny_unet
