"""The denoising chain as a Markov decision process (Diffusion-DPO supp. S3, eq. 19).

::

    s_t = (c, t, x_t)          a_t = x_{t-1} ~ π_θ(· | s_t) = p_θ(x_{t-1} | x_t, c)
    P(s_{t+1} | s_t, a_t) = δ(c) δ(t−1) δ(a_t)          ρ_0 = p(c) × δ_T × N(0, I)
    R(s_t, a_t) = r(c, x_0) if t = 0 else 0

`DenoisingCore` is batched torch and never detaches or switches autograd off by itself (DRaFT backpropagates
through it). It holds the prompt distribution, the timestep schedule, decoding and the terminal reward; the policy
holds the network and the Gaussian step. It also exposes the forward process q(x_t | x_0), the behaviour policy of
the off-policy (Diffusion-DPO) view of S3, and ``rollout``, which drives the one sampling loop
(`DiffusionPolicy.sample`) from ρ_0 to the terminal reward. The training loop, the algorithms and the evaluation
all sample through ``rollout``; the gymnasium adapters in ``envs/denoising.py`` wrap this core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from rlkit_diffusion.policy import Cond, DiffusionPolicy, Rows, SampleOutput, StepOutput, check_rows
from rlkit_diffusion.rewards.base import checked_reward
from rlkit_diffusion.worlds.base import World


def rescore_at(
    world: World,
    policy: DiffusionPolicy,
    x_t: Tensor,
    t: Tensor | int | float,
    t_prev: Tensor | int | float,
    cond: Cond,
    *,
    prev_sample: Tensor | None = None,
) -> StepOutput:
    """π(· | s) of any ``policy`` at states s = (c, t, x_t) given by their timesteps (t → t_prev), with the world's
    classifier-free guidance: the body of `DenoisingCore.rescore` (which looks t, t_prev up in its schedule), for
    callers that hold the timesteps themselves (the TorchRL actor, whose observation carries them; a schedule other
    than the core's). ``prev_sample``: recorded actions to score (``log_prob``); None = only the distribution.
    """
    uncond = world.uncond(x_t.shape[0])
    eps = policy.predict_noise(x_t, t, cond, uncond=uncond, guidance_scale=world.guidance_scale)
    mean, std, x0_pred = policy.step_distribution(x_t, t, t_prev, eps)
    log_prob = None if prev_sample is None else policy.log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob, eps=eps, x0_pred=x0_pred)


@dataclass
class State:
    """A batch of MDP states s = (c, t, x_t); all rows share the step index."""

    prompts: list[str]
    cond: Cond
    index: int  # position in the schedule: 0 = x_T, N = x_0 (terminal)
    x: Tensor  # (B, ...)


@dataclass
class Rollout:
    """A batch of trajectories from ρ_0 to the terminal state, with terminal rewards."""

    prompts: list[str]
    cond: Cond
    sample: SampleOutput
    rewards: Tensor | None  # (B,) r(c, x_0) (None if not requested)

    @property
    def x0(self) -> Tensor:
        return self.sample.x0


class DenoisingCore:
    """Functional, batched torch core of the denoising MDP.

    Args:
        world: the task (prompts, decoder, rewards).
        reward: name of the reward model of the terminal reward (``world.rewards[reward]``); None = no reward
            (an evaluation draws samples and scores them itself).
        num_inference_steps: N, the episode length (defaults to the policy's).
        strength: SDEdit: episodes start at t = strength·T from q(x_t | x_input) instead of N(0, I).
        split: prompt split of ρ_0: ``train`` or ``heldout``.
    """

    def __init__(
        self,
        world: World,
        *,
        reward: str | None = "proxy",
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        split: str = "train",
    ):
        self.world = world
        self.reward_name = reward
        self.reward_model = world.reward(reward) if reward is not None else None
        self.schedule = world.policy.schedule(num_inference_steps, strength=strength)
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.prompts = world.train_prompts if split == "train" else world.heldout_prompts
        self.sample_shape = tuple(world.sample_shape)

    @property
    def horizon(self) -> int:
        return len(self.schedule)

    def timestep(self, index: int) -> int | float:
        """The diffusion timestep t of schedule position ``index`` (-1 once terminal); σ (a float) for flow."""
        return self.schedule.timesteps[index].item() if index < self.horizon else -1

    # ρ_0 ---------------------------------------------------------------------------------------------------------
    def sample_prompts(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """c ~ p(c): uniform over the split's prompts."""
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in idx.tolist()]

    def initial_state(
        self,
        prompts: list[str],
        *,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        x_input: Tensor | None = None,
        cond: Cond = None,
        rows: Rows | None = None,
    ) -> State:
        """s_0 = (c, T, x_T), x_T ~ N(0, I); for SDEdit (``x_input`` given) x_T ~ q(x_t | x_input), t = the
        schedule's first timestep (strength·T). ``cond``: the prompts' encoding if already computed. ``rows =
        (n, rows)``: the prompts are the rows ``rows`` of n drawn as one; x_T is drawn for all n and sliced."""
        if isinstance(prompts, str):  # a str would be iterated per character
            raise ValueError(f"prompts must be a list of strings, got the string {prompts!r} (wrap it: [prompt])")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: an episode needs at least one prompt")
        device = self.world.device
        cond = self.world.encoder(prompts) if cond is None else cond
        if x_T is None:
            check_rows(rows, len(prompts))
            n, keep = rows if rows is not None else (len(prompts), slice(None))
            x_T = torch.randn((n, *self.sample_shape), generator=generator, device=device)[keep]
        if x_input is not None:
            t = self.schedule.timesteps[:1].expand(len(prompts)).to(device)
            x_T = self.forward_process(x_input.to(device), t, x_T)
        self._check(x_T, len(prompts), "x_T")
        return State(prompts=list(prompts), cond=cond, index=0, x=x_T)

    # P and R -----------------------------------------------------------------------------------------------------
    def transition(self, state: State, action: Tensor) -> State:
        """s_{t+1} = (c, t−1, a_t): deterministic. Raises ValueError on a malformed action."""
        if state.index >= self.horizon:
            raise ValueError("the episode is over (t = 0): call initial_state / reset first")
        self._check(action, len(state.prompts), "action")
        return replace(state, index=state.index + 1, x=action)

    def reward(self, state: State) -> Tensor:
        """R = r(c, x_0) at the terminal state, 0 before (eq. 19). (B,)"""
        if state.index < self.horizon:
            return torch.zeros(len(state.prompts), device=state.x.device)
        return self.terminal_reward(state.x, state.prompts)

    def terminal_reward(self, x0: Tensor, prompts: list[str]) -> Tensor:
        """r(c, decode(x_0)); keeps autograd (DRaFT)."""
        if self.reward_model is None:
            raise ValueError("this DenoisingCore was built without a reward (reward=None)")
        return checked_reward(self.reward_model, self.world.decode(x0), prompts, name=self.reward_name)

    # The behaviour policy of the off-policy view (S3) -------------------------------------------------------------
    def forward_process(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), reparameterised with ``noise`` (eq. 2)."""
        return self.world.policy.add_noise(x0, noise, t)

    # Whole episodes through THE sampling loop --------------------------------------------------------------------
    def rollout(
        self,
        policy: DiffusionPolicy,
        prompts: list[str],
        *,
        generator: torch.Generator | None = None,
        x_T: Tensor | None = None,
        x_input: Tensor | None = None,
        cond: Cond = None,
        with_reward: bool = True,
        rows: Rows | None = None,
        **sample_kwargs: Any,
    ) -> Rollout:
        """Run ``policy`` from ρ_0 to t = 0 (`DiffusionPolicy.sample`) and score the final sample.

        ``sample_kwargs`` go to `DiffusionPolicy.sample` (``grad``, ``k``, ``checkpoint``, ``return_trajectory``).
        ``rows = (n, rows)``: the episodes are the rows ``rows`` of n run as one batch (data parallelism,
        `AlgoContext.global_rows`): x_T and every step's noise are drawn for all n rows and sliced, so a row's
        episode does not depend on how the n rows are split over processes.
        """
        s0 = self.initial_state(prompts, generator=generator, x_T=x_T, x_input=x_input, cond=cond, rows=rows)
        out = self.world.denoise(
            policy, s0.x, s0.cond, schedule=self.schedule, generator=generator, rows=rows, **sample_kwargs
        )
        rewards = self.terminal_reward(out.x0, s0.prompts) if with_reward else None
        return Rollout(prompts=s0.prompts, cond=s0.cond, sample=out, rewards=rewards)

    def rescore(
        self,
        policy: DiffusionPolicy,
        x_t: Tensor,
        index: Tensor | int,
        cond: Cond,
        *,
        prev_sample: Tensor | None = None,
    ) -> StepOutput:
        """π(· | s) of any ``policy`` at stored states s = (c, t, x_t): THE re-scoring of a recorded trajectory.

        The path KL of the evaluation (reference at the policy's states), DDPO/DPOK (the current and the reference
        policy at the collected transitions) and DRaFT+'s ε penalty all call this, so a stored state is always
        evaluated with the world's guidance, the same schedule and the same step maths as when it was sampled.

        Args:
            policy: the network to score with (the trained policy, the reference, ...).
            x_t: (M, ...) stored states.
            index: schedule positions of the rows, an int or (M,) long (0 = x_T's step).
            cond: the rows' conditioning, batch M (the unconditional side of guidance is the world's, as when
                sampling: it does not depend on the row, so a trajectory need not store it).
            prev_sample: (M, ...) recorded actions x_{t−1} to score (``log_prob``); None = only the distribution
                (``log_prob`` and ``prev_sample`` of the output are then None; no noise is drawn).

        Returns:
            `StepOutput` (``mean``, ``std``, ``eps``, ``x0_pred``; ``log_prob`` of ``prev_sample``).
        """
        sched = self.schedule
        if isinstance(index, Tensor):
            t, t_prev = sched.timesteps.to(x_t.device)[index], sched.prev_timesteps.to(x_t.device)[index]
        else:
            t, t_prev = sched.timesteps[index], sched.prev_timesteps[index]
        return rescore_at(self.world, policy, x_t, t, t_prev, cond, prev_sample=prev_sample)

    def path_kl(self, policy: DiffusionPolicy, ref_policy: DiffusionPolicy, rollout: Rollout) -> Tensor:
        """Σ_t KL(π_θ(·|x_t, c) ‖ π_ref(·|x_t, c)) along a batch of ``policy``'s trajectories (eq. 10): (B,) nats.

        ``rollout`` must hold the trajectory (``return_trajectory=True``): per-step Gaussian KLs with the shared
        σ_t, the reference re-scored at the policy's own states (`rescore`)."""
        out = rollout.sample
        kl = torch.zeros(out.x0.shape[0], device=out.x0.device)
        for i in range(self.horizon):
            ref = self.rescore(ref_policy, out.latents[i], i, rollout.cond)
            kl += policy.gaussian_kl(out.means[i], ref.mean, out.stds[:, i])
        return kl

    def _check(self, x: Tensor, batch: int, what: str) -> None:
        expected = (batch, *self.sample_shape)
        if not isinstance(x, Tensor):
            raise ValueError(f"{what} must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
        if tuple(x.shape) != expected:
            raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {expected}")
        if not torch.is_floating_point(x):
            raise ValueError(f"{what} must be a floating-point tensor of shape {expected}, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} of shape {expected} contains NaN or inf")
