"""World registry: ``build_world(name, **kwargs)`` is the only place worlds are constructed."""

from __future__ import annotations

import importlib
from typing import Any

from rlkit_diffusion.worlds.base import World

# name -> "module:function"; imported lazily so that toy2d never pays for transformers/open_clip imports.
WORLDS: dict[str, str] = {
    "toy2d": "rlkit_diffusion.worlds.toy2d:build_toy2d",
    "toy2d_flow": "rlkit_diffusion.worlds.toy2d:build_toy2d_flow",
    "shapes": "rlkit_diffusion.worlds.shapes:build_shapes",
    "shapes_flow": "rlkit_diffusion.worlds.shapes:build_shapes_flow",
    "sd15": "rlkit_diffusion.worlds.stable_diffusion:build_sd15",
    "sdxl": "rlkit_diffusion.worlds.stable_diffusion:build_sdxl",
    "sd3": "rlkit_diffusion.worlds.stable_diffusion:build_sd3",
}
# Worlds whose builder takes one config dataclass, name -> "module:class". Its fields are the world's keyword
# arguments (the YAML keys of benchmarks/conf/world/<name>.yaml) and its Hydra schema; the others take keywords.
WORLD_CONFIGS: dict[str, str] = {
    "shapes": "rlkit_diffusion.worlds.shapes:ShapesWorldConfig",
    "shapes_flow": "rlkit_diffusion.worlds.shapes:ShapesFlowWorldConfig",
    "sd15": "rlkit_diffusion.worlds.stable_diffusion:SDWorldConfig",
    "sdxl": "rlkit_diffusion.worlds.stable_diffusion:SDXLWorldConfig",
    "sd3": "rlkit_diffusion.worlds.stable_diffusion:SD3WorldConfig",
}


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def world_config_class(name: str) -> type | None:
    """The config dataclass of world ``name``, or None when its builder takes keyword arguments."""
    return _load(WORLD_CONFIGS[name]) if name in WORLD_CONFIGS else None


def build_world(name: str, **kwargs: Any) -> World:
    """Build a world by name (``toy2d``, ``toy2d_flow``, ``shapes``, ``shapes_flow``, ``sd15``, ``sdxl``, ``sd3``);
    ``kwargs``: its settings and ``device``."""
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; available: {sorted(WORLDS)}")
    builder = _load(WORLDS[name])
    config_class = world_config_class(name)
    if config_class is None:
        return builder(**kwargs)
    device = kwargs.pop("device", "cpu")
    return builder(config_class(**kwargs), device=device)


__all__ = ["World", "WORLDS", "WORLD_CONFIGS", "build_world", "world_config_class"]
