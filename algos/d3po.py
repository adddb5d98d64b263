"""Online DPO on the policy's own trajectories: D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion
Models without Any Reward Model", CVPR 2024, arXiv 2311.13231).

Diffusion-DPO (``algos/dpo.py``) learns off-policy from a fixed dataset and needs the forward-process
approximation (eq. 13) because a dataset image has no recorded chain. D3PO samples the pairs itself: for each caption
the policy draws two trajectories x^a_{T:0}, x^b_{T:0} (from the same x_T by default), a reward (D3PO: a human;
here the world's reward model) says which final image is better, and because every step of both chains was
recorded, the per-step log-likelihoods log π(x_{t−1} | x_t, c) are exact — no approximation of the path. D3PO
treats each denoising step as a DPO decision: if x^w_0 is preferred, each state-action pair of its chain is
assumed better than the loser's at the same step, and the DPO loss is applied per step.

Notation (code name → symbol):

==================  ===========================================================================================
``log_prob_w/l``    log π_θ(x^{w/l}_{t−1} | x^{w/l}_t, c), re-scored with gradient (`DenoisingCore.rescore`)
``ref_log_prob``    log π_ref of the same recorded actions: the sampling policy θ_old (``reference=sampler``,
                    D3PO's code: the log-probs stored at sampling) or the frozen initial policy (``base``, re-scored)
``ratio``           ρ = exp(log π_θ − log π_ref), clamped to [1 − ε, 1 + ε] (D3PO's ratio clamp, ε = ``ratio_clip``)
``inside``          β (log ρ_w − log ρ_l), the per-step implicit reward margin
==================  ===========================================================================================

Implementation details (numbered, cleanrl style):

1. A batch is B/2 captions × 2 samples (rows 2p, 2p + 1), collected through DDPO's collection
   (`algos.ddpo.DDPO.collect_trajectories`); ``shared_noise`` starts both from the same x_T (D3PO's sampling).
2. The reward picks the winner of each pair (ties, probability 0 for a continuous reward, go to the first row);
   the labels are stored as ±1 in the batch's ``advantages`` (D3PO's ``human_prefer``).
3. Minibatches are over (pair, step): DDPO's minibatching (`algos.ddpo.DDPO.minibatches`) on the pairs, so both
   members of a pair are trained at the same step; both share σ_t (one global η), hence the same trainable steps.
4. The clamp gives zero gradient once a ratio has left [1 − ε, 1 + ε]: a trust region per step, as PPO's clip.
   With ``reference=sampler`` the ratio is exactly 1 on the first minibatch of a fresh batch (checked, DDPO
   detail 4) and the loss is log 2 there; with ``base`` the trust region is around the initial policy instead.
5. Log-probs follow ``log_prob_reduction`` (``mean`` over dims = D3PO's code, built on ddpo-pytorch; ``sum`` =
   `DiffusionPolicy.log_prob`); β and ε are in those units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from algos.ddpo import DDPO, Trajectories, TrajectoryTraining, Transitions
from algos.dpo import bradley_terry_loss
from algos.grpo import grouped_prompts, setup_trajectories, shared_group_noise
from rlkit_diffusion.algorithm import AlgoContext


@dataclass
class D3POConfig(TrajectoryTraining):
    """D3PO hyper-parameters."""

    beta: float = 0.1
    """β of the per-step DPO loss, in the units of ``log_prob_reduction``."""
    ratio_clip: float = 1e-4
    """ε of the ratio clamp [1 − ε, 1 + ε] (the default is DDPO's clip range for per-dim-mean log-probs)."""
    reference: str = "sampler"
    """π_ref of the log-ratio: ``sampler`` (the policy that sampled the batch, D3PO's code) or ``base`` (the frozen
    initial policy, re-scored at the recorded steps)."""
    shared_noise: bool = True
    """Both samples of a pair start from the same x_T."""
    sampling_steps: int | None = None
    """Steps of the training chain (None = the world's, the evaluation's)."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------
def d3po_loss(
    log_prob_w: Tensor,
    log_prob_l: Tensor,
    ref_log_prob_w: Tensor,
    ref_log_prob_l: Tensor,
    *,
    beta: float,
    ratio_clip: float,
) -> dict[str, Tensor]:
    """D3PO's per-step DPO loss on recorded trajectories, mean over the minibatch's (pair, step) transitions.

    Line by line (the DPO loss of eq. 8 with the policy's own chains as the pair, one term per denoising step)::

        ρ_w    = clip(π_θ(x^w_{t−1}|x^w_t, c) / π_ref(x^w_{t−1}|x^w_t, c), 1 − ε, 1 + ε)   the ratio clamp
        ρ_l    = clip(π_θ(x^l_{t−1}|x^l_t, c) / π_ref(x^l_{t−1}|x^l_t, c), 1 − ε, 1 + ε)
        inside = β log ρ_w − β log ρ_l                          the per-step implicit reward margin
        L      = −E_{(c, x^w, x^l), t} log σ(inside)             D3PO's objective (Bradley–Terry on each step)

    Args:
        log_prob_w, log_prob_l: (M,) with gradient. ref_log_prob_w, ref_log_prob_l: (M,) without.

    Returns:
        ``loss`` plus logs: ``implicit_acc`` (inside > 0, ties ½), ``reward_margin`` (mean inside), ``clipfrac``
        (fraction of the 2M ratios outside the clamp), ``log_ratio_w`` / ``log_ratio_l`` (unclamped means).
    """
    log_ratio_w = log_prob_w - ref_log_prob_w  # (M,)
    log_ratio_l = log_prob_l - ref_log_prob_l  # (M,)
    ratio_w = log_ratio_w.exp().clamp(1.0 - ratio_clip, 1.0 + ratio_clip)
    ratio_l = log_ratio_l.exp().clamp(1.0 - ratio_clip, 1.0 + ratio_clip)
    inside = beta * ratio_w.log() - beta * ratio_l.log()  # (M,)
    both = torch.cat([log_ratio_w, log_ratio_l]).detach()
    return {
        **bradley_terry_loss(inside),
        "clipfrac": ((both.exp() - 1.0).abs() > ratio_clip).float().mean(),
        "log_ratio_w": log_ratio_w.detach().mean(),
        "log_ratio_l": log_ratio_l.detach().mean(),
    }


def pair_labels(rewards: Tensor) -> Tensor:
    """±1 per row of consecutive pairs (2p, 2p + 1): +1 for the higher reward (the first row on a tie). (B,)"""
    r = rewards.reshape(-1, 2)
    second = r[:, 1] > r[:, 0]  # (P,)
    return torch.stack([torch.where(second, -1.0, 1.0), torch.where(second, 1.0, -1.0)], dim=1).reshape(-1).to(r)


@dataclass
class PairBatch:
    """The pairs of a collected batch: DDPO's minibatching runs over pairs (``log_probs``, ``stds`` per pair)."""

    traj: Trajectories
    winner: Tensor  # (P,) rows of the preferred samples
    loser: Tensor  # (P,) rows of the rejected samples

    @property
    def log_probs(self) -> Tensor:  # (P, N)
        return self.traj.log_probs[self.winner]

    @property
    def stds(self) -> Tensor:  # (P, N): both members share σ_t
        return self.traj.stds[self.winner]


# --------------------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------------------
class D3PO(DDPO):
    """D3PO: online pairs from the policy, labelled by the reward; `d3po_loss` on their recorded steps."""

    name = "d3po"
    config_class = D3POConfig

    def configure(self, ctx: AlgoContext, cfg: D3POConfig) -> None:
        if ctx.batch_size % 2:
            raise ValueError(f"{self.name}: train.batch_size must be even (pairs), got {ctx.batch_size}")
        if cfg.reference not in ("sampler", "base"):
            raise ValueError(f"{self.name}: reference must be sampler|base, got {cfg.reference!r}")
        self.dim, self.env = setup_trajectories(self.name, ctx, cfg)
        self.reference = ctx.base if cfg.reference == "base" else None

    def collect(self) -> Trajectories:
        ctx, cfg = self.ctx, self.config
        g, n, rows = ctx.global_rows(ctx.batch_size)  # whole pairs (DDPO detail 6): the batch is even
        prompts = grouped_prompts(ctx.env, n // 2, 2, g)[rows]
        x_T = shared_group_noise(self.env, n // 2, 2, g)[rows] if cfg.shared_noise else None
        return self.collect_trajectories(prompts, x_T=x_T)

    def advantages(self, prompts: list[str], rewards: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The pair labels (detail 2) and the gathered reward statistics."""
        all_r = self.ctx.gather(rewards)
        gap = (rewards[0::2] - rewards[1::2]).abs().mean()
        stats = {
            "reward_mean": float(all_r.mean()),
            "reward_std": float(all_r.std(unbiased=False)),
            "pair_reward_gap": float(gap),
        }
        return pair_labels(rewards), stats

    def minibatches(self, batch: Trajectories):
        label = batch.advantages.reshape(-1, 2).cpu()  # (P, 2) ±1
        first = torch.arange(label.shape[0]) * 2
        second_wins = (label[:, 1] > 0).long()
        pairs = PairBatch(traj=batch, winner=first + second_wins, loser=first + 1 - second_wins)
        yield from super().minibatches(pairs)

    def loss(self, mb: Transitions) -> dict[str, Tensor]:
        cfg, pairs = self.config, mb.batch
        m = len(mb.sample)
        rows = torch.cat([pairs.winner[mb.sample], pairs.loser[mb.sample]])  # (2M,) winners first
        steps = torch.cat([mb.step, mb.step])
        both = Transitions(pairs.traj, rows, steps, first=mb.first)
        log_prob = self.reduce(self.step_outputs(self.ctx.policy, both).log_prob)  # (2M,)
        old = self.reduce(pairs.traj.log_probs[rows, steps].to(log_prob.device))  # (2M,) θ_old
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reduce(self.step_outputs(self.reference.policy, both).log_prob)
        else:
            ref = old
        out = d3po_loss(log_prob[:m], log_prob[m:], ref[:m], ref[m:], beta=cfg.beta, ratio_clip=cfg.ratio_clip)
        if mb.first:
            fresh_clip = ((log_prob.detach() - old).exp() - 1.0).abs() > cfg.ratio_clip
            out.update(self.check_fresh_ratio(log_prob, old, {"clipfrac": fresh_clip.float().mean()}))
        out.update({k: torch.tensor(v) for k, v in pairs.traj.stats.items()})
        return self.weighted(out, mb.weight)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
