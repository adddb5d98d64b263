"""Flow-matching policies (`FlowMatchingPolicy`): parity with diffusers' Euler step, the SDE step and its
log-probability, guidance in one forward, the SDE's marginals against the ODE's, DPO's velocity weighting, and
learning on toy2d_flow (DPO, DDPO and GRPO on the SDE sampler, DRaFT through the chain, DiffusionNFT in its native
velocity form) that fails when the sign flips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from benchmarks.run import run
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.policy import FlowMatchingPolicy
from rlkit_diffusion.preference import parameterised_weight
from tests.helpers import compose_cfg
from tests.zoo_helpers import FAST_EVAL, did_not_learn, flip_objective, one_thread  # noqa: F401


class TinyVelocity(torch.nn.Module):
    """A smooth conditional velocity field for the maths tests: v(x, t, c) = tanh(W x) · t/1000 + c."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * (t[:, None] / 1000) + c


class GaussianVelocity(torch.nn.Module):
    """The exact velocity E[ε − x_0 | x_σ] of x_0 ~ N(m, diag s²): both samplers' marginals are N((1−σ)m, V_σ)."""

    def __init__(self, m: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, x: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
        sig = (t / 1000)[:, None]
        var = (1 - sig) ** 2 * self.s**2 + sig**2  # V_σ
        r = x - (1 - sig) * self.m
        return sig / var * r - (self.m + (1 - sig) * self.s**2 / var * r)  # E[ε|x] − E[x_0|x]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_ode_sampling_is_bit_identical_to_diffusers_flow_match_euler(shift):
    torch.manual_seed(0)
    net, sched = TinyVelocity(), FlowMatchEulerDiscreteScheduler(shift=shift)
    policy = FlowMatchingPolicy(net, sched, sampler="ode", num_inference_steps=28)
    x, c = torch.randn(5, 3), torch.randn(5, 3)
    ours = policy.sample(x, c).x0
    sched.set_timesteps(28)
    ref = x.clone()
    for t in sched.timesteps:  # diffusers' pipeline loop: the model at t = σ·T, then FlowMatchEulerDiscrete.step
        ref = sched.step(net(ref, t.expand(5), c), t, ref).prev_sample
    assert torch.equal(ours, ref)
    assert torch.equal(policy.schedule().timesteps, sched.sigmas[:-1])


def test_forward_process_and_target_match_diffusers():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    policy = FlowMatchingPolicy(TinyVelocity(), sched)
    sched.set_timesteps(10)
    x0, noise = torch.randn(4, 3), torch.randn(4, 3)
    for i in (0, 4, 9):
        want = sched.scale_noise(x0, sched.timesteps[i : i + 1], noise)
        assert torch.equal(policy.add_noise(x0, noise, sched.sigmas[i].expand(4)), want)
    t = torch.tensor([0, 10, 500, 999])  # integer timesteps index the training grid (diffusers', ascending)
    train_sigmas = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.flip(0)
    torch.testing.assert_close(policy.sigma(t), train_sigmas[t], rtol=0, atol=1e-7)
    assert torch.equal(policy.training_target(x0, noise, t), noise - x0)


def test_sde_step_is_flow_grpo_and_log_prob_is_the_gaussian_density():
    torch.manual_seed(1)
    policy = FlowMatchingPolicy(TinyVelocity(), FlowMatchEulerDiscreteScheduler(shift=3.0), noise_level=0.7)
    sched = policy.schedule(10)
    x, c = torch.randn(6, 3), torch.randn(6, 3)
    for i in (0, 5, 9):  # the first step (σ = 1), a middle one, the last (σ' = 0)
        sigma, sigma_next = sched.timesteps[i], sched.prev_timesteps[i]
        out = policy.step(x, sigma, sigma_next, c, generator=torch.Generator().manual_seed(i))
        v = policy.model_output(x, sigma, c)
        # Flow-GRPO's sde_step_with_logprob, written as there (σ = 1 uses σ_max = the schedule's second σ).
        dt = sigma_next - sigma
        std_dev = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sched.timesteps[1], sigma))) * 0.7
        mean = x * (1 + std_dev**2 / (2 * sigma) * dt) + v * (1 + std_dev**2 * (1 - sigma) / (2 * sigma)) * dt
        std = std_dev * torch.sqrt(-dt)
        torch.testing.assert_close(out.mean, mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out.std, std.expand(6), rtol=1e-6, atol=0)
        want = torch.distributions.Normal(out.mean, std).log_prob(out.prev_sample).sum(1)
        torch.testing.assert_close(out.log_prob, want, rtol=1e-5, atol=1e-5)


