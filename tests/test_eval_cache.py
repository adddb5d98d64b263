"""The cross-run evaluation cache: a hit reuses the base's evaluation, a changed input misses, a corrupt entry is
recomputed, and a warm run's numbers equal a cold run's bit for bit (toy2d and a tiny shapes run)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import rlkit_diffusion.evaluate as evaluate_module
from rlkit_diffusion.eval_cache import open_base_cache
from rlkit_diffusion.evaluate import EvalConfig, evaluate
from rlkit_diffusion.worlds import build_world
from tests.helpers import compose_cfg

VOLATILE = (
    "eval_wall_s",
    "peak_mem_mb",
    "wall_s",
    "train_wall_s",
    "checkpoint",
    "environment",
    "phases_wall_s",
    "phases_cpu_s",
)


@pytest.fixture
def count_base(monkeypatch):
    """Counts the base model's evaluations actually computed (cache misses)."""
    calls = []
    real = evaluate_module._base_split

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "_base_split", counted)
    return calls


def _toy_world():
    torch.manual_seed(0)
    return build_world("toy2d", device="cpu")


def _evaluate(world, policy, cfg, cache):
    world.optimum.generator.manual_seed(0)  # toy2d's draws of p* advance their own generator at every evaluation
    return evaluate(world, policy, policy, cfg, base_cache=cache)


def _same(a: dict, b: dict) -> None:
    keys = sorted(set(a) - set(VOLATILE))
    assert keys == sorted(set(b) - set(VOLATILE))
    for k in keys:
        # bit for bit (floats printed exactly; the per-row arrays of `per_sample` as lists)
        assert json.dumps(a[k], default=np.ndarray.tolist) == json.dumps(b[k], default=np.ndarray.tolist), k


def test_hit_miss_invalidation_and_corrupt_entry(tmp_path, count_base):
    world = _toy_world()
    cfg = EvalConfig(samples_per_prompt=4, bootstrap=20, implicit_pairs=0)
    policy = world.policy
    cold = _evaluate(world, policy, cfg, open_base_cache(tmp_path, world, policy, cfg, "proxy"))
    assert len(count_base) == 2  # train + heldout computed and stored
    warm_cache = open_base_cache(tmp_path, world, policy, cfg, "proxy")
    warm = _evaluate(world, policy, cfg, warm_cache)
    assert len(count_base) == 2 and warm_cache.hits == 2  # both splits read from disk
    _same(cold, warm)

    # A changed input is another entry: evaluation settings, base weights.
    other = open_base_cache(tmp_path, world, policy, EvalConfig(samples_per_prompt=4, seed=7), "proxy")
    assert other.directory != warm_cache.directory and "train" not in other
    weight = next(policy.eps_model.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    changed = open_base_cache(tmp_path, world, policy, cfg, "proxy")
    assert changed.directory != warm_cache.directory and "train" not in changed
    with torch.no_grad():
        weight.copy_(saved)
    assert open_base_cache(tmp_path, world, policy, cfg, "proxy").directory == warm_cache.directory
    # eval.cache itself is not part of the key.
    off = EvalConfig(samples_per_prompt=4, bootstrap=20, implicit_pairs=0, cache=False)
    assert open_base_cache(tmp_path, world, policy, off, "proxy").directory == warm_cache.directory

    # A corrupt entry (one flipped byte) or a partial one (its json gone) is recomputed, never used.
    tensors = warm_cache.directory / "train.safetensors"
    raw = bytearray(tensors.read_bytes())
    raw[-1] ^= 0xFF
    tensors.write_bytes(bytes(raw))
    (warm_cache.directory / "heldout.json").unlink()
    fresh = open_base_cache(tmp_path, world, policy, cfg, "proxy")
    again = _evaluate(world, policy, cfg, fresh)
    assert count_base[2:] == ["train", "heldout"] and fresh.hits == 0
    _same(cold, again)
    healed = open_base_cache(tmp_path, world, policy, cfg, "proxy")
    assert "train" in healed and "heldout" in healed and healed.hits == 2
    np.testing.assert_array_equal(healed["train"]["gold"], fresh["train"]["gold"])


def _run(tmp_path, overrides, name):
    from benchmarks.run import run

    cfg = compose_cfg([f"out_dir={tmp_path}", "report=false", *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True)
    return run(cfg, run_dir=run_dir)


@pytest.mark.parametrize(
    "world",
    [
        ["world=toy2d", "train.steps=3", "eval.samples_per_prompt=8", "eval.bootstrap=50"],
        [
            "world=shapes",
            "train.steps=1",
            "train.batch_size=2",
            "eval.max_prompts=3",
            "eval.samples_per_prompt=2",
            "eval.bootstrap=20",
            "eval.implicit_pairs=4",
            "eval.implicit_draws=1",
        ],
    ],
    ids=["toy2d", "shapes"],
)
def test_warm_run_equals_cold_run_bit_for_bit(tmp_path, count_base, world):
    cold = _run(tmp_path, ["algo=dpo", *world], "cold")
    n_cold = len(count_base)
    assert n_cold >= 1 and any((tmp_path / ".eval_cache").iterdir())
    warm = _run(tmp_path, ["algo=dpo", *world], "warm")
    assert len(count_base) == n_cold  # nothing of the base recomputed
    _same(cold, warm)
    if "world=toy2d" in world:  # and the cache changes nothing against no cache at all
        _same(_run(tmp_path, ["algo=dpo", *world, "eval.cache=false"], "off"), cold)


def test_the_key_is_the_same_in_every_process(tmp_path):
    """The key must not depend on the interpreter's string-hash seed (diffusers' configs hold set-ordered lists)."""
    import subprocess
    import sys

    code = (
        "import torch; from rlkit_diffusion.worlds import build_world\n"
        "from rlkit_diffusion.evaluate import EvalConfig; from rlkit_diffusion.eval_cache import cache_key\n"
        "torch.manual_seed(0); w = build_world('toy2d', device='cpu')\n"
        "print(cache_key(w, w.policy, EvalConfig(), 'proxy')[0])"
    )
    keys = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(keys) == 1 and "" not in keys, keys
