"""The denoising chain as a Markov decision process (Diffusion-DPO supp. S3, eq. 19).

::

    s_t = (c, t, x_t)          a_t = x_{t-1} ~ π_θ(· | s_t) = p_θ(x_{t-1} | x_t, c)
    P(s_{t+1} | s_t, a_t) = δ(c) δ(t−1) δ(a_t)          ρ_0 = p(c) × δ_T × N(0, I)
    R(s_t, a_t) = r(c, x_0) if t = 0 else 0

Three layers, one set of maths:

* `DenoisingCore` — batched torch, never detaches and never switches autograd off by itself (DRaFT backpropagates
  through it). It holds the prompt distribution, the timestep schedule, decoding and the terminal reward; the
  policy holds the network and the Gaussian step. It also exposes the forward process q(x_t | x_0), the
  behaviour policy of the off-policy (Diffusion-DPO) view of S3, and ``rollout``, which drives the one sampling
  loop (`DiffusionPolicy.sample`) from ρ_0 to the terminal reward.
* `DenoisingVectorEnv` — a ``gymnasium.vector.VectorEnv`` over the core (numpy in, numpy out).
* `DenoisingEnv` — a single-env adapter, registered as ``rlkit_diffusion/Denoising-v0``; passes ``check_env``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from torch import Tensor

from rlkit_diffusion.policy import Cond, DiffusionPolicy, SampleOutput
from rlkit_diffusion.worlds.base import World


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


def check_reward(r: Any, batch: int, name: str) -> None:
    """A reward model's output must be a (B,) tensor: else a one-line ValueError naming the reward."""
    if not isinstance(r, Tensor):
        raise ValueError(f"reward {name!r} returned {type(r).__name__}, expected a tensor of shape ({batch},)")
    if tuple(r.shape) != (batch,):
        raise ValueError(f"reward {name!r} returned shape {tuple(r.shape)}, expected ({batch},)")


class DenoisingCore:
    """Functional, batched torch core of the denoising MDP.

    Args:
        world: the task (prompts, decoder, rewards).
        reward: name of the reward model of the terminal reward (``world.rewards[reward]``).
        num_inference_steps: N, the episode length (defaults to the policy's).
        strength: SDEdit: episodes start at t = strength·T from q(x_t | x_input) instead of N(0, I).
        split: prompt split of ρ_0: ``train`` or ``heldout``.
    """

    def __init__(
        self,
        world: World,
        *,
        reward: str = "proxy",
        num_inference_steps: int | None = None,
        strength: float = 1.0,
        split: str = "train",
    ):
        self.world = world
        self.reward_name = reward
        self.reward_model = world.reward(reward)
        self.schedule = world.policy.schedule(num_inference_steps, strength=strength)
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        self.prompts = world.train_prompts if split == "train" else world.heldout_prompts
        self.sample_shape = tuple(world.sample_shape)

    @property
    def horizon(self) -> int:
        return len(self.schedule)

    def timestep(self, index: int) -> int:
        """The diffusion timestep t of schedule position ``index`` (-1 once terminal)."""
        return int(self.schedule.timesteps[index]) if index < self.horizon else -1

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
    ) -> State:
        """s_0 = (c, T, x_T), x_T ~ N(0, I); for SDEdit (``x_input`` given) x_T ~ q(x_t | x_input)."""
        device = self.world.device
        cond = self.world.encoder(prompts)
        if x_T is None:
            x_T = torch.randn((len(prompts), *self.sample_shape), generator=generator, device=device)
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
        r = self.reward_model(self.world.decode(x0), prompts)
        check_reward(r, len(prompts), self.reward_name)
        return r

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
        with_reward: bool = True,
        **sample_kwargs: Any,
    ) -> Rollout:
        """Run ``policy`` from ρ_0 to t = 0 (`DiffusionPolicy.sample`) and score the final sample.

        ``sample_kwargs`` go to `DiffusionPolicy.sample` (``grad``, ``k``, ``checkpoint``, ``return_trajectory``).
        """
        s0 = self.initial_state(prompts, generator=generator, x_T=x_T, x_input=x_input)
        uncond = self.world.uncond(len(prompts))
        out = policy.sample(
            s0.x,
            s0.cond,
            schedule=self.schedule,
            uncond=uncond,
            guidance_scale=self.world.guidance_scale,
            generator=generator,
            **sample_kwargs,
        )
        rewards = self.terminal_reward(out.x0, s0.prompts) if with_reward else None
        return Rollout(prompts=s0.prompts, cond=s0.cond, sample=out, rewards=rewards)

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


