"""Group-relative policy optimisation on the denoising MDP: GRPO (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470;
DanceGRPO, Xue et al. 2025, arXiv 2505.07818) and MixGRPO's sliding window (Li et al. 2025, arXiv 2507.21802).

GRPO is DDPO (``algos/ddpo.py``) with three changes: the baseline is the group, the KL to the reference is a loss
term, and the training chain is cheaper than the evaluation's.

* **Group baselines.** Each collected batch is B/G captions × G samples. A sample's advantage is its reward
  standardised within its own group, A_i = (r_i − mean_g r) / (std_g r + ε) — no value network, no reward history,
  no statistics across captions (DDPO's per-prompt tracker keeps a history; GRPO does not).
* **KL as a loss term.** β · KL(π_θ(·|x_t, c) ‖ π_ref(·|x_t, c)) at the visited states, closed form (both steps
  are Gaussians with the scheduler's σ_t): exactly DPOK's term (`algos.ddpo.dpok_loss`), here next to
  std-normalised advantages, so β is a regularisation weight, not the temperature of p* (see DPOK for that).
* **Denoising reduction.** Training samples with ``sampling_steps`` steps (Flow-GRPO: 10 for training, 40 for
  evaluation) and trains on a subset of them (``train_timesteps`` positions and/or DDPO's random
  ``timestep_fraction``; DanceGRPO trains a random 60%); the evaluation keeps the world's schedule.

MixGRPO (`MixGRPO`) mixes SDE and ODE sampling: only a window of ``window_size`` consecutive schedule positions is
stochastic (DDIM η > 0) and trained; every other step is the deterministic η = 0 step
(`DiffusionPolicy.sample`'s ``stochastic`` mask), which has no log-probability, no gradient and no reference
forward. The window starts at the first (noisiest) step and moves ``window_stride`` positions later every
``window_shift_every`` collected batches, until it reaches the end of the chain, where it stays.

Notation (code name → symbol), in addition to DDPO's (``log_prob``, ``old_log_prob``, ``ratio``, ``kl``):

==================  ===========================================================================================
``group_size``      G, samples per caption in a batch (the "group" of GRPO)
``advantages``      A_i = (r_i − mean_{j∈g} r_j) / (std_{j∈g} r_j + ε), population std, ε = ``adv_eps``
``kl_coef``         β of the KL loss term (Flow-GRPO: 0.04 with per-dim-mean log-probs and KL)
``window``          MixGRPO's W(l) = {l, …, l + w − 1}, l = min(⌊k / τ⌋ · s, N − w) after k collected batches
==================  ===========================================================================================

Conventions: log-probs and the KL follow ``log_prob_reduction`` exactly as in DDPO (``mean`` over dims = Flow-GRPO's
and DanceGRPO's code, with their clip range 1e-4; ``sum`` = `DiffusionPolicy.log_prob`, whose ratios are D times
larger in log space, so the clip range must be larger, e.g. PPO's 0.2 for the 2-D toy). Everything DDPO does that is
the same maths is DDPO's code: collection, minibatches over (sample, step), the re-scoring of stored transitions
(`DenoisingCore.rescore`), the fresh-batch ratio check and the clipped surrogate.

Implementation details (numbered, cleanrl style):

1. ``batch_size`` must be a multiple of ``group_size``; a batch holds B/G distinct captions drawn from the training
   prompts, each repeated G times in consecutive rows. Groups never span processes, so the advantages need no
   all-gather (only the logged reward statistics are gathered). Captions, x_T, the sampling noise and the
   minibatches are drawn for the global batch and sliced, as DDPO's (``algos/ddpo.py``, detail 6), so several
   processes compute what one computes with the global batch.
2. ``shared_noise`` gives the G samples of a group the same x_T (DanceGRPO's shared initialisation noise); the
   per-step noise still differs. Default off (Flow-GRPO draws independent x_T).
3. A group whose rewards are all equal gets A = 0 (the ε in the denominator), so it contributes only its KL.
4. ``sampling_steps`` builds a second `DenoisingCore` on the same world and reward with that schedule; collection
   and re-scoring both use it, so the ratio is still exactly 1 on the first minibatch (DDPO detail 4).
5. The steps trained are DDPO's (σ_t > ``min_std``) ∩ ``train_timesteps`` (schedule positions, 0 = the step from
   x_T) ∩ a random ``timestep_fraction`` of them per inner epoch.
6. MixGRPO counts its savings: ``transitions`` (logged per optimizer step) is the number of (sample, step) pairs
   trained, i.e. the policy forwards with gradient, the backward passes and the reference forwards of the KL;
   sampling NFE are the same as GRPO's on the same schedule (all N steps run). The run's ``unet_nfe`` totals both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from algos.ddpo import DPOK, Trajectories, TrajectoryTraining, Transitions, check_trajectory_training, dpok_loss
from rlkit_diffusion.algorithm import AlgoContext
from rlkit_diffusion.mdp import DenoisingCore


@dataclass
class GRPOConfig(TrajectoryTraining):
    """GRPO hyper-parameters (Flow-GRPO / DanceGRPO on the ε-prediction DDIM policy)."""

    group_size: int = 8
    """G, samples per caption; the per-process batch size must be a multiple of it."""
    shared_noise: bool = False
    """The G samples of a caption start from the same x_T (DanceGRPO) instead of independent ones (Flow-GRPO)."""
    clip_range: float = 1e-4
    """ε of the clipped per-step ratio (Flow-GRPO's 1e-4 goes with ``log_prob_reduction=mean``)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max] (Flow-GRPO: 5)."""
    advantage_std: bool = True
    """Divide by the group's std (GRPO); False only subtracts the group mean (Dr. GRPO style)."""
    adv_eps: float = 1e-4
    """ε of A = (r − mean) / (std + ε) (Flow-GRPO's 1e-4)."""
    kl_coef: float = 0.04
    """β of the per-step KL loss term (Flow-GRPO: 0.04); 0 = no KL term and no reference forwards."""
    sampling_steps: int | None = None
    """Denoising reduction: steps of the training chain (Flow-GRPO: 10); None = the world's (the evaluation's)."""
    train_timesteps: list[int] | None = None
    """Schedule positions (0 = the step from x_T) that may be trained; None = every stochastic one."""


@dataclass
class MixGRPOConfig(GRPOConfig):
    """MixGRPO: GRPO with SDE steps and training only inside a sliding window of the chain."""

    window_size: int = 4
    """w, consecutive stochastic (trained) steps (MixGRPO: 4 of 25)."""
    window_stride: int = 1
    """s, positions the window moves each shift."""
    window_shift_every: int = 25
    """τ, collected batches between two shifts (MixGRPO: 25 iterations)."""
    timestep_fraction: float = 1.0
    """Fraction of the window's steps trained per inner epoch (MixGRPO trains the whole window)."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------
def group_advantages(rewards: Tensor, group_size: int, *, use_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage: rows [gG, (g+1)G) form group g.

    ``A_i = (r_i − mean_g) / (std_g + ε)`` with the population std of the group (Flow-GRPO's advantage; DanceGRPO
    uses ε = 1e-8), or ``r_i − mean_g`` when ``use_std`` is False. Returns (B,).
    """
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size)  # (B/G, G)
    centred = r - r.mean(1, keepdim=True)
    adv = centred / (r.std(1, unbiased=False, keepdim=True) + eps) if use_std else centred
    return adv.reshape(-1)


