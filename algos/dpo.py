"""The Diffusion-DPO family (Wallace et al.): off-policy preference optimisation on a fixed dataset of pairs.

Modules: ``dpo`` (eq. 14), ``dpo_l2`` (supp. S2, "an alternative approximation"), ``sft`` (fine-tuning on the
winners, §5.5 / S6). Shared by the whole family (and by ``rethink_dpo``): AI-feedback relabelling of the pairs
(§5.4, ``labels=<reward>``) and the implicit-reward preference accuracy (S4.1, Table 2).

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
================  =================================================================================================

Conventions (peers disagree; each is reproducible with ``beta_convention``):

* ``official`` (DiffusionDPO repo): per-pixel MEAN errors, inside = −½ β (Δ_θ − Δ_ref), Δ = err_w − err_l.
* ``diffusers`` (diffusers' example): per-pixel MEAN errors, inside = β (Δ_ref − Δ_θ). So
  ``diffusers`` at β equals ``official`` at 2β.
* ``paper`` (eq. 14 literally, T factored into β): per-sample SUM of squared errors, inside = −β ω(λ_t)(Δ_θ − Δ_ref).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.policy import DiffusionPolicy, cond_cat
from rlkit_diffusion.worlds.base import PairSource, World

BETA_SCALE = {"official": 0.5, "diffusers": 1.0, "paper": 1.0}


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
    implicit_eval_pairs: int = 256
    """Validation pairs scored by the implicit reward at the end of training (Table 2); 0 = skip."""
    implicit_eval_draws: int = 10
    """(t, ε) draws averaged per pair by the implicit reward (S4.1)."""


@dataclass
class DPOL2Config(DPOConfig):
    """Hyper-parameters of the S2 alternative approximation (same fields as Diffusion-DPO)."""


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
    implicit_eval_pairs: int = 256
    """Validation pairs scored by the implicit reward (β = 1: only the sign matters for accuracy); 0 = skip."""
    implicit_eval_draws: int = 10
    """(t, ε) draws averaged per pair by the implicit reward."""


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


def per_sample_error(pred: Tensor, target: Tensor, reduction: Literal["mean", "sum"]) -> Tensor:
    """‖target − pred‖² reduced over every non-batch dim: mean (official/diffusers) or sum (eq. 14). (B,)"""
    err = (pred.float() - target.float()).pow(2).flatten(1)
    return err.mean(1) if reduction == "mean" else err.sum(1)


def beta_scale(convention: str) -> float:
    """s of the convention: inside = −s β ω (…)."""
    if convention not in BETA_SCALE:
        raise ValueError(f"beta_convention must be official|diffusers|paper, got {convention!r}")
    return BETA_SCALE[convention]


def implicit_margin(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    *,
    convention: str = "official",
    weight: Tensor | None = None,
) -> Tensor:
    """The implicit reward margin r(c, x^w_0) − r(c, x^l_0) of one (t, ε) draw, per pair. (B,)

    ``inside = −s β ω(λ_t) [(SE^w_θ − SE^w_ref) − (SE^l_θ − SE^l_ref)]`` — the argument of log σ in eq. 14, and the
    reward difference of eq. 48-49 (written there with the opposite sign; the sign here is the one of eq. 46/14,
    under which a lower error than the reference means a higher reward).
    """
    w = torch.ones_like(model_err_w) if weight is None else weight
    model_diff = model_err_w - model_err_l  # Δ_θ
    ref_diff = ref_err_w - ref_err_l  # Δ_ref
    return -beta_scale(convention) * beta * w * (model_diff - ref_diff)


def preference_accuracy(margin: Tensor) -> Tensor:
    """Fraction of pairs ranked correctly by a margin (ties count ½)."""
    return (margin > 0).float().mean() + 0.5 * (margin == 0).float().mean()


def dpo_loss(
    model_err_w: Tensor,
    model_err_l: Tensor,
    ref_err_w: Tensor,
    ref_err_l: Tensor,
    beta: float,
    *,
    convention: str = "official",
    weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """The Diffusion-DPO loss, eq. 14, from per-sample denoising errors.

    Line by line::

        Δ_θ    = err_θ(x^w_t) − err_θ(x^l_t)          model_diff   (eq. 14, first bracket minus second, θ terms)
        Δ_ref  = err_ref(x^w_t) − err_ref(x^l_t)      ref_diff     (eq. 14, the reference terms)
        inside = −s β ω(λ_t) (Δ_θ − Δ_ref)            s = ½ (official), 1 (diffusers, paper)   (`implicit_margin`)
        L      = −E log σ(inside)                     (eq. 14; the Bradley–Terry likelihood of eq. 3/8)

    Args:
        model_err_w, model_err_l, ref_err_w, ref_err_l: (B,) per-sample errors, already reduced over pixels with
            the convention's reduction (see `per_sample_error`).
        beta: β.
        convention: ``official`` | ``diffusers`` | ``paper`` (module docstring).
        weight: ω(λ_t) per sample (B,), default 1.

    Returns:
        ``loss`` plus logs: ``implicit_acc`` (inside > 0, ties count ½), ``reward_margin`` (mean inside), and the
        four mean errors.
    """
    inside = implicit_margin(
        model_err_w, model_err_l, ref_err_w, ref_err_l, beta, convention=convention, weight=weight
    )  # (B,)
    loss = -F.logsigmoid(inside).mean()  # eq. 14
    return {
        "loss": loss,
        "implicit_acc": preference_accuracy(inside.detach()),
        "reward_margin": inside.detach().mean(),
        "model_mse_w": model_err_w.detach().mean(),
        "model_mse_l": model_err_l.detach().mean(),
        "ref_mse_w": ref_err_w.detach().mean(),
        "ref_mse_l": ref_err_l.detach().mean(),
    }


def dpo_l2_loss(
    dist_w: Tensor,
    dist_l: Tensor,
    beta: float,
    *,
    convention: str = "official",
    weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """The S2 "alternative approximation": q(x_t | x_0) p_θ(x_{t−1} | x_t) instead of q(x_{t−1,t} | x_0).

    Line by line (supp. S2, the last display of "An alternative approximation"; T factored into β)::

        d^w    = ‖ε_θ(x^w_t, t) − ε_ref(x^w_t, t)‖²     dist_w   (2·σ²-scaled KL(p_θ ‖ p_ref) at x^w_t, Jensen step)
        d^l    = ‖ε_θ(x^l_t, t) − ε_ref(x^l_t, t)‖²     dist_l
        inside = −s β ω(λ_t) (d^w − d^l)
        L      = −E log σ(inside)

    Property worth knowing (tested): d^w and d^l are squared distances that vanish at θ = θ_ref together with
    their gradients, so **θ = θ_ref is a stationary point of this loss** — started from the reference, it does not
    move on its own. The expectation over x_{t−1} ~ p_θ removed the data's x_{t−1}, so the loss no longer says in
    which direction to move. ``sft_weight`` > 0 breaks the tie (the toy2d tuning does this).

    Args:
        dist_w, dist_l: (B,) ‖ε_θ − ε_ref‖² on winners and losers, reduced over pixels (mean, or sum for ``paper``).
        beta, convention, weight: as in `dpo_loss`.
    """
    w = torch.ones_like(dist_w) if weight is None else weight
    inside = -beta_scale(convention) * beta * w * (dist_w - dist_l)  # (B,)
    loss = -F.logsigmoid(inside).mean()
    return {
        "loss": loss,
        "implicit_acc": preference_accuracy(inside.detach()),
        "reward_margin": inside.detach().mean(),
        "dist_w": dist_w.detach().mean(),
        "dist_l": dist_l.detach().mean(),
    }


def sft_loss(model_err_w: Tensor, weight: Tensor | None = None) -> dict[str, Tensor]:
    """Supervised fine-tuning on the winners: the diffusion loss of eq. 2 on x^w_0 only.

    ``L = E_{(c, x^w_0), t, ε} ω(λ_t) ‖ε − ε_θ(x^w_t, t, c)‖²`` (per-pixel mean).
    """
    w = torch.ones_like(model_err_w) if weight is None else weight
    return {"loss": (w * model_err_w).mean(), "model_mse_w": model_err_w.detach().mean()}


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


# --------------------------------------------------------------------------------------------------------------
# AI feedback (§5.4) and the implicit reward (S4.1, Table 2)
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
        total += implicit_margin(m_err[:b], m_err[b:], r_err[:b], r_err[b:], beta, convention=convention)
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


def implicit_reward_accuracy(
    policy: DiffusionPolicy,
    ref_policy: DiffusionPolicy,
    pairs: PairSource,
    encoder: Any,
    *,
    n_pairs: int = 512,
    batch_size: int = 256,
    n_draws: int = 10,
    beta: float = 1.0,
    convention: str = "official",
    seed: int = 0,
) -> dict[str, float]:
    """Preference accuracy of the implicit reward on validation pairs (Table 2).

    Each pair (c, x^w, x^l) counts as correct when `implicit_reward_margin` (x^A = x^w, x^B = x^l) is > 0, ½ on a
    tie — so a policy equal to its reference scores exactly 0.5. The pair stream is rewound afterwards (its
    ``state_dict``), so the same pairs are scored every time and the stream is not consumed.

    Returns ``{"implicit_acc": ..., "implicit_margin": mean margin}``.
    """
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
                    encoder(prompts),
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
    return {"implicit_acc": float(preference_accuracy(margin)), "implicit_margin": float(margin.mean())}


@torch.no_grad()
def reward_preference_accuracy(
    world: World, pairs: PairSource, names: list[str], *, n_pairs: int = 512, batch_size: int = 256
) -> dict[str, float]:
    """Preference accuracy of explicit reward models on validation pairs (the other rows of Table 2).

    A pair (c, x^w, x^l) counts as correct when r(c, D(x^w)) > r(c, D(x^l)), ½ on a tie: the same rule and the same
    pairs as `implicit_reward_accuracy` (the stream is rewound afterwards). Returns ``{"reward_acc_<name>": ...}``.
    """
    margins: dict[str, list[Tensor]] = {name: [] for name in names}
    for prompts, x_w, x_l in validation_batches(pairs, n_pairs, batch_size):
        images = world.decode(torch.cat([x_w, x_l]))  # (2B, ...): winners then losers
        for name in names:
            r = world.reward(name)(images, list(prompts) * 2).float()  # (2B,)
            margins[name].append(r[: len(prompts)] - r[len(prompts) :])
    return {f"reward_acc_{name}": float(preference_accuracy(torch.cat(m))) for name, m in margins.items()}


# --------------------------------------------------------------------------------------------------------------
# The algorithms
# --------------------------------------------------------------------------------------------------------------
class DPO(AlgorithmDefaults):
    """Diffusion-DPO on the world's preference pairs (``world.pairs``)."""

    name = "dpo"
    config_class = DPOConfig

    def setup(self, ctx: AlgoContext) -> None:
        super().setup(ctx)
        if ctx.world.pairs is None:
            raise ValueError(f"algo {self.name!r} needs preference pairs, but world {ctx.world.name!r} has none")
        labels = self.config.labels
        if labels != "data" and labels not in ctx.world.rewards:
            raise ValueError(
                f"{self.name}: labels={labels!r} is neither 'data' nor a reward of world {ctx.world.name!r} "
                f"(available: {sorted(ctx.world.rewards)})"
            )
        self.reference = ctx.base
        T = ctx.policy.num_train_timesteps
        self.t_max = self.config.t_max if self.config.t_max is not None else T
        if not 0 <= self.config.t_min < self.t_max <= T:
            raise ValueError(f"{self.name}: need 0 <= t_min < t_max <= {T}, got {self.config.t_min}, {self.t_max}")
        self.label_flips = 0.0

    def collect(self) -> tuple[list[str], Tensor, Tensor]:
        prompts, x_w, x_l = self.ctx.world.pairs.next_batch(self.ctx.batch_size)
        self.ctx.counters.samples += len(prompts)
        if self.config.labels != "data":
            x_w, x_l, swapped = rank_pairs(self.ctx, self.config.labels, prompts, x_w, x_l)
            self.label_flips = float(swapped.float().mean())
        return prompts, x_w, x_l

    def predictions(self, prompts: list[str], x_w: Tensor, x_l: Tensor) -> dict[str, Tensor]:
        """Shared (t, ε) draw → policy and reference outputs on winners and losers (rows [:B] winners), ω(λ_t)."""
        ctx, cfg = self.ctx, self.config
        cond = ctx.world.encoder(prompts)
        t = sample_timesteps(len(prompts), cfg.t_min, self.t_max, ctx.generator, ctx.device)
        noise = torch.randn(x_w.shape, generator=ctx.generator).to(ctx.device)
        model_pred, ref_pred, target = paired_predictions(ctx.policy, self.reference.policy, x_w, x_l, cond, t, noise)
        weight = snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting)
        return {"model": model_pred, "ref": ref_pred, "target": target, "weight": weight, "t": t}

    def errors(self, prompts: list[str], x_w: Tensor, x_l: Tensor) -> dict[str, Tensor]:
        """Shared (t, ε) draw → per-sample model/reference errors on winners and losers, and ω(λ_t)."""
        p = self.predictions(prompts, x_w, x_l)
        b = len(prompts)
        reduction = "sum" if self.config.beta_convention == "paper" else "mean"
        m_err = per_sample_error(p["model"], p["target"], reduction)
        r_err = per_sample_error(p["ref"], p["target"], reduction)
        return {
            "model_w": m_err[:b],
            "model_l": m_err[b:],
            "ref_w": r_err[:b],
            "ref_l": r_err[b:],
            "weight": p["weight"],
            "t": p["t"],
        }

    def loss(self, batch) -> dict[str, Tensor]:
        e = self.errors(*batch)
        out = dpo_loss(
            e["model_w"],
            e["model_l"],
            e["ref_w"],
            e["ref_l"],
            self.config.beta,
            convention=self.config.beta_convention,
            weight=e["weight"],
        )
        return self._extras(out, e["model_w"])

    def _extras(self, out: dict[str, Tensor], model_err_w: Tensor) -> dict[str, Tensor]:
        """Options shared by the family: the SFT term on the winners and the AI-feedback log."""
        if getattr(self.config, "sft_weight", 0.0) > 0:
            out["loss_sft"] = self.config.sft_weight * model_err_w.mean()
        if self.config.labels != "data":
            out["label_flips"] = torch.tensor(self.label_flips)
        return out

    def eval_metrics(self) -> dict[str, float]:
        """Implicit-reward preference accuracy on the validation pairs against the pretrained model (Table 2)."""
        ctx, cfg = self.ctx, self.config
        if cfg.implicit_eval_pairs <= 0 or ctx.world.val_pairs is None:
            return {}
        out = implicit_reward_accuracy(
            ctx.policy,
            ctx.base.policy,
            ctx.world.val_pairs,
            ctx.world.encoder,
            n_pairs=cfg.implicit_eval_pairs,
            n_draws=cfg.implicit_eval_draws,
            beta=getattr(cfg, "beta", 1.0),
            convention=getattr(cfg, "beta_convention", "official"),
        )
        # Table 2's other rows: the explicit rewards on the same validation pairs.
        names = [n for n in ctx.world.rewards if not n.startswith("jpeg")]
        out.update(reward_preference_accuracy(ctx.world, ctx.world.val_pairs, names, n_pairs=cfg.implicit_eval_pairs))
        return out


