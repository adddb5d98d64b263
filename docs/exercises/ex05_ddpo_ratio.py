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
# # Exercise 5 — where DDPO's importance ratio leaves 1
#
# [derivation §11](../derivation.md#11-ddpo-the-score-function-and-importance-sampled-gradients): DDPO re-weights each
# recorded step by $\rho_t = p_\theta(x_{t-1}\mid x_t)/p_{\theta_\text{old}}(x_{t-1}\mid x_t)$ (eq. 16, an
# approximation). At $\theta = \theta_\text{old}$ every ratio is exactly 1.
#
# **Tasks.** On toy2d:
#
# 1. Collect trajectories with the policy through the MDP (`DenoisingCore.rollout`) and re-score the recorded
#    actions with `DiffusionPolicy.step(..., prev_sample=...)`: check that every ratio is 1.
# 2. Take one optimizer step on `algos.ddpo.ddpo_loss` and re-score: at which steps of the chain does the ratio
#    leave 1 first? Relate it to the step's standard deviation $s_t$.

# %%
import torch

from algos.ddpo import ddpo_loss
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.worlds import build_world

torch.manual_seed(0)
world = build_world("toy2d", optimum_pool=16)
env = DenoisingCore(world, reward="gold")
policy = world.policy
prompts = env.sample_prompts(256, torch.Generator().manual_seed(0))
with torch.no_grad():
    ro = env.rollout(policy, prompts, generator=torch.Generator().manual_seed(1), return_trajectory=True)
old_log_prob = ro.sample.log_probs  # (B, N), recorded at collection
stds = ro.sample.stds[0]  # (N,) s_t of each step
schedule = env.schedule


def rescore() -> torch.Tensor:
    """log p_θ(x_{t-1} | x_t) of the recorded actions under the current parameters: (B, N)."""
    out = []
    for i in range(len(schedule)):
        step = policy.step(
            ro.sample.latents[i],
            schedule.timesteps[i],
            schedule.prev_timesteps[i],
            ro.cond,
            uncond=world.uncond(len(prompts)),
            guidance_scale=world.guidance_scale,
            prev_sample=ro.sample.latents[i + 1],
        )
        out.append(step.log_prob)
    return torch.stack(out, 1)


# %% [markdown]
# ## Solution
#
# 1. The same parameters, the same states and actions: the ratio is 1 to the last bit (on toy2d the recomputation
#    is bit-identical; `DDPO.check_fresh_ratio` asserts this on every fresh batch).

# %%
with torch.no_grad():
    assert torch.equal(rescore(), old_log_prob)

# %% [markdown]
# 2. One step of the IS surrogate on every transition with a positive-or-negative advantage, then the mean
#    $\lvert\log\rho_t\rvert$ per step. The log-density is $-\lVert x_{t-1} - \mu_\theta\rVert^2/2s_t^2 + \dots$, so
#    a change $\delta\mu$ of the mean moves it by about $\lVert x_{t-1}-\mu\rVert\,\lVert\delta\mu\rVert / s_t^2
#    \sim \lVert\delta\mu\rVert/s_t$: the ratio leaves 1 first where $s_t$ is smallest — the last stochastic step,
#    $s = 0.01$ — which is why PPO's clipping (and `algo.min_std`) matter most there.

# %%
stochastic = stds > 0
rewards = ro.rewards
adv = ((rewards - rewards.mean()) / rewards.std())[:, None].expand_as(old_log_prob)  # (B, N)
opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
new = rescore()
out = ddpo_loss(
    new[:, stochastic].flatten(),
    old_log_prob[:, stochastic].flatten(),
    adv[:, stochastic].flatten(),
    clip_range=0.2,
    adv_clip_max=5.0,
    mode="is",
)
opt.zero_grad()
out["loss"].backward()
opt.step()
with torch.no_grad():
    log_ratio = rescore() - old_log_prob  # (B, N)
per_step = log_ratio.abs().mean(0)
for i in range(len(schedule)):
    print(f"t = {int(schedule.timesteps[i]):4d}  s_t = {float(stds[i]):.4f}  mean |log ρ| = {float(per_step[i]):.2e}")
assert float(per_step[~stochastic].abs().max()) == 0.0  # a deterministic step has no density to re-weight
largest = int(per_step.argmax())
assert largest == int(torch.where(stochastic, stds, torch.tensor(float("inf"))).argmin())  # the smallest s_t
assert per_step[largest] > 10 * per_step[: largest - 1].max()
