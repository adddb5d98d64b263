"""On-policy policy gradient on the denoising MDP: DDPO (Black et al.; Diffusion-DPO supp. eq. 15-16) and DPOK
(Fan et al.: policy gradient + KL to the reference).

The MDP is the env's (supp. S3, eq. 19): a trajectory x_T → … → x_0 is sampled from the policy with DDIM η > 0
(every step a Gaussian π_θ(x_{t−1} | x_t, c) = N(μ_θ, σ_t² I)), the only reward is r(c, x_0) at the end, so every
transition (c, t, x_t, x_{t−1}) of a trajectory shares the trajectory's advantage.

Notation (code name → symbol):

==================  ===========================================================================================
``log_prob``        log π_θ(x_{t−1} | x_t, c), recomputed with gradient; per-dim mean (default) or sum over dims
``old_log_prob``    log π_θold(x_{t−1} | x_t, c), recorded at collection (θold = θ at collection time)
``ratio``           ρ_t = exp(log_prob − old_log_prob), the importance weight of eq. 16
``advantages``      A = (r − μ_c) / (σ_c + 1e-6) per prompt c (`PerPromptStatTracker`), or batch-global, clipped
``kl``              KL(π_θ(·|x_t, c) ‖ π_ref(·|x_t, c)) = ‖μ_θ − μ_ref‖² / 2σ_t² at the visited states (DPOK)
==================  ===========================================================================================

Implementation details (numbered, cleanrl style):

1. Collection runs the ONE sampling loop under ``torch.no_grad()`` through ``ctx.env.rollout(...,
   return_trajectory=True)`` and keeps x_t of every step, the log-probs and σ_t; rewards go through ``ctx.reward``
   (counted) and are all-gathered across processes before normalisation.
2. Deterministic steps (σ_t = 0: DDIM η = 0, or a final step to ᾱ_0) have no log-probability and are never trained.
   Nearly deterministic ones are ill-conditioned: ∇ log π = (z/σ_t) ∇μ_θ is a score-function term whose variance
   grows as 1/σ_t² while the step hardly moves x_0, and DPOK's KL there, ‖Δμ‖²/2σ_t², is just as stiff.
   ``min_std`` > 0 leaves the steps with σ_t ≤ min_std out of training altogether (default 0: every stochastic
   step, as ddpo-pytorch). On toy2d the step t = 50 → 0 has σ = 0.01 and, trained, dominates the gradient (noise
   for the policy gradient, stiffness for DPOK's KL), so its tuning sets min_std = 0.05; the evaluation's path KL
   still counts that step. On shapes (cosine schedule, ᾱ_0 ≈ 1 − 4e-5) the step t = 50 → 0 has σ = 0.0064 while
   its mean moves by 0.09 ε: trained, it carried 94% of the gradient energy at a signal-to-noise ratio ≈ 1, and
   DDPO/DPOK lowered the reward they optimise (issue #21; ``python -m benchmarks.diagnose_pg snr``), so the shapes
   tunings set min_std = 0.05 as well. (Stable Diffusion's last step, σ ≈ 0.02 with a mean moving by 0.02 ε, is
   benign.)
3. Minibatches are over (sample, timestep) transitions: each inner epoch keeps a random ``timestep_fraction`` of the
   stochastic steps of every trajectory, shuffles all kept transitions and splits them into ``num_minibatches``
   equal chunks; **one optimizer step per chunk**, with all the chunk's transitions in one batched forward. With
   ``num_minibatches=1`` this is ddpo-pytorch's "accumulate over every timestep, then step" (the same gradient:
   the mean over transitions); to bound memory on big models use more minibatches and ``train.grad_accum``.
4. On the first minibatch of a freshly collected batch θ = θold, so the ratio must be exactly 1 and nothing is
   clipped; ``check_ratio`` asserts this (it fails if collection and training disagree: dropout, a different
   guidance scale, schedule or η).
5. The loss is the mean over transitions; logs ``approx_kl`` = ½ E[(log_prob − old_log_prob)²] and ``clipfrac``.
6. Data parallelism computes what one process computes with the global batch (and a checkpoint resumes on another
   number of processes: ``world_size_invariant``). Every random number is drawn for the GLOBAL batch from a stream
   shared by the processes, each keeping its rows (`AlgoContext.global_rows`): the prompts, x_T and every step's
   noise (`DenoisingCore.rollout`'s ``rows``), and the minibatches — the kept steps and the permutation of detail 3
   are drawn over all processes' transitions, and each process trains, of every chunk of M transitions, the M_r of
   its own trajectories. Rewards and prompts are all-gathered before the advantages (detail 1). DDP and FSDP
   average the processes' gradients, so each process's loss (a mean over its M_r transitions) is weighted by
   M_r · W / M: the average over the W processes is then the mean over the chunk's M transitions. In one process
   W = 1, M_r = M, the weight is 1 and every number is what it was before data parallelism was made invariant.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlkit_diffusion.algorithm import AlgoContext, AlgorithmDefaults
from rlkit_diffusion.policy import DiffusionPolicy, cond_map


@dataclass
class TrajectoryTraining:
    """How the trajectory algorithms (DDPO, DPOK, GRPO, MixGRPO, D3PO) train on a collected batch: minibatches of
    (sample, step) transitions (detail 3), the log-prob convention, the steps trained and the fresh-batch check."""

    timestep_fraction: float = 1.0
    """Fraction of each trajectory's trainable steps trained per inner epoch, at random (DanceGRPO: 0.6)."""
    num_inner_epochs: int = 1
    """Passes over each collected batch."""
    num_minibatches: int = 1
    """Optimizer steps per inner epoch (transitions are shuffled and split evenly)."""
    log_prob_reduction: str = "mean"
    """``mean`` over dims (ddpo-pytorch, and the Flow-GRPO, DanceGRPO and D3PO code built on it) or ``sum`` (this
    repo's `DiffusionPolicy.log_prob`): mean = sum / D."""
    min_std: float = 0.0
    """Train only the steps with σ_t > min_std (0 = every stochastic step, as ddpo-pytorch; detail 2)."""
    check_ratio: bool = True
    """Assert π_θ = π_θold (ratio == 1, clipfrac == 0) on the first minibatch of every fresh batch (detail 4)."""
    ratio_check_atol: float = 1e-4
    """Tolerance of that check on |log_prob − old_log_prob| (after the reduction; bit-identical recomputation, as
    on toy2d, gives 0; a UNet re-run in batches of another size differs by float noise)."""


