"""Test helpers: compose the benchmark's Hydra config and run it in-process."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module

import benchmarks.schema  # noqa: F401

# The shapes world at a tiny size: 4 denoising steps, 8 training captions, a one-draw evaluation on 4 captions and
# Table 2 on 8 pairs (the whole-run tests of reliability, resume and scale add their own train.* settings).
TINY_SHAPES = [
    "world=shapes",
    "world.num_inference_steps=4",
    "world.n_train_prompts=8",
    "world.n_heldout_prompts=4",
    "eval.implicit_pairs=8",
    "eval.implicit_draws=1",
    "eval.samples_per_prompt=1",
    "eval.max_prompts=4",
    "eval.heldout=false",
    "eval.bootstrap=10",
    "device=cpu",
]


def compose_cfg(overrides: list[str]):
    with initialize_config_module("benchmarks.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def run_toy(tmp_path: Path, overrides: list[str], name: str = "run"):
    from benchmarks.run import run

    cfg = compose_cfg(["world=toy2d", f"out_dir={tmp_path}", *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg, run_dir=run_dir), run_dir
