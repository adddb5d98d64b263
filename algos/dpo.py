"""The Diffusion-DPO family (Wallace et al.): off-policy preference optimisation on a fixed dataset of pairs.

Modules: ``dpo`` (eq. 14) and ``dpo_l2`` (supp. S2, "an alternative approximation"); ``rethink_dpo`` and ``sft``
(``algos/sft.py``) reuse the pair handling here: the pair stream and AI-feedback relabelling of the pairs (§5.4,
``labels=<reward>``). The implicit reward itself (`implicit_margin`, S4) and its preference accuracy on validation
pairs (Table 2, reported for every algorithm by the evaluation) live in `rlkit_diffusion.preference`.

Notation (code name → paper symbol):

================  =================================================================================================
``x_w, x_l``      x^w_0, x^l_0: the preferred and the rejected sample (diffusion space: pixels or VAE latents)
``t``             t ~ U(0, T), shared by winner and loser
``noise``         ε ~ N(0, I), shared by winner and loser (S9 pseudocode)
``x_t``           x^*_t = α_t x^*_0 + σ_t ε ~ q(x_t | x_0): the forward process is the behaviour policy (S3)
``err``           SE = ‖ε − ε_θ(x^*_t, t)‖² (model) and ‖ε − ε_ref(x^*_t, t)‖² (reference), reduced over pixels
``dist``          ‖ε_θ(x^*_t, t) − ε_ref(x^*_t, t)‖² (``dpo_l2`` only), reduced over pixels
``weight``        ω(λ_t), λ_t = α_t²/σ_t² (constant in practice)
``inside``        the argument of log σ(·): the implicit reward margin r(c, x^w_0) − r(c, x^l_0) (eq. 48-49)
``s``             the convention's factor on β: ½ (official) or 1 (diffusers, paper)
``scale``         s β ω(λ_t) per pair (`implicit_scale`): the one factor through which β, s and ω enter a loss
================  =================================================================================================

Conventions (peers disagree; each is reproducible with ``beta_convention``):

* ``official`` (DiffusionDPO repo): per-pixel MEAN errors, inside = −½ β (Δ_θ − Δ_ref), Δ = err_w − err_l.
* ``diffusers`` (diffusers' example): per-pixel MEAN errors, inside = β (Δ_ref − Δ_θ). So
  ``diffusers`` at β equals ``official`` at 2β.
* ``paper`` (eq. 14 literally, T factored into β): per-sample SUM of squared errors, inside = −β ω(λ_t)(Δ_θ − Δ_ref).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.preference import (
    beta_scale,  # noqa: F401  (re-exported: docs/exercises/ex03 imports it from algos.dpo)
    implicit_margin,
    implicit_scale,
    paired_predictions,
    parameterised_weight,
    per_sample_error,
    preference_accuracy,
    sample_timesteps,
)


@dataclass
class DPOConfig:
    """Diffusion-DPO hyper-parameters."""

    beta: float = 2000.0
    """β, the KL strength of eq. 5 (paper: 2000 for SD1.5, 5000 for SDXL, with the ``official`` convention)."""
    beta_convention: str = "official"
    """How β enters: ``official`` (−½β, pixel mean), ``diffusers`` (β, pixel mean) or ``paper`` (pixel sum)."""
    weighting: str = "constant"
    """ω(λ_t): ``constant`` (paper), ``snr`` (λ_t) or ``min_snr`` (min(λ_t, 5) / λ_t)."""
    t_min: int = 0
    """Smallest training timestep drawn (t ~ U{t_min, ..., t_max − 1})."""
    t_max: int | None = None
    """One past the largest timestep drawn; None = T (all training timesteps)."""
    sft_weight: float = 0.0
    """Optional extra diffusion loss on the winners (0 = pure DPO)."""
    labels: str = "data"
    """Who labels the pairs: ``data`` (the dataset's labels) or a reward name of the world (AI feedback, §5.4)."""


@dataclass
class DPOL2Config(DPOConfig):
    """Hyper-parameters of the S2 alternative approximation (same fields as Diffusion-DPO, another default)."""

    sft_weight: float = 1.0
    """The diffusion loss on the winners, on by default: θ = θ_ref (where every run starts, LoRA or full fine-tune)
    is a stationary point of the pure S2 loss, so with 0 the gradient is exactly zero and the run returns the base
    model; `DPOL2.configure` refuses 0."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------
def snr_weight(alpha_bar: Tensor, weighting: str) -> Tensor:
    """ω(λ_t) with λ_t = ᾱ_t / (1 − ᾱ_t) (eq. 2). (B,)"""
    snr = alpha_bar / (1 - alpha_bar)
    if weighting == "constant":
        return torch.ones_like(snr)
    if weighting == "snr":
        return snr
    if weighting == "min_snr":
        return snr.clamp(max=5.0) / snr
    raise ValueError(f"weighting must be constant|snr|min_snr, got {weighting!r}")


def bradley_terry_loss(inside: Tensor) -> dict[str, Tensor]:
    """``L = −E log σ(inside)``: the Bradley–Terry likelihood of eq. 3/8 on implicit reward margins ``inside`` (B,),
    with the logs ``implicit_acc`` (inside > 0, ties count ½) and ``reward_margin`` (mean inside)."""
    return {
        "loss": -F.logsigmoid(inside).mean(),
        "implicit_acc": preference_accuracy(inside.detach()),
        "reward_margin": inside.detach().mean(),
    }


def dpo_loss(model_err: Tensor, ref_err: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """The Diffusion-DPO loss, eq. 14, from per-sample denoising errors.

    Line by line::

        Δ_θ    = err_θ(x^w_t) − err_θ(x^l_t)          model_diff   (eq. 14, first bracket minus second, θ terms)
        Δ_ref  = err_ref(x^w_t) − err_ref(x^l_t)      ref_diff     (eq. 14, the reference terms)
        inside = −s β ω(λ_t) (Δ_θ − Δ_ref)            scale = s β ω(λ_t)   (`implicit_margin`)
        L      = −E log σ(inside)                     (eq. 14; the Bradley–Terry likelihood of eq. 3/8)

    Args:
        model_err, ref_err: (2B,) per-sample errors, rows [:B] on the winners and [B:] on the losers, already
            reduced over pixels with the convention's reduction (see `per_sample_error`).
        scale: (B,) s β ω(λ_t): β times the convention's s (½ ``official``, 1 ``diffusers``/``paper``; module
            docstring) times the weighting ω(λ_t) — `implicit_scale(beta, convention, weight, like)`.

    Returns:
        ``loss`` plus logs: ``implicit_acc`` (inside > 0, ties count ½), ``reward_margin`` (mean inside), and the
        four mean errors.
    """
    inside = implicit_margin(model_err, ref_err, scale)  # (B,)
    model_w, model_l = model_err.detach().chunk(2)
    ref_w, ref_l = ref_err.detach().chunk(2)
    return {
        **bradley_terry_loss(inside),  # eq. 14
        "model_mse_w": model_w.mean(),
        "model_mse_l": model_l.mean(),
        "ref_mse_w": ref_w.mean(),
        "ref_mse_l": ref_l.mean(),
    }


def dpo_l2_loss(dist: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """The S2 "alternative approximation": q(x_t | x_0) p_θ(x_{t−1} | x_t) instead of q(x_{t−1,t} | x_0).

    Line by line (supp. S2, the last display of "An alternative approximation"; T factored into β)::

        d^w    = ‖ε_θ(x^w_t, t) − ε_ref(x^w_t, t)‖²     dist[:B]  (2·σ²-scaled KL(p_θ ‖ p_ref) at x^w_t, Jensen step)
        d^l    = ‖ε_θ(x^l_t, t) − ε_ref(x^l_t, t)‖²     dist[B:]
        inside = −s β ω(λ_t) (d^w − d^l)               scale = s β ω(λ_t)
        L      = −E log σ(inside)

    Property worth knowing (tested): d^w and d^l are squared distances that vanish at θ = θ_ref together with
    their gradients, so **θ = θ_ref is a stationary point of this loss** — started from the reference, it does not
    move on its own. The expectation over x_{t−1} ~ p_θ removed the data's x_{t−1}, so the loss no longer says in
    which direction to move. ``sft_weight`` > 0 breaks the tie (the toy2d tuning does this).

    Args:
        dist: (2B,) ‖ε_θ − ε_ref‖², winners then losers, reduced over pixels (mean, or sum for ``paper``).
        scale: (B,) s β ω(λ_t), as in `dpo_loss`.
    """
    dist_w, dist_l = dist.chunk(2)  # (B,), (B,)
    inside = -scale * (dist_w - dist_l)  # (B,)
    return {
        **bradley_terry_loss(inside),
        "dist_w": dist_w.detach().mean(),
        "dist_l": dist_l.detach().mean(),
    }


# --------------------------------------------------------------------------------------------------------------
# The pairs: the stream and AI feedback (§5.4)
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rank_pairs(
    ctx: AlgoContext, reward: str, prompts: list[str], x_a: Tensor, x_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """AI feedback (§5.4): order each pair by a reward model instead of the dataset's label.

    ``x^w = x^b if r(c, D(x^b)) > r(c, D(x^a)) else x^a`` (D = the world's decoder; ties keep the dataset's order).
    Both images of every pair are scored in one call, counted as 2B reward queries.

    Returns ``(x_w, x_l, swapped)`` with ``swapped`` (B,) bool: True where the reward disagrees with the data.
    """
    b = len(prompts)
    r = ctx.reward(ctx.world.reward(reward), ctx.world.decode(torch.cat([x_a, x_b])), prompts + prompts)  # (2B,)
    swap = r[b:] > r[:b]  # (B,)
    mask = swap.reshape(b, *([1] * (x_a.ndim - 1)))
    return torch.where(mask, x_b, x_a), torch.where(mask, x_a, x_b), swap


def setup_pairs(ctx: AlgoContext, name: str, labels: str, t_min: int, t_max: int | None) -> int:
    """Checks shared by the pair-based algorithms: the world has pairs, ``labels`` is ``data`` or one of its rewards,
    and 0 <= t_min < t_max <= T. Returns t_max (None → T)."""
    if ctx.world.pairs is None:
        raise ValueError(f"algo {name!r} needs preference pairs, but world {ctx.world.name!r} has none")
    if labels != "data" and labels not in ctx.world.rewards:
        raise ValueError(
            f"{name}: labels={labels!r} is neither 'data' nor a reward of world {ctx.world.name!r} "
            f"(available: {sorted(ctx.world.rewards)})"
        )
    T = ctx.policy.num_train_timesteps
    t_max = t_max if t_max is not None else T
    if not 0 <= t_min < t_max <= T:
        raise ValueError(f"{name}: need 0 <= t_min < t_max <= {T}, got {t_min}, {t_max}")
    return t_max


def collect_pairs(ctx: AlgoContext, labels: str) -> tuple[tuple[list[str], Tensor, Tensor], float]:
    """The next batch of pairs ``(prompts, x_w, x_l)`` (counted as training samples), relabelled by a reward under
    AI feedback; and the fraction of pairs whose order the reward flipped (0 with the dataset's labels)."""
    prompts, x_w, x_l = ctx.world.pairs.next_batch(ctx.batch_size)
    ctx.counters.samples += len(prompts)
    if labels == "data":
        return (prompts, x_w, x_l), 0.0
    x_w, x_l, swapped = rank_pairs(ctx, labels, prompts, x_w, x_l)
    return (prompts, x_w, x_l), float(swapped.float().mean())


# --------------------------------------------------------------------------------------------------------------
# The algorithms
# --------------------------------------------------------------------------------------------------------------
class PairAlgorithm(AlgorithmDefaults):
    """An algorithm on the world's pair stream: its config's ``labels``, ``t_min`` and ``t_max`` are checked by
    `setup_pairs`; a batch is `collect_pairs`' ``(prompts, x_w, x_l)``, and ``label_flips`` the fraction of its pairs
    that AI feedback relabelled."""

    def configure(self, ctx: AlgoContext, cfg: Any) -> None:  # DPOConfig, SFTConfig, ...: labels, t_min, t_max
        self.t_max = setup_pairs(ctx, self.name, cfg.labels, cfg.t_min, cfg.t_max)
        self.label_flips = 0.0

    def collect(self) -> tuple[list[str], Tensor, Tensor]:
        batch, self.label_flips = collect_pairs(self.ctx, self.config.labels)
        return batch


class DPO(PairAlgorithm):
    """Diffusion-DPO on the world's preference pairs (``world.pairs``)."""

    name = "dpo"
    config_class = DPOConfig
    world_size_invariant = True  # pairs and (t, ε) are slices of global draws: resumable on any number of processes

    def configure(self, ctx: AlgoContext, cfg: DPOConfig) -> None:
        super().configure(ctx, cfg)
        self.reference = ctx.base

    def implicit_reward_scale(self) -> tuple[float, str]:
        """The implicit reward r̂ = β log π_θ/π_ref in this run's own β and convention."""
        return self.config.beta, self.config.beta_convention

    def predictions(self, prompts: list[str], x_w: Tensor, x_l: Tensor) -> dict[str, Tensor]:
        """Shared (t, ε) draw → policy and reference outputs on winners and losers (rows [:B] winners), ω(λ_t)."""
        ctx, cfg = self.ctx, self.config
        cond = ctx.world.encoder(prompts)
        g, n, rows = ctx.global_rows(len(prompts))  # (t, ε) of the global batch, this rank's rows
        t = sample_timesteps(n, cfg.t_min, self.t_max, g, ctx.device)[rows]
        noise = torch.randn((n, *x_w.shape[1:]), generator=g)[rows].to(ctx.device)
        model_pred, ref_pred, target = paired_predictions(ctx.policy, self.reference.policy, x_w, x_l, cond, t, noise)
        weight = parameterised_weight(ctx.policy, t, snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting))
        return {"model": model_pred, "ref": ref_pred, "target": target, "weight": weight, "t": t}

    def errors(self, prompts: list[str], x_w: Tensor, x_l: Tensor) -> dict[str, Tensor]:
        """Shared (t, ε) draw → per-sample errors ``model``/``ref`` (2B,: winners, then losers), ω(λ_t) ``weight``
        and ``t``."""
        p = self.predictions(prompts, x_w, x_l)
        reduction = "sum" if self.config.beta_convention == "paper" else "mean"
        m_err = per_sample_error(p["model"], p["target"], reduction)  # (2B,) winners, then losers
        r_err = per_sample_error(p["ref"], p["target"], reduction)
        return {"model": m_err, "ref": r_err, "weight": p["weight"], "t": p["t"]}

    def scale(self, weight: Tensor | None, like: Tensor) -> Tensor:
        """s β ω(λ_t) of this configuration (`implicit_scale`), per pair shaped as ``like`` (B,)."""
        return implicit_scale(self.config.beta, self.config.beta_convention, weight, like)

    def loss(self, batch) -> dict[str, Tensor]:
        e = self.errors(*batch)
        model_w = e["model"].chunk(2)[0]  # (B,) the winners' errors: the scale's per-pair shape, the SFT term
        out = dpo_loss(e["model"], e["ref"], self.scale(e["weight"], model_w))
        return self._extras(out, model_w)

    def _extras(self, out: dict[str, Tensor], model_err_w: Tensor) -> dict[str, Tensor]:
        """Options shared by the family: the SFT term on the winners and the AI-feedback log."""
        if self.config.sft_weight > 0:
            out["loss_sft"] = self.config.sft_weight * model_err_w.mean()
        if self.config.labels != "data":
            out["label_flips"] = torch.tensor(self.label_flips)
        return out


