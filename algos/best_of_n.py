"""Best-of-N rejection sampling (Diffusion-DPO supp. S8): the inference-time baseline. Nothing is trained.

For every prompt c and evaluation noise, draw N samples from the reference policy and keep the one with the highest
optimised reward::

    x^{(1)} = the evaluation's own draw (the same x_T and step noises as every other algorithm's sample)
    x^{(j)} ~ p_ref(·|c), j = 2..N (fresh noises, seeded from the evaluation's generator)
    x̂ = x^{(j*)},  j* = argmax_j r(c, D(x^{(j)}))                 r = the env's (optimised) reward, never gold

Because x^{(1)} is the base model's own sample, best-of-N never loses to the base on the optimised reward, and its
cost is N× the base's: N·(sampling steps) UNet evaluations and N reward queries per sample (``eval.json``:
``inference_nfe_per_sample``, ``inference_reward_queries_per_sample``). Its KL to the reference is bounded by the
classical best-of-N bound ``KL ≤ log N − (N − 1)/N``, reported as ``kl_to_ref``.

The algorithm declares ``trains = False`` (the training loop returns at once) and exposes ``sampler``, which
`rlkit_diffusion.evaluate.evaluate` uses in place of plain sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.worlds.base import World

Draw = Callable[[Tensor, Any, torch.Generator], Tensor]  # (x_T, cond, generator) -> x_0, the evaluation's sampler


@dataclass
class BestOfNConfig:
    """Best-of-N hyper-parameters."""

    n: int = 16
    """N: draws from the reference per evaluation sample."""
    reward: str | None = None
    """Reward that ranks the draws; None = the run's optimised reward (``reward=``, the env's)."""


def best_of_n(candidates: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Keep, per column, the candidate with the highest score.

    Args:
        candidates: (N, B, ...) N draws for each of B slots. scores: (N, B) their rewards.

    Returns:
        ``(best (B, ...), index (B,))`` with ``index = argmax_j scores[j]`` (the first on ties).
    """
    idx = scores.argmax(0)  # (B,)
    return candidates[idx, torch.arange(candidates.shape[1], device=candidates.device)], idx


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-N ‖ p_ref) ≤ log N − (N − 1)/N (exact for a continuous reward)."""
    return math.log(n) - (n - 1) / n


class BestOfNSampler:
    """The evaluation hook: N draws through the evaluation's own sampler, the best by the reward is kept."""

    def __init__(self, world: World, reward: Any, n: int):
        self.world, self.reward, self.n = world, reward, n
        self.kl_to_ref = best_of_n_kl_bound(n)
        self.reward_queries_per_sample = n

    @torch.no_grad()
    def sample(self, draw: Draw, prompts: list[str], x_T: Tensor, cond: Any, generator: torch.Generator) -> Tensor:
        """Best of N for each row of ``x_T`` (B, ...); draw 1 uses ``x_T`` and ``generator`` as plain sampling does."""
        b = len(prompts)
        first = draw(x_T, cond, generator)  # (B, ...): the evaluation's own draw
        g = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        others = []
        for _ in range(self.n - 1):  # B rows at a time: the memory of plain sampling
            x = torch.randn(x_T.shape, generator=g).to(x_T.device)
            others.append(draw(x, cond, g))
        candidates = torch.stack([first, *others])  # (N, B, ...)
        images = self.world.decode(candidates.flatten(0, 1))
        scores = self.reward(images, prompts * self.n).reshape(self.n, b)  # (N, B)
        return best_of_n(candidates, scores)[0]


class BestOfN(AlgorithmDefaults):
    """Inference-time baseline: no training step; ``sampler`` replaces plain sampling in the evaluation."""

    name = "best_of_n"
    config_class = BestOfNConfig
    trains = False

    def configure(self, ctx: AlgoContext, cfg: BestOfNConfig) -> None:
        if cfg.n < 1:
            raise ValueError(f"best_of_n: n must be >= 1, got {cfg.n}")
        reward = ctx.env.reward_model if cfg.reward is None else ctx.world.reward(cfg.reward)
        self.sampler = BestOfNSampler(ctx.world, reward, cfg.n)

    def collect(self) -> None:
        raise RuntimeError("best_of_n does not train (trains = False): the training loop never calls collect()")

    def loss(self, minibatch: Any) -> dict[str, Tensor]:
        raise RuntimeError("best_of_n does not train (trains = False): the training loop never calls loss()")
