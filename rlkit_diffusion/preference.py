"""The implicit reward of a policy against its reference (Diffusion-DPO supp. S4) and preference accuracy (Table 2).

Algorithm-agnostic pieces: the DPO family's losses (``algos/dpo.py``) are −log σ of `implicit_margin`, and the
evaluation (`rlkit_diffusion.evaluate.evaluate`) scores EVERY trained policy by the preference accuracy of its
implicit reward on the world's validation pairs, next to the accuracy of the explicit reward models — Table 2.

Notation (code name → paper symbol):

================  =================================================================================================
``x_w, x_l``      x^w_0, x^l_0: the preferred and the rejected sample (diffusion space: pixels or VAE latents)
``t, noise``      t ~ U{t_min, …, t_max − 1} and ε ~ N(0, I), shared by winner and loser (S9 pseudocode)
``x_t``           x^*_t = α_t x^*_0 + σ_t ε ~ q(x_t | x_0): the forward process is the behaviour policy (S3)
``err``           SE = ‖ε − ε_θ(x^*_t, t)‖² (model) and ‖ε − ε_ref(x^*_t, t)‖² (reference), reduced over pixels
``inside``        the implicit reward margin r(c, x^w_0) − r(c, x^l_0) of one (t, ε) draw (eq. 46, 48-49)
``s``             the convention's factor on β: ½ (official) or 1 (diffusers, paper)
``scale``         s β ω(λ_t) per pair (`implicit_scale`): the one factor through which β, s and ω enter a loss
================  =================================================================================================

β conventions (peers disagree; each is reproducible): ``official`` (DiffusionDPO repo: per-pixel MEAN errors,
inside = −½ β (Δ_θ − Δ_ref)), ``diffusers`` (per-pixel MEAN, inside = β (Δ_ref − Δ_θ), so ``diffusers`` at β equals
``official`` at 2β), ``paper`` (eq. 14 literally: per-sample SUM, inside = −β ω(λ_t)(Δ_θ − Δ_ref)).
The accuracy does not depend on β (only the sign of the margin counts); the reported mean margin does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rlkit_diffusion.intervals import bootstrap_ci
from rlkit_diffusion.policy import DiffusionPolicy, cond_cat
from rlkit_diffusion.worlds.base import PairSource, World

BETA_SCALE = {"official": 0.5, "diffusers": 1.0, "paper": 1.0}


def per_sample_error(pred: Tensor, target: Tensor, reduction: Literal["mean", "sum"]) -> Tensor:
    """‖target − pred‖² reduced over every non-batch dim: mean (official/diffusers) or sum (eq. 14). (B,)"""
    err = (pred.float() - target.float()).pow(2).flatten(1)
    return err.mean(1) if reduction == "mean" else err.sum(1)


def beta_scale(convention: str) -> float:
    """s of the convention: inside = −s β ω (…)."""
    if convention not in BETA_SCALE:
        raise ValueError(f"beta_convention must be official|diffusers|paper, got {convention!r}")
    return BETA_SCALE[convention]


def implicit_scale(beta: float, convention: str, weight: Tensor | None, like: Tensor) -> Tensor:
    """s β ω(λ_t), the factor of the implicit reward r = s β ω (err_ref − err_θ) of one (t, ε) draw, per sample
    (shaped as ``like``; ω = 1 when ``weight`` is None)."""
    w = torch.ones_like(like) if weight is None else weight
    return beta_scale(convention) * beta * w


def implicit_margin(model_err: Tensor, ref_err: Tensor, scale: Tensor) -> Tensor:
    """The implicit reward margin r(c, x^w_0) − r(c, x^l_0) of one (t, ε) draw, per pair. (B,)

    ``inside = −s β ω(λ_t) [(SE^w_θ − SE^w_ref) − (SE^l_θ − SE^l_ref)]`` — the argument of log σ in eq. 14, and the
    reward difference of eq. 48-49 (written there with the opposite sign; the sign here is the one of eq. 46/14,
    under which a lower error than the reference means a higher reward).

    Args:
        model_err, ref_err: (2B,) per-sample errors SE_θ, SE_ref; rows [:B] on x^w_t, [B:] on x^l_t, as
            `paired_predictions` lays out the pair (one forward of both; the official repo's ``chunk(2)``).
        scale: (B,) s β ω(λ_t), from `implicit_scale` (β, its convention's s and the weighting ω enter only as
            this product).
    """
    if model_err.shape != ref_err.shape or model_err.ndim != 1 or model_err.shape[0] % 2:
        raise ValueError(
            "implicit_margin: model_err and ref_err must both be (2B,) — winners then losers — got "
            f"{tuple(model_err.shape)} and {tuple(ref_err.shape)}"
        )
    model_w, model_l = model_err.chunk(2)  # (B,), (B,)
    ref_w, ref_l = ref_err.chunk(2)
    model_diff = model_w - model_l  # Δ_θ
    ref_diff = ref_w - ref_l  # Δ_ref
    return -scale * (model_diff - ref_diff)


def parameterised_weight(policy: DiffusionPolicy, t: Tensor, weight: Tensor | None = None) -> Tensor | None:
    """ω(λ_t) times the policy's factor that makes its squared regression error the ε-error of eq. 14.

    ε-prediction: no factor (``weight`` is returned as given). Flow matching (`FlowMatchingPolicy`): (1 − σ_t)², since
    at a fixed x_σ the ε implied by a velocity is ε̂ = x_σ + (1 − σ) v̂, so ‖ε − ε̂‖² = (1 − σ)² ‖v − v̂‖²: the
    weighted velocity regression is eq. 14 term for term (docs/derivation.md, "DPO in velocity form"). (B,) or None.
    """
    factor = policy.eps_error_weight(t)
    if factor is None:
        return weight
    return factor if weight is None else weight * factor


def pair_outcomes(margin: Tensor) -> np.ndarray:
    """Per-pair correctness of a margin: 1 (> 0), ½ (tie), 0 — its mean is `preference_accuracy`."""
    return ((margin > 0).double() + 0.5 * (margin == 0).double()).cpu().numpy()


def preference_accuracy(margin: Tensor) -> Tensor:
    """Fraction of pairs ranked correctly by a margin (ties count ½)."""
    return (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()


def sample_timesteps(n: int, t_min: int, t_max: int, generator: torch.Generator, device) -> Tensor:
    """t ~ U{t_min, ..., t_max − 1}. (n,)"""
    if not 0 <= t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max, got t_min={t_min}, t_max={t_max}")
    return torch.randint(t_min, t_max, (n,), generator=generator).to(device)


def paired_predictions(
    policy: DiffusionPolicy,
    ref_policy: DiffusionPolicy,
    x_w: Tensor,
    x_l: Tensor,
    cond: Any,
    t: Tensor,
    noise: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Policy and reference outputs on (x^w_t, x^l_t) with shared (t, ε), each in ONE batched forward.

    Returns ``(model_pred (2B, ...), ref_pred (2B, ...), target (2B, ...))``; rows [:B] are winners.
    """
    x0 = torch.cat([x_w, x_l])  # (2B, ...)
    t2 = torch.cat([t, t])
    eps = torch.cat([noise, noise])
    x_t = policy.add_noise(x0, eps, t2)  # q(x_t | x_0), eq. 2
    c2 = cond_cat([cond, cond])
    with torch.no_grad():  # the reference first: its activations are freed before the policy's graph is built
        ref_pred = ref_policy.model_output(x_t, t2, c2)
    model_pred = policy.model_output(x_t, t2, c2)
    return model_pred, ref_pred, policy.training_target(x0, eps, t2)


@torch.no_grad()
def implicit_reward_margin(
    policy: DiffusionPolicy,
    ref_policy: DiffusionPolicy,
    cond: Any,
    x_a: Tensor,
    x_b: Tensor,
    *,
    beta: float = 1.0,
    convention: str = "official",
    n_draws: int = 10,
    t_min: int = 0,
    t_max: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimated reward difference r(c, x^A_0) − r(c, x^B_0) of a policy and its reference (S4.1, eq. 48-49).

    ``r_A − r_B = −s β E_{t, ε}[(SE^A_θ − SE^A_ref) − (SE^B_θ − SE^B_ref)]``, the expectation estimated with
    ``n_draws`` draws of (t, ε), each shared by A and B ("it improves the estimate to average over multiple draws").
    β log Z(c, t, q_t) cancels between A and B. Sign: as in eq. 14 (see `implicit_margin`). Returns (B,).
    """
    t_max = policy.num_train_timesteps if t_max is None else t_max
    reduction = "sum" if convention == "paper" else "mean"
    total = torch.zeros(x_a.shape[0], device=x_a.device)
    b = x_a.shape[0]
    for _ in range(n_draws):
        t = sample_timesteps(b, t_min, t_max, generator, x_a.device)
        noise = torch.randn(x_a.shape, generator=generator).to(x_a.device)
        model_pred, ref_pred, target = paired_predictions(policy, ref_policy, x_a, x_b, cond, t, noise)
        m_err, r_err = per_sample_error(model_pred, target, reduction), per_sample_error(ref_pred, target, reduction)
        scale = implicit_scale(beta, convention, parameterised_weight(policy, t), total)  # ω: None for ε
        total += implicit_margin(m_err, r_err, scale)
    return total / n_draws


def validation_batches(pairs: PairSource, n_pairs: int, batch_size: int) -> Iterator[tuple[list[str], Tensor, Tensor]]:
    """The first ``n_pairs`` pairs of a stream as batches ``(prompts, x_w, x_l)``; the stream is rewound afterwards
    (its ``state_dict``), so every evaluation scores the same pairs and training's stream is not consumed."""
    state = pairs.state_dict()
    try:
        done = 0
        while done < n_pairs:
            batch = pairs.next_batch(min(batch_size, n_pairs - done))
            done += len(batch[0])
            yield batch
    finally:
        pairs.load_state_dict(state)


def _pairs_of(world: World, pairs: PairSource | None) -> PairSource:
    """``pairs``, else the world's validation pairs (a one-line error when it has none)."""
    if pairs is not None:
        return pairs
    if world.val_pairs is None:
        raise ValueError(f"world {world.name!r} has no validation pairs (val_pairs) for the preference accuracy")
    return world.val_pairs


def implicit_reward_accuracy(
    policy: DiffusionPolicy,
    ref_policy: DiffusionPolicy,
    world: World,
    *,
    pairs: PairSource | None = None,
    n_pairs: int = 512,
    batch_size: int = 256,
    n_draws: int = 10,
    beta: float = 1.0,
    convention: str = "official",
    seed: int = 0,
) -> dict[str, float]:
    """Preference accuracy of the implicit reward on the world's validation pairs (Table 2).

    Each pair (c, x^w, x^l) counts as correct when `implicit_reward_margin` (x^A = x^w, x^B = x^l) is > 0, ½ on a
    tie — so a policy equal to its reference scores exactly 0.5. The pair stream is rewound afterwards (its
    ``state_dict``), so the same pairs are scored every time and the stream is not consumed. ``pairs``: another
    stream to score instead of ``world.val_pairs`` (its prompts are encoded by the world's encoder).

    Returns ``{"implicit_acc": ..., "implicit_acc_ci_low/high": percentile bootstrap over pairs,
    "implicit_margin": mean margin}``.
    """
    pairs = _pairs_of(world, pairs)
    generator = torch.Generator().manual_seed(seed)
    margins = []
    was_training = policy.eps_model.training
    policy.eps_model.eval()
    bar = tqdm(total=n_pairs, desc="implicit-reward accuracy", unit="pair", leave=False)
    try:
        for prompts, x_w, x_l in validation_batches(pairs, n_pairs, batch_size):
            bar.update(len(prompts))
            margins.append(
                implicit_reward_margin(
                    policy,
                    ref_policy,
                    world.encoder(prompts),
                    x_w,
                    x_l,
                    beta=beta,
                    convention=convention,
                    n_draws=n_draws,
                    generator=generator,
                )
            )
    finally:
        bar.close()
        policy.eps_model.train(was_training)
    margin = torch.cat(margins)
    lo, hi = bootstrap_ci(pair_outcomes(margin), seed=seed)  # pairs are independent: bootstrap over pairs
    return {
        "implicit_acc": float(preference_accuracy(margin)),
        "implicit_acc_ci_low": lo,
        "implicit_acc_ci_high": hi,
        "implicit_margin": float(margin.mean()),
    }


@torch.no_grad()
def reward_preference_accuracy(
    world: World, names: list[str], *, pairs: PairSource | None = None, n_pairs: int = 512, batch_size: int = 256
) -> dict[str, float]:
    """Preference accuracy of the world's explicit reward models ``names`` on its validation pairs (the other rows
    of Table 2; ``pairs``: another stream instead of ``world.val_pairs``).

    A pair (c, x^w, x^l) counts as correct when r(c, D(x^w)) > r(c, D(x^l)), ½ on a tie: the same rule and the same
    pairs as `implicit_reward_accuracy` (the stream is rewound afterwards). Returns ``{"reward_acc_<name>": ...}``.
    """
    margins: dict[str, list[Tensor]] = {name: [] for name in names}
    for prompts, x_w, x_l in validation_batches(_pairs_of(world, pairs), n_pairs, batch_size):
        images = world.decode(torch.cat([x_w, x_l]))  # (2B, ...): winners then losers
        for name in names:
            r = world.reward(name)(images, list(prompts) * 2).float()  # (2B,)
            margins[name].append(r[: len(prompts)] - r[len(prompts) :])
    return {f"reward_acc_{name}": float(preference_accuracy(torch.cat(m))) for name, m in margins.items()}
