"""SIGKILL, then resume, on the shapes world, for every algorithm that trains: the final checkpoint (weights,
reference, optimizer and scheduler, counters, algorithm, data, generator and RNG state) and every reproducible number
of ``eval.json`` are identical to an uninterrupted run's.

The toy2d version is ``tests/test_reliability.py::test_sigkill_then_resume_gives_identical_parameters``; this one
adds what only shapes has: the UNet with cross-attention, the caption encoder and its cache, the shapes pair stream,
the proxy and gold rewards, decoded images. Each run is tiny (4 denoising steps, batch 4, 4 optimizer steps, a
checkpoint every 2). The killed run is blocked at its step-4 checkpoint write, so it has trained past step 2 when it
receives SIGKILL; ``resume=<run dir>`` then continues from step 2. Uses the forking launcher of test_reliability
(the stack is imported once). One module per algorithm family runs by default; the others are opt-in (``-m slow``).
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

from rlkit_diffusion.checkpoint import load_checkpoint
from tests.helpers import TINY_SHAPES
from tests.test_reliability import (
    NOT_REPRODUCIBLE,
    assert_same,
    finish,
    launcher,  # noqa: F401  (the module-scoped fixture)
    numbers,
    wait_for,
)

STEPS, EVERY = 4, 2
SHAPES = [
    *TINY_SHAPES,
    f"train.steps={STEPS}",
    f"train.checkpoint_every={EVERY}",
    "train.warmup_steps=3",
    "train.batch_size=4",
    "train.log_every=1",
    "seed=7",
]
# Per-algorithm settings that the tiny batch needs (a group/pair structure that divides 4 trajectories).
EXTRA = {
    "grpo": ["algo.group_size=2"],
    "mix_grpo": ["algo.group_size=2"],
}
# By default one off-policy (the shapes pair stream) and one online module (collection, groups, the tracker); the
# other modules are opt-in: ~30 CPU s each.
DEFAULT = ["dpo", "grpo"]
SLOW = ["dpo_l2", "sft", "rethink_dpo", "kto", "dspo", "nft", "ddpo", "dpok", "mix_grpo", "d3po", "draft", "draft_lv"]
SLOW += ["alignprop"]
ALGOS = [*DEFAULT, *(pytest.param(a, marks=pytest.mark.slow) for a in SLOW)]


def reproducible(run_dir: Path) -> dict[str, float]:
    """Every number of eval.json that does not measure a clock, memory or a path."""
    nums = numbers(json.loads((run_dir / "eval.json").read_text()))
    return {k: v for k, v in nums.items() if not any(w in k for w in NOT_REPRODUCIBLE)}


@pytest.mark.parametrize("algo", ALGOS)
def test_shapes_sigkill_then_resume_is_bit_exact(launcher, tmp_path, algo):  # noqa: F811
    base = [f"algo={algo}", *SHAPES, *EXTRA.get(algo, []), f"out_dir={tmp_path}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    marker = tmp_path / "blocked"
    pid_a = launcher.start([*base, f"hydra.run.dir={straight}"], tmp_path / "straight.log")
    argv_b = [*base, f"hydra.run.dir={killed}"]
    pid_b = launcher.start(argv_b, tmp_path / "killed.log", block_after=EVERY, marker=marker)
    wait_for(marker, pid_b, tmp_path / "killed.log", timeout=600.0)
    os.kill(pid_b, signal.SIGKILL)
    assert launcher.wait(pid_b) == -signal.SIGKILL
    steps = sorted(int(d.name[5:]) for d in (killed / "checkpoints").glob("step_*"))
    assert steps == [EVERY], steps  # killed after training past its only checkpoint
    assert not (killed / "eval.json").exists()
    pid_c = launcher.start([f"resume={killed}", f"out_dir={tmp_path}"], tmp_path / "resumed.log")
    finish(launcher, pid_a, tmp_path / "straight.log")
    finish(launcher, pid_c, tmp_path / "resumed.log")

    a = load_checkpoint(straight / "checkpoints" / f"step_{STEPS:08d}")
    b = load_checkpoint(killed / "checkpoints" / f"step_{STEPS:08d}")
    assert_same(a["model"], b["model"], f"{algo}: parameters")
    assert_same(a["reference"], b["reference"], f"{algo}: reference model")
    assert_same(a["optimizer"], b["optimizer"], f"{algo}: optimizer / lr scheduler")
    for key in ("counters", "nfe_used", "skipped", "algo", "generators", "pairs", "rng"):
        assert_same(a["state"].get(key), b["state"].get(key), f"{algo}: state.json {key}")
    x, y = reproducible(straight), reproducible(killed)
    assert x.keys() == y.keys() and len(x) > 20
    differ = {k: (x[k], y[k]) for k in x if not (x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])))}
    assert not differ, f"{algo}: eval.json differs after the resume: {differ}"
    run_dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert run_dirs == ["killed", "straight"]  # the resume ran in the run's own folder: no stray directory
