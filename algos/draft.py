"""Reward backpropagation through the sampler: DRaFT-K, DRaFT-LV (Clark et al.) and AlignProp (Prabhudesai et al.).

These maximise E_c E_{x_0 ~ p_θ(·|c)} r(c, x_0) (Diffusion-DPO supp. eq. 15) by differentiating the reward of a
sample with respect to θ through the ONE sampling loop (`DiffusionPolicy.sample`); the reward must therefore be
differentiable (checked at set-up). Optionally (DRaFT+) an ε-space penalty keeps the policy near the reference.

Notation:

==============  =============================================================================================
``K``           number of final sampling steps that carry gradient (``sample(grad="last_k", k=K)``); the
                N − K earlier steps run without autograd and their output is a constant (a leaf)
``x0``          x_0 of the rollout (depends on θ through the last K steps only)
``t1``          the timestep of the first tracked step, t_K (= the last step's t for K = 1)
``n``           DRaFT-LV: number of re-noised copies of x_0
``kl_weight``   DRaFT+: weight of E ‖ε_θ(x_t, t, c) − ε_ref(x_t, t, c)‖² at the tracked states
==============  =============================================================================================

Exact losses (B prompts, r = the env's reward of the decoded sample):

* DRaFT-K:   L = −(1/B) Σ_b r(c_b, x0_b)
* DRaFT-LV:  x0 from a K-step-tracked rollout (K = 1 in the paper); n re-noised copies
  x^{(j)}_{t_K} = √ᾱ_{t_K} sg(x0) + √(1 − ᾱ_{t_K}) ε_j, each denoised again by the last K steps (with gradient)
  into x̂^{(j)}_0;  L = −1/(B(n+1)) Σ_b [r(c_b, x0_b) + Σ_{j=1..n} r(c_b, x̂^{(j)}_{0,b})]
* AlignProp: DRaFT-K with K drawn once per rollout (``fixed``: K; ``uniform``: K ~ U{k_min..k_max};
  ``gaussian``: K = round(N(k_mean, k_std)) clipped to [k_min, k_max]) and per-step gradient checkpointing.
* DRaFT+ (any of them, ``kl_weight`` > 0): + kl_weight · (1/|S|) Σ_{(b,t) ∈ tracked} mean_d (ε_θ − ε_ref)², the
  ε-predictions evaluated at the visited (detached) states x_t of the tracked steps; the reference under no_grad.

Where DRaFT truncates (a stated convention): K counts steps of the env's schedule, the last ones; a schedule whose
final step is the identity (DDIM to ᾱ_final = ᾱ_t, e.g. toy2d's t = 0 → ᾱ_0) gives K = 1 no gradient at all, so
toy2d's tuning uses K ≥ 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.policy import Schedule, cond_cat


@dataclass
class DRaFTConfig:
    """DRaFT-K hyper-parameters."""

    k: int = 1
    """K: the number of final sampling steps that carry gradient (the paper's DRaFT-1 is K = 1)."""
    checkpoint: bool = False
    """Recompute each tracked step in the backward pass (memory flat in K)."""
    kl_weight: float = 0.0
    """DRaFT+: weight of the ε-space penalty to the reference at the tracked states (0 = off)."""
    allow_gradient_free: bool = False
    """Accept a K whose tracked steps are all identity steps (no gradient reaches the network; set-up refuses it
    otherwise). Only for cost measurements (`benchmarks.perf`)."""


def identity_tail(policy, schedule: Schedule) -> int:
    """How many final steps of ``schedule`` are the identity: DDIM from ᾱ_t to ᾱ_prev = ᾱ_t (the last step t = 0 →
    ᾱ_final = ᾱ_0 of a scheduler with ``set_alpha_to_one=False``) returns x_t unchanged for any ε, so a gradient
    truncated to those steps is exactly zero."""
    a_t = policy.alpha_bar(schedule.timesteps)  # (n,)
    a_prev = policy.alpha_bar(schedule.prev_timesteps)
    same = (a_t == a_prev).tolist()
    tail = 0
    for flag in reversed(same):
        if not flag:
            break
        tail += 1
    return tail


@dataclass
class DRaFTLVConfig(DRaFTConfig):
    """DRaFT-LV: DRaFT-K (K = 1 in the paper) plus n re-noised one-step copies of x_0."""

    n: int = 2
    """Re-noised copies of the final sample whose rewards are averaged with the sample's own (the paper: n = 2)."""


@dataclass
class AlignPropConfig(DRaFTConfig):
    """AlignProp: randomised truncation drawn once per rollout, gradient checkpointing on."""

    truncation: str = "uniform"
    """How K is drawn per rollout: ``fixed`` (K = k), ``uniform`` (K ~ U{k_min..k_max}) or ``gaussian``."""
    k_min: int = 1
    """Smallest K (uniform/gaussian)."""
    k_max: int | None = None
    """Largest K (uniform/gaussian); None = N, the whole chain."""
    k_mean: float = 10.0
    """Mean of K for ``gaussian``."""
    k_std: float = 3.0
    """Standard deviation of K for ``gaussian``."""
    checkpoint: bool = True
    """Per-step gradient checkpointing (AlignProp's memory saver)."""


def draft_loss(rewards: Tensor, eps_sq: Tensor | None = None, kl_weight: float = 0.0) -> dict[str, Tensor]:
    """The reward-backprop loss (module docstring).

    Line by line::

        L_r  = −mean over copies and batch of r            rewards (B,) or (n+1, B): DRaFT-K / DRaFT-LV
        L_kl = kl_weight · mean of (ε_θ − ε_ref)²          eps_sq (M, ...) at the tracked states (DRaFT+)

    Returns ``loss`` (and ``loss_kl``) plus ``reward_mean`` (of the sample itself, row 0 for LV).
    """
    out = {"loss": -rewards.mean(), "reward_mean": (rewards[0] if rewards.ndim == 2 else rewards).detach().mean()}
    if eps_sq is not None and kl_weight > 0:
        out["loss_kl"] = kl_weight * eps_sq.mean()
        out["eps_kl"] = eps_sq.detach().mean()
    return out


class DRaFT(AlgorithmDefaults):
    """DRaFT-K: backpropagate the reward of each rollout through its last K steps (``sample(grad="last_k")``)."""

    name = "draft"
    config_class = DRaFTConfig

    def configure(self, ctx: AlgoContext, cfg: DRaFTConfig) -> None:
        reward = ctx.env.reward_model
        if not getattr(reward, "differentiable", False):
            raise ValueError(
                f"{self.name} backpropagates through the reward, but reward {ctx.env.reward_name!r} "
                f"({type(reward).__name__}) is not differentiable; choose a differentiable reward (reward=...) "
                "or an RL algorithm (ddpo, dpok)"
            )
        if isinstance(reward, nn.Module):  # the reward is a frozen critic: it never receives gradient
            reward.requires_grad_(False)
        n = len(ctx.env.schedule)
        for k in self.k_range():
            if not 0 < k <= n:
                raise ValueError(f"{self.name}: K must be in [1, {n}] for a {n}-step schedule, got {k}")
        tail = identity_tail(ctx.policy, ctx.env.schedule)
        k_lo, k_hi = self.k_range()
        if k_lo <= tail and not cfg.allow_gradient_free:
            raise ValueError(
                f"{self.name}: the last {tail} step(s) of this {n}-step schedule are the identity (t = "
                f"{int(ctx.env.schedule.timesteps[-1])} → ᾱ_prev = ᾱ_t), so K = {k_lo} carries no gradient to the "
                f"network; use K ≥ {tail + 1} (algo.k, or algo.k_min for randomised truncation)"
            )
        if cfg.kl_weight > 0:
            self.reference = ctx.base

    def k_range(self) -> tuple[int, int]:
        """Smallest and largest K this algorithm can draw (validated at set-up)."""
        return self.config.k, self.config.k

    def draw_k(self) -> int:
        return self.config.k

    def collect(self) -> list[str]:
        prompts = self.ctx.env.sample_prompts(self.ctx.batch_size, self.ctx.generator)
        self.ctx.counters.samples += len(prompts)
        return prompts

    def loss(self, prompts: list[str]) -> dict[str, Tensor]:
        ctx, cfg = self.ctx, self.config
        k = self.draw_k()
        ro = ctx.env.rollout(
            ctx.policy,
            prompts,
            generator=ctx.generator,
            with_reward=False,
            grad="last_k",
            k=k,
            checkpoint=cfg.checkpoint,
            return_trajectory=cfg.kl_weight > 0,
        )
        rewards = self.rewards(ro.x0, prompts, ro.cond, k)  # (B,) or (n+1, B)
        eps_sq = self.eps_penalty(ro, k) if cfg.kl_weight > 0 else None
        out = draft_loss(rewards, eps_sq, cfg.kl_weight)
        out["k"] = torch.tensor(float(k))
        return out

    def rewards(self, x0: Tensor, prompts: list[str], cond, k: int) -> Tensor:
        """r(c, x_0) with gradient, counted (``ctx.reward`` over ``env.terminal_reward``)."""
        return self.ctx.reward(self.ctx.env.terminal_reward, x0, prompts)

    def eps_penalty(self, ro, k: int) -> Tensor:
        """DRaFT+: (ε_θ − ε_ref)² at the detached states of the last k steps, ONE batched forward each (the
        trajectory re-scored by `DenoisingCore.rescore` under the policy and the reference). (kB, ...)"""
        env = self.ctx.env
        n, b = env.horizon, len(ro.prompts)
        x_t = torch.cat([ro.sample.latents[i].detach() for i in range(n - k, n)])  # (kB, ...)
        index = torch.arange(n - k, n).repeat_interleave(b)  # (kB,) schedule positions
        cond = cond_cat([ro.cond] * k)
        eps = env.rescore(self.ctx.policy, x_t, index, cond).eps
        with torch.no_grad():
            eps_ref = env.rescore(self.reference.policy, x_t, index, cond).eps
        return (eps - eps_ref).pow(2)


class DRaFTLV(DRaFT):
    """DRaFT-LV: the sample's reward averaged with n re-noised, re-denoised copies (module docstring)."""

    name = "draft_lv"
    config_class = DRaFTLVConfig

    def rewards(self, x0: Tensor, prompts: list[str], cond, k: int) -> Tensor:
        ctx, n = self.ctx, self.config.n
        b = len(prompts)
        sched = ctx.env.schedule
        tail = Schedule(sched.timesteps[-k:], sched.prev_timesteps[-k:])  # the tracked steps t_K … t_1
        noise = torch.randn((n * b, *x0.shape[1:]), generator=ctx.generator).to(x0.device)
        t_k = tail.timesteps[:1].expand(n * b).to(x0.device)
        x_tk = ctx.env.forward_process(x0.detach().repeat(n, *([1] * (x0.ndim - 1))), t_k, noise)  # q(x_{t_K} | x_0)
        again = ctx.policy.sample(
            x_tk,
            cond_cat([cond] * n),
            schedule=tail,
            uncond=ctx.world.uncond(n * b),
            guidance_scale=ctx.world.guidance_scale,
            grad="full",
            checkpoint=self.config.checkpoint,
            generator=ctx.generator,
        )
        r = ctx.reward(ctx.env.terminal_reward, torch.cat([x0, again.x0]), prompts * (n + 1))  # ((n+1)B,)
        return r.reshape(n + 1, b)


class AlignProp(DRaFT):
    """AlignProp: DRaFT-K with K drawn once per rollout and per-step gradient checkpointing."""

    name = "alignprop"
    config_class = AlignPropConfig

    def configure(self, ctx: AlgoContext, cfg: AlignPropConfig) -> None:
        if cfg.truncation not in ("fixed", "uniform", "gaussian"):
            raise ValueError(f"alignprop: truncation must be fixed|uniform|gaussian, got {cfg.truncation!r}")
        self._n = len(ctx.env.schedule)
        super().configure(ctx, cfg)

    def k_range(self) -> tuple[int, int]:
        cfg = self.config
        if cfg.truncation == "fixed":
            return cfg.k, cfg.k
        return cfg.k_min, cfg.k_max if cfg.k_max is not None else self._n

    def draw_k(self) -> int:
        cfg, g = self.config, self.ctx.generator
        lo, hi = self.k_range()
        if cfg.truncation == "uniform":
            return int(torch.randint(lo, hi + 1, (1,), generator=g))
        if cfg.truncation == "gaussian":
            k = round(cfg.k_mean + cfg.k_std * float(torch.randn((), generator=g)))
            return min(max(k, lo), hi)
        return cfg.k
