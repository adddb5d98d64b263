"""DDPO learns on shapes (issue #21): on a fixed prompt set, the proxy reward of the collected batches rises over a
few updates and the sign-flipped run lowers it — so a change that turns the policy gradient on shapes into noise
(e.g. training the σ = 0.0064 step t = 50 → 0 again, which carried 94% of the gradient) cannot come back silently.

Tiny size: the shapes world with a 10-step sampler, its first 4 training prompts, 8 trajectories per update,
6 updates, the shipped shapes tuning's conventions (per-dim mean log-probs, clip 1e-4, ``min_std`` 0.05) at lr 1e-4,
with per-prompt advantages once a prompt has 2 rewards. Besides the collected batches, the proxy of 8 fixed (prompt,
noise) pairs is measured before and after (common random numbers: only the policy's change moves it). The same runs:
``python -m benchmarks.diagnose_pg curve --steps 10 --prompts 4 --batch 8 --updates 6 --lr 1e-4 --min-std 0.05
--min-count 2 [--flip]``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from algos.ddpo import DDPO, DDPOConfig
from rlkit_diffusion.algorithm import AlgoContext
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference
from rlkit_diffusion.train import BudgetConfig, TrainConfig, train
from tests.zoo_helpers import flip_objective, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes_world_10_steps():
    """The shipped shapes world with a 10-step sampler (`benchmarks.diagnose_pg curve --steps 10` builds the same)."""
    from rlkit_diffusion.worlds.shapes import build_shapes

    return build_shapes(num_inference_steps=10)


UPDATES, BATCH, PROMPTS = 6, 8, 4


class Rows:
    """A `MetricLogger` stand-in keeping the logged rows."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def log(self, step, row):
        self.rows.append({k: float(v) for k, v in row.items()})
        return row

    def close(self):
        return None


def fixed_proxy(ctx: AlgoContext, prompts: list[str]) -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    with torch.no_grad():
        x0 = ctx.env.rollout(ctx.policy, prompts, generator=g, with_reward=False).x0
        return ctx.env.reward_model(ctx.world.decode(x0), prompts)


def learn_on_shapes(world) -> tuple[list[float], float]:
    """Batch rewards over the updates and the change of the fixed-noise proxy."""
    world = copy.deepcopy(world)
    world.train_prompts = world.train_prompts[:PROMPTS]
    ctx = AlgoContext(
        world=world,
        policy=world.policy,
        base=Reference(world.policy, "frozen"),
        env=DenoisingCore(world, reward="proxy"),
        batch_size=BATCH,
        generator=torch.Generator().manual_seed(0),
    )
    fixed = [p for p in world.train_prompts for _ in range(2)]
    before = fixed_proxy(ctx, fixed)
    rows = Rows()
    algo = DDPO(DDPOConfig(min_std=0.05, min_count=2))
    cfg = TrainConfig(steps=UPDATES, lr=1e-4, batch_size=BATCH, log_every=1)
    train(algo, ctx, cfg, budget=BudgetConfig("steps", UPDATES), logger=rows, progress=False)
    gain = float((fixed_proxy(ctx, fixed) - before).mean())
    return [r["train/reward_mean"] for r in rows.rows], gain


def slope(values: list[float]) -> float:
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def test_ddpo_raises_the_collected_batch_reward_on_shapes(shapes_world_10_steps, monkeypatch):
    rewards, gain = learn_on_shapes(shapes_world_10_steps)
    flip_objective(monkeypatch)
    flipped_rewards, flipped_gain = learn_on_shapes(shapes_world_10_steps)
    msg = f"batch rewards {rewards} (gain {gain:+.3f}); flipped {flipped_rewards} (gain {flipped_gain:+.3f})"
    assert slope(rewards) > 0 and gain > 0, msg
    assert slope(flipped_rewards) < 0 and flipped_gain < 0, msg
