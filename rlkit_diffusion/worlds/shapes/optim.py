"""One supervised training stage of the shapes world's own models: AdamW, linear warm-up, cosine decay to 0.

The base UNet's pretraining (`base_model.pretrain`) and the three stages of the learned rewards
(`proxy_train.train_proxy`: contrastive CLIP, Bradley–Terry tuning, the aesthetic head) all train this way; each
declares its stage as an `AdamWStage` and builds its optimiser and schedule with `AdamWStage.optimizer`.

Learning rate at optimizer step s (0-based; ``LambdaLR`` calls the factor with s before the first step)::

    lr(s) = lr · (s + 1) / W                                   s < W   (linear warm-up over W = ``warmup`` steps)
    lr(s) = lr · ½ [1 + cos(π · min(1, (s − W) / (S − W)))]    s ≥ W   (cosine decay to 0 at S = ``steps``)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (module docstring)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class AdamWStage:
    """The optimiser settings of one training stage (the stage's own config says what a batch is)."""

    steps: int
    """Optimizer steps (S)."""
    batch_size: int
    """Items per step."""
    lr: float
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (decoupled; 0 makes AdamW the same as Adam)."""
    warmup: int = 0
    """Linear warm-up steps (W)."""

    def optimizer(
        self, params: Iterable[nn.Parameter]
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """AdamW over ``params`` and its warm-up-cosine schedule (step the scheduler once per optimizer step)."""
        optimiser = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(self.warmup, self.steps))


__all__ = ["AdamWStage", "warmup_cosine"]