def grpo_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, **coefs: float
) -> dict[str, Tensor]:
    """The GRPO objective on the denoising MDP (Flow-GRPO's J_Flow-GRPO, DanceGRPO's objective), as a loss.

    With G trajectories i per caption, steps t and M = the minibatch's (i, t) transitions::

        A_i  = (r_i − mean_g r) / (std_g r + ε)                       group-relative advantage (`group_advantages`)
        ρ_it = π_θ(x^i_{t−1} | x^i_t, c) / π_θold(x^i_{t−1} | x^i_t, c)   per-step likelihood ratio
        J    = 1/G Σ_i 1/T Σ_t [ min(ρ_it A_i, clip(ρ_it, 1 − ε, 1 + ε) A_i) − β D_KL(π_θ ‖ π_ref)(x^i_t) ]
        L    = −J = E_M max(−A ρ, −A clip(ρ)) + β E_M KL_it          `algos.ddpo.dpok_loss`, mode "is"
        KL_it = ‖μ_θ(x^i_t) − μ_ref(x^i_t)‖² / 2σ_t²                  the closed-form Gaussian KL (shared σ_t)

    The clipped term is DDPO's surrogate and the KL term DPOK's; GRPO differs from DPOK only in the advantage
    (group-standardised) and hence in what β means (a regulariser weight on unit-scale advantages). The mean over
    the minibatch's transitions is the 1/G 1/T average. Keys: ``loss`` (surrogate), ``loss_kl`` (β · mean KL),
    ``kl``, ``approx_kl``, ``clipfrac``, ``ratio_mean``.

    Args:
        log_prob: (M,) with gradient. old_log_prob: (M,) recorded at collection. advantages: (M,) group advantages.
        kl: (M,) per-step KL to the reference, gradient through μ_θ (zeros when kl_coef = 0).
        coefs: ``kl_coef`` (β), ``clip_range`` (ε) and ``adv_clip_max``, as in `algos.ddpo.dpok_loss`.
    """
    return dpok_loss(log_prob, old_log_prob, advantages, kl, **coefs, mode="is")