def check_trajectory_training(name: str, cfg: TrajectoryTraining) -> None:
    """Fail at once on a `TrajectoryTraining` value outside its range (the message names the algorithm)."""
    if cfg.log_prob_reduction not in ("sum", "mean"):
        raise ValueError(f"{name}: log_prob_reduction must be sum|mean, got {cfg.log_prob_reduction!r}")
    if not 0.0 < cfg.timestep_fraction <= 1.0 or cfg.num_minibatches < 1 or cfg.num_inner_epochs < 1:
        raise ValueError(f"{name}: need 0 < timestep_fraction <= 1, num_minibatches >= 1, num_inner_epochs >= 1")


@dataclass
class DDPOConfig(TrajectoryTraining):
    """DDPO hyper-parameters (defaults follow ddpo-pytorch where they do not depend on the log-prob convention)."""

    mode: str = "is"
    """``is``: importance-sampled PPO-clip (DDPO_IS); ``sf``: score function, no ratio (DDPO_SF). SF has no trust
    region: keep it on-policy (``num_minibatches=1``, ``num_inner_epochs=1``), where IS and SF coincide exactly."""
    clip_range: float = 1e-4
    """ε of the clipped ratio (ddpo-pytorch's 1e-4, meant for per-dim MEAN log-probs: ``log_prob_reduction``)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max] in units of their standard deviation: standardised
    advantages (``advantage_std``) are clipped at adv_clip_max, unstandardised ones (DPOK's raw reward minus a
    baseline) at adv_clip_max × their batch standard deviation — a fixed ±5 on raw rewards would clip every reward
    whose spread exceeds 5 and change the β of DPOK's target."""
    advantage_norm: str = "per_prompt"
    """``per_prompt`` (stat tracker), ``global`` (batch statistics) or ``none`` (raw rewards)."""
    advantage_std: bool = True
    """Divide by the standard deviation (False: only subtract the mean baseline)."""
    buffer_size: int = 32
    """Per-prompt tracker: rewards remembered per prompt."""
    min_count: int = 16
    """Per-prompt tracker: below this many rewards for a prompt, use the batch statistics instead."""


