"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117).

Online and sampler-agnostic: sample clean images x_0 with the current "old" policy (any sampler, no trajectory and no
log-probability kept), score them with the optimised reward, turn the rewards into an optimality probability
r ∈ [0, 1], and train on the FORWARD process only (x_t = α_t x_0 + σ_t ε with fresh ε, like pretraining). The
reward enters through two implicit policies built from the trained network and the frozen-per-batch old one:

    positive  ε⁺_θ = (1 − β) ε_old + β ε_θ           (the policy improved toward the good samples)
    negative  ε⁻_θ = (1 + β) ε_old − β ε_θ           (its mirror image about ε_old)
    L(θ) = E_{c, x_0 ~ π_old, t, ε} [ r ‖ε⁺_θ − ε‖²_w + (1 − r) ‖ε⁻_θ − ε‖²_w ] / β

so the positive policy fits the good samples and the negative one the bad samples; at the optimum ε_θ moves from ε_old
toward the good data's score and away from the bad data's — a policy-improvement direction learned by regression,
with no likelihood and no classifier-free guidance (each of ε⁺, ε⁻ is one conditional forward).

**From the paper's velocity form to ε-prediction.** The paper writes the loss with flow-matching velocities v. For a
forward process x_t = α_t x_0 + σ_t ε the velocity is v = α'_t x_0 + σ'_t ε, and a network's x̂_0 and v̂ are
functions of its ε̂ at fixed x_t: x̂_0 = (x_t − σ_t ε̂)/α_t, v̂ = α'_t x̂_0 + σ'_t ε̂, so

    v̂ − v = (σ'_t − α'_t σ_t/α_t)(ε̂ − ε) = ((α_t σ'_t − α'_t σ_t)/α_t)(ε̂ − ε),    x̂_0 − x_0 = −(σ_t/α_t)(ε̂ − ε).

Both maps are affine in ε̂ with the same coefficients for every network at the same x_t, so the implicit policies
carry over unchanged (ε⁺ = (1 − β)ε_old + β ε_θ ⇔ v⁺ = (1 − β)v_old + β v_θ), and only the per-t weight of the squared
error changes: ‖v̂ − v‖² = w(t)‖ε̂ − ε‖² with w(t) = ((α σ' − α' σ)/α)². For rectified flow (α = 1 − t, σ = t) and for
the variance-preserving schedule here (α = cos φ, σ = sin φ in the angle φ) α σ' − α' σ = 1, so w(t) = 1/α_t² = 1/ᾱ_t.

**On a flow policy** (`FlowMatchingPolicy`, x_σ = (1 − σ) x_0 + σ ε) the network predicts v̂ itself and the loss is
the paper's velocity form as written: the same lines with ε̂ → v̂ and the target ε → v = ε − x_0
(``policy.training_target``). The residual factors become x̂_0 − x_0 = −σ (v̂ − v) (``adaptive``: σ), 1
(``velocity``) and ε̂ − ε = (1 − σ)(v̂ − v) (``eps``: 1 − σ) — `flow_residual_scale`.

Notation (code name → paper symbol):

================  ==================================================================================================
``eps_theta``     ε_θ(x_t, t, c), the trained network (v_θ in the paper, and on a flow policy)
``eps_old``       ε_old(x_t, t, c), the sampling ("old") policy, no gradient (v^old)
``eps``           ε, the forward-process noise (the target; v = ε − x_0 in the paper, and on a flow policy)
``r``             optimality probability r ∈ [0, 1] of each sample (detail 2)
``beta``          β, the guidance strength of the implicit policies
``scale``         per-sample factor of the residual: σ_t/α_t (x_0 error, ``adaptive``), 1/α_t (v error), 1 (ε error);
                  flow: σ, 1, 1 − σ
================  ==================================================================================================

Implementation details (numbered):