class DPOL2(DPO):
    """The S2 alternative approximation (`dpo_l2_loss`): the same pairs, (t, ε) draws and reference as DPO."""

    name = "dpo_l2"
    config_class = DPOL2Config

    def loss(self, batch) -> dict[str, Tensor]:
        prompts = batch[0]
        b = len(prompts)
        p = self.predictions(*batch)
        reduction = "sum" if self.config.beta_convention == "paper" else "mean"
        dist = per_sample_error(p["model"], p["ref"], reduction)  # (2B,) ‖ε_θ − ε_ref‖²
        out = dpo_l2_loss(
            dist[:b], dist[b:], self.config.beta, convention=self.config.beta_convention, weight=p["weight"]
        )
        return self._extras(out, per_sample_error(p["model"][:b], p["target"][:b], reduction))


class SFT(DPO):
    """Supervised fine-tuning on the winners (`sft_loss`); the losers and the reference are not used."""

    name = "sft"
    config_class = SFTConfig

    def loss(self, batch) -> dict[str, Tensor]:
        ctx, cfg = self.ctx, self.config
        prompts, x_w, _ = batch
        t = sample_timesteps(len(prompts), cfg.t_min, self.t_max, ctx.generator, ctx.device)
        noise = torch.randn(x_w.shape, generator=ctx.generator).to(ctx.device)
        x_t = ctx.policy.add_noise(x_w, noise, t)  # q(x^w_t | x^w_0), eq. 2
        pred = ctx.policy.model_output(x_t, t, ctx.world.encoder(prompts))
        err = per_sample_error(pred, ctx.policy.training_target(x_w, noise, t), "mean")  # (B,)
        out = sft_loss(err, snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting))
        return self._extras(out, err)
