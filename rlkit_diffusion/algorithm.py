"""The algorithm protocol and the context every algorithm gets.

The one training loop (`rlkit_diffusion.train.train`) drives any object with this shape (`Algorithm` declares
every member; `AlgorithmDefaults` gives the optional ones their defaults)::

    algo.setup(ctx)                      # once: reads the world, policy, reference, counters from ctx
    batch = algo.collect()               # data for one or more updates (pairs, rollouts, ...)
    for mb in algo.minibatches(batch):   # one optimizer step per minibatch
        losses = algo.loss(mb)           # dict: keys starting with "loss" are summed and stepped, others logged
    algo.after_update(update)            # e.g. reference-model updates, returns metrics to log

Algorithms hold their own config dataclass (registered as the Hydra schema of ``benchmarks/conf/algo/<name>``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.policy import DiffusionPolicy
from rlkit_diffusion.reference import Reference
from rlkit_diffusion.rewards.base import check_reward
from rlkit_diffusion.worlds.base import World


@dataclass
class Counters:
    """Budget counters shared by the loop, the algorithm and the evaluation."""

    reward_queries: int = 0  # images scored by a reward model during training
    updates: int = 0  # optimizer steps
    samples: int = 0  # training samples consumed (pairs or trajectories)


@dataclass
class AlgoContext:
    """What an algorithm may use. Built once by the runner, identical for every algorithm in a comparison."""

    world: World
    policy: DiffusionPolicy  # trainable; its eps_model may be wrapped by accelerate (DDP)
    base: Reference  # π_ref = the initial policy (frozen copy, or LoRA adapters off)
    env: DenoisingCore  # the MDP on the training prompts with the optimised reward
    batch_size: int  # per process
    generator: torch.Generator  # per-rank seeded source of all training randomness
    counters: Counters = field(default_factory=Counters)
    accelerator: Any = None  # accelerate.Accelerator (None in unit tests: single process)
    shared_generator: torch.Generator | None = None  # identical on every rank (None: ``generator``, one process)

    @property
    def device(self) -> torch.device:
        return self.world.device

    def global_rows(self, b: int) -> tuple[torch.Generator, int, slice]:
        """World-size-invariant randomness: ``(generator, n, rows)`` — draw ``n = b × num_processes`` rows (the
        global batch) from ``generator``, which is the same stream on every rank, and keep ``rows``, this rank's
        slice ``[rank·b, (rank+1)·b)``. The union over ranks is exactly what one process with the global batch draws,
        whatever the number of processes, so a run resumes on another number of processes and continues as an
        uninterrupted run there would (with one process: the context's generator, all ``b`` rows)."""
        acc = self.accelerator
        rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
        return self.shared_generator or self.generator, b * world, slice(rank * b, (rank + 1) * b)

    def gather(self, x: Tensor) -> Tensor:
        """All-gather a tensor across processes (identity in a single process)."""
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return x
        return self.accelerator.gather(x.contiguous())

    def reward(self, rewards_fn, images: Tensor, prompts: list[str]) -> Tensor:
        """Query a reward model, counting the queries and checking the output (shape (B,), finite).

        Raises a one-line ValueError naming the reward (the training loop adds the optimizer step)."""
        r = rewards_fn(images, prompts)
        self.counters.reward_queries += len(prompts)
        return check_reward(r, len(prompts), self.reward_name(rewards_fn))

    def reward_name(self, rewards_fn) -> str:
        """The configured name of a reward model (``reward=<name>`` for the env's own reward)."""
        env = self.env
        if env is not None and (
            rewards_fn is getattr(env, "reward_model", None) or getattr(rewards_fn, "__self__", None) is env
        ):
            return str(getattr(env, "reward_name", "reward"))
        name = getattr(rewards_fn, "name", None)
        return name if isinstance(name, str) else getattr(rewards_fn, "__name__", type(rewards_fn).__name__)


class Sampler(Protocol):
    """An inference-time procedure that replaces plain sampling in the evaluation (best-of-N, supp. S8)."""

    kl_to_ref: float  # reported as the method's KL to the reference (e.g. the best-of-N bound)
    reward_queries_per_sample: int  # reward calls spent per evaluation sample

    def sample(self, draw: Any, prompts: list[str], x_T: Tensor, cond: Any, generator: torch.Generator) -> Tensor:
        """x_0 for each row of ``x_T``; ``draw(x_T, cond, generator) -> x_0`` is the evaluation's own episode."""
        ...


@runtime_checkable
class Algorithm(Protocol):
    """Every member the training loop (`rlkit_diffusion.train.train`), the evaluation and the runner use.

    `AlgorithmDefaults` gives the optional ones their defaults: ``trains = True``, ``reference = None``,
    ``sampler = None``, ``world_size_invariant = False``, one minibatch per batch, no state, and the implicit
    reward at β = 1."""

    name: str
    trains: bool
    """False for an inference-time method (best-of-N): the loop returns at once, nothing is optimised."""
    reference: Reference | None
    """The reference the algorithm regularises towards, if any; an updated one (hard copy / EMA) is checkpointed."""
    sampler: Sampler | None
    """An inference-time procedure the evaluation uses instead of plain sampling (None = plain sampling)."""
    world_size_invariant: bool
    """True when every random draw of training goes through `AlgoContext.global_rows` (and its data through the
    sharded pairs): a checkpoint then resumes on another number of processes (`rlkit_diffusion.train`)."""

    def setup(self, ctx: AlgoContext) -> None: ...

    def collect(self) -> Any: ...

    def minibatches(self, batch: Any) -> Iterable[Any]: ...

    def loss(self, minibatch: Any) -> dict[str, Tensor]: ...

    def after_update(self, update: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def implicit_reward_scale(self) -> tuple[float, str]:
        """(β, convention) in which the evaluation reports the implicit reward margin r̂ = β log π_θ/π_ref (S4);
        the implicit-reward accuracy does not depend on it."""
        ...


class AlgorithmDefaults:
    """Defaults for the protocol's optional members (see `Algorithm`), the constructor ``Algo(config=None)`` (the
    algorithm's ``config_class()`` when no config is given) and ``setup``: it keeps the context as ``self.ctx`` and
    hands the context and the config to ``configure``, where an algorithm checks its config and derives its state."""

    config_class: type
    config: Any = None  # the algorithm's hyper-parameters (an instance of config_class; None: it has none)
    ctx: AlgoContext
    trains: bool = True
    reference: Reference | None = None
    sampler: Sampler | None = None
    world_size_invariant: bool = False

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.config_class()

    def setup(self, ctx: AlgoContext) -> None:
        self.ctx = ctx
        self.configure(ctx, self.config)

    def configure(self, ctx: AlgoContext, cfg: Any) -> None:
        """The algorithm's own set-up (called by ``setup`` with ``self.ctx`` set): check ``cfg`` against the
        context, fail early on a typo, derive state (``t_max``, ``reference``, ...). Default: nothing."""
        return None

    def minibatches(self, batch: Any) -> Iterable[Any]:
        yield batch

    def after_update(self, update: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def implicit_reward_scale(self) -> tuple[float, str]:
        return 1.0, "official"


def sum_losses(losses: dict[str, Tensor]) -> Tensor:
    """The stepped objective: the sum of every ``loss*`` entry."""
    keys = [k for k in losses if k.startswith("loss")]
    if not keys:
        raise ValueError(f"an algorithm's loss dict needs at least one 'loss*' key, got {sorted(losses)}")
    return sum(losses[k] for k in keys)