1. Collection: B/G prompts c ~ p(c), each G = ``group_size`` times; x_0 from the old policy through the MDP rollout
   (the world's sampler, any η, no trajectory kept), rewards r_raw = R(c, x_0) through ``ctx.reward`` (counted),
   gathered over processes.
2. Optimality probability (the paper's normalisation): r_norm = (r_raw − mean_c r_raw) / Z with the per-prompt mean of
   the gathered batch and Z the batch's global standard deviation of r_raw − mean_c; r = ½ + ½ clip(r_norm / c, −1, 1)
   with c = ``adv_clip`` (the paper's c = 1). A prompt drawn once has r_norm = 0 (r = ½: no signal).
3. Weighting ``adaptive`` (the paper's default): the residual in x_0-space, d = (σ_t/α_t)(ε̂ − ε) = −(x̂_0 − x_0), and
   ‖d‖² / sg(mean|d|) per sample (mean over dims, the denominator clipped at 1e-5), for ε⁺ and ε⁻ separately;
   ``velocity``: the v-loss exactly, w(t) = 1/ᾱ_t; ``eps``: the plain ε-loss.
4. Old policy: a copy of the network (``reference``, checkpointed), updated before every collection after the
   first as θ_old ← η_i θ_old + (1 − η_i) θ with η_i = min(``old_decay_ramp`` · i, ``old_decay_max``) (the paper's
   soft update, i = collections so far). It samples the data and gives ε_old for the whole batch.
5. Each collected batch gives ``num_minibatches`` optimizer steps (samples shuffled and split; each step draws its
   own t ~ U{t_min, …, t_max − 1} and ε per sample). ε-prediction networks (the conversion above) and flow
   policies (the velocity form itself) are accepted; v- or x_0-prediction UNets are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from algos.ddpo import _gather_strings
from algos.grpo import grouped_prompts
from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.preference import sample_timesteps
from rlkit_diffusion.reference import Reference

WEIGHTINGS = ("adaptive", "velocity", "eps")


@dataclass
class NFTConfig:
    """DiffusionNFT hyper-parameters."""

    beta: float = 1.0
    """β, the strength of the implicit positive/negative policies (the paper's default 1)."""
    weighting: str = "adaptive"
    """Squared-error weight (detail 3): ``adaptive`` (x_0-space residual over its detached mean |·|, the paper's),
    ``velocity`` (the v-loss, w(t) = 1/ᾱ_t) or ``eps`` (the ε-loss)."""
    adv_clip: float = 1.0
    """c of r = ½ + ½ clip(r_norm / c, −1, 1) (detail 2)."""
    num_minibatches: int = 1
    """Optimizer steps per collected batch (detail 5)."""
    old_decay_ramp: float = 0.001
    """η_i = min(ramp · i, max): the old policy's soft-update decay after i collections (detail 4)."""
    old_decay_max: float = 0.5
    """Upper bound of η_i (detail 4)."""
    group_size: int = 8
    """G, samples per caption in a collected batch: B/G captions, each G times, so that every caption's mean reward is
    a baseline (detail 2; DiffusionNFT samples a group of images per prompt). 1 = captions drawn independently, which
    groups them only by chance (often on toy2d's 6 captions; on shapes' 64 most rows would get r = ½, no signal)."""
    t_min: int = 0
    """Smallest training timestep drawn."""
    t_max: int | None = None
    """One past the largest training timestep drawn; None = T."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------
def optimality_probability(rewards: Tensor, prompts: list[str], clip: float = 1.0) -> Tensor:
    """r = ½ + ½ clip((r_raw − mean_c r_raw) / Z / c, −1, 1), Z = global std of the centred rewards (detail 2). (B,)"""
    r_raw = rewards.double()
    centred = torch.empty_like(r_raw)
    for p in set(prompts):
        rows = torch.tensor([i for i, q in enumerate(prompts) if q == p], device=r_raw.device)
        centred[rows] = r_raw[rows] - r_raw[rows].mean()
    z = centred.std(unbiased=False).clamp(min=1e-8)
    return (0.5 + 0.5 * (centred / z / clip).clamp(-1.0, 1.0)).to(rewards.dtype)


def residual_scale(alpha_bar: Tensor, weighting: str) -> Tensor:
    """Per-sample factor of ε̂ − ε (detail 3): σ_t/α_t (``adaptive``), 1/α_t (``velocity``), 1 (``eps``). (B,)"""
    if weighting == "adaptive":
        return ((1 - alpha_bar) / alpha_bar).sqrt()
    if weighting == "velocity":
        return alpha_bar.rsqrt()
    if weighting == "eps":
        return torch.ones_like(alpha_bar)
    raise ValueError(f"nft: weighting must be one of {'|'.join(WEIGHTINGS)}, got {weighting!r}")


def flow_residual_scale(sigma: Tensor, weighting: str) -> Tensor:
    """Per-sample factor of v̂ − v on a flow policy: σ (x_0 error, ``adaptive``), 1 (``velocity``), 1 − σ (ε error).
    (B,)"""
    if weighting == "adaptive":
        return sigma
    if weighting == "velocity":
        return torch.ones_like(sigma)
    if weighting == "eps":
        return 1 - sigma
    raise ValueError(f"nft: weighting must be one of {'|'.join(WEIGHTINGS)}, got {weighting!r}")


def _weighted_error(d: Tensor, adaptive: bool) -> Tensor:
    """mean(d²) per sample, divided by sg(mean|d|) (clipped at 1e-5) when ``adaptive``. (B,)"""
    sq = d.pow(2).flatten(1).mean(1)
    if not adaptive:
        return sq
    return sq / d.detach().abs().flatten(1).mean(1).clamp(min=1e-5)


def nft_loss(
    eps_theta: Tensor,
    eps_old: Tensor,
    eps: Tensor,
    r: Tensor,
    beta: float,
    *,
    scale: Tensor | None = None,
    adaptive: bool = False,
) -> dict[str, Tensor]:
    """The DiffusionNFT loss (arXiv 2509.16117, the policy-optimisation objective) in ε-prediction form.

    Line by line (the paper's v-lines with v → ε, detail 3 for the weight)::

        ε⁺ = (1 − β) ε_old + β ε_θ                 implicit positive policy   (paper: v⁺ = (1 − β) v_old + β v_θ)
        ε⁻ = (1 + β) ε_old − β ε_θ                 implicit negative policy   (paper: v⁻ = (1 + β) v_old − β v_θ)
        d± = scale_t (ε± − ε)                      residual in x_0 (σ/α), v (1/α) or ε (1) units
        L± = ‖d±‖² [/ sg(mean|d±|)]                per-sample error (pixel mean; adaptive normalisation)
        L  = E[r L⁺ + (1 − r) L⁻] / β              reward-weighted forward-process loss

    Args:
        eps_theta: (B, ...) ε_θ(x_t, t, c) with gradient.
        eps_old: (B, ...) ε_old(x_t, t, c), no gradient.
        eps: (B, ...) the forward-process noise.
        r: (B,) optimality probabilities in [0, 1].
        beta: β > 0.
        scale: (B,) factor of the residual (`residual_scale`), default 1.
        adaptive: divide each sample's error by its detached mean absolute residual.

    Returns:
        ``loss`` plus logs ``loss_pos``/``loss_neg`` (mean L⁺, L⁻), ``r_mean`` and ``old_gap`` = mean ‖ε_θ − ε_old‖².
    """
    if beta <= 0:
        raise ValueError(f"nft: beta must be > 0, got {beta}")
    eps_theta, eps_old, eps = eps_theta.float(), eps_old.detach().float(), eps.float()
    pos = (1 - beta) * eps_old + beta * eps_theta  # (B, ...) ε⁺
    neg = (1 + beta) * eps_old - beta * eps_theta  # (B, ...) ε⁻
    s = torch.ones(eps.shape[0], device=eps.device) if scale is None else scale.float()
    s = s.reshape(-1, *([1] * (eps.ndim - 1)))
    l_pos = _weighted_error(s * (pos - eps), adaptive)  # (B,)
    l_neg = _weighted_error(s * (neg - eps), adaptive)  # (B,)
    loss = (r * l_pos + (1 - r) * l_neg).mean() / beta
    return {
        "loss": loss,
        "loss_pos": l_pos.detach().mean(),
        "loss_neg": l_neg.detach().mean(),
        "r_mean": r.detach().float().mean(),
        "old_gap": (eps_theta.detach() - eps_old).pow(2).flatten(1).mean(1).mean(),
    }


# --------------------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------------------
@dataclass
class NFTBatch:
    """Clean samples of the old policy and their optimality probabilities."""

    prompts: list[str]
    x0: Tensor  # (B, ...)
    r: Tensor  # (B,) optimality probability
    rewards: Tensor  # (B,) raw rewards (logged)


class NFT(AlgorithmDefaults):
    """DiffusionNFT on the env's reward (details 1-5 of the module docstring)."""

    name = "nft"
    config_class = NFTConfig

    def configure(self, ctx: AlgoContext, cfg: NFTConfig) -> None:
        residual_scale(torch.ones(1), cfg.weighting)  # fails at once on a typo
        if cfg.beta <= 0 or cfg.adv_clip <= 0 or cfg.num_minibatches < 1:
            raise ValueError("nft: need beta > 0, adv_clip > 0 and num_minibatches >= 1")
        if cfg.group_size < 1 or ctx.batch_size % cfg.group_size:
            raise ValueError(
                f"nft: train.batch_size={ctx.batch_size} must be a multiple of algo.group_size={cfg.group_size} "
                "(the batch holds batch_size/group_size captions, group_size samples each)"
            )
        if not 0.0 <= cfg.old_decay_max < 1.0 or cfg.old_decay_ramp < 0:
            raise ValueError("nft: need 0 <= old_decay_max < 1 and old_decay_ramp >= 0")
        if ctx.policy.prediction_type not in ("epsilon", "flow"):
            raise ValueError(
                f"nft works on ε-prediction networks and flow policies, got prediction_type="
                f"{ctx.policy.prediction_type!r}"
            )
        T = ctx.policy.num_train_timesteps
        self.t_max = T if cfg.t_max is None else cfg.t_max
        if not 0 <= cfg.t_min < self.t_max <= T:
            raise ValueError(f"nft: need 0 <= t_min < t_max <= {T}, got {cfg.t_min}, {self.t_max}")
        self.reference = Reference(ctx.policy, "ema", ema_decay=0.0)  # θ_old, detail 4
        self.collections = 0

    def collect(self) -> NFTBatch:
        ctx, cfg = self.ctx, self.config
        if self.collections > 0:  # detail 4: soft update before sampling
            self.reference.ema_decay = min(cfg.old_decay_ramp * self.collections, cfg.old_decay_max)
            self.reference.update(self.collections)
        self.collections += 1
        prompts = grouped_prompts(ctx.env, ctx.batch_size // cfg.group_size, cfg.group_size, ctx.generator)  # (B,)
        with torch.no_grad():
            ro = ctx.env.rollout(self.reference.policy, prompts, generator=ctx.generator, with_reward=False)
            rewards = ctx.reward(ctx.env.reward_model, ctx.world.decode(ro.x0), prompts)  # (B,)
        all_r, all_p = ctx.gather(rewards), _gather_strings(ctx, prompts)
        rank = ctx.accelerator.process_index if ctx.accelerator is not None else 0
        b = len(prompts)
        r = optimality_probability(all_r, all_p, cfg.adv_clip)[rank * b : (rank + 1) * b].to(rewards.device)
        ctx.counters.samples += b
        return NFTBatch(prompts=prompts, x0=ro.x0.detach(), r=r, rewards=rewards)

    def minibatches(self, batch: NFTBatch) -> Iterator[NFTBatch]:
        n = len(batch.prompts)
        perm = torch.randperm(n, generator=self.ctx.generator)
        for chunk in perm.chunk(self.config.num_minibatches):
            idx = chunk.tolist()
            rows = chunk.to(batch.x0.device)
            yield NFTBatch([batch.prompts[i] for i in idx], batch.x0[rows], batch.r[rows], batch.rewards[rows])

    def loss(self, mb: NFTBatch) -> dict[str, Tensor]:
        ctx, cfg = self.ctx, self.config
        t = sample_timesteps(len(mb.prompts), cfg.t_min, self.t_max, ctx.generator, ctx.device)  # (B,)
        noise = torch.randn(mb.x0.shape, generator=ctx.generator).to(ctx.device)  # (B, ...) ε
        x_t = ctx.policy.add_noise(mb.x0, noise, t)  # forward process q(x_t | x_0)
        cond = ctx.world.encoder(mb.prompts)
        with torch.no_grad():
            eps_old = self.reference.policy.model_output(x_t, t, cond)
        eps_theta = ctx.policy.model_output(x_t, t, cond)
        target = ctx.policy.training_target(mb.x0, noise, t)  # ε, or v = ε − x_0 on a flow policy
        if ctx.policy.prediction_type == "flow":
            scale = flow_residual_scale(ctx.policy.sigma(t).float(), cfg.weighting)
        else:
            scale = residual_scale(ctx.policy.alphas_cumprod[t].float(), cfg.weighting)
        out = nft_loss(eps_theta, eps_old, target, mb.r, cfg.beta, scale=scale, adaptive=cfg.weighting == "adaptive")
        out["reward_mean"] = mb.rewards.float().mean()
        return out

    def state_dict(self) -> dict:
        return {"collections": self.collections}

    def load_state_dict(self, state: dict) -> None:
        self.collections = int(state.get("collections", 0))
