"""The reward-model protocol shared by every algorithm, and THE output check (`check_reward`).

One implementation serves DDPO (scored without gradient) and DRaFT/AlignProp (gradient through the reward when
``differentiable`` is True). Gold rewards are for labelling and evaluation only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class RewardModel(Protocol):
    """``reward(images, prompts) -> (B,)``.

    Attributes:
        name: short identifier used in logs (``"gold_shapes"``, ``"jpeg_compressibility"``, ...).
        differentiable: True if gradients flow from the output to ``images``.
    """

    name: str
    differentiable: bool

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Score images.

        Args:
            images: (B, C, H, W) floats in [0, 1].
            prompts: B prompts, one per image.

        Returns:
            (B,) float rewards (higher is better).
        """
        ...


def reward_name(reward: object) -> str:
    """``reward.name`` if present, else the class name."""
    return str(getattr(reward, "name", type(reward).__name__))


def check_reward(r: Any, batch: int, name: str) -> Tensor:
    """THE reward check: a reward model's output must be a finite tensor of shape (B,). Returns it.

    Raises:
        ValueError: one line naming the reward (the training loop appends the optimizer step).
    """
    if not isinstance(r, Tensor):
        raise ValueError(f"reward {name!r} returned {type(r).__name__}, expected a tensor of shape ({batch},)")
    if tuple(r.shape) != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(r.shape)}, expected ({batch},)")
    finite = torch.isfinite(r.detach())
    if not bool(finite.all()):
        raise ValueError(f"reward {name!r} returned NaN or inf")
    return r


def checked_reward(reward: RewardModel, images: Tensor, prompts: Sequence[str], name: str | None = None) -> Tensor:
    """Call ``reward`` on a batch and `check_reward` its output; ``name`` defaults to `reward_name`.

    Raises:
        ValueError: (one line, naming the reward) if the number of prompts is not the batch size B, or the output
            is not a finite tensor of shape (B,).
    """
    name = reward_name(reward) if name is None else name
    batch = images.shape[0]
    if len(prompts) != batch:
        raise ValueError(f"reward {name!r}: {batch} images but {len(prompts)} prompts")
    return check_reward(reward(images, prompts), batch, name)


__all__ = ["RewardModel", "check_reward", "checked_reward", "reward_name"]
