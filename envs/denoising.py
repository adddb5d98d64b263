"""Gymnasium adapters over the denoising MDP core (`rlkit_diffusion.mdp.DenoisingCore`).

* `DenoisingVectorEnv` — a ``gymnasium.vector.VectorEnv`` over the core (numpy in, numpy out).
* `DenoisingEnv` — a single-env adapter, registered as ``rlkit_diffusion/Denoising-v0`` (by ``import envs``);
  passes ``check_env``.

The maths (ρ_0, P, R, the forward process, rollouts) lives in the core; these classes only convert.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv

from rlkit_diffusion.mdp import DenoisingCore, State
from rlkit_diffusion.worlds.base import World


# ----------------------------------------------------------------------------------------------------------------
# gymnasium adapters (numpy in, numpy out)
# ----------------------------------------------------------------------------------------------------------------
def _t_dtype(core: DenoisingCore) -> type:
    """The observation's t: the integer timestep of an ε-policy, the float σ ∈ (0, 1] of a flow policy (−1 once
    terminal in both)."""
    return np.float32 if core.world.policy.prediction_type == "flow" else np.int64


def _single_spaces(core: DenoisingCore) -> tuple[spaces.Dict, spaces.Box]:
    box = spaces.Box(-np.inf, np.inf, shape=core.sample_shape, dtype=np.float32)
    flow = _t_dtype(core) is np.float32
    t_high = 1.0 if flow else core.world.policy.num_train_timesteps
    obs = spaces.Dict(
        {
            "x": box,
            "t": spaces.Box(-1, t_high, shape=(), dtype=_t_dtype(core)),
            "prompt": spaces.Discrete(len(core.prompts)),
        }
    )
    return obs, spaces.Box(-np.inf, np.inf, shape=core.sample_shape, dtype=np.float32)


def checked_action(action: Any, expected: tuple[int, ...]) -> np.ndarray:
    """``action`` as an array, refused (ValueError) unless it has shape ``expected`` and is finite in float32."""
    arr = np.asarray(action)
    if arr.shape != expected:
        raise ValueError(f"action has shape {arr.shape}, expected {expected}")
    with np.errstate(over="ignore"):
        in_range = np.all(np.isfinite(arr.astype(np.float32)))
    if not in_range:
        big = float(np.nanmax(np.abs(arr.astype(np.float64)))) if not np.isnan(arr).all() else float("nan")
        raise ValueError(
            f"action of shape {expected} contains NaN, inf or values outside the float32 range (max |a| = {big:.3g})"
        )
    return arr


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
        options = dict(options or {})
        prompt = options.pop("prompt", None)
        if options:
            raise ValueError(f"reset: unknown option(s) {sorted(options)}; the only option is 'prompt'")
        if prompt is not None:  # a prompt of the split for every env (a str), or one per env (a list)
            prompts = [prompt] * self.num_envs if isinstance(prompt, str) else list(prompt)
            unknown = [p for p in prompts if p not in self.core.prompts]
            if len(prompts) != self.num_envs or unknown:
                raise ValueError(
                    f"reset: options['prompt'] must be one of the split's {len(self.core.prompts)} prompts or a list "
                    f"of {self.num_envs} of them; got {prompt!r}"
                )
        else:
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
        arr = checked_action(actions, (self.num_envs, *self.core.sample_shape))
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
        t = np.full(self.num_envs, self.core.timestep(s.index), dtype=_t_dtype(self.core))
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
        arr = checked_action(action, self.core.sample_shape)
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

    def render(self):
        raise NotImplementedError(
            "DenoisingEnv has no render mode: the image is world.decode(x_0) of the final observation's 'x' "
            "(core.world.decode(torch.as_tensor(obs['x'])[None]))"
        )

    @staticmethod
    def _unbatch(obs: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"x": obs["x"][0], "t": np.asarray(obs["t"][0]), "prompt": int(obs["prompt"][0])}
