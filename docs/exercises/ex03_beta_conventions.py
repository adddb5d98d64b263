# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Exercise 3 — the β conventions of Diffusion-DPO, and the sign of the L2 variant
#
# [derivation §7](../derivation.md#7-the-ε-form-eq-14-where-t-and-ωλ_t-go-and-the-β-conventions): published code
# disagrees on the pixel reduction (mean or sum) and on a factor ½. `algo.beta_convention` reproduces each:
# `official` (pixel mean, $-\tfrac12\beta\Delta/D$), `diffusers` (pixel mean, $-\beta\Delta/D$), `paper` (pixel sum,
# $-\beta\Delta$).
#
# **Tasks.** With real denoising errors on toy2d preference pairs:
#
# 1. Find the $\beta$ of `diffusers` and of `paper` that give exactly the loss of `official` at $\beta = 5$, and
#    check it with `algos.dpo.dpo_loss`.
# 2. The L2 variant (§8) is printed with two signs in S2. Which way does each sign move the policy on a winner?
#    Use the gradient of `algos.dpo.dpo_l2_loss` with respect to
#    $d^w = \lVert\epsilon_\theta - \epsilon_\text{ref}\rVert^2$.

# %%
import copy

import torch

from algos.dpo import beta_scale, dpo_l2_loss, dpo_loss, per_sample_error
from rlkit_diffusion.preference import implicit_scale
from rlkit_diffusion.worlds import build_world

torch.manual_seed(0)
world = build_world("toy2d", optimum_pool=16)
policy = world.policy
ref_policy = policy.with_eps_model(copy.deepcopy(policy.eps_model))
with torch.no_grad():
    for p in policy.eps_model.parameters():  # a "trained" policy: the reference plus a perturbation
        p.add_(0.1 * torch.randn_like(p))
prompts, x_w, x_l = world.pairs.next_batch(512)
cond = world.encoder(prompts)
t = torch.randint(0, policy.num_train_timesteps, (512,))
eps = torch.randn_like(x_w)  # one (t, ε) per pair, shared by winner and loser (the S9 choice)
with torch.no_grad():
    pred = {
        (who, name): net.predict_noise(net.add_noise(x, eps, t), t, cond)
        for who, x in (("w", x_w), ("l", x_l))
        for name, net in (("theta", policy), ("ref", ref_policy))
    }
D = x_w[0].numel()

# %% [markdown]
# ## Solution
#
# 1. With SE summed over $D$ dimensions, the argument of $\log\sigma$ is $-\tfrac12\beta\Delta/D$ (official),
#    $-\beta'\Delta/D$ (diffusers) and $-\beta''\Delta$ (paper). Equal losses need $\beta' = \beta/2$ and
#    $\beta'' = \beta/(2D)$ — the derivation's table read from the other side: `diffusers` at $\beta$ is `official`
#    at $2\beta$, and `paper` at $\beta$ is `official` at $2D\beta$.


# %%
def loss(convention: str, beta: float) -> torch.Tensor:
    reduction = "sum" if convention == "paper" else "mean"
    model, ref = (
        torch.cat([per_sample_error(pred[who, name], eps, reduction) for who in ("w", "l")])
        for name in ("theta", "ref")
    )  # (2B,) each: winners, then losers
    scale = implicit_scale(beta, convention, None, model[: len(prompts)])  # s β: the convention enters only here
    return dpo_loss(model, ref, scale)["loss"]


beta = 5.0
official = loss("official", beta)
print(f"official β = {beta}: loss {official:.6f}")
print(f"diffusers β = {beta / 2}: loss {loss('diffusers', beta / 2):.6f}")
print(f"paper β = {beta / (2 * D)}: loss {loss('paper', beta / (2 * D)):.6f}")
assert torch.allclose(loss("diffusers", beta / 2), official, atol=1e-6)
assert torch.allclose(loss("paper", beta / (2 * D)), official, atol=1e-6)
assert not torch.allclose(loss("diffusers", beta), official, atol=1e-4)  # the same typed β is NOT the same loss
assert beta_scale("official") == 0.5 and beta_scale("diffusers") == beta_scale("paper") == 1.0

# %% [markdown]
# 2. `dpo_l2_loss` computes $-\log\sigma(-s\beta(d^w - d^l))$ (the final display of S2). Its derivative with
#    respect to $d^w$ is positive, so gradient descent *decreases* $d^w$: the policy is pulled towards the reference
#    on winners and pushed away on losers. The literal algebra's $+$ sign (here: a negative β) does the opposite.
#    Neither is argued for in the paper: this repository implements the final display's sign as a convention.

# %%
d_w = per_sample_error(pred["w", "theta"], pred["w", "ref"], "mean").requires_grad_()
d_l = per_sample_error(pred["l", "theta"], pred["l", "ref"], "mean").requires_grad_()
for sign, label in ((+1.0, "final display (implemented)"), (-1.0, "literal algebra")):
    scale = implicit_scale(sign * beta, "official", None, d_w)
    g_w, g_l = torch.autograd.grad(dpo_l2_loss(torch.cat([d_w, d_l]), scale)["loss"], (d_w, d_l))
    print(f"{label:28s}: dL/dd_w {g_w.mean():+.4f}, dL/dd_l {g_l.mean():+.4f}")
    assert (sign * g_w > 0).all() and (sign * g_l < 0).all()
