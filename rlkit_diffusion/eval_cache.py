"""The cross-run evaluation cache: the base model's evaluation samples and scores, computed once and reused.

The base model's part of `rlkit_diffusion.evaluate.evaluate` (its samples x_0 and their gold/proxy/other reward
scores on each split) depends only on the world, the base weights, the evaluation settings, the reward models and
the sampling code — never on the trained policy. Every run of a world (ten in a head-to-head, thirty in a 3-seed
leaderboard) used to recompute it. `open_base_cache` returns a dict-like object that `evaluate(base_cache=...)`
fills and reads as before, backed by files under ``<root>/<key>/``:

* ``<split>.safetensors``: the tensors of the split's base entry (``x0`` and every score vector), bit-exact;
* ``<split>.json``: the non-tensor fields (NFEs, which scores are absent) and the SHA-256 of the safetensors file.

``key`` = SHA-256 of (world name, sample shape, guidance scale, prompts, the world's config, the base policy's
weights and schedule, the prompt encoder's and the rewards' weights, the evaluation settings, the proxy name, the
source code of the sampler maths, the world's and the rewards' modules, torch's version and the device type) —
a changed input gives another key, so an entry is never used for inputs it was not computed from. An entry whose
file is missing, truncated or altered (checksum mismatch) is recomputed and rewritten, never used. Writes go
through `rlkit_diffusion.checkpoint.atomic_write`, so a crash mid-write leaves no partial entry behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlkit_diffusion.checkpoint import atomic_write, atomic_write_json, tensor_digest
from rlkit_diffusion.evaluate import EvalConfig
from rlkit_diffusion.worlds.base import World

CACHE_FORMAT = 1
"""Bump when the layout of an entry changes."""
SAMPLER_MODULES = (
    "rlkit_diffusion.policy",
    "rlkit_diffusion.mdp",
    "rlkit_diffusion.evaluate",
    "rlkit_diffusion.worlds.base",
)
"""Modules whose source is the sampler and scoring maths of the base evaluation (part of every key)."""
EVAL_FIELDS_IGNORED = ("cache",)
"""EvalConfig fields that do not change the base's numbers."""
WORLD_FIELDS_IGNORED = ("text_cache", "latent_cache")
"""World settings that are cache locations, not inputs (the numbers are the same with and without them)."""


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------------
def module_digest(module: torch.nn.Module, skip: str | None = None) -> str:
    """SHA-256 of a module's parameters and buffers (names containing ``skip`` left out, e.g. LoRA adapters that
    the base policy switches off)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if skip is None or skip not in name:
            tensor_digest(h, name, t)
    return h.hexdigest()


def object_digest(obj: Any) -> str:
    """SHA-256 of what a reward or encoder computes with: its class (and source file), and the weights of the
    modules and tensors it holds (one attribute level deep; a bound method counts as its object)."""
    obj = getattr(obj, "__self__", obj)
    h = hashlib.sha256()
    kind = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    h.update(f"{kind.__module__}.{kind.__qualname__}|{source_digest(kind)}".encode())
    parts = {"": obj} if isinstance(obj, torch.nn.Module) else dict(getattr(obj, "__dict__", {}))
    if inspect.isfunction(obj):  # a closure (e.g. a decode around a VAE): the objects it captured
        parts.update(inspect.getclosurevars(obj).nonlocals)
    for name, value in sorted(parts.items()):
        if isinstance(value, torch.nn.Module):
            h.update(f"{name}:{module_digest(value)}".encode())
        elif isinstance(value, Tensor):
            tensor_digest(h, name, value)
        elif isinstance(value, (int, float, str, bool, tuple)):
            h.update(f"{name}={value!r}".encode())
    return h.hexdigest()


def source_digest(obj: Any) -> str:
    """SHA-256 of the source file defining ``obj`` (a module, class or function); '' when it has none."""
    try:
        path = inspect.getsourcefile(obj)
    except TypeError:
        return ""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).exists() else ""


def policy_digest(policy: Any) -> str:
    """The base policy: network weights (LoRA adapters excluded: the base switches them off), noise schedule and
    sampling settings."""
    h = hashlib.sha256()
    h.update(module_digest(policy.eps_model, skip="lora_").encode())
    h.update(type(policy.eps_model).__qualname__.encode())
    for name, value in sorted(vars(policy).items()):
        if isinstance(value, Tensor):
            tensor_digest(h, name, value)
        elif isinstance(value, (int, float, str, bool)) or value is None:
            h.update(f"{name}={value!r}".encode())
    config = {k: v for k, v in dict(getattr(policy.scheduler, "config", {})).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())  # not repr: diffusers keeps a set-ordered list
    return h.hexdigest()


def cache_key(
    world: World, base_policy: Any, cfg: EvalConfig, proxy: str, world_config: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """The entry's key and the readable description it hashes (saved next to the entry as ``key.json``)."""
    eval_settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in EVAL_FIELDS_IGNORED}
    rewards = sorted({cfg.reward, *cfg.rewards, *([proxy] if proxy in world.rewards else [])})
    desc = {
        "format": CACHE_FORMAT,
        "world": world.name,
        "world_config": {k: v for k, v in (world_config or {}).items() if k not in WORLD_FIELDS_IGNORED},
        "sample_shape": list(world.sample_shape),
        "guidance_scale": world.guidance_scale,
        "prompts": hashlib.sha256(json.dumps([world.train_prompts, world.heldout_prompts]).encode()).hexdigest(),
        "edit_inputs": source_digest(getattr(world.extras.get("sdedit_inputs"), "__code__", None)),
        "base_policy": policy_digest(base_policy),
        "encoder": object_digest(world.encoder),
        "decode": object_digest(world.decode),
        "rewards": {name: object_digest(world.reward(name)) for name in rewards},
        "eval": eval_settings,
        "proxy": proxy,
        "code": {m: source_digest(sys.modules[m]) for m in SAMPLER_MODULES},
        "torch": torch.__version__,
        "device": world.device.type,
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:32]
    return key, desc


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class BaseEvalCache(MutableMapping):
    """``split → base entry`` (the dict `evaluate(base_cache=...)` reads and fills), persisted in ``directory``.

    An entry is ``{"x0": Tensor, "nfe": int, "gold": ndarray, "proxy": ndarray | None, "reward:<name>": ndarray}``.
    Reading checks the stored checksum; an absent or corrupt entry reads as missing (so `evaluate` recomputes it and
    the write replaces the bad files). ``hits``/``misses`` count the lookups that found / did not find an entry.
    """

    def __init__(self, directory: Path, device: torch.device, description: dict[str, Any] | None = None):
        self.directory = Path(directory)
        self.device = device
        self.description = description or {}
        self.memory: dict[str, dict[str, Any]] = {}
        self.hits = 0
        self.misses = 0

    def _paths(self, split: str) -> tuple[Path, Path]:
        return self.directory / f"{split}.safetensors", self.directory / f"{split}.json"

    def _load(self, split: str) -> dict[str, Any] | None:
        from safetensors.torch import load_file

        tensors_path, meta_path = self._paths(split)
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != CACHE_FORMAT or file_sha256(tensors_path) != meta["sha256"]:
                return None
            tensors = load_file(str(tensors_path))
        except (OSError, ValueError, KeyError, RuntimeError):  # missing, unreadable or malformed: recompute
            return None
        entry: dict[str, Any] = {"nfe": int(meta["nfe"])}
        for name in meta["tensors"]:
            entry[name] = tensors[name].to(self.device) if name == "x0" else tensors[name].numpy()
        for name in meta["absent"]:
            entry[name] = None
        return entry

    def __contains__(self, split: object) -> bool:
        if split in self.memory:
            return True
        entry = self._load(str(split))
        if entry is None:
            self.misses += 1
            return False
        self.hits += 1
        self.memory[str(split)] = entry
        return True

    def __getitem__(self, split: str) -> dict[str, Any]:
        if split not in self:
            raise KeyError(split)
        return self.memory[split]

    def __setitem__(self, split: str, entry: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        self.memory[split] = entry
        tensors, absent = {}, []
        for name, value in entry.items():
            if name == "nfe":
                continue
            if value is None:
                absent.append(name)
            else:
                tensors[name] = torch.as_tensor(np.asarray(value.cpu() if isinstance(value, Tensor) else value))
                tensors[name] = tensors[name].contiguous()
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors_path, meta_path = self._paths(split)
        atomic_write(tensors_path, lambda tmp: save_file(tensors, str(tmp)))
        meta = {
            "format": CACHE_FORMAT,
            "nfe": int(entry["nfe"]),
            "tensors": sorted(tensors),
            "absent": sorted(absent),
            "sha256": file_sha256(tensors_path),
        }
        atomic_write_json(meta_path, meta)
        if self.description and not (self.directory / "key.json").exists():
            atomic_write_json(self.directory / "key.json", self.description, default=str)

    def __delitem__(self, split: str) -> None:
        self.memory.pop(split, None)
        for p in self._paths(split):
            p.unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.memory)

    def __len__(self) -> int:
        return len(self.memory)


def open_base_cache(
    root: Path | str,
    world: World,
    base_policy: Any,
    cfg: EvalConfig,
    proxy: str,
    world_config: dict[str, Any] | None = None,
) -> BaseEvalCache:
    """The persistent base-evaluation cache of (world, base weights, ``cfg``, rewards, code) under ``root``."""
    key, desc = cache_key(world, base_policy, cfg, proxy, world_config)
    return BaseEvalCache(Path(root) / key, world.device, desc)
