"""``python -m benchmarks.diagnose_pg <check> [options]`` — diagnostics of the policy-gradient family (DDPO, DPOK) on
a world (issue #21: on shapes they lowered the proxy reward they optimise). Every check prints its numbers.

Checks (each on one freshly collected batch of the base policy, or on a short training run):

* ``curve``     (a)/(b) the reward of every collected batch over ``--updates`` updates through THE training loop, with
                ``--flip`` the same with the advantage sign flipped; also the proxy of a fixed set of (prompt, noise)
                pairs (common random numbers) before and after, which sees a change of the policy without the
                batch-to-batch noise.
* ``ratio``     (f) classifier-free guidance: the log-probability recomputed by training (`DDPO.step_outputs`) vs the
                one stored at collection, per step, and vs the unguided step (guidance_scale 1).
* ``x0``        (e) the reward of the final x̂_0 vs of the decoded sample, and the collection's reward vs the
                evaluation's ``score`` of the same samples.
* ``snr``       (d) per-step gradient signal-to-noise ratio: per-trajectory gradients of the surrogate at each step,
                their mean's squared norm over the variance of that mean, each step's share of the gradient energy,
                and the cosine between the gradients of two disjoint halves of the batch.
* ``update``    (c) one optimizer step on the batch, then the correlation between each trajectory's advantage and
                the change of its log-probability.
* ``reward``    (g) the reward on the policy's own samples: variance between vs within prompts (what a global
                baseline leaves in the advantage), proxy–gold correlation, and the proxy change under small random
                and gradient perturbations of the samples.

Examples: ``python -m benchmarks.diagnose_pg snr --batch 16``; ``python -m benchmarks.diagnose_pg curve --updates 8
--lr 1e-4 --flip``. ``--json PATH`` appends each check's numbers as one JSON line; ``plot --json PATH`` draws the
figures of `docs/algos/ddpo.md` from them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from algos.ddpo import DDPO, DPOK, DDPOConfig, DPOKConfig, Trajectories, Transitions
from rlkit_diffusion.algorithm import AlgoContext, Counters
from rlkit_diffusion.evaluate import score
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.reference import Reference, add_lora
from rlkit_diffusion.train import BudgetConfig, TrainConfig, make_optimizer, train
from rlkit_diffusion.worlds import build_world


# --------------------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------------------
def flipped(cls: type) -> type:
    """``cls`` with every advantage negated after normalisation: the check that a learning signal is real."""

    class Flipped(cls):
        def advantages(self, prompts, rewards):
            adv, stats = super().advantages(prompts, rewards)
            return -adv, stats

    Flipped.__name__ = f"Flipped{cls.__name__}"
    return Flipped


def build(args: argparse.Namespace, world=None) -> tuple[AlgoContext, DDPO]:
    """World (or a private copy of ``world``), context and algorithm from the command-line options."""
    if world is None:
        world = build_world(args.world, device="cpu", num_inference_steps=args.steps, seed=0)
    else:
        world = copy.deepcopy(world)
    if args.prompts:  # a fixed, small prompt set: every prompt recurs in every batch
        world.train_prompts = world.train_prompts[: args.prompts]
    policy = world.policy
    if args.lora_rank > 0:
        add_lora(policy.eps_model, rank=args.lora_rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
        base = Reference(policy, "lora")
    else:
        base = Reference(policy, "frozen")
    ctx = AlgoContext(
        world=world,
        policy=policy,
        base=base,
        env=DenoisingCore(world, reward=args.reward),
        batch_size=args.batch,
        generator=torch.Generator().manual_seed(args.seed),
        counters=Counters(),
    )
    fields: dict[str, Any] = dict(
        min_std=args.min_std,
        advantage_norm=args.advantage_norm,
        min_count=args.min_count,
        timestep_fraction=args.timestep_fraction,
        num_minibatches=args.minibatches,
    )
    if args.algo == "dpok":
        cls, cfg = DPOK, DPOKConfig(kl_coef=args.kl_coef, **fields)
    else:
        cls, cfg = DDPO, DDPOConfig(**fields)
    algo = (flipped(cls) if getattr(args, "flip", False) else cls)(cfg)
    algo.setup(ctx)
    return ctx, algo


def all_transitions(algo: DDPO, batch: Trajectories) -> Transitions:
    """Every trained transition of a batch (σ_t > min_std), in (sample, step) order, as the first minibatch."""
    stochastic = batch.stds.cpu() > max(algo.config.min_std, 0.0)
    sample, step = stochastic.nonzero(as_tuple=True)
    return Transitions(batch, sample, step, first=True)


def log_probs(algo: DDPO, mb: Transitions, guidance_scale: float | None = None) -> Tensor:
    """Reduced log π(x_{t−1} | x_t, c) of the policy at the minibatch's transitions (training's `step_outputs`),
    without gradient; ``guidance_scale`` overrides the world's (1 = the unguided, conditional step). (M,)"""
    world = algo.ctx.world
    kept = world.guidance_scale
    try:
        if guidance_scale is not None:
            world.guidance_scale = guidance_scale
        with torch.no_grad():
            out = algo.step_outputs(algo.ctx.policy, mb)
    finally:
        world.guidance_scale = kept
    return algo.reduce(out.log_prob)


