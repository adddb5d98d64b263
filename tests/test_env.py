"""The denoising MDP: gymnasium API, terminal reward, bad actions, forward process, autograd through the core."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers rlkit_diffusion/Denoising-v0)
from envs.denoising import DenoisingEnv, DenoisingVectorEnv
from rlkit_diffusion.mdp import DenoisingCore


def test_registered_env_passes_check_env(toy_world):
    env = gym.make("rlkit_diffusion/Denoising-v0", world=toy_world)
    check_env(env.unwrapped, skip_render_check=True)


def test_make_by_world_name():
    env = gym.make("rlkit_diffusion/Denoising-v0", world="toy2d", world_kwargs={"optimum_pool": 16})
    obs, info = env.reset(seed=0)
    assert obs["x"].shape == (2,) and int(obs["t"]) > 0 and info["prompt"].startswith("angle")


def test_episode_follows_eq_19(toy_world):
    env = DenoisingEnv(toy_world)
    obs, info = env.reset(seed=1)
    n = env.core.horizon
    ts, rewards = [int(obs["t"])], []
    for i in range(n):
        obs, r, term, trunc, _ = env.step(np.full(2, 0.5, dtype=np.float32))
        rewards.append(r)
        ts.append(int(obs["t"]))
        assert term == (i == n - 1) and not trunc
    assert ts[:-1] == env.core.schedule.timesteps.tolist() and ts[-1] == -1
    assert rewards[:-1] == [0.0] * (n - 1)  # R = 0 before t = 0
    want = toy_world.rewards["proxy"](torch.full((1, 2), 0.5), [info["prompt"]]).item()
    assert rewards[-1] == pytest.approx(want)  # R = r(c, x_0) at t = 0
    np.testing.assert_allclose(obs["x"], 0.5)  # deterministic transition: s_{t+1} holds the action


def test_flow_world_observes_sigma_as_a_float():
    """A flow policy's t is σ ∈ (0, 1] (float32, −1 once terminal), not an integer the cast would round to 0/1; the
    env with it passes gymnasium's checker."""
    env = gym.make("rlkit_diffusion/Denoising-v0", world="toy2d_flow", world_kwargs={"optimum_pool": 16})
    check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    core = env.unwrapped.core
    assert env.observation_space["t"].dtype == np.float32 and obs["t"].dtype == np.float32
    sigmas = [float(obs["t"])]
    for _ in range(core.horizon):
        obs, *_ = env.step(np.zeros(2, dtype=np.float32))
        sigmas.append(float(obs["t"]))
    np.testing.assert_allclose(sigmas[:-1], core.schedule.timesteps.numpy(), rtol=1e-6)
    assert sigmas[0] == 1.0 and 0 < sigmas[-2] < 1 and sigmas[-1] == -1.0


@pytest.mark.parametrize("bad", [np.zeros(3, np.float32), np.zeros((1, 2), np.float32), np.array([np.nan, 0.0])])
def test_bad_actions_raise_with_expected_shape(toy_world, bad):
    env = DenoisingEnv(toy_world)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"\(2,\)"):
        env.step(bad)


def test_vector_env_autoresets_next_step(toy_world):
    venv = DenoisingVectorEnv(toy_world, num_envs=3)
    obs, info = venv.reset(seed=0)
    assert obs["x"].shape == (3, 2) and len(info["prompts"]) == 3
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        venv.step(np.zeros((2, 2)))
    for _ in range(venv.core.horizon):
        obs, r, term, trunc, info = venv.step(np.zeros((3, 2), np.float32))
    assert term.all() and r.shape == (3,) and (r != 0).all()
    obs, r, term, _, _ = venv.step(np.zeros((3, 2), np.float32))  # the reset step
    assert not term.any() and (r == 0).all() and int(obs["t"][0]) == int(venv.core.schedule.timesteps[0])


def test_core_keeps_autograd_and_exposes_forward_process(toy_world):
    core = DenoisingCore(toy_world)
    policy = toy_world.policy
    prompts = core.sample_prompts(4, torch.Generator().manual_seed(0))
    roll = core.rollout(policy, prompts, generator=torch.Generator().manual_seed(0), grad="full")
    roll.rewards.sum().backward()
    grads = [p.grad for p in policy.eps_model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    policy.zero_grad(set_to_none=True)
    x0, eps, t = torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 100, 500, 999])
    a = policy.alphas_cumprod[t][:, None]
    torch.testing.assert_close(core.forward_process(x0, t, eps), a.sqrt() * x0 + (1 - a).sqrt() * eps)
    s = core.initial_state(prompts, x_T=torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        core.transition(s, torch.full((4, 2), float("nan")))
    with pytest.raises(ValueError, match=r"expected \(4, 2\)"):
        core.transition(s, torch.zeros(4, 3))
