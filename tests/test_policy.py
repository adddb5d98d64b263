"""DiffusionPolicy: parity with diffusers' schedulers, log-prob convention, truncated gradients, guidance."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from rlkit_diffusion.policy import DiffusionPolicy, UNetEpsModel


class FixedOutput(nn.Module):
    """An 'ε-model' that returns a given tensor, so the scheduler maths is tested in isolation."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.calls: list[int] = []

    def forward(self, x_t, t, cond):
        self.calls.append(x_t.shape[0])
        return self.out[: x_t.shape[0]]


def _ddim(**kw):
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(eta, set_alpha_to_one, prediction_type):
    g = torch.Generator().manual_seed(0)
    sched = _ddim(
        set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type, clip_sample=False, steps_offset=1
    )
    x_t = torch.randn(4, 3, 8, 8, generator=g)
    out = torch.randn(4, 3, 8, 8, generator=g)
    policy = DiffusionPolicy(FixedOutput(out), sched, sampler="ddim", eta=eta, num_inference_steps=10)
    schedule = policy.schedule()
    sched.set_timesteps(10)
    assert torch.equal(schedule.timesteps, sched.timesteps.long())
    for i in [0, 3, 9]:
        t, t_prev = schedule.timesteps[i], schedule.prev_timesteps[i]
        z = torch.randn(4, 3, 8, 8, generator=g)
        ref = sched.step(out, int(t), x_t, eta=eta, variance_noise=z if eta > 0 else None).prev_sample
        o = policy.step(x_t, t, t_prev, None, noise=z)
        torch.testing.assert_close(o.prev_sample, ref, atol=1e-5, rtol=1e-5)
        if eta == 0:  # deterministic: the mean is the sample
            torch.testing.assert_close(o.mean, ref, atol=1e-5, rtol=1e-5)
            assert torch.all(o.std == 0) and torch.all(o.log_prob == 0)
        else:
            torch.testing.assert_close(o.mean + o.std[:, None, None, None] * z, ref, atol=1e-5, rtol=1e-5)


def test_ddim_clip_sample_matches_diffusers():
    sched = _ddim(clip_sample=True, set_alpha_to_one=False)
    g = torch.Generator().manual_seed(1)
    x_t, out, z = (torch.randn(2, 3, 4, 4, generator=g) * 3 for _ in range(3))
    policy = DiffusionPolicy(FixedOutput(out), sched, eta=1.0, num_inference_steps=5)
    s = policy.schedule()
    sched.set_timesteps(5)
    for i in range(5):
        ref = sched.step(out, int(s.timesteps[i]), x_t, eta=1.0, variance_noise=z).prev_sample
        got = policy.step(x_t, s.timesteps[i], s.prev_timesteps[i], None, noise=z).prev_sample
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [10, 1000])
def test_ddpm_matches_diffusers(steps):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    g = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, 2, 4, 4, generator=g)
    out = torch.randn(3, 2, 4, 4, generator=g)
    policy = DiffusionPolicy(FixedOutput(out), sched, sampler="ddpm", num_inference_steps=steps)
    s = policy.schedule()
    sched.set_timesteps(steps)
    for i in [0, len(s) // 2, len(s) - 1]:
        t = int(s.timesteps[i])
        ref = sched.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))
        o = policy.step(x_t, s.timesteps[i], s.prev_timesteps[i], None, noise=z)
        torch.testing.assert_close(o.prev_sample, ref, atol=1e-5, rtol=1e-5)
        if t == 0:
            torch.testing.assert_close(o.mean, ref, atol=1e-5, rtol=1e-5)


def test_add_noise_matches_diffusers():
    sched = _ddim()
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    policy = DiffusionPolicy(FixedOutput(eps), sched)
    torch.testing.assert_close(policy.add_noise(x0, eps, t), sched.add_noise(x0, eps, t), atol=1e-6, rtol=1e-6)


def test_log_prob_is_summed_normal_log_density():
    g = torch.Generator().manual_seed(4)
    mean, x = torch.randn(6, 3, 5, 5, generator=g), torch.randn(6, 3, 5, 5, generator=g)
    std = torch.rand(6, generator=g) + 0.1
    got = DiffusionPolicy.log_prob(x, mean, std)
    want = torch.distributions.Normal(mean, std[:, None, None, None]).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert got.shape == (6,)


def test_gaussian_kl_closed_form():
    g = torch.Generator().manual_seed(5)
    mp, mq = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0, 0.0])
    kl = DiffusionPolicy.gaussian_kl(mp, mq, std)
    for i in range(3):
        p = torch.distributions.Normal(mp[i], std[i])
        q = torch.distributions.Normal(mq[i], std[i])
        torch.testing.assert_close(kl[i], torch.distributions.kl_divergence(p, q).sum())
    assert kl[3] == 0


def _toy_policy(toy_world):
    import copy

    from rlkit_diffusion.worlds.toy2d import make_scheduler

    model = copy.deepcopy(toy_world.policy.eps_model)
    return DiffusionPolicy(model, make_scheduler(), eta=1.0, num_inference_steps=6)


