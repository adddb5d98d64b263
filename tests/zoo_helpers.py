"""Helpers of the algorithm-zoo tests (``tests/test_algos_*.py``): fast toy2d runs, a flipped objective, contexts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rlkit_diffusion.algorithm import AlgoContext, sum_losses
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference
from tests.helpers import run_toy

# The tuning files' training settings with a cheaper evaluation (64 noises per prompt, training prompts only).
FAST_EVAL = [
    "eval.samples_per_prompt=64",
    "eval.heldout=false",
    "eval.bootstrap=100",
    "world.optimum_pool=1024",
]


@pytest.fixture(scope="module")
def one_thread():
    """The toy MLP is tiny: one intra-op thread is as fast alone and ~10× faster on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def learn(tmp_path: Path, algo: str, *overrides: str, name: str = "run") -> dict:
    """Train ``algo`` on toy2d with its tuning file (``conf/tuning/toy2d_<algo>.yaml``); returns eval.json."""
    return run_toy(tmp_path, [f"algo={algo}", *FAST_EVAL, *overrides], name)[0]


def did_not_learn(tmp_path: Path, algo: str, *overrides: str, name: str = "flipped", train_fn=learn) -> bool:
    """Train with ``train_fn`` (default `learn`: toy2d); True if the gold reward ended below the base's, or training
    blew up (a flipped objective may send the samples to infinity: the reward check or the divergence guard stops
    the run)."""
    from rlkit_diffusion.train import DivergenceError

    try:
        res = train_fn(tmp_path, algo, *overrides, name=name)
    except (DivergenceError, ValueError) as e:
        if isinstance(e, ValueError) and "NaN or inf" not in str(e):
            raise
        return True
    return res["gold_reward_trained"] < res["gold_reward_base"]


def flip_objective(monkeypatch) -> None:
    """Make the training loop step the NEGATED objective (−Σ loss*): the test hook that proves learning tests can
    fail. It flips every algorithm at once, whatever its loss terms."""
    import rlkit_diffusion.train as train_module

    original = train_module.sum_losses
    monkeypatch.setattr(train_module, "sum_losses", lambda losses: -original(losses))


def sgd_steps(ctx: AlgoContext, algo, batch, lr: float = 1e-2) -> list[dict[str, torch.Tensor]]:
    """One plain SGD step (lr ``lr``) per minibatch of ``batch`` on the stepped objective (`sum_losses`, as the
    training loop); returns each minibatch's loss dict."""
    opt = torch.optim.SGD(ctx.policy.eps_model.parameters(), lr=lr)
    outs = []
    for mb in algo.minibatches(batch):
        out = algo.loss(mb)
        outs.append(out)
        opt.zero_grad()
        sum_losses(out).backward()
        opt.step()
    return outs


def toy_context(world, batch_size: int = 32, seed: int = 0, reward: str = "proxy") -> AlgoContext:
    """A single-process context on a private copy of ``world`` (training never touches the shared fixture)."""
    world = copy.deepcopy(world)
    return AlgoContext(
        world=world,
        policy=world.policy,
        base=Reference(world.policy, "frozen"),
        env=DenoisingCore(world, reward=reward),
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
