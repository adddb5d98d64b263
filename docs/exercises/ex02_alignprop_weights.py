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
# # Exercise 2 — AlignProp's random truncation weights each step by P(K ≥ i)
#
# [derivation §13](../derivation.md#13-draft-the-reparameterised-gradient-through-the-sampler): with the sampler's
# $N$ steps numbered $i = N, \dots, 1$ in the order they run, the gradient truncated to the last $K$ steps is
# $\hat g_K = \sum_{i\le K} g_i$, so a random $K$ gives
#
# $$\mathbb E[\hat g_K] = \sum_{i=1}^{N} P(K\ge i)\,g_i. \qquad (D5)$$
#
# **Tasks.** On toy2d with AlignProp's own `draw_k` (uniform $K$ in $\{2, \dots, 12\}$):
#
# 1. Derive $P(K\ge i)$ for the uniform draw and compare with the frequencies of `AlignProp.draw_k`.
# 2. With fixed noises, compute the truncated gradients $\hat g_K$ for every $K$ through the one sampling loop
#    (`DiffusionPolicy.sample(grad="last_k", k=K)` via `World.denoise`), recover the per-step terms
#    $g_i = \hat g_i - \hat g_{i-1}$, and check (D5) against the average of $\hat g_K$ over AlignProp's draws.
# 3. How far is $\mathbb E[\hat g_K]$ from the full gradient $\hat g_N$? Which reweighting would remove the bias?

# %%
import torch

from algos import build_algo
from algos.draft import AlignPropConfig
from rlkit_diffusion.algorithm import AlgoContext, Counters
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference
from rlkit_diffusion.worlds import build_world

world = build_world("toy2d", optimum_pool=16)
env = DenoisingCore(world, reward="gold")
ctx = AlgoContext(
    world=world,
    policy=world.policy,
    base=Reference(world.policy, "frozen"),
    env=env,
    batch_size=16,
    generator=torch.Generator().manual_seed(0),
    counters=Counters(),
)
algo = build_algo("alignprop", AlignPropConfig(truncation="uniform", k_min=2, k_max=12))
algo.setup(ctx)
N = env.horizon
k_min, k_max = algo.k_range()
print(f"N = {N} sampler steps; K ~ U{{{k_min}..{k_max}}}")

# %% [markdown]
# ## Solution
#
# 1. For $K\sim\mathcal U\{k_\text{min}..k_\text{max}\}$: $P(K\ge i) = 1$ for $i\le k_\text{min}$,
#    $(k_\text{max} - i + 1)/(k_\text{max} - k_\text{min} + 1)$ for $k_\text{min}\le i\le k_\text{max}$, and 0 beyond.

# %%
i = torch.arange(1, N + 1, dtype=torch.float64)
p_formula = ((k_max - i + 1) / (k_max - k_min + 1)).clamp(0, 1)
ks = torch.tensor([algo.draw_k() for _ in range(5_000)], dtype=torch.float64)
p_empirical = (ks[:, None] >= i[None]).double().mean(0)
print("P(K >= i), i = 1..N:", [round(float(p), 3) for p in p_formula])
assert torch.allclose(p_empirical, p_formula, atol=0.03)

# %%
# 2. The truncated gradients for every K, with the same noises (common random numbers).
params = [p for p in world.policy.parameters() if p.requires_grad]
prompts = ["angle 0"] * 16


def truncated_gradient(k: int) -> torch.Tensor:
    """ĝ_K: gradient of the mean reward with autograd through the last k steps only (flattened)."""
    g = torch.Generator().manual_seed(123)
    ro = env.rollout(world.policy, prompts, generator=g, with_reward=False, grad="last_k", k=k)
    reward = env.terminal_reward(ro.x0, prompts).mean()
    return torch.cat([x.flatten() for x in torch.autograd.grad(reward, params)])


g_hat = torch.stack([torch.zeros_like(truncated_gradient(1))] + [truncated_gradient(k) for k in range(1, N + 1)])
g_step = g_hat[1:] - g_hat[:-1]  # (N, P): g_i, the contribution of the i-th last step
assert g_step[0].abs().max() == 0  # toy2d's last step (t = 0 → ᾱ_0) is the identity: no gradient

expected = (p_formula[:, None].float() * g_step).sum(0)  # (D5)
freq = torch.bincount(ks.long(), minlength=N + 1).float() / len(ks)  # (N+1,) frequency of each K among the draws
empirical = freq @ g_hat  # the average of ĝ_K over AlignProp's own draws
rel = float((empirical - expected).norm() / expected.norm())
print(f"|mean of ĝ_K over draws − Σ P(K≥i) g_i| / |Σ P(K≥i) g_i| = {rel:.3f}")
assert rel < 0.05

# %% [markdown]
# 3. The full gradient is $\hat g_N = \sum_i g_i$. Unless $P(K\ge i) = 1$ for every $i$ the two differ; dividing
#    the $i$-th term by $P(K\ge i)$ (possible only for $i\le k_\text{max}$) removes the bias on those steps.

# %%
full = g_hat[N]
bias = float((expected - full).norm() / full.norm())
print(f"relative bias of random truncation: {bias:.3f}")
assert bias > 0.01  # biased: the early steps are under-weighted, those before step k_max get nothing

# Reweighted: each tracked term divided by P(K ≥ i). Over AlignProp's draws it averages to Σ_{i≤k_max} g_i.
weights = torch.zeros(N)
weights[:k_max] = 1 / p_formula[:k_max].float()
cumulative = torch.cat([torch.zeros_like(g_step[:1]), torch.cumsum(weights[:, None] * g_step, 0)])  # (N+1, P)
reweighted = freq @ cumulative  # the average over the draws of Σ_{i≤K} g_i / P(K ≥ i)
rel_rw = float((reweighted - g_hat[k_max]).norm() / g_hat[k_max].norm())
print(f"reweighted estimator vs the gradient through the last k_max steps: relative error {rel_rw:.3f}")
assert rel_rw < 0.05