# --------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------
def check_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """(f) The guided step is the one scored: stored vs recomputed log-probs per step, and vs the unguided step."""
    ctx, algo = build(args)
    batch = algo.collect()
    mb = all_transitions(algo, batch)
    old = algo.reduce(batch.log_probs[mb.sample, mb.step])
    new = log_probs(algo, mb)
    unguided = log_probs(algo, mb, guidance_scale=1.0)
    n = batch.log_probs.shape[1]
    rows = []
    for k in range(n):
        sel = mb.step == k
        if sel.any():
            rows.append(
                {
                    "step": k,
                    "t": int(ctx.env.schedule.timesteps[k]),
                    "sigma": float(batch.stds[0, k]),
                    "max_abs_recomputed_minus_stored": float((new[sel] - old[sel]).abs().max()),
                    "mean_abs_unguided_minus_stored": float((unguided[sel] - old[sel]).abs().mean()),
                }
            )
    # The guided mean itself: a rollout that keeps the step means, re-scored by the training path.
    g = torch.Generator().manual_seed(args.seed + 7)
    prompts = ctx.env.sample_prompts(4, g)
    with torch.no_grad():
        ro = ctx.env.rollout(ctx.policy, prompts, generator=g, return_trajectory=True, with_reward=False)
    latents = torch.stack(ro.sample.latents, 1)
    tr = Trajectories(
        prompts, ro.cond, latents, ro.sample.log_probs, ro.sample.stds, torch.zeros(4), torch.zeros(4), {}
    )
    dev = 0.0
    for k in range(n):
        mbk = Transitions(tr, torch.arange(4), torch.full((4,), k), first=True)
        with torch.no_grad():
            mean = algo.step_outputs(ctx.policy, mbk).mean
        dev = max(dev, float((mean - ro.sample.means[k]).abs().max()))
    out = {
        "check": "ratio",
        "guidance_scale": ctx.world.guidance_scale,
        "max_abs_dev_all_steps": float((new - old).abs().max()),
        "max_abs_mean_dev_training_vs_sampling": dev,
        "per_step": rows,
    }
    print(f"(f) guidance scale {ctx.world.guidance_scale}; log-probs are per-dim {algo.config.log_prob_reduction}s")
    print("    step    t   sigma   |recomputed − stored|max   |unguided − stored|mean")
    for r in rows:
        print(
            f"    {r['step']:>4} {r['t']:>4} {r['sigma']:7.4f}   {r['max_abs_recomputed_minus_stored']:.2e}"
            f"                 {r['mean_abs_unguided_minus_stored']:.3e}"
        )
    print(f"    max |μ_training − μ_sampling| over every step of 4 rollouts: {dev:.2e}")
    return out


