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
# # Exercise 6 — eq. 11's inner term is eq. 8's log-ratio plus a posterior KL
#
# [derivation §4](../derivation.md#4-diffusion-models-the-path-level-objective-eqs-911): eq. 11 replaces
# $\log p_\theta(x_0)/p_\text{ref}(x_0)$ of eq. 8 by the expectation of the *path* log-ratio under the policy's
# posterior. Since $p(x_{0:T}) = p(x_0)\,p(x_{1:T}\mid x_0)$,
#
# $$\mathbb E_{p_\theta(x_{1:T}\mid x_0)}\Big[\log\frac{p_\theta(x_{0:T})}{p_\text{ref}(x_{0:T})}\Big]
# = \log\frac{p_\theta(x_0)}{p_\text{ref}(x_0)}
# + D_\text{KL}\big(p_\theta(x_{1:T}\mid x_0)\,\Vert\,p_\text{ref}(x_{1:T}\mid x_0)\big).$$
#
# **Tasks.** On a two-step, one-dimensional chain with affine Gaussian steps (everything is jointly Gaussian, so
# $p(x_0)$ and the posteriors are exact):
#
# 1. Compute the left-hand side by Monte Carlo over posterior samples, scoring each path with the toolkit's
#    per-step `DiffusionPolicy.log_prob` (the prior $\mathcal N(0,1)$ of $x_2$ cancels, §4).
# 2. Compute the right-hand side exactly and compare, for several $x_0$.
# 3. Conclude: the path margin of eq. 11 is eq. 8's margin plus $\beta$(KL of the winner $-$ KL of the loser) —
#    a term without a sign.

# %%
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from rlkit_diffusion.policy import DiffusionPolicy

torch.manual_seed(0)
s2, s1 = 0.6, 0.3  # the steps' standard deviations (shared)
models = {"theta": (1.1, 0.2, 0.7, -0.1), "ref": (0.9, 0.0, 0.9, 0.0)}  # (m_2, b_2, m_1, b_1)


def joint(m2: float, b2: float, m1: float, b1: float) -> MultivariateNormal:
    """(x_2, x_1, x_0) for x_2 ~ N(0,1), x_1 = m2 x_2 + b2 + s2 z_2, x_0 = m1 x_1 + b1 + s1 z_1."""
    L = torch.tensor([[1.0, 0.0, 0.0], [m2, s2, 0.0], [m1 * m2, m1 * s2, s1]], dtype=torch.float64)
    c = torch.tensor([0.0, b2, m1 * b2 + b1], dtype=torch.float64)
    return MultivariateNormal(c, scale_tril=L)


def posterior(dist: MultivariateNormal, x0: float) -> MultivariateNormal:
    """p(x_2, x_1 | x_0) by Gaussian conditioning."""
    mu, S = dist.mean, dist.covariance_matrix
    gain = S[:2, 2:] / S[2, 2]
    return MultivariateNormal(mu[:2] + gain[:, 0] * (x0 - mu[2]), S[:2, :2] - gain @ S[2:, :2])


def path_log_prob(params, x2: torch.Tensor, x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(x_{t-1} | x_t) with the toolkit's Gaussian step density (the shared prior of x_2 left out)."""
    m2, b2, m1, b1 = params
    std = lambda s: torch.full((x2.shape[0],), s, dtype=torch.float64)  # noqa: E731
    return DiffusionPolicy.log_prob(x1, m2 * x2 + b2, std(s2)) + DiffusionPolicy.log_prob(x0, m1 * x1 + b1, std(s1))


# %% [markdown]
# ## Solution

# %%
p = {name: joint(*params) for name, params in models.items()}
for x0 in (-1.0, 0.3, 1.5):
    post = {name: posterior(d, x0) for name, d in p.items()}
    paths = post["theta"].sample((400_000,))  # (n, 2): x_2, x_1 ~ p_θ(· | x_0)
    x2, x1 = paths[:, :1], paths[:, 1:]
    x0s = torch.full_like(x2, x0)
    lhs = (path_log_prob(models["theta"], x2, x1, x0s) - path_log_prob(models["ref"], x2, x1, x0s)).mean()
    marginal = {name: Normal(d.mean[2], d.covariance_matrix[2, 2].sqrt()) for name, d in p.items()}
    log_ratio_x0 = marginal["theta"].log_prob(torch.tensor(x0)) - marginal["ref"].log_prob(torch.tensor(x0))
    posterior_kl = kl_divergence(post["theta"], post["ref"])
    rhs = log_ratio_x0 + posterior_kl
    print(
        f"x0 = {x0:+.1f}: E[path log-ratio] = {lhs:.4f};  log-ratio {log_ratio_x0:.4f} + posterior KL "
        f"{posterior_kl:.4f} = {rhs:.4f}"
    )
    assert abs(float(lhs - rhs)) < 0.02
    assert posterior_kl > 0.05  # the extra term is real, and positive for every image

# %% [markdown]
# 3. For a pair, eq. 11's margin is eq. 8's margin plus $\beta[\mathrm{KL}^w - \mathrm{KL}^l]$: the winner's
#    posterior KL enters with $+$, the loser's with $-$, so eq. 11 neither bounds nor is bounded by eq. 8 through this
#    term — the same structure as the ELBO gaps of §5.