@pytest.mark.parametrize("k", [1, 3])
def test_truncated_sample_gradient_only_through_last_k(toy_world, k):
    policy = _toy_policy(toy_world)
    grad_flags: list[bool] = []
    policy.eps_model.register_forward_hook(lambda m, i, o: grad_flags.append(o.requires_grad))
    cond = toy_world.encoder(["angle 0"] * 8)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))

    out = policy.sample(x_T, cond, grad="last_k", k=k, generator=torch.Generator().manual_seed(1))
    assert grad_flags == [False] * (6 - k) + [True] * k
    out.x0.pow(2).sum().backward()
    got = [p.grad.clone() for p in policy.eps_model.parameters()]

    # The same computation written by hand: the first 6-k steps detached, the last k tracked.
    policy.zero_grad()
    s, gen = policy.schedule(), torch.Generator().manual_seed(1)
    x = x_T
    for i in range(6):
        z = torch.randn(x.shape, generator=gen)
        with torch.set_grad_enabled(i >= 6 - k):
            x = policy.step(x, s.timesteps[i], s.prev_timesteps[i], cond, noise=z).prev_sample
    x.pow(2).sum().backward()
    for a, b in zip(got, [p.grad for p in policy.eps_model.parameters()]):
        torch.testing.assert_close(a, b)
    # A k-truncated gradient differs from the full one (the untracked steps really are cut).
    policy.zero_grad()
    policy.sample(x_T, cond, grad="full", generator=torch.Generator().manual_seed(1)).x0.pow(2).sum().backward()
    full = [p.grad for p in policy.eps_model.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(got, full))


def test_checkpointed_sample_has_identical_gradients(toy_world):
    policy = _toy_policy(toy_world)
    cond = toy_world.encoder(["angle 60"] * 4)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        policy.zero_grad()
        out = policy.sample(x_T, cond, grad="last_k", k=4, checkpoint=ckpt, generator=torch.Generator().manual_seed(3))
        out.x0.sum().backward()
        grads.append([p.grad.clone() for p in policy.eps_model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_no_grad_sample_tracks_nothing(toy_world):
    policy = _toy_policy(toy_world)
    out = policy.sample(torch.randn(3, 2), toy_world.encoder(["angle 0"] * 3))
    assert not out.x0.requires_grad and out.log_probs.shape == (3, 6)


def test_classifier_free_guidance_is_one_batched_forward(unet_factory):
    unet = unet_factory()
    sched = _ddim()
    policy = DiffusionPolicy(UNetEpsModel(unet), sched, guidance_scale=5.0)
    calls = []
    unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    x, c, u = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 8, generator=g), torch.zeros(2, 4, 8)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        eps = policy.predict_noise(x, t, c, uncond=u)
        assert calls == [4]
        e_c, e_u = unet(x, t, c).sample, unet(x, t, u).sample
    torch.testing.assert_close(eps, e_u + 5.0 * (e_c - e_u), atol=1e-5, rtol=1e-4)
    assert policy.nfe == 4


def test_bad_arguments_are_clear():
    sched = _ddim()
    with pytest.raises(ValueError, match="sampler"):
        DiffusionPolicy(FixedOutput(torch.zeros(1)), sched, sampler="euler")
    policy = DiffusionPolicy(FixedOutput(torch.zeros(1, 2)), sched)
    with pytest.raises(ValueError, match="num_inference_steps"):
        policy.schedule(0)
    with pytest.raises(ValueError, match="grad"):
        policy.sample(torch.zeros(1, 2), None, grad="some")


def test_stochastic_mask_is_parity_preserving_and_makes_masked_steps_deterministic(toy_world):
    """MixGRPO's per-step η: no mask and an all-True mask are bit-identical to before; a False step is the η = 0
    DDIM step (σ = 0, log-prob 0) and the other steps still receive the same noise z."""
    policy = _toy_policy(toy_world)
    cond = toy_world.encoder(["angle 60"] * 4)
    x_T = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))

    def run(mask=None, eta=None):
        p = policy if eta is None else policy.with_eps_model(policy.eps_model)
        if eta is not None:
            p.eta = eta
        return p.sample(x_T, cond, generator=torch.Generator().manual_seed(3), return_trajectory=True, stochastic=mask)

    n = len(policy.schedule())
    plain, all_true = run(), run(torch.ones(n, dtype=torch.bool))
    assert torch.equal(plain.x0, all_true.x0) and torch.equal(plain.log_probs, all_true.log_probs)
    window = torch.zeros(n, dtype=torch.bool)
    window[1:3] = True
    mixed = run(window)
    assert (mixed.stds[:, ~window] == 0).all() and (mixed.log_probs[:, ~window] == 0).all()
    assert (mixed.stds[:, window] > 0).all() and torch.equal(mixed.stds[:, window], plain.stds[:, window])
    ode = run(eta=0.0)  # step 0 outside the window: exactly the deterministic DDIM step from the same x_T
    torch.testing.assert_close(mixed.latents[1], ode.latents[1], rtol=0, atol=0)
    # Inside the window the noise is the unmasked run's z: x_{t-1} − μ is the same σ z as in the plain run.
    torch.testing.assert_close(mixed.latents[2] - mixed.means[1], plain.latents[2] - plain.means[1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        run(torch.ones(n + 1, dtype=torch.bool))
