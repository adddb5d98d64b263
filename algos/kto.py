"""Diffusion-KTO (Li et al., "Aligning Diffusion Models by Optimizing Human Utility", arXiv 2404.04465).

Per-image binary feedback instead of pairs: every image x_0 of the data is either desirable (y = +1) or undesirable
(y = −1), and the policy maximises the expected Kahneman–Tversky utility of its implicit reward measured against a
reference point. Each image is used on its own (its own t and ε): the objective never compares two images, so it
works from unpaired data.

Notation (code name → paper symbol):

=================  ============================================================================================
``x``              x_0, one image (diffusion space: pixels or VAE latents), with label y ∈ {+1, −1}
``t, noise``       t ~ U{t_min, …, t_max − 1}, ε ~ N(0, I), drawn per image (no sharing: the data are unpaired)
``x_t``            α_t x_0 + σ_t ε ~ q(x_t | x_0), the forward process as behaviour policy (Diffusion-DPO S3)
``model_err``      ‖ε − ε_θ(x_t, t, c)‖², per-pixel mean (``paper``: sum)
``ref_err``        ‖ε − ε_ref(x_t, t, c)‖²
``g``              s β ω(λ_t) (ref_err − model_err): the implicit reward β log p_θ(x_{t−1}|x_t)/p_ref(x_{t−1}|x_t)
                   of one (t, ε) draw, in the DPO family's β convention (`rlkit_diffusion.preference.beta_scale`)
``kl``             Q_ref, the reference point: max(0, mean of g over the batch), no gradient (detail 2)
``utility``        U(y (g − Q_ref)) = σ(y (g − Q_ref)), the Kahneman–Tversky value function (sigmoid form)
``λ_D, λ_U``       weights of desirable and undesirable images
=================  ============================================================================================

Implementation details (numbered):

1. Labels: ``labels=pairs`` takes the world's preference pairs apart — winners become desirable singles, losers
   undesirable singles, each with its own (t, ε) — so the same data stream as DPO feeds an unpaired objective.
   ``labels=<reward name>`` scores every image with that reward model and calls it desirable when r(c, D(x_0)) >
   ``threshold`` (None: the batch median, so half of each batch is desirable).
2. The reference point is the batch mean of the per-image implicit reward g, clamped at 0 and detached, averaged
   over processes — what the official Diffusion-KTO code does (``kl = g.mean().detach()``, reduced over ranks,
   ``clamp(min=0)``). It estimates β KL(p_θ ‖ p_ref) of the paper's eq. 8 with the batch's own images instead of
   KTO's mismatched (c, x) pairs: under the reference each g has mean ≤ 0 where p_θ ≈ p_ref, and the clamp
   keeps Q_ref ≥ 0 as a KL must be.
3. Loss: L = E[λ_y (1 − σ(y (g − Q_ref)))], the official code's ``l_kto`` with the sigmoid utility (the paper's
   default); ``convention=diffusers`` (s = 1, per-pixel mean) is the official code's scaling of β.
4. ``implicit_acc`` logs the fraction of images on the right side of the reference point, sign(y (g − Q_ref)) > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algos.dpo import collect_pairs, setup_pairs, snr_weight
from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.preference import beta_scale, implicit_scale, per_sample_error, sample_timesteps


@dataclass
class KTOConfig:
    """Diffusion-KTO hyper-parameters."""

    beta: float = 5000.0
    """β of the implicit reward g = s β ω (err_ref − err_θ); 5000: an SD-scale value of the DPO family (toy2d: 20)."""
    beta_convention: str = "diffusers"
    """How β enters (`rlkit_diffusion.preference.beta_scale`): ``diffusers`` (s = 1, pixel mean: the official
    Diffusion-KTO code), ``official`` (s = ½) or ``paper`` (pixel sum)."""
    lambda_desirable: float = 1.0
    """λ_D, the weight of desirable images."""
    lambda_undesirable: float = 1.0
    """λ_U, the weight of undesirable images."""
    labels: str = "pairs"
    """Who labels each image: ``pairs`` (winners desirable, losers undesirable, taken as unpaired singles) or a
    reward name of the world (desirable iff the reward exceeds ``threshold``)."""
    threshold: float | None = None
    """Reward threshold of ``labels=<reward>``; None = the batch median."""
    weighting: str = "constant"
    """ω(λ_t): ``constant``, ``snr`` or ``min_snr`` (`algos.dpo.snr_weight`)."""
    t_min: int = 0
    """Smallest training timestep drawn."""
    t_max: int | None = None
    """One past the largest timestep drawn; None = T."""


def kto_loss(
    model_err: Tensor,
    ref_err: Tensor,
    desirable: Tensor,
    scale: Tensor,
    *,
    lambda_desirable: float = 1.0,
    lambda_undesirable: float = 1.0,
    reference_point: Tensor | None = None,
) -> dict[str, Tensor]:
    """The Diffusion-KTO loss (arXiv 2404.04465, eq. 8 with the sigmoid utility) from per-image denoising errors.

    Line by line::

        g      = scale · (err_ref − err_θ)           β log p_θ/p_ref of one (t, ε) draw (Diffusion-DPO eq. 14 terms)
        Q_ref  = sg[max(0, mean_batch g)]            the reference point, β KL(p_θ ‖ p_ref) estimated (detail 2)
        y      = +1 (desirable) / −1 (undesirable)
        U      = σ(y (g − Q_ref))                    Kahneman–Tversky utility (sigmoid value function)
        L      = E[λ_y (1 − U)]                      maximise the expected utility (eq. 8)

    Args:
        model_err, ref_err: (B,) per-image errors ‖ε − ε_θ‖², ‖ε − ε_ref‖² (pixel mean; sum for ``paper``).
        desirable: (B,) bool, y = +1 where True.
        scale: (B,) s β ω(λ_t) per image (`rlkit_diffusion.preference.implicit_scale`; as in `algos.dpo.dpo_loss`).
        lambda_desirable, lambda_undesirable: λ_D, λ_U.
        reference_point: Q_ref if already computed (e.g. averaged over processes); None = from this batch.

    Returns:
        ``loss`` plus logs ``kl`` (Q_ref), ``implicit_acc``, ``reward_desirable``/``reward_undesirable`` (mean g of
        each group, NaN if empty) and ``desirable_frac``.
    """
    g = scale * (ref_err - model_err)  # (B,) implicit reward
    q_ref = g.detach().mean().clamp(min=0) if reference_point is None else reference_point.detach()
    y = desirable.float() * 2 - 1  # (B,) ±1
    utility = torch.sigmoid(y * (g - q_ref))  # (B,)
    lam = torch.where(desirable, torch.full_like(g, lambda_desirable), torch.full_like(g, lambda_undesirable))
    loss = (lam * (1 - utility)).mean()
    gd = g.detach()
    nan = torch.tensor(float("nan"))
    return {
        "loss": loss,
        "kl": q_ref,
        "implicit_acc": (y * (gd - q_ref) > 0).float().mean(),
        "reward_desirable": gd[desirable].mean() if desirable.any() else nan,
        "reward_undesirable": gd[~desirable].mean() if (~desirable).any() else nan,
        "desirable_frac": desirable.float().mean(),
        "model_mse": model_err.detach().mean(),
        "ref_mse": ref_err.detach().mean(),
    }


class KTO(AlgorithmDefaults):
    """Diffusion-KTO on per-image labels from the world's pairs or a reward threshold (`kto_loss`)."""

    name = "kto"
    config_class = KTOConfig

    def configure(self, ctx: AlgoContext, cfg: KTOConfig) -> None:
        if cfg.labels != "pairs" and cfg.labels not in ctx.world.rewards:
            raise ValueError(
                f"kto: labels={cfg.labels!r} is neither 'pairs' nor a reward of world {ctx.world.name!r} "
                f"(available: {sorted(ctx.world.rewards)})"
            )
        beta_scale(cfg.beta_convention)  # fails at once on a typo
        self.t_max = setup_pairs(ctx, self.name, "data", cfg.t_min, cfg.t_max)
        self.reference = ctx.base

    def implicit_reward_scale(self) -> tuple[float, str]:
        return self.config.beta, self.config.beta_convention

    def collect(self) -> tuple[list[str], Tensor, Tensor]:
        """2B unpaired singles ``(prompts, x (2B, ...), desirable (2B,))`` from B pairs (detail 1)."""
        ctx, cfg = self.ctx, self.config
        (prompts, x_w, x_l), _ = collect_pairs(ctx, "data")
        x = torch.cat([x_w, x_l])  # (2B, ...)
        prompts2 = list(prompts) + list(prompts)
        if cfg.labels == "pairs":
            desirable = torch.arange(len(prompts2), device=x.device) < len(prompts)  # winners
        else:
            r = ctx.reward(ctx.world.reward(cfg.labels), ctx.world.decode(x), prompts2)  # (2B,)
            threshold = r.median() if cfg.threshold is None else torch.tensor(cfg.threshold, device=r.device)
            desirable = r > threshold
        return prompts2, x, desirable

    def loss(self, batch) -> dict[str, Tensor]:
        ctx, cfg = self.ctx, self.config
        prompts, x0, desirable = batch
        t = sample_timesteps(len(prompts), cfg.t_min, self.t_max, ctx.generator, ctx.device)  # (N,) per image
        noise = torch.randn(x0.shape, generator=ctx.generator).to(ctx.device)  # (N, ...) per image
        x_t = ctx.policy.add_noise(x0, noise, t)  # q(x_t | x_0)
        cond = ctx.world.encoder(prompts)
        with torch.no_grad():
            ref_pred = self.reference.policy.model_output(x_t, t, cond)
        pred = ctx.policy.model_output(x_t, t, cond)
        target = ctx.policy.training_target(x0, noise, t)
        reduction = "sum" if cfg.beta_convention == "paper" else "mean"
        m_err, r_err = per_sample_error(pred, target, reduction), per_sample_error(ref_pred, target, reduction)
        weight = snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting)
        scale = implicit_scale(cfg.beta, cfg.beta_convention, weight, m_err)  # (N,) s β ω(λ_t)
        g = scale * (r_err - m_err)
        q_ref = ctx.gather(g.detach().mean()[None]).mean().clamp(min=0)  # detail 2, averaged over processes
        return kto_loss(
            m_err,
            r_err,
            desirable,
            scale,
            lambda_desirable=cfg.lambda_desirable,
            lambda_undesirable=cfg.lambda_undesirable,
            reference_point=q_ref,
        )