def grouped_prompts(env: DenoisingCore, n_groups: int, group_size: int, generator: torch.Generator) -> list[str]:
    """n_groups captions c ~ p(c), each repeated group_size times in consecutive rows (GRPO's and D3PO's groups)."""
    return [p for p in env.sample_prompts(n_groups, generator) for _ in range(group_size)]


def shared_group_noise(env: DenoisingCore, n_groups: int, group_size: int, generator: torch.Generator) -> Tensor:
    """One x_T ~ N(0, I) per group, repeated for its members: (n_groups · group_size, ...)."""
    x_T = torch.randn((n_groups, *env.sample_shape), generator=generator, device=env.world.device)
    return x_T.repeat_interleave(group_size, dim=0)


def mix_window(iteration: int, horizon: int, size: int, stride: int, shift_every: int) -> tuple[int, Tensor]:
    """MixGRPO's window after ``iteration`` collected batches: l = min(⌊iteration / τ⌋ · s, N − w).

    Returns ``(l, mask)`` with mask (N,) bool, True on positions l … l + w − 1 (the SDE, trained steps)."""
    start = min((iteration // shift_every) * stride, horizon - size)
    mask = torch.zeros(horizon, dtype=torch.bool)
    mask[start : start + size] = True
    return start, mask


# --------------------------------------------------------------------------------------------------------------
# The algorithms
# --------------------------------------------------------------------------------------------------------------
def setup_trajectories(name: str, ctx: AlgoContext, cfg: Any) -> tuple[int, DenoisingCore]:
    """Checks shared by the trajectory algorithms of this family (GRPO, MixGRPO, D3PO): the log-prob reduction, the
    minibatching, a stochastic policy. Returns (dim = values per sample, the MDP collected from: the run's env, or
    one with ``cfg.sampling_steps`` steps — denoising reduction)."""
    check_trajectory_training(name, cfg)
    if ctx.policy.sampler not in ("ddim", "sde") or not ctx.policy.stochastic:
        raise ValueError(
            f"{name} needs a stochastic DDIM policy (eta > 0) or a flow policy with sampler=sde; "
            f"got sampler={ctx.policy.sampler}, eta={ctx.policy.eta}"
        )
    if cfg.sampling_steps is None:
        return math.prod(ctx.world.sample_shape), ctx.env
    env = DenoisingCore(ctx.world, reward=ctx.env.reward_name, num_inference_steps=cfg.sampling_steps)
    return math.prod(ctx.world.sample_shape), env


class GRPO(DPOK):
    """Flow-GRPO / DanceGRPO on the denoising MDP (`grpo_loss`); DDPO's collection, minibatches and re-scoring, and
    DPOK's KL term. Its own set-up (`setup_trajectories`): DDPO's advantage and mode checks do not apply."""

    name = "grpo"
    config_class = GRPOConfig

    def configure(self, ctx: AlgoContext, cfg: GRPOConfig) -> None:
        if cfg.group_size < 2:
            raise ValueError(f"{self.name}: group_size must be >= 2 (a group of one has no baseline)")
        if ctx.batch_size % cfg.group_size:
            raise ValueError(
                f"{self.name}: train.batch_size ({ctx.batch_size}) must be a multiple of group_size ({cfg.group_size})"
            )
        self.dim, self.env = setup_trajectories(self.name, ctx, cfg)
        self.steps_mask = self.position_mask(self.env.horizon)  # (N,) detail 5
        self.reference = ctx.base if cfg.kl_coef > 0 else None

    def position_mask(self, horizon: int) -> Tensor:
        """(N,) bool: the schedule positions named by ``train_timesteps`` (all when None)."""
        positions = self.config.train_timesteps
        if positions is None:
            return torch.ones(horizon, dtype=torch.bool)
        if not positions or any(not 0 <= p < horizon for p in positions):
            raise ValueError(f"{self.name}: train_timesteps must be positions in [0, {horizon}), got {positions}")
        mask = torch.zeros(horizon, dtype=torch.bool)
        mask[list(positions)] = True
        return mask

    # Collection ------------------------------------------------------------------------------------------------
    def collect(self) -> Trajectories:
        ctx, cfg = self.ctx, self.config
        g, n, rows = ctx.global_rows(ctx.batch_size)  # whole groups: the batch is a multiple of group_size
        prompts = grouped_prompts(ctx.env, n // cfg.group_size, cfg.group_size, g)[rows]
        kwargs: dict[str, Any] = self.rollout_kwargs()
        if cfg.shared_noise:
            kwargs["x_T"] = shared_group_noise(self.env, n // cfg.group_size, cfg.group_size, g)[rows]
        return self.collect_trajectories(prompts, **kwargs)

    def rollout_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the training rollout (MixGRPO: the stochastic window)."""
        return {}

    def advantages(self, prompts: list[str], rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Group advantages of this process's rows (groups never span processes); gathered reward statistics."""
        cfg = self.config
        adv = group_advantages(rewards, cfg.group_size, use_std=cfg.advantage_std, eps=cfg.adv_eps)
        all_r = self.ctx.gather(rewards)
        group_std = rewards.reshape(-1, cfg.group_size).std(1, unbiased=False).mean()
        stats = {
            "reward_mean": float(all_r.mean()),
            "reward_std": float(all_r.std(unbiased=False)),
            "group_reward_std": float(group_std),
        }
        return adv, stats

    def trainable_steps(self, batch: Trajectories) -> Tensor:
        """DDPO's σ_t > min_std, restricted to the ``train_timesteps`` positions (detail 5). (B, N) bool"""
        return super().trainable_steps(batch) & self.steps_mask[None, :]

    # Loss -----------------------------------------------------------------------------------------------------
    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor, out_step, mb: Transitions) -> dict[str, Tensor]:
        out = self.objective_with_kl(grpo_loss, log_prob, old, adv, out_step, mb)  # clips at adv_clip_max
        out["transitions"] = torch.tensor(float(len(mb.sample)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class MixGRPO(GRPO):
    """MixGRPO: SDE steps (η > 0) and training only inside a window that slides down the chain (`mix_window`)."""

    name = "mix_grpo"
    config_class = MixGRPOConfig

    def configure(self, ctx: AlgoContext, cfg: MixGRPOConfig) -> None:
        if cfg.train_timesteps is not None:
            raise ValueError(f"{self.name}: the window decides the trained steps; leave train_timesteps unset")
        super().configure(ctx, cfg)
        if not 1 <= cfg.window_size <= self.env.horizon or cfg.window_stride < 0 or cfg.window_shift_every < 1:
            raise ValueError(
                f"{self.name}: need 1 <= window_size <= {self.env.horizon} (the training chain), window_stride >= 0 "
                f"and window_shift_every >= 1; got {cfg.window_size}, {cfg.window_stride}, {cfg.window_shift_every}"
            )
        self.iteration = 0  # collected batches so far
        self.window_start = 0

    def rollout_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        self.window_start, mask = mix_window(
            self.iteration, self.env.horizon, cfg.window_size, cfg.window_stride, cfg.window_shift_every
        )
        self.iteration += 1
        return {"stochastic": mask}

    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor, out_step, mb: Transitions) -> dict[str, Tensor]:
        out = super().objective(log_prob, old, adv, out_step, mb)
        out["window_start"] = torch.tensor(float(self.window_start))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state.get("iteration", 0))
