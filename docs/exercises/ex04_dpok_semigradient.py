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
# # Exercise 4 — DPOK's update is a semi-gradient
#
# [derivation §12](../derivation.md#12-dpok-policy-gradient-plus-the-closed-form-kl): the exact gradient of eq. 20,
# $J(\theta) = \mathbb E[r(x_0) - \beta\sum_t \mathrm{KL}_t(x_t;\theta)]$, is (D4): the score of each action times
# the reward **minus the KL still to be paid downstream** ($K_{<t}$), plus the KL's gradient at the visited states.
# `algos.ddpo.dpok_loss` scores the actions by the reward only: it drops
# $-\beta\,\mathbb E[\sum_t\nabla\log p_\theta(x_{t-1}\mid x_t)\,K_{<t}]$.
#
# **Tasks.** On a two-step, one-dimensional Gaussian chain whose steps are the toolkit's Gaussians
# ($x_2\sim\mathcal N(0,1)$, $x_1 = \mu_2(x_2) + s_2 z_2$, $x_0 = \mu_1(x_1) + s_1 z_1$ with affine means, the
# reference's slopes $a$ and the policy's $a + \delta_t$ and offsets $b_t$):
#
# 1. Compute $\nabla J$ exactly in expectation (reparameterisation through the chain).
# 2. Compute DPOK's update with `dpok_loss` (score-function mode) and the dropped term.
# 3. Check $\nabla J = $ DPOK's update $+$ the dropped term, and that the dropped term is not zero.

# %%
import torch

from algos.ddpo import dpok_loss
from rlkit_diffusion.policy import DiffusionPolicy

torch.manual_seed(0)
M, a, beta = 1_000_000, 0.9, 0.5
s = {2: 0.6, 1: 0.3}  # the steps' standard deviations (shared by policy and reference, as in §12)
theta = torch.tensor([0.2, 0.1, -0.3, 0.2], requires_grad=True)  # δ_2, b_2, δ_1, b_1


def mean(step: int, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    delta, b = (params[0], params[1]) if step == 2 else (params[2], params[3])
    return (a + delta) * x + b


def reward(x0: torch.Tensor) -> torch.Tensor:
    return -((x0 - 1.0) ** 2).squeeze(1)


def kl(step: int, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """KL(p_θ(·|x) ‖ p_ref(·|x)) of one step, by the toolkit's closed form."""
    std = torch.full((x.shape[0],), s[step])
    return DiffusionPolicy.gaussian_kl(mean(step, x, params), a * x, std)


x2 = torch.randn(M, 1)
z2, z1 = torch.randn(M, 1), torch.randn(M, 1)

# %% [markdown]
# ## Solution
#
# 1. With the noises fixed, $x_1$ and $x_0$ are differentiable functions of $\theta$: the gradient of the Monte
#    Carlo average of $r - \beta(\mathrm{KL}_2 + \mathrm{KL}_1)$ is an unbiased estimate of $\nabla J$.

# %%
x1 = mean(2, x2, theta) + s[2] * z2
x0 = mean(1, x1, theta) + s[1] * z1
J = (reward(x0) - beta * (kl(2, x2, theta) + kl(1, x1, theta))).mean()
full = torch.autograd.grad(J, theta)[0]

# %% [markdown]
# 2. DPOK's update: detach the visited states, score each action by the (baselined) reward, and add $\beta$ times the
#    KL at the visited states — `dpok_loss` in score-function mode, averaged over the $2M$ transitions (so its
#    gradient is half the per-trajectory one). The dropped term scores the first action by the KL it leads to.

# %%
x1d, x0d = x1.detach(), x0.detach()
std2, std1 = torch.full((M,), s[2]), torch.full((M,), s[1])
log_prob = torch.cat(
    [DiffusionPolicy.log_prob(x1d, mean(2, x2, theta), std2), DiffusionPolicy.log_prob(x0d, mean(1, x1d, theta), std1)]
)  # (2M,): both transitions of every trajectory
r = reward(x0d)
adv = (r - r.mean()).repeat(2)  # a baseline leaves the expectation unchanged
kls = torch.cat([kl(2, x2, theta), kl(1, x1d, theta)])  # at the visited (detached) states
out = dpok_loss(log_prob, log_prob.detach(), adv, kls, kl_coef=beta, clip_range=1.0, adv_clip_max=1e9, mode="sf")
semi = -2 * torch.autograd.grad(out["loss"] + out["loss_kl"], theta)[0]

kl_to_go = kl(1, x1d, theta).detach()  # K_{<2}: the KL of the step after the first action; K_{<1} = 0
score_first = DiffusionPolicy.log_prob(x1d, mean(2, x2, theta), std2)
dropped = -beta * torch.autograd.grad((score_first * (kl_to_go - kl_to_go.mean())).mean(), theta)[0]

print("∇J (reparameterised):  ", [round(v, 4) for v in full.tolist()])
print("DPOK update:           ", [round(v, 4) for v in semi.tolist()])
print("dropped term:          ", [round(v, 4) for v in dropped.tolist()])
print("DPOK update + dropped: ", [round(v, 4) for v in (semi + dropped).tolist()])

# %% [markdown]
# 3. The identity holds up to Monte Carlo error, and the dropped term is far from zero on the first step's
#    parameters: the semi-gradient's fixed point is not eq. 20's optimum.

# %%
assert torch.allclose(semi + dropped, full, atol=0.03)
assert dropped[:2].abs().max() > 0.1  # the first action's parameters: the KL it causes downstream is ignored
assert dropped[2:].abs().max() < 0.02  # the last action has no KL to go
