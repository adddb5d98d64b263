"""Algorithm registry: ``name -> "module:Class"``; each class has a ``config`` dataclass (its Hydra schema)."""

from __future__ import annotations

import importlib
from typing import Any

ALGOS: dict[str, tuple[str, str]] = {
    # name: (algorithm class, config dataclass)
    "dpo": ("algos.dpo:DPO", "algos.dpo:DPOConfig"),
    "dpo_l2": ("algos.dpo:DPOL2", "algos.dpo:DPOL2Config"),
    "sft": ("algos.sft:SFT", "algos.sft:SFTConfig"),
    "rethink_dpo": ("algos.rethink_dpo:RethinkDPO", "algos.rethink_dpo:RethinkDPOConfig"),
    "ddpo": ("algos.ddpo:DDPO", "algos.ddpo:DDPOConfig"),
    "dpok": ("algos.ddpo:DPOK", "algos.ddpo:DPOKConfig"),
    "grpo": ("algos.grpo:GRPO", "algos.grpo:GRPOConfig"),
    "mix_grpo": ("algos.grpo:MixGRPO", "algos.grpo:MixGRPOConfig"),
    "d3po": ("algos.d3po:D3PO", "algos.d3po:D3POConfig"),
    "draft": ("algos.draft:DRaFT", "algos.draft:DRaFTConfig"),
    "draft_lv": ("algos.draft:DRaFTLV", "algos.draft:DRaFTLVConfig"),
    "alignprop": ("algos.draft:AlignProp", "algos.draft:AlignPropConfig"),
    "best_of_n": ("algos.best_of_n:BestOfN", "algos.best_of_n:BestOfNConfig"),
}


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def algo_config_class(name: str) -> type:
    if name not in ALGOS:
        raise ValueError(f"unknown algo {name!r}; available: {sorted(ALGOS)}")
    return _load(ALGOS[name][1])


def build_algo(name: str, config: Any = None) -> Any:
    """Instantiate algorithm ``name`` with its config dataclass instance (default config if None)."""
    cls = _load(ALGOS[name][0]) if name in ALGOS else None
    if cls is None:
        raise ValueError(f"unknown algo {name!r}; available: {sorted(ALGOS)}")
    return cls(config if config is not None else algo_config_class(name)())