class DPOL2(DPO):
    """The S2 alternative approximation (`dpo_l2_loss`): the same pairs, (t, ε) draws and reference as DPO."""

    name = "dpo_l2"
    config_class = DPOL2Config

    def configure(self, ctx: AlgoContext, cfg: DPOL2Config) -> None:
        if cfg.sft_weight <= 0:
            raise ValueError(
                "dpo_l2: sft_weight must be > 0 — θ = θ_ref (the start of every run, LoRA or full fine-tune) is a "
                "stationary point of the pure S2 loss (`dpo_l2_loss`), so with sft_weight = 0 the gradient is exactly "
                "zero and training returns the base model; use algo.sft_weight=1.0 (the default) or another value > 0"
            )
        super().configure(ctx, cfg)

    def loss(self, batch) -> dict[str, Tensor]:
        prompts = batch[0]
        b = len(prompts)
        p = self.predictions(*batch)
        reduction = "sum" if self.config.beta_convention == "paper" else "mean"
        dist = per_sample_error(p["model"], p["ref"], reduction)  # (2B,) ‖ε_θ − ε_ref‖²
        out = dpo_l2_loss(dist, self.scale(p["weight"], dist[:b]))
        return self._extras(out, per_sample_error(p["model"][:b], p["target"][:b], reduction))