@dataclass
class DPOKConfig(DDPOConfig):
    """DPOK: the DDPO fields plus the KL penalty. Defaults target the KL-regularised optimum p* ∝ p_ref e^{r/β}."""

    kl_coef: float = 1.0
    """β of E[r] − β Σ_t KL(π_θ ‖ π_ref): with unscaled advantages the optimum is p* ∝ p_ref exp(r/β)."""
    advantage_std: bool = False
    """Keep the reward scale (only a per-prompt baseline is subtracted), so that ``kl_coef`` is the β of p*."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------
def ddpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    mode: str = "is",
) -> dict[str, Tensor]:
    """DDPO's per-transition surrogate (Black et al. eq. 3-4; Diffusion-DPO supp. eq. 16), mean over transitions.

    Line by line (M transitions)::

        A      = clip(A, −a_max, a_max)                                        advantage clipping
        ρ      = exp(log π_θ(x_{t−1}|x_t) − log π_θold(x_{t−1}|x_t))           the importance weight of eq. 16
        IS:  L = E max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε))                          PPO-clip on each step
        SF:  L = −E A log π_θ(x_{t−1}|x_t)                                      score function: ∇L = −E A ∇log π
        approx_kl = ½ E (log π_θ − log π_θold)²,   clipfrac = E 1[|ρ − 1| > ε]

    Args:
        log_prob: (M,) with gradient. old_log_prob: (M,) recorded at collection. advantages: (M,).
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)  # (M,)
    log_ratio = log_prob - old_log_prob  # (M,)
    ratio = torch.exp(log_ratio)
    if mode == "is":
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(unclipped, clipped).mean()
    elif mode == "sf":
        loss = -(adv * log_prob).mean()
    else:
        raise ValueError(f"ddpo mode must be 'is' or 'sf', got {mode!r}")
    return {
        "loss": loss,
        "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
        "clipfrac": ((ratio.detach() - 1.0).abs() > clip_range).float().mean(),
        "ratio_mean": ratio.detach().mean(),
    }


def dpok_loss(
    log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, kl: Tensor, *, kl_coef: float, **surrogate: Any
) -> dict[str, Tensor]:
    """DPOK: the DDPO surrogate plus the per-step KL to the reference at the visited states.

    ``L = L_DDPO + β E_t KL(π_θ(·|x_t, c) ‖ π_ref(·|x_t, c))`` with KL = ‖μ_θ − μ_ref‖²/2σ_t² (closed form, both
    Gaussians share σ_t). Its gradient is that of −(1/N)(E[r] − β Σ_t KL_t): the mean over transitions scales
    both terms by 1/N, so β keeps the meaning of eq. 10's KL weight. ``kl``: (M,), gradient through μ_θ;
    ``kl_coef``: β; ``surrogate``: `ddpo_loss`'s ``clip_range``, ``adv_clip_max`` and ``mode``.
    """
    out = ddpo_loss(log_prob, old_log_prob, advantages, **surrogate)
    out["loss_kl"] = kl_coef * kl.mean()
    out["kl"] = kl.detach().mean()
    return out