def test_guidance_is_one_batched_forward():
    net = TinyVelocity()
    policy = FlowMatchingPolicy(net, FlowMatchEulerDiscreteScheduler(), guidance_scale=4.0)
    x, c, u = torch.randn(5, 3), torch.randn(5, 3), torch.zeros(5, 3)
    n0 = policy.nfe
    v = policy.predict_noise(x, 0.5, c, uncond=u)
    assert policy.nfe - n0 == 10  # the unconditional and conditional rows of one forward
    t = torch.full((5,), 500.0)
    torch.testing.assert_close(v, net(x, t, u) + 4.0 * (net(x, t, c) - net(x, t, u)))


def test_velocity_error_weighted_by_one_minus_sigma_squared_is_the_eps_error():
    policy = FlowMatchingPolicy(TinyVelocity(), FlowMatchEulerDiscreteScheduler(shift=3.0))
    x0, noise, v_hat = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 3)
    t = torch.randint(0, 1000, (8,))
    x_t = policy.add_noise(x0, noise, t)
    s = policy.sigma(t)[:, None]
    eps_hat = x_t + (1 - s) * v_hat  # the ε implied by the velocity at x_σ
    eps_err = ((noise - eps_hat) ** 2).sum(1)
    v_err = ((policy.training_target(x0, noise, t) - v_hat) ** 2).sum(1)
    torch.testing.assert_close(parameterised_weight(policy, t) * v_err, eps_err, rtol=1e-4, atol=1e-5)


def _moment_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |difference| of per-dimension means and variances of two independent samples, in standard errors."""
    n = a.shape[0]
    z_mean = (a.mean(0) - b.mean(0)) / (a.var(0) / n + b.var(0) / n).sqrt()
    z_var = (a.var(0) - b.var(0)) / (2 * a.var(0) ** 2 / n + 2 * b.var(0) ** 2 / n).sqrt()
    return float(torch.cat([z_mean.abs(), z_var.abs()]).max())


@pytest.mark.usefixtures("one_thread")
def test_sde_marginals_match_the_ode_at_every_step():
    """The SDE (F2-F4) keeps the probability-flow ODE's marginals: with the exact velocity of a Gaussian, the mean
    and variance of x_σ under both samplers (independent draws) agree within their standard errors at every σ of
    the schedule; adding the same noise WITHOUT the score correction of the drift does not.

    Noise level a = 0.3: the Euler–Maruyama step has a bias that does not vanish with N near σ = 1, where
    s_σ² |dt| ≈ a²/i at the i-th step (an Ornstein–Uhlenbeck step of rate c = a²/(2i) has variance error c²,
    Σ_i c² ≈ 0.4 a⁴): 0.003 for a = 0.3, 0.1 for Flow-GRPO's a = 0.7 (docs/derivation.md)."""
    m, s = torch.tensor([1.5, -0.5]), torch.tensor([0.3, 0.8])
    sched, n, steps = FlowMatchEulerDiscreteScheduler(), 20000, 100
    sde = FlowMatchingPolicy(GaussianVelocity(m, s), sched, sampler="sde", noise_level=0.3, num_inference_steps=steps)
    ode = FlowMatchingPolicy(GaussianVelocity(m, s), sched, sampler="ode", num_inference_steps=steps)
    x_T = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    a = sde.sample(x_T, None, generator=torch.Generator().manual_seed(1), return_trajectory=True).latents
    b = ode.sample(torch.randn(n, 2, generator=torch.Generator().manual_seed(2)), None, return_trajectory=True).latents
    z = [_moment_z(xa, xb) for xa, xb in zip(a[1:], b[1:])]
    assert max(z) < 4.0, max(z)  # 2 × 2 moments × 100 steps: |z| < 4 with probability > 0.99 if they agree

    class NoCorrection(FlowMatchingPolicy):  # the same std, drift v only: the marginals spread out
        def step_distribution(self, x_t, t, t_prev, eps, *, eta=None):
            mean, std, x0 = super().step_distribution(x_t, t, t_prev, eps, eta=eta)
            return x_t + (t_prev - t) * eps, std, x0

    naive = NoCorrection(GaussianVelocity(m, s), sched, sampler="sde", noise_level=0.3, num_inference_steps=steps)
    c = naive.sample(x_T, None, generator=torch.Generator().manual_seed(1), return_trajectory=True).latents
    assert _moment_z(c[-1], b[-1]) > 10.0


