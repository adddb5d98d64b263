"""Supervised fine-tuning on the winners (the Diffusion-DPO paper's SFT baseline, §5.5 and supp. S6).

The diffusion loss of eq. 2 on the preferred images only: the same pair stream (and AI-feedback relabelling) as the
DPO family, no loser, no reference. It does not solve eq. 5 (there is no KL term): it moves the policy towards the
winners' distribution as far as the budget lets it, which is why its KL to the base is reported next to its reward.

Notation: ``x_w`` = x^w_0 the preferred sample; ``t`` ~ U{t_min, …, t_max − 1}; ``noise`` = ε ~ N(0, I);
``x_t`` = α_t x^w_0 + σ_t ε ~ q(x_t | x^w_0); ``err`` = ‖target − model output‖² per-pixel mean; ω(λ_t) the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algos.dpo import PairAlgorithm, snr_weight
from rlkit_diffusion.preference import per_sample_error, sample_timesteps


@dataclass
class SFTConfig:
    """Supervised fine-tuning on the winners (the paper's SFT baseline, §5.5 and S6)."""

    weighting: str = "constant"
    """ω(λ_t) of the diffusion loss: ``constant`` (eq. 2 in practice), ``snr`` or ``min_snr``."""
    t_min: int = 0
    """Smallest training timestep drawn."""
    t_max: int | None = None
    """One past the largest timestep drawn; None = T."""
    labels: str = "data"
    """Who picks the winner: ``data`` or a reward name of the world (AI feedback)."""


def sft_loss(model_err_w: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
    """Supervised fine-tuning on the winners: the diffusion loss of eq. 2 on x^w_0 only.

    ``L = E_{(c, x^w_0), t, ε} ω(λ_t) ‖ε − ε_θ(x^w_t, t, c)‖²`` (per-pixel mean).
    """
    w = torch.ones_like(model_err_w) if weight is None else weight
    return {"loss": (w * model_err_w).mean(), "model_mse_w": model_err_w.detach().mean()}


class SFT(PairAlgorithm):
    """Fine-tuning on the winners of the world's pairs (`sft_loss`); the losers and the reference are not used."""

    name = "sft"
    config_class = SFTConfig

    def loss(self, batch) -> dict[str, Tensor]:
        ctx, cfg = self.ctx, self.config
        prompts, x_w, _ = batch
        t = sample_timesteps(len(prompts), cfg.t_min, self.t_max, ctx.generator, ctx.device)  # (B,)
        noise = torch.randn(x_w.shape, generator=ctx.generator).to(ctx.device)  # (B, ...) ε
        x_t = ctx.policy.add_noise(x_w, noise, t)  # q(x^w_t | x^w_0), eq. 2
        pred = ctx.policy.model_output(x_t, t, ctx.world.encoder(prompts))
        err = per_sample_error(pred, ctx.policy.training_target(x_w, noise, t), "mean")  # (B,)
        out = sft_loss(err, snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting))
        if cfg.labels != "data":
            out["label_flips"] = torch.tensor(self.label_flips)
        return out
