# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exercise 1 — the ELBO step: (D2), (D3) and the ε-form
#
# [derivation §5](../derivation.md#5-the-forward-process-and-the-elbo-s2-eq-18) replaces the posterior by the
# forward process $q$ and evaluates the expectation over $x_{t-1}\sim q(x_{t-1}\mid x_t, x_0)$ in closed form:
#
# $$\mathbb E_{q}\Big[\log\frac{p_\theta(x_{t-1}\mid x_t)}{p_\text{ref}(x_{t-1}\mid x_t)}\Big]
# = D_\text{KL}(q\Vert p_\text{ref}) - D_\text{KL}(q\Vert p_\theta) \qquad (D3)$$
#
# and §7 turns each KL into $c_t\lVert\epsilon - \epsilon_\theta(x_t, t)\rVert^2$ with
# $c_t = b_t / (2a_t(1-\bar\alpha_{t-1}))$.
#
# **Tasks.** On toy2d, with the shipped network as $\epsilon_\theta$ and a perturbed copy as $\epsilon_\text{ref}$:
#
# 1. Write $q(x_{t-1}\mid x_t, x_0)$ with the toolkit's own step: DDPM's step with the *true* noise is the forward
#    posterior. Check (D3) by Monte Carlo with `DiffusionPolicy.log_prob`.
# 2. Check that `DiffusionPolicy.gaussian_kl` of the two steps equals $c_t\lVert\epsilon - \epsilon_\theta\rVert^2$.
# 3. Sum over all $t$: the ELBO difference (D2) is $T\,\mathbb E_t$ of (D3), so it only needs the two networks'
#    errors — the diffusion losses that eq. 14 compares.

# %%
import copy

import torch

from rlkit_diffusion.policy import DiffusionPolicy
from rlkit_diffusion.worlds import build_world
from rlkit_diffusion.worlds.toy2d import make_scheduler

torch.manual_seed(0)
world = build_world("toy2d", optimum_pool=16)
theta = DiffusionPolicy(world.policy.eps_model, make_scheduler(), sampler="ddpm")
ref_model = copy.deepcopy(world.policy.eps_model)
with torch.no_grad():
    for p in ref_model.parameters():
        p.add_(0.2 * torch.randn_like(p))
ref = theta.with_eps_model(ref_model)
prompts, x0, _ = world.pairs.next_batch(4096)  # the winners of 4096 preference pairs: data points
cond = world.encoder(prompts)

# %% [markdown]
# ## Solution
#
# With the true $\epsilon$, DDPM's $\hat x_0$ is $x_0$ and its mean is the forward posterior mean $\tilde\mu_t$; its
# standard deviation is $\tilde s_t$. So `step_distribution(x_t, t, t-1, ε)` *is* $q(x_{t-1}\mid x_t, x_0)$.

# %%
t = torch.full((4096,), 300)
eps = torch.randn_like(x0)
x_t = theta.add_noise(x0, eps, t)
with torch.no_grad():
    q_mean, q_std, _ = theta.step_distribution(x_t, t, t - 1, eps)  # the forward posterior
    eps_th, eps_ref = theta.predict_noise(x_t, t, cond), ref.predict_noise(x_t, t, cond)
    th_mean, _, _ = theta.step_distribution(x_t, t, t - 1, eps_th)
    ref_mean, _, _ = ref.step_distribution(x_t, t, t - 1, eps_ref)

# 1. (D3) by Monte Carlo: 256 draws of x_{t-1} ~ q for each of the 4096 states.
draws = []
for _ in range(256):
    x_prev = q_mean + q_std[:, None] * torch.randn_like(q_mean)
    draws.append(DiffusionPolicy.log_prob(x_prev, th_mean, q_std) - DiffusionPolicy.log_prob(x_prev, ref_mean, q_std))
draws = torch.stack(draws)  # (256, 4096)
mc, standard_error = draws.mean(0), draws.std(0) / 256**0.5
closed = DiffusionPolicy.gaussian_kl(q_mean, ref_mean, q_std) - DiffusionPolicy.gaussian_kl(q_mean, th_mean, q_std)
print(f"(D3): Monte Carlo {mc.mean():.5f}   closed form {closed.mean():.5f}")
assert abs(mc.mean() - closed.mean()) < 0.05 * closed.abs().mean()  # 5% of the size of the term
# per state, not only on average: within 4 standard errors for (almost) every state
assert ((mc - closed).abs() < 4 * standard_error + 1e-6).float().mean() > 0.99

# %%
# 2. The ε-form: KL(q ‖ p_θ) = c_t ‖ε − ε_θ‖².
a = theta.alphas_cumprod.double()
b_t = 1 - a[300] / a[299]
c_t = float(b_t / (2 * (1 - b_t) * (1 - a[299])))
kl_theta = DiffusionPolicy.gaussian_kl(q_mean, th_mean, q_std)
print(f"c_t = {c_t:.5f}; max |KL − c_t‖ε−ε_θ‖²| = {(kl_theta - c_t * ((eps - eps_th) ** 2).sum(1)).abs().max():.2e}")
assert torch.allclose(kl_theta, c_t * ((eps - eps_th) ** 2).sum(1), rtol=1e-3, atol=1e-6)

# %% [markdown]
# 3. Averaged over $t$, (D3) is the ELBO difference of (D2) divided by $T$. Its estimate from single $(t,\epsilon)$
# draws is unbiased (the sampling law does not involve $\theta$), and it is a difference of weighted diffusion
# losses: exactly what eq. 14 compares, with $\omega(\lambda_t) = c_t$.

# %%
T = theta.num_train_timesteps
t = torch.randint(1, T, (4096,))
eps = torch.randn_like(x0)
x_t = theta.add_noise(x0, eps, t)
with torch.no_grad():
    q_mean, q_std, _ = theta.step_distribution(x_t, t, t - 1, eps)
    e_th, e_ref = theta.predict_noise(x_t, t, cond), ref.predict_noise(x_t, t, cond)
    m_th, _, _ = theta.step_distribution(x_t, t, t - 1, e_th)
    m_ref, _, _ = ref.step_distribution(x_t, t, t - 1, e_ref)
b = 1 - a[t] / a[t - 1]
c = (b / (2 * (1 - b) * (1 - a[t - 1]))).float()
via_kl = DiffusionPolicy.gaussian_kl(q_mean, m_ref, q_std) - DiffusionPolicy.gaussian_kl(q_mean, m_th, q_std)
via_eps = c * (((eps - e_ref) ** 2).sum(1) - ((eps - e_th) ** 2).sum(1))
print(f"ELBO_θ − ELBO_ref ≈ {T * via_kl.mean():.3f} (per-step KLs) = {T * via_eps.mean():.3f} (weighted ε errors)")
assert torch.allclose(via_kl, via_eps, rtol=1e-3, atol=1e-5)
