"""The TorchRL door into the MDP: `envs.torchrl.DenoisingTorchRLEnv` passes TorchRL's ``check_env_specs``, keeps the
batch as tensors, and its actor is exactly the policy's denoising step; TorchRL's PPO (``examples/
torchrl_ppo_toy2d.py``) beats the base model on toy2d."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrl_ppo_toy2d.py"


@pytest.fixture(scope="module", params=["toy2d", "toy2d_flow"])
def world(request):
    """The ε world and the flow world (whose t and t_prev are the float σ of the flow schedule)."""
    from rlkit_diffusion.worlds import build_world

    return build_world(request.param, optimum_pool=16)


def test_check_env_specs_and_a_rollout(world):
    from torchrl.envs.utils import check_env_specs

    from envs.torchrl import DenoisingTorchRLEnv

    env = DenoisingTorchRLEnv(world, num_envs=4)
    check_env_specs(env, seed=0)
    td = env.rollout(100, break_when_any_done=True)  # random actions until the episode ends
    n = env.core.horizon
    assert td.shape == (4, n) and isinstance(td["x"], torch.Tensor)
    assert td["next", "done"][:, :-1].sum() == 0 and td["next", "done"][:, -1].all()
    assert (td["next", "reward"][:, :-1] == 0).all()  # R = 0 before t = 0 (eq. 19)
    prompts = [env.prompts[i] for i in td["prompt"][:, -1].tolist()]
    r = world.reward("proxy")(td["next", "x"][:, -1], prompts)  # the terminal reward is r(c, x_0) of the last action
    torch.testing.assert_close(td["next", "reward"][:, -1, 0], r)
    torch.testing.assert_close(td["next", "x"][:, -1], td["action"][:, -1])
    first = env.core.schedule.timesteps[0]
    assert td["t"].dtype == (torch.float32 if world.name == "toy2d_flow" else torch.int64)
    assert td["t"][:, 0].eq(first.to(td["t"].dtype)).all() and (world.name != "toy2d_flow" or first.item() == 1.0)


def test_the_actor_is_the_policy_step(world):
    """loc/scale = mean/σ of `DiffusionPolicy.step`, and TorchRL's log-prob = the policy's (summed over dims)."""
    from tensordict.nn import TensorDictModule
    from torchrl.modules import IndependentNormal, ProbabilisticActor

    from envs.torchrl import DenoisingTorchRLEnv, StepDistribution

    env = DenoisingTorchRLEnv(world, num_envs=6)
    env.set_seed(1)
    td = env.reset()
    net = TensorDictModule(
        StepDistribution(world.policy, world, env.prompts), ["x", "t", "t_prev", "prompt"], ["loc", "scale"]
    )
    actor = ProbabilisticActor(
        net, ["loc", "scale"], distribution_class=IndependentNormal, return_log_prob=True, spec=env.action_spec
    )
    with torch.no_grad():
        td = actor(td)
        prompts = [env.prompts[i] for i in td["prompt"].tolist()]
        step = world.policy.step(
            td["x"], td["t"][:, 0], td["t_prev"][:, 0], world.encoder(prompts), prev_sample=td["action"]
        )
    torch.testing.assert_close(td["loc"], step.mean)
    torch.testing.assert_close(td["scale"], step.std[:, None].expand(-1, 2))
    log_prob = td.get("action_log_prob", td.get("sample_log_prob", None))
    torch.testing.assert_close(log_prob, step.log_prob)


def test_torchrl_ppo_example_beats_the_base():
    spec = importlib.util.spec_from_file_location("torchrl_ppo_toy2d", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--iterations", "3", "--num-envs", "32", "--eval-samples", "32"])
    assert result["reward_trained"] > result["reward_base"]
    assert result["win_rate_vs_base_ci_low"] > 0.5, result