def check_x0(args: argparse.Namespace) -> dict[str, Any]:
    """(e) Which image is scored: x_0 of the chain vs x̂_0 of the last step, collection reward vs evaluation score."""
    ctx, algo = build(args)
    batch = algo.collect()
    world, sched = ctx.world, ctx.env.schedule
    x0 = batch.latents[:, -1]
    last = batch.latents.shape[1] - 2  # the last step x_{t_1} → x_0
    with torch.no_grad():
        o = ctx.env.rescore(ctx.policy, batch.latents[:, last], last, batch.cond, prev_sample=x0)
    r_x0 = torch.as_tensor(score(world, args.reward, x0, batch.prompts))
    r_hat = torch.as_tensor(score(world, args.reward, o.x0_pred, batch.prompts))
    out = {
        "check": "x0",
        "last_step": {"t": int(sched.timesteps[last]), "t_prev": int(sched.prev_timesteps[last])},
        "collection_reward_mean": float(batch.rewards.mean()),
        "eval_score_of_same_x0_mean": float(r_x0.mean()),
        "max_abs_collection_minus_eval": float((batch.rewards - r_x0).abs().max()),
        "proxy_of_x0hat_mean": float(r_hat.mean()),
        "max_abs_x0_minus_x0hat_pixels": float((world.decode(x0) - world.decode(o.x0_pred)).abs().max()),
        "max_abs_reward_x0_minus_x0hat": float((r_x0 - r_hat).abs().max()),
    }
    print(f"(e) last step t={out['last_step']['t']} → {out['last_step']['t_prev']} (σ = {float(o.std[0]):.4f})")
    print(f"    collection reward {out['collection_reward_mean']:.4f}, evaluation score of the same x_0 "
          f"{out['eval_score_of_same_x0_mean']:.4f} (max |Δ| {out['max_abs_collection_minus_eval']:.1e})")  # fmt: skip
    print(f"    reward of x̂_0 {out['proxy_of_x0hat_mean']:.4f}; max |image(x_0) − image(x̂_0)| "
          f"{out['max_abs_x0_minus_x0hat_pixels']:.2e}, "
          f"max |Δreward| {out['max_abs_reward_x0_minus_x0hat']:.2e}")  # fmt: skip
    return out