def test_rescore_and_path_kl_run_unchanged_on_a_flow_world(flow_world):
    core = DenoisingCore(flow_world)
    prompts = flow_world.train_prompts[:4]
    ro = core.rollout(flow_world.policy, prompts, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    i = 3
    again = core.rescore(flow_world.policy, ro.sample.latents[i], i, ro.cond, prev_sample=ro.sample.latents[i + 1])
    torch.testing.assert_close(again.log_prob, ro.sample.log_probs[:, i])
    assert torch.all(core.path_kl(flow_world.policy, flow_world.policy, ro) == 0)
    assert isinstance(core.timestep(0), float) and core.timestep(0) == 1.0


@pytest.fixture(scope="module")
def flow_world():
    from rlkit_diffusion.worlds.toy2d import build_toy2d_flow

    return build_toy2d_flow(optimum_pool=1024)


def _learn(tmp_path: Path, algo: str, *overrides: str, name: str = "run") -> dict:
    cfg = compose_cfg(["world=toy2d_flow", f"out_dir={tmp_path}", f"algo={algo}", *FAST_EVAL, *overrides])
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg, run_dir=run_dir)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("algo", ["dpo", "ddpo", "grpo", "draft", "nft"])
def test_learns_on_toy2d_flow_and_flipped_does_not(tmp_path, monkeypatch, algo):
    res = _learn(tmp_path, algo, name=algo)
    assert res["gold_reward_trained"] > res["gold_reward_base"] + 0.3, res
    if algo == "dpo":  # the KL-regularised objective moves towards p*; DDPO/DRaFT maximise the reward alone
        assert res["distance_to_optimum_trained"] < 0.5 * res["distance_to_optimum_base"], res
    flip_objective(monkeypatch)
    steps = {"dpo": 60, "ddpo": 20, "grpo": 20, "draft": 20, "nft": 60}[algo]
    assert did_not_learn(tmp_path, algo, f"train.steps={steps}", name=f"{algo}-flipped", train_fn=_learn)


def test_algorithms_needing_a_gaussian_step_refuse_the_ode_sampler(flow_world):
    from algos.ddpo import DDPO, DDPOConfig
    from tests.zoo_helpers import toy_context

    ctx = toy_context(flow_world)
    ctx.policy.sampler, ctx.policy.eta = "ode", 0.0
    with pytest.raises(ValueError, match="stochastic policy"):
        DDPO(DDPOConfig()).setup(ctx)
    assert math.isfinite(ctx.policy.sample(torch.zeros(2, 2), ctx.world.encoder(["angle 0"] * 2)).x0.sum().item())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "algo",
    [
        "dpo",
        "dpo_l2",
        "sft",
        "rethink_dpo",
        "ddpo",
        "dpok",
        "grpo",
        "mix_grpo",
        "d3po",
        "kto",
        "dspo",
        "nft",
        "draft",
        "draft_lv",
        "alignprop",
        "best_of_n",
    ],
)
def test_every_algorithm_runs_on_the_flow_policy(tmp_path, algo):
    """Two updates and the evaluation of every algorithm on toy2d_flow (the SDE sampler)."""
    tiny_eval = ["eval.samples_per_prompt=8", "eval.heldout=false", "eval.bootstrap=20", "world.optimum_pool=256"]
    cfg = compose_cfg(["world=toy2d_flow", f"out_dir={tmp_path}", f"algo={algo}", "train.steps=2", *tiny_eval])
    cfg.train.batch_size = 16
    res = run(cfg, run_dir=tmp_path / algo)
    assert res["world"] == "toy2d_flow" and math.isfinite(res["gold_reward_trained"])