# ----------------------------------------------------------------------------------------------------------------
# gymnasium adapters (numpy in, numpy out)
# ----------------------------------------------------------------------------------------------------------------
def _single_spaces(core: DenoisingCore) -> tuple[spaces.Dict, spaces.Box]:
    box = spaces.Box(-np.inf, np.inf, shape=core.sample_shape, dtype=np.float32)
    obs = spaces.Dict(
        {
            "x": box,
            "t": spaces.Box(-1, core.world.policy.num_train_timesteps, shape=(), dtype=np.int64),
            "prompt": spaces.Discrete(len(core.prompts)),
        }
    )
    return obs, spaces.Box(-np.inf, np.inf, shape=core.sample_shape, dtype=np.float32)


class DenoisingVectorEnv(VectorEnv):
    """``num_envs`` denoising episodes stepped in lock-step (every sub-env is at the same t).

    Observations: ``{"x": x_t, "t": t, "prompt": index into the split's prompts}``; ``info["prompts"]`` has the
    strings. Actions: x_{t-1}, shape ``(num_envs, *sample_shape)``. Autoreset: next step (gymnasium's default).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, world: World, num_envs: int = 1, **core_kwargs: Any):
        self.core = DenoisingCore(world, **core_kwargs)
        self.num_envs = int(num_envs)
        self.single_observation_space, self.single_action_space = _single_spaces(self.core)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self._generator = torch.Generator()
        self._state: State | None = None
        self._needs_reset = False

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._generator.manual_seed(seed)
        prompts = self.core.sample_prompts(self.num_envs, self._generator)
        x_T = torch.randn((self.num_envs, *self.core.sample_shape), generator=self._generator)
        self._state = self.core.initial_state(prompts, x_T=x_T.to(self.core.world.device))
        self._needs_reset = False
        return self._obs(), {"prompts": list(prompts)}

    def step(self, actions):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._needs_reset:  # NEXT_STEP autoreset: this step only resets
            obs, info = self.reset()
            zeros = np.zeros(self.num_envs, dtype=bool)
            return obs, np.zeros(self.num_envs), zeros, zeros, info
        expected = (self.num_envs, *self.core.sample_shape)
        arr = np.asarray(actions)
        if arr.shape != expected:
            raise ValueError(f"action has shape {arr.shape}, expected {expected}")
        action = torch.as_tensor(arr, dtype=torch.float32, device=self.core.world.device)
        with torch.no_grad():
            self._state = self.core.transition(self._state, action)
            reward = self.core.reward(self._state)
        done = self._state.index >= self.core.horizon
        self._needs_reset = done
        terminated = np.full(self.num_envs, done, dtype=bool)
        return (
            self._obs(),
            reward.detach().cpu().numpy().astype(np.float64),
            terminated,
            np.zeros(self.num_envs, dtype=bool),
            {"prompts": list(self._state.prompts)},
        )

    def _obs(self) -> dict[str, np.ndarray]:
        s = self._state
        idx = np.array([self.core.prompts.index(p) for p in s.prompts], dtype=np.int64)
        t = np.full(self.num_envs, self.core.timestep(s.index), dtype=np.int64)
        return {"x": s.x.detach().cpu().numpy().astype(np.float32), "t": t, "prompt": idx}


class DenoisingEnv(gym.Env):
    """Single-episode adapter: ``gymnasium.make("rlkit_diffusion/Denoising-v0", world="toy2d")``.

    Args:
        world: a built `World`, or a world name for `rlkit_diffusion.worlds.build_world`.
        world_kwargs: passed to ``build_world`` when ``world`` is a name.
        core_kwargs: passed to `DenoisingCore` (``reward``, ``num_inference_steps``, ``strength``, ``split``).
    """

    metadata = {"render_modes": []}

    def __init__(self, world: World | str = "toy2d", world_kwargs: dict | None = None, **core_kwargs: Any):
        if isinstance(world, str):
            from rlkit_diffusion.worlds import build_world

            world = build_world(world, **(world_kwargs or {}))
        self._vec = DenoisingVectorEnv(world, num_envs=1, **core_kwargs)
        self.core = self._vec.core
        self.observation_space = self._vec.single_observation_space
        self.action_space = self._vec.single_action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, info = self._vec.reset(seed=seed, options=options)
        return self._unbatch(obs), {"prompt": info["prompts"][0]}

    def step(self, action):
        arr = np.asarray(action)
        if arr.shape != self.core.sample_shape:
            raise ValueError(f"action has shape {arr.shape}, expected {self.core.sample_shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"action of shape {self.core.sample_shape} contains NaN or inf")
        if self._vec._needs_reset:
            raise RuntimeError("the episode is over: call reset()")
        obs, reward, terminated, truncated, info = self._vec.step(arr[None])
        return (
            self._unbatch(obs),
            float(reward[0]),
            bool(terminated[0]),
            bool(truncated[0]),
            {"prompt": info["prompts"][0]},
        )

    @staticmethod
    def _unbatch(obs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"x": obs["x"][0], "t": np.asarray(obs["t"][0], dtype=np.int64), "prompt": int(obs["prompt"][0])}