def _flat_grad(params: list[torch.nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def check_snr(args: argparse.Namespace) -> dict[str, Any]:
    """(d) Per-step gradient SNR across trajectories, each step's share of the gradient, split-half cosines."""
    ctx, algo = build(args)
    batch = algo.collect()
    params = [p for p in ctx.policy.eps_model.parameters() if p.requires_grad]
    b, n = batch.log_probs.shape
    steps = [k for k in range(n) if float(batch.stds[0, k]) > 0]
    adv = batch.advantages.clamp(-algo.config.adv_clip_max, algo.config.adv_clip_max)
    # g[i, k]: gradient of the surrogate −A_i log π(x_{t−1}|x_t) (its gradient at ratio 1) of trajectory i at step k.
    size = sum(p.numel() for p in params)
    step_sum = {k: torch.zeros(size) for k in steps}  # Σ_i g[i, k]
    half_sum = {k: torch.zeros(size) for k in steps}  # Σ over even i of g[i, k] (the other half: the rest)
    step_sq = dict.fromkeys(steps, 0.0)  # Σ_i |g[i, k]|²
    per_traj = torch.zeros(b, size)  # Σ_k g[i, k]
    last = torch.zeros(b, size)  # g[i, last stochastic step]
    for i in range(b):
        for k in steps:
            mb = Transitions(batch, torch.tensor([i]), torch.tensor([k]), first=True)
            for p in params:
                p.grad = None
            lp = algo.reduce(algo.step_outputs(ctx.policy, mb).log_prob)
            (-adv[i] * lp).sum().backward()
            g = _flat_grad(params)
            step_sum[k] += g
            step_sq[k] += float(g.pow(2).sum())
            per_traj[i] += g
            if i % 2 == 0:
                half_sum[k] += g
            if k == steps[-1]:
                last[i] = g
    rows = []
    for k in steps:
        mean = step_sum[k] / b
        m2 = float(mean.pow(2).sum())
        var = (step_sq[k] / b - m2) * b / (b - 1)  # tr Cov of one trajectory's gradient
        cos = float(torch.nn.functional.cosine_similarity(half_sum[k], step_sum[k] - half_sum[k], dim=0))
        rows.append(
            {
                "step": k,
                "t": int(ctx.env.schedule.timesteps[k]),
                "sigma": float(batch.stds[0, k]),
                "energy": step_sq[k] / b,
                "snr": m2 / (var / b),
                "half_cosine": cos,
            }
        )
    total_energy = sum(r["energy"] for r in rows)
    for r in rows:
        r["energy_share"] = r["energy"] / total_energy

    def whole(g: Tensor) -> dict[str, float]:  # g: (B, P) per-trajectory gradients
        mean = g.mean(0)
        var = float(g.var(0, unbiased=True).sum())
        cos = float(torch.nn.functional.cosine_similarity(g[0::2].sum(0), g[1::2].sum(0), dim=0))
        return {"snr": float(mean.pow(2).sum()) / (var / b), "half_cosine": cos}

    out = {
        "check": "snr",
        "batch": b,
        "per_step": rows,
        "all_steps": whole(per_traj),
        "without_last_step": whole(per_traj - last),
    }
    print(f"(d) per-step gradient of −A log π over {b} trajectories (snr = |mean|² / (tr Cov / B); ≈ 1 = pure noise)")
    print("    step    t   sigma   energy share   snr     half-batch cosine")
    for r in rows:
        print(f"    {r['step']:>4} {r['t']:>4} {r['sigma']:7.4f}   {r['energy_share']:9.3%}   {r['snr']:6.2f}   "
              f"{r['half_cosine']:+.3f}")  # fmt: skip
    for key in ("all_steps", "without_last_step"):
        print(f"    whole update, {key.replace('_', ' ')}: snr {out[key]['snr']:.2f}, "
              f"half-batch cosine {out[key]['half_cosine']:+.3f}")  # fmt: skip
    return out


def check_update(args: argparse.Namespace) -> dict[str, Any]:
    """(c) One optimizer step; corr(advantage, Δ log-prob of the trajectory), overall and per step."""
    ctx, algo = build(args)
    batch = algo.collect()
    mb = all_transitions(algo, batch)
    before = log_probs(algo, mb)
    opt, _ = make_optimizer(ctx.policy.eps_model, TrainConfig(lr=args.lr))
    for m in algo.minibatches(batch):
        loss = algo.loss(m)
        sum(v for k, v in loss.items() if k.startswith("loss")).backward()
        torch.nn.utils.clip_grad_norm_([p for p in ctx.policy.eps_model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = log_probs(algo, mb)
    delta = after - before  # (M,)
    b = batch.log_probs.shape[0]
    per_traj = torch.zeros(b).index_add_(0, mb.sample, delta.double().float())
    adv = batch.advantages.float()
    corr = float(np.corrcoef(adv.numpy(), per_traj.numpy())[0, 1])
    rows = []
    for k in sorted(set(mb.step.tolist())):
        sel = mb.step == k
        rows.append(
            {
                "step": k,
                "corr": float(np.corrcoef(adv[mb.sample[sel]].numpy(), delta[sel].numpy())[0, 1]),
                "mean_abs_delta": float(delta[sel].abs().mean()),
            }
        )
    out = {"check": "update", "lr": args.lr, "corr_adv_delta_logprob": corr, "per_step": rows}
    print(f"(c) after one step (lr {args.lr}): corr(A_i, Σ_t Δ log π_i) = {corr:+.3f} over {b} trajectories")
    print("    step  corr(A, Δ log π)   mean |Δ log π|")
    for r in rows:
        print(f"    {r['step']:>4}   {r['corr']:+.3f}            {r['mean_abs_delta']:.2e}")
    return out


def check_reward(args: argparse.Namespace) -> dict[str, Any]:
    """(g) The reward on the policy's own samples: prompt vs within-prompt variance, proxy–gold, small moves."""
    ctx, _ = build(args)
    world = ctx.world
    g = torch.Generator().manual_seed(args.seed + 11)
    prompts = [p for p in world.train_prompts[: args.reward_prompts] for _ in range(args.reward_samples)]
    with torch.no_grad():
        x0 = ctx.env.rollout(ctx.policy, prompts, generator=g, with_reward=False).x0
    r = torch.as_tensor(score(world, args.reward, x0, prompts)).double()
    gold = torch.as_tensor(score(world, "gold", x0, prompts)).double()
    rp = r.view(args.reward_prompts, args.reward_samples)
    between = float(rp.mean(1).var(unbiased=True))
    within = float(rp.var(1, unbiased=True).mean())
    gp = gold.view_as(rp)
    within_corr = float(
        np.corrcoef((rp - rp.mean(1, keepdim=True)).flatten(), (gp - gp.mean(1, keepdim=True)).flatten())[0, 1]
    )
    images = world.decode(x0)
    reward_fn = world.reward(args.reward)
    moves = []
    for eps in args.perturb:  # RMS pixel change of the move
        noise = torch.randn(images.shape, generator=g) * eps
        r_noise = reward_fn((images + noise).clamp(0, 1), prompts).double()
        img = images.clone().requires_grad_(True)
        grad = torch.autograd.grad(reward_fn(img, prompts).sum(), img)[0]
        step = (
            grad
            / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
            * eps
            * math.sqrt(images[0].numel())
        )
        with torch.no_grad():
            r_grad = reward_fn((images + step).clamp(0, 1), prompts).double()
        moves.append({"rms_pixel_change": eps, "random_delta": float((r_noise - r).mean()),
                      "gradient_delta": float((r_grad - r).mean())})  # fmt: skip
    out = {
        "check": "reward",
        "n": len(prompts),
        "reward_mean": float(r.mean()),
        "between_prompt_var": between,
        "within_prompt_var": within,
        "between_share": between / (between + within),
        "proxy_gold_corr_within_prompt": within_corr,
        "proxy_gold_corr": float(np.corrcoef(r, gold)[0, 1]),
        "moves": moves,
    }
    print(f"(g) {args.reward} on {len(prompts)} base samples ({args.reward_prompts} prompts × {args.reward_samples}): "
          f"mean {out['reward_mean']:.3f}")  # fmt: skip
    print(f"    variance between prompts {between:.3f}, within a prompt {within:.3f}: "
          f"{out['between_share']:.0%} of the reward variance is the prompt")  # fmt: skip
    print(f"    corr(proxy, gold) {out['proxy_gold_corr']:+.3f}; within a prompt {within_corr:+.3f}")
    for m in moves:
        print(f"    RMS pixel move {m['rms_pixel_change']}: random Δproxy {m['random_delta']:+.4f}, "
              f"along ∇proxy {m['gradient_delta']:+.4f}")  # fmt: skip
    return out


def fixed_reward(ctx: AlgoContext, prompts: list[str], seed: int) -> Tensor:
    """The optimised reward of the policy on fixed (prompt, noise) pairs (common random numbers). (B,)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = ctx.env.rollout(ctx.policy, prompts, generator=g, with_reward=False).x0
        return ctx.env.reward_model(ctx.world.decode(x0), prompts).double()


class _Rows:
    """A `MetricLogger` stand-in that keeps the logged rows."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def log(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        self.rows.append({"step": step, **{k: float(v) for k, v in row.items()}})
        return row

    def close(self) -> None:
        return None


def check_curve(args: argparse.Namespace, world=None) -> dict[str, Any]:
    """(a)/(b) The collected-batch reward over updates through THE training loop (optionally sign-flipped)."""
    ctx, algo = build(args, world)
    fixed_prompts = [p for p in ctx.world.train_prompts for _ in range(args.fixed_samples)]
    before = fixed_reward(ctx, fixed_prompts, seed=4321)
    rows = _Rows()
    t0 = time.perf_counter()
    cfg = TrainConfig(steps=args.updates, lr=args.lr, batch_size=args.batch, log_every=1)
    train(algo, ctx, cfg, budget=BudgetConfig("steps", args.updates), logger=rows, progress=False)
    after = fixed_reward(ctx, fixed_prompts, seed=4321)
    batch_rewards = [r["train/reward_mean"] for r in rows.rows if "train/reward_mean" in r]
    wins = ((after > before).double() + 0.5 * (after == before).double()).numpy()
    rng = np.random.default_rng(0)
    boot = wins[rng.integers(0, len(wins), (1000, len(wins)))].mean(1)
    slope = float(np.polyfit(np.arange(len(batch_rewards)), batch_rewards, 1)[0]) if len(batch_rewards) > 1 else 0.0
    out = {
        "check": "curve",
        "algo": args.algo,
        "flip": bool(args.flip),
        "lr": args.lr,
        "batch": args.batch,
        "min_std": args.min_std,
        "lora_rank": args.lora_rank,
        "batch_rewards": batch_rewards,
        "slope_per_update": slope,
        "fixed_before": float(before.mean()),
        "fixed_after": float(after.mean()),
        "fixed_win_rate": float(wins.mean()),
        "fixed_win_rate_ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
        "grad_norm": [r.get("train/grad_norm", float("nan")) for r in rows.rows],
        "seconds": time.perf_counter() - t0,
    }
    name = f"{args.algo}{' (flipped)' if args.flip else ''} lr {args.lr} min_std {args.min_std}"
    print(f"(a/b) {name}: collected-batch reward per update " + " ".join(f"{v:.3f}" for v in batch_rewards))
    print(f"    slope {slope:+.4f}/update; fixed-noise {args.reward} {out['fixed_before']:.3f} → "
          f"{out['fixed_after']:.3f}, win rate {out['fixed_win_rate']:.1%} "
          f"[{out['fixed_win_rate_ci'][0]:.1%}, {out['fixed_win_rate_ci'][1]:.1%}] "
          f"({out['seconds']:.0f} s)")  # fmt: skip
    return out


def plot(json_path: str, out_dir: str) -> list[Path]:
    """The figures of `docs/algos/ddpo.md` from the JSON lines of the checks: each step's share of the gradient
    energy (``snr``) and the collected-batch reward of every ``curve`` run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(json_path).read_text().splitlines() if line.strip()]
    out, written = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    snr = [r for r in rows if r["check"] == "snr"]
    if snr:
        steps = snr[-1]["per_step"]
        fig, ax = plt.subplots(1, 2, figsize=(8, 2.6), dpi=80)
        labels = [str(s["t"]) for s in steps]
        ax[0].bar(labels, [s["energy_share"] for s in steps], color="tab:red")
        ax[0].set(title="share of the gradient energy", xlabel="step t → t−50")
        ax[1].bar(labels, [s["snr"] for s in steps], color="tab:blue")
        ax[1].axhline(1.0, color="k", lw=0.8, ls="--")
        ax[1].set(title="per-step SNR (1 = noise)", xlabel="step t → t−50")
        for a in ax:
            a.tick_params(axis="x", labelrotation=90, labelsize=6)
        fig.tight_layout()
        written.append(out / "ddpo_shapes_gradient_by_step.png")
        fig.savefig(written[-1])
        plt.close(fig)
    curves = [r for r in rows if r["check"] == "curve"]
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
        for r in curves:
            label = f"min_std {r['min_std']}{' flipped' if r['flip'] else ''}, lr {r['lr']:g}"
            ax.plot(range(1, len(r["batch_rewards"]) + 1), r["batch_rewards"], marker="o", label=label)
        ax.set(xlabel="update", ylabel="proxy of the collected batch", title="DDPO on shapes")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "ddpo_shapes_batch_reward.png")
        fig.savefig(written[-1])
        plt.close(fig)
    for w in written:
        print(f"wrote {w}")
    return written


CHECKS = {
    "ratio": check_ratio,
    "x0": check_x0,
    "snr": check_snr,
    "update": check_update,
    "reward": check_reward,
    "curve": check_curve,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.diagnose_pg", description=__doc__.split("\n\n")[0])
    p.add_argument("checks", nargs="+", choices=[*CHECKS, "all", "plot"], help="plot: figures from --json")
    p.add_argument("--world", default="shapes")
    p.add_argument("--algo", default="ddpo", choices=["ddpo", "dpok"])
    p.add_argument("--reward", default="proxy")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of the world")
    p.add_argument("--batch", type=int, default=16, help="trajectories per collected batch")
    p.add_argument("--prompts", type=int, default=0, help="train on the first N training prompts only (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--flip", action="store_true", help="curve: negate the advantages")
    p.add_argument("--min-std", type=float, default=0.0)
    p.add_argument("--advantage-norm", default="per_prompt")
    p.add_argument("--min-count", type=int, default=16)
    p.add_argument("--timestep-fraction", type=float, default=1.0)
    p.add_argument("--minibatches", type=int, default=1)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--fixed-samples", type=int, default=2, help="curve: fixed noises per prompt (needs --prompts)")
    p.add_argument("--reward-prompts", type=int, default=8)
    p.add_argument("--reward-samples", type=int, default=8)
    p.add_argument("--perturb", type=float, nargs="+", default=[0.01, 0.03])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default=None, help="append each check's numbers as a JSON line to this file")
    p.add_argument("--out", default="docs/images", help="plot: where the PNGs go")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checks == ["plot"]:
        plot(args.json, args.out)
        return []
    names = list(CHECKS)[:-1] if "all" in args.checks else args.checks
    results = []
    for name in names:
        torch.manual_seed(args.seed)
        res = {**CHECKS[name](args), "argv": argv}
        results.append(res)
        if args.json:
            with open(Path(args.json), "a") as f:
                f.write(json.dumps(res) + "\n")
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
