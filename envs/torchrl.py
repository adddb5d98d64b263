"""A native TorchRL environment over the batched denoising MDP core (`rlkit_diffusion.mdp.DenoisingCore`).

`DenoisingTorchRLEnv` is a ``torchrl.envs.EnvBase`` whose batch is the core's batch: ``num_envs`` episodes stepped
in lock-step (every row is at the same t), tensors in and out on the world's device, nothing converted to numpy.
It passes TorchRL's own ``check_env_specs``. The MDP (Diffusion-DPO supp. S3, eq. 19)::

    observation  s_t = (x_t, t, t_prev, prompt)    x_t (B, *sample_shape); t, t_prev (B, 1) timesteps of this step
                                                   and of its target: int64 (ε-policies) or the float32 σ of a
                                                   flow policy; prompt (B,) index into ``prompts``
    action       a_t = x_{t-1}                     (B, *sample_shape)
    reward       r(c, x_0) at the last step, 0 before (B, 1)
    done         after N = num_inference_steps actions (B, 1), all rows at once

``t_prev`` is in the observation so that a stateless actor can evaluate the policy's step distribution
π_θ(x_{t-1} | x_t, c) = N(mean, σ_t² I) (`DiffusionPolicy.step_distribution`); `StepDistribution` is that actor
network for TorchRL (``loc``/``scale`` out, for ``ProbabilisticActor`` with ``IndependentNormal``), so the actor's
Gaussian is exactly the policy's step, as in DDPO. ``examples/torchrl_ppo_toy2d.py`` trains it with ``ClipPPOLoss``.

Episodes restart together: a reset (full or partial: every row is done at the same step) draws new prompts
c ~ p(c) and x_T ~ N(0, I) for all rows from the env's generator (``set_seed``).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torchrl.data import Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from rlkit_diffusion.mdp import DenoisingCore, State, rescore_at
from rlkit_diffusion.policy import DiffusionPolicy
from rlkit_diffusion.worlds.base import World


class DenoisingTorchRLEnv(EnvBase):
    """``num_envs`` denoising episodes as one batched TorchRL env (module docstring).

    Args:
        world: a built `World`, or a world name for `rlkit_diffusion.worlds.build_world`.
        num_envs: the batch size B.
        world_kwargs: passed to ``build_world`` when ``world`` is a name.
        core_kwargs: passed to `DenoisingCore` (``reward``, ``num_inference_steps``, ``strength``, ``split``).
    """

    def __init__(
        self, world: World | str = "toy2d", num_envs: int = 1, world_kwargs: dict | None = None, **core_kwargs: Any
    ):
        if isinstance(world, str):
            from rlkit_diffusion.worlds import build_world

            world = build_world(world, **(world_kwargs or {}))
        self.core = DenoisingCore(world, **core_kwargs)
        super().__init__(device=world.device, batch_size=torch.Size([int(num_envs)]))
        b, shape = int(num_envs), self.core.sample_shape
        self._t_dtype = torch.float32 if world.policy.prediction_type == "flow" else torch.int64  # σ or t
        self.observation_spec = Composite(
            x=Unbounded((b, *shape), dtype=torch.float32, device=self.device),
            t=Unbounded((b, 1), dtype=self._t_dtype, device=self.device),
            t_prev=Unbounded((b, 1), dtype=self._t_dtype, device=self.device),
            prompt=Categorical(len(self.core.prompts), (b,), dtype=torch.int64, device=self.device),
            shape=(b,),
            device=self.device,
        )
        self.action_spec = Unbounded((b, *shape), dtype=torch.float32, device=self.device)
        self.reward_spec = Unbounded((b, 1), dtype=torch.float32, device=self.device)
        self.done_spec = Composite(
            done=Categorical(2, (b, 1), dtype=torch.bool, device=self.device),
            terminated=Categorical(2, (b, 1), dtype=torch.bool, device=self.device),
            truncated=Categorical(2, (b, 1), dtype=torch.bool, device=self.device),
            shape=(b,),
            device=self.device,
        )
        self._generator = torch.Generator()
        self._state: State | None = None

    @property
    def prompts(self) -> list[str]:
        """The prompt strings the ``prompt`` observation indexes."""
        return self.core.prompts

    def _observation(self, state: State) -> dict[str, Tensor]:
        b, sched = self.batch_size[0], self.core.schedule
        index = min(state.index, self.core.horizon - 1)  # the terminal observation repeats the last step's times
        t = sched.timesteps[index].item() if state.index < self.core.horizon else -1
        t_prev = sched.prev_timesteps[index].item()
        prompt = torch.tensor([self.core.prompts.index(p) for p in state.prompts], device=self.device)
        return {
            "x": state.x.detach(),
            "t": torch.full((b, 1), t, dtype=self._t_dtype, device=self.device),
            "t_prev": torch.full((b, 1), t_prev, dtype=self._t_dtype, device=self.device),
            "prompt": prompt,
        }

    def _done(self, done: bool) -> dict[str, Tensor]:
        flag = torch.full((self.batch_size[0], 1), done, dtype=torch.bool, device=self.device)
        return {"done": flag, "terminated": flag.clone(), "truncated": torch.zeros_like(flag)}

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        b = self.batch_size[0]
        prompts = self.core.sample_prompts(b, self._generator)
        x_T = torch.randn((b, *self.core.sample_shape), generator=self._generator).to(self.device)
        self._state = self.core.initial_state(prompts, x_T=x_T)
        return TensorDict({**self._observation(self._state), **self._done(False)}, batch_size=self.batch_size)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        with torch.no_grad():
            self._state = self.core.transition(self._state, tensordict.get("action").to(self.device))
            reward = self.core.reward(self._state).float()  # (B,): r(c, x_0) at the last step, else 0
        done = self._state.index >= self.core.horizon
        return TensorDict(
            {**self._observation(self._state), "reward": reward[:, None], **self._done(done)},
            batch_size=self.batch_size,
        )

    def _set_seed(self, seed: int | None) -> None:
        self._generator.manual_seed(int(seed) if seed is not None else torch.seed())


class StepDistribution(nn.Module):
    """The policy's Gaussian step as a TorchRL actor network: ``(x, t, t_prev, prompt) → (loc, scale)``.

    loc = mean of π_θ(x_{t-1} | x_t, c) and scale = σ_t broadcast to x's shape, from the core's one re-scoring of
    states (`rlkit_diffusion.mdp.rescore_at`, with the world's classifier-free guidance); ``prompt`` indexes
    ``prompts`` (the env's). Rows whose σ_t is 0 (a deterministic η = 0 step) have no density: use η > 0 for policy
    gradients.
    """

    def __init__(self, policy: DiffusionPolicy, world: World, prompts: list[str]):
        super().__init__()
        self.policy, self.world, self.prompts = policy, world, list(prompts)

    def forward(self, x: Tensor, t: Tensor, t_prev: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
        lead = x.shape[: x.dim() - len(self.world.sample_shape)]  # the collector's / loss's batch dims
        x_flat = x.reshape(-1, *self.world.sample_shape)  # (M, *sample_shape)
        prompts = [self.prompts[i] for i in prompt.reshape(-1).tolist()]
        cond = self.world.encoder(prompts)
        step = rescore_at(self.world, self.policy, x_flat, t.reshape(-1), t_prev.reshape(-1), cond)
        mean, std = step.mean, step.std  # (M, ...), (M,)
        scale = std.reshape(-1, *([1] * len(self.world.sample_shape))).expand_as(mean)
        return mean.reshape(*lead, *self.world.sample_shape), scale.reshape(*lead, *self.world.sample_shape)


__all__ = ["DenoisingTorchRLEnv", "StepDistribution"]