class PerPromptStatTracker:
    """Per-prompt reward normalisation of DDPO (ddpo-pytorch's ``PerPromptStatTracker``).

    For each prompt c the last ``buffer_size`` rewards are kept; A = (r − mean_c) / (std_c + 1e-6) once c has at
    least ``min_count`` of them, else the batch's mean/std are used (the fallback). ``use_std=False`` only
    subtracts the mean. ``state_dict`` / ``load_state_dict`` keep the buffers across a resume. ``own_fraction``:
    the share of the last batch normalised by its own prompt's statistics (0 = every sample took the fallback, and
    ``per_prompt`` was ``global``; logged as ``adv_own_prompt_frac``).
    """

    def __init__(self, buffer_size: int, min_count: int, use_std: bool = True):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"stat tracker needs buffer_size >= 1 and min_count >= 1, got {buffer_size}, {min_count}")
        self.buffer_size, self.min_count, self.use_std = buffer_size, min_count, use_std
        self.buffers: dict[str, deque[float]] = {}
        self.own_fraction = 0.0

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Add this batch's rewards, then normalise each of them. Returns (B,) advantages."""
        r = rewards.detach().double().cpu()
        for p, v in zip(prompts, r.tolist()):
            self.buffers.setdefault(p, deque(maxlen=self.buffer_size)).append(v)
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        adv = torch.empty_like(r)
        own = 0
        for p in set(prompts):
            idx = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            buf = torch.tensor(list(self.buffers[p]), dtype=torch.float64)
            enough = len(buf) >= self.min_count
            mean, std = (buf.mean(), buf.std(unbiased=False)) if enough else (batch_mean, batch_std)
            own += len(idx) if enough else 0
            adv[idx] = (r[idx] - mean) / (std + 1e-6) if self.use_std else r[idx] - mean
        self.own_fraction = own / len(prompts)
        return adv.to(rewards)

    def state_dict(self) -> dict[str, list[float]]:
        return {p: list(b) for p, b in self.buffers.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.buffers = {p: deque((float(v) for v in b), maxlen=self.buffer_size) for p, b in state.items()}


def global_advantages(rewards: Tensor, use_std: bool = True) -> Tensor:
    """A = (r − mean) / (std + 1e-8) over the whole (gathered) batch. (B,)"""
    centred = rewards - rewards.mean()
    return centred / (rewards.std(unbiased=False) + 1e-8) if use_std else centred


# --------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Trajectories:
    """A collected batch of B trajectories of N steps."""

    prompts: list[str]
    cond: Any  # batch B
    latents: Tensor  # (B, N+1, ...) x_{t_N}, ..., x_0
    log_probs: Tensor  # (B, N) log π_θold of each step
    stds: Tensor  # (B, N) σ_t
    advantages: Tensor  # (B,)
    rewards: Tensor  # (B,) this process's rewards
    stats: dict[str, float]  # reward statistics of the gathered batch


@dataclass
class Transitions:
    """A minibatch: M (sample, timestep) index pairs into a `Trajectories` batch."""

    batch: Trajectories
    sample: Tensor  # (M,) long
    step: Tensor  # (M,) long
    first: bool  # the first minibatch since collection (θ = θold)
    weight: float = 1.0  # this process's loss multiplier (detail 6); 1 in one process


def _gather_strings(ctx: AlgoContext, items: list[str]) -> list[str]:
    if ctx.accelerator is None or ctx.accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return list(gather_object(items))


# --------------------------------------------------------------------------------------------------------------
# The algorithms
# --------------------------------------------------------------------------------------------------------------
class DDPO(AlgorithmDefaults):
    """DDPO_IS / DDPO_SF on the env's reward (details 1-5 of the module docstring)."""

    name = "ddpo"
    config_class = DDPOConfig
    world_size_invariant = True  # detail 6: resumable on any number of processes

    def configure(self, ctx: AlgoContext, cfg: DDPOConfig) -> None:
        if cfg.mode not in ("is", "sf"):
            raise ValueError(f"{self.name}: mode must be 'is' or 'sf', got {cfg.mode!r}")
        if cfg.advantage_norm not in ("per_prompt", "global", "none"):
            raise ValueError(f"{self.name}: advantage_norm must be per_prompt|global|none, got {cfg.advantage_norm!r}")
        check_trajectory_training(self.name, cfg)
        policy = ctx.policy
        if not policy.stochastic:
            raise ValueError(
                f"{self.name} needs a stochastic policy (DDIM eta > 0, DDPO uses eta = 1; a flow policy needs "
                f"sampler=sde): got sampler={policy.sampler!r}, eta={policy.eta}"
            )
        self.tracker = PerPromptStatTracker(cfg.buffer_size, cfg.min_count, use_std=cfg.advantage_std)
        self.dim = math.prod(ctx.world.sample_shape)
        self.env = ctx.env  # the MDP collected from and re-scored in (GRPO may train on a shorter schedule)

    # Collection ------------------------------------------------------------------------------------------------
    def advantages(self, prompts: list[str], rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        """All-gather rewards and prompts, normalise, and return this process's slice of the advantages."""
        ctx, cfg = self.ctx, self.config
        all_r = ctx.gather(rewards)
        all_p = _gather_strings(ctx, prompts)
        if cfg.advantage_norm == "per_prompt":
            adv = self.tracker.update(all_p, all_r)
        elif cfg.advantage_norm == "global":
            adv = global_advantages(all_r, cfg.advantage_std)
        else:
            adv = all_r.clone()
        rank = ctx.accelerator.process_index if ctx.accelerator is not None else 0
        b = len(prompts)
        stats = {"reward_mean": float(all_r.mean()), "reward_std": float(all_r.std(unbiased=False))}
        stats["adv_clip"] = self.advantage_clip(adv)
        if cfg.advantage_norm == "per_prompt":
            stats["adv_own_prompt_frac"] = self.tracker.own_fraction
        return adv[rank * b : (rank + 1) * b].to(rewards.device), stats

    def advantage_clip(self, adv: Tensor) -> float:
        """The advantage clip in units of the advantages' standard deviation (``adv_clip_max``): standardised
        advantages are clipped at adv_clip_max, unstandardised ones at adv_clip_max × their batch std (no clip for a
        zero std), so DPOK's raw-reward advantages keep their scale and ``kl_coef`` stays the β of its target."""
        if self.config.advantage_std:
            return float(self.config.adv_clip_max)
        std = float(adv.std(unbiased=False)) if adv.numel() > 1 else 0.0
        return self.config.adv_clip_max * std if std > 0 else math.inf

    def collect(self) -> Trajectories:
        ctx = self.ctx
        g, n, rows = ctx.global_rows(ctx.batch_size)  # detail 6: this process's rows of the global batch
        return self.collect_trajectories(ctx.env.sample_prompts(n, g)[rows])

    def collect_trajectories(self, prompts: list[str], **rollout_kwargs: Any) -> Trajectories:
        """Roll ``prompts`` out through ``self.env`` (detail 1), score them and compute the advantages.
        ``prompts`` are this process's rows of the global batch (`AlgoContext.global_rows`), whose x_T and
        per-step noise are drawn for the global batch and sliced (detail 6). ``rollout_kwargs`` go to
        `DenoisingCore.rollout` (``x_T``, ``stochastic``, ...)."""
        ctx = self.ctx
        g, n, rows = ctx.global_rows(len(prompts))
        with torch.no_grad():
            ro = self.env.rollout(
                ctx.policy,
                prompts,
                generator=g,
                rows=(n, rows),
                return_trajectory=True,
                with_reward=False,
                **rollout_kwargs,
            )
            rewards = ctx.reward(ctx.env.reward_model, ctx.world.decode(ro.x0), prompts)  # (B,)
        adv, stats = self.advantages(prompts, rewards)
        ctx.counters.samples += len(prompts)
        s = ro.sample
        return Trajectories(
            prompts=prompts,
            cond=ro.cond,
            latents=torch.stack(s.latents, dim=1),
            log_probs=s.log_probs,
            stds=s.stds,
            advantages=adv,
            rewards=rewards,
            stats=stats,
        )

    def minibatches(self, batch: Trajectories) -> Iterator[Transitions]:
        """Detail 3 on the GLOBAL batch (detail 6): the kept steps and their order are drawn for all processes'
        trajectories, and each process takes, from every chunk, the transitions of its own trajectories."""
        cfg, ctx = self.config, self.ctx
        g, b, rows = ctx.global_rows(len(batch.log_probs))  # b = the global batch, rows = this process's
        mask = self.trainable_steps(batch).to(ctx.device, torch.uint8)  # (B_local, N) detail 2
        stochastic = ctx.gather(mask).cpu().bool()  # (B, N)
        n = stochastic.shape[1]
        for epoch in range(cfg.num_inner_epochs):
            keys = torch.rand(b, n, generator=g).masked_fill(~stochastic, 2.0)  # random order of stochastic steps
            per_sample = stochastic.sum(1)
            keep_n = (per_sample.double() * cfg.timestep_fraction).ceil().long().clamp(max=per_sample)
            rank = keys.argsort(1).argsort(1)  # rank of each step in its trajectory's random order
            keep = rank < keep_n[:, None]  # (B, N)
            sample, step = keep.nonzero(as_tuple=True)
            if len(sample) == 0:
                raise ValueError(f"{self.name}: no stochastic step to train on (every sigma_t is 0)")
            order = torch.randperm(len(sample), generator=g)
            for j, chunk in enumerate(order.chunk(cfg.num_minibatches)):
                yield self.own_share(batch, sample[chunk], step[chunk], keep, rows, epoch == 0 and j == 0)

    def own_share(
        self, batch: Any, sample: Tensor, step: Tensor, keep: Tensor, rows: slice, first: bool
    ) -> Transitions:
        """This process's part of a global minibatch of M transitions (``sample`` indexes the global batch): those
        of its rows, re-indexed into its batch, with the weight M_r · W / M (detail 6). A process holding none of
        them trains one of its kept transitions at weight 0, so that its collectives still run."""
        world = len(keep) // (rows.stop - rows.start)
        mine = (sample >= rows.start) & (sample < rows.stop)  # (M,)
        if bool(mine.any()):
            weight = int(mine.sum()) * world / len(sample)
            return Transitions(batch, sample[mine] - rows.start, step[mine], first=first, weight=weight)
        own = keep[rows].nonzero()[:1]  # (1, 2): (local sample, step)
        return Transitions(batch, own[:, 0], own[:, 1], first=first, weight=0.0)

    def trainable_steps(self, batch: Trajectories) -> Tensor:
        """(B, N) bool: the steps that may be trained, σ_t > min_std (detail 2)."""
        return batch.stds.cpu() > max(self.config.min_std, 0.0)

    # Loss -----------------------------------------------------------------------------------------------------
    def step_outputs(self, policy: DiffusionPolicy, mb: Transitions):
        """π(x_{t−1} | x_t, c) of ``policy`` at the minibatch's transitions, scoring the recorded actions
        (`DenoisingCore.rescore`, the one re-scoring of stored trajectories)."""
        tr = mb.batch
        i, k = mb.sample.to(tr.latents.device), mb.step.to(tr.latents.device)
        pick = lambda c: c[i]  # noqa: E731
        return self.env.rescore(policy, tr.latents[i, k], k, cond_map(pick, tr.cond), prev_sample=tr.latents[i, k + 1])

    def reduce(self, x: Tensor) -> Tensor:
        """The log-prob convention: summed over dims (as computed) or per-dim mean (ddpo-pytorch)."""
        return x / self.dim if self.config.log_prob_reduction == "mean" else x

    def loss(self, mb: Transitions) -> dict[str, Tensor]:
        out_step = self.step_outputs(self.ctx.policy, mb)
        log_prob = self.reduce(out_step.log_prob)
        old = self.reduce(mb.batch.log_probs[mb.sample, mb.step].to(log_prob.device))
        adv = mb.batch.advantages[mb.sample].to(log_prob.device)
        out = self.objective(log_prob, old, adv, out_step, mb)
        if mb.first:
            out.update(self.check_fresh_ratio(log_prob, old, out))
        out.update({k: torch.tensor(v) for k, v in mb.batch.stats.items()})
        return self.weighted(out, mb.weight)

    @staticmethod
    def weighted(out: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
        """The stepped ``loss*`` terms times this process's weight (detail 6); unchanged at weight 1."""
        if weight == 1.0:
            return out
        return {k: v * weight if k.startswith("loss") else v for k, v in out.items()}

    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor, out_step, mb: Transitions) -> dict[str, Tensor]:
        cfg = self.config
        clip = mb.batch.stats.get("adv_clip", cfg.adv_clip_max)
        return ddpo_loss(log_prob, old, adv, clip_range=cfg.clip_range, adv_clip_max=clip, mode=cfg.mode)

    def check_fresh_ratio(self, log_prob: Tensor, old: Tensor, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detail 4: before the first update on a fresh batch, ratio == 1 and clipfrac == 0."""
        dev = (log_prob.detach() - old).abs().max()
        if self.config.check_ratio and (dev > self.config.ratio_check_atol or out["clipfrac"] > 0):
            raise RuntimeError(
                f"{self.name}: on a freshly collected batch the importance ratio must be 1, but "
                f"max |log_prob − old_log_prob| = {float(dev):.3g} and clipfrac = {float(out['clipfrac']):.3g}: "
                "collection and training evaluate the policy differently (dropout? guidance scale? schedule? eta?), "
                "or clip_range is below the numerical noise of the recomputation (summed log-probs of big images "
                "need a larger clip_range than 1e-4; ddpo-pytorch's 1e-4 goes with log_prob_reduction=mean)"
            )
        return {"fresh_ratio_max_dev": dev}

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])


class DPOK(DDPO):
    """DPOK: DDPO's policy gradient plus β × the closed-form per-step KL to the reference (`dpok_loss`)."""

    name = "dpok"
    config_class = DPOKConfig

    def configure(self, ctx: AlgoContext, cfg: DPOKConfig) -> None:
        super().configure(ctx, cfg)
        self.reference = ctx.base

    def objective(self, log_prob: Tensor, old: Tensor, adv: Tensor, out_step, mb: Transitions) -> dict[str, Tensor]:
        return self.objective_with_kl(dpok_loss, log_prob, old, adv, out_step, mb, mode=self.config.mode)

    def objective_with_kl(
        self, loss_fn, log_prob: Tensor, old: Tensor, adv: Tensor, out_step, mb: Transitions, **coefs: Any
    ) -> dict[str, Tensor]:
        """``loss_fn`` (`dpok_loss`, or GRPO's) with β = ``kl_coef`` on the closed-form per-step KL to
        ``self.reference`` at the minibatch's states (DPOK's term); zero KL, without a reference forward, when there
        is no reference. ``coefs``: the loss's other keywords (DPOK's ``mode``)."""
        cfg = self.config
        if self.reference is not None:
            with torch.no_grad():
                ref_step = self.step_outputs(self.reference.policy, mb)
            kl = self.reduce(DiffusionPolicy.gaussian_kl(out_step.mean, ref_step.mean, out_step.std))  # (M,)
        else:
            kl = torch.zeros_like(log_prob)
        return loss_fn(
            log_prob,
            old,
            adv,
            kl,
            kl_coef=cfg.kl_coef,
            clip_range=cfg.clip_range,
            adv_clip_max=mb.batch.stats.get("adv_clip", cfg.adv_clip_max),
            **coefs,
        )
