"""THE evaluation: the same prompts and the same noises for the base model and every trained policy.

For each split (training prompts, held-out prompts) and each prompt, ``samples_per_prompt`` initial noises x_T and
per-step noises are drawn from ``seed`` — identical for the base and the trained policy (common random numbers), so
"win rate vs base" compares the two models on the same caption and the same noise, as the paper's head-to-head.

Metric formulas (all rewards are the world's ``gold`` reward unless named ``proxy_*``):

* ``win_rate_vs_base`` = mean over (prompt, noise) of 1[r(x_θ) > r(x_base)] + ½·1[r(x_θ) = r(x_base)];
  ``_ci_low/_ci_high``: percentile 95% interval of a cluster bootstrap over captions (`rlkit_diffusion.intervals`:
  the ``samples_per_prompt`` draws of one caption are correlated, so whole captions are resampled). Every interval
  of a per-sample metric below is this caption-cluster bootstrap (``*_ci_low/_ci_high``).
* ``gold_reward_*``: mean, median and CI of r on the split's samples; ``proxy_reward_*`` likewise.
* ``kl_to_ref`` = E_{x_{0:T} ~ π_θ} Σ_t KL(π_θ(·|x_t, c) ‖ π_base(·|x_t, c)), the path KL of eq. 10 along policy
  samples (per-step Gaussian KLs with the shared σ_t), with its CI. With a deterministic sampler (DDIM η = 0) every
  step's KL is 0 while the images differ, so the KL is measured on a separate stochastic pass of the same two
  networks at η = 1 (``kl_to_ref_eta`` = 1.0 says so; the samples themselves stay η = 0).
* ``distance_to_optimum_*`` (toy2d): energy distance to draws from p* ∝ p_ref exp(r/β*), averaged over prompts.
* ``win_rate_by_category`` (worlds whose ``extras["prompt_categories"]`` labels the prompts, e.g. PartiPrompts'
  categories or HPSv2's styles): the win rate and its CI per category.
* ``diversity``: the world's diversity measure (shapes: entropy of the attributes a caption leaves unspecified;
  otherwise the mean pairwise distance between samples of one prompt). ``diversity_ci_low/_high``: caption
  bootstrap of the mean of the per-caption diversities (the measure applied to each caption's draws alone).
* ``best_of_n_equivalent`` (the MEAN-REWARD CROSSING, not S8's statistic): the N at which best-of-N over the *base*
  model's draws, picked by the gold reward, matches the trained policy's mean gold reward. ``best_of_n_curve[N-1]`` =
  E[max of N base draws] per prompt (averaged over prompts), estimated without bias from the split's
  ``samples_per_prompt`` base draws by order statistics: E[max_N] = Σ_i r_(i) C(i−1, N−1) / C(n, N) (r_(1) ≤ … ≤
  r_(n)); N is interpolated linearly between integers. ``best_of_n_equivalent_censored`` is true when the policy beats
  even best-of-n (then N ≥ n). ``best_of_n_curve_by_proxy`` / ``best_of_n_equivalent_by_proxy``: the same with the
  draws picked by the proxy reward (what the best-of-N baseline can actually do) and still scored by gold.
  ``best_of_n_equivalent_ci_*``: caption bootstrap of the crossing.
* ``s8_p_base_best_of_n_beats_policy`` (supp. S8 as in the paper): entry n−1 = P(the best of n base draws, picked
  by gold, beats one trained draw) for the same caption, averaged over captions; per caption and trained draw y it
  is 1 − ½(C(k_<, n) + C(k_≤, n)) / C(m, n) over the m base draws (k_< / k_≤ = base draws below / not above y;
  exact for n drawn without replacement, ties ½). ``s8_base_draws_for_half``: the n at which that probability
  reaches ½ (linear between integers; ``_censored`` = even the best of m does not reach ½), with caption-bootstrap
  intervals. ``metric_labels`` names what each of these S8 numbers is.
* ``win_rate_vs_base_by_reward`` (``eval.rewards=[...]``): win rate vs base under each named reward — the AI-feedback
  matrix of the paper's Fig. 6 evaluates every trained model under every reward.
* ``eval_mode``: ``sample`` (from pure noise) or ``sdedit`` (image-to-image editing, §5.3): each row starts from
  the world's edit input x_in (shapes: a corrupted render that differs from the caption in one attribute) noised to
  t = strength·T, x_t ~ q(x_t | x_in) — the env's ρ_0 becomes q(x_t | x_in) — and denoises the rest of the
  schedule. Base and policy edit the same inputs with the same noises; wins are scored against the caption.
* ``implicit_acc`` / ``implicit_margin`` (Table 2, every algorithm): the preference accuracy (CI: bootstrap over pairs)
  on the world's first ``implicit_pairs`` validation pairs of the trained policy's implicit reward against the base, r̂
  = β log π_θ/π_ref estimated with ``implicit_draws`` shared (t, ε) draws (`rlkit_diffusion.preference`);
  ``reward_acc_<name>``: the same for each explicit reward model. The accuracy does not depend on β; the margin is in
  the algorithm's own β.
* ``per_sample`` / ``heldout_per_sample``: the per-row arrays (``wins``, ``gold_trained``, ``gold_base``, ``kl``,
  ``proxy_wins`` — the win/tie/loss under the training reward, ``reward=`` (the proxy by default) — when the world
  has it;
  caption-major) behind the means — the runner saves them as ``per_sample.npz`` (pooling seeds needs the rows).
* ``inference_nfe_per_sample``: UNet evaluations spent sampling one evaluation sample (the inference cost of Table 1;
  N× the base's for best-of-N), ``inference_reward_queries_per_sample`` likewise for reward calls.

An algorithm may replace plain sampling by an inference-time procedure (``sampler``, e.g. best-of-N, supp. S8): an
object with ``sample(draw, prompts, x_T, cond, generator) -> x0``, where ``draw(x_T, cond, generator) -> x0`` is this
module's own sampling of the policy, and the attributes ``kl_to_ref`` (reported as such) and
``reward_queries_per_sample``.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from rlkit_diffusion.intervals import (
    bootstrap_ci,  # noqa: F401  (re-exported: its import path before intervals.py)
    caption_clusters,
    cluster_bootstrap_ci,
    cluster_weights,
    percentile_interval,
    weighted_sums,
)
from rlkit_diffusion.mdp import DenoisingCore
from rlkit_diffusion.policy import DiffusionPolicy
from rlkit_diffusion.preference import implicit_reward_accuracy, reward_preference_accuracy
from rlkit_diffusion.worlds.base import World

EVAL_MODES = ("sample", "sdedit")
NO_REWARD = {"with_reward": False}  # evaluation episodes are scored by `score`, reward by reward


@dataclass
class EvalConfig:
    """Evaluation settings (identical for every algorithm in a comparison)."""

    samples_per_prompt: int = 16
    """Initial noises per prompt (shared by base and trained policy)."""
    max_prompts: int | None = None
    """Use at most this many prompts of each split (None = all)."""
    seed: int = 1234
    """Seed of the evaluation noises (fixed across algorithms)."""
    batch_size: int = 256
    """Sampling and scoring batch size (scoring decodes with the VAE in the SD worlds: keep it GPU-sized there)."""
    reward: str = "gold"
    """The reward that decides wins."""
    optimum_beta: float = 1.0
    """β* of the tilted optimum p* ∝ p_ref exp(r/β*) (toy2d distance to optimum)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the 95% intervals."""
    heldout: bool = True
    """Also evaluate held-out prompts."""
    num_inference_steps: int | None = None
    """Sampling steps (None = the policy's default)."""
    mode: str = "sample"
    """``sample`` (text-to-image from pure noise) or ``sdedit`` (edit the world's inputs, SDEdit; paper §5.3)."""
    strength: float = 0.6
    """SDEdit: the edit starts at t = strength·T (1 = pure noise, i.e. plain sampling)."""
    rewards: list[str] = field(default_factory=list)
    """Further rewards to report win rates under (``win_rate_vs_base_by_reward``; Fig. 6's AI-feedback matrix)."""
    implicit_pairs: int = 256
    """Validation pairs scored by the policy's implicit reward and by the explicit rewards (Table 2); 0 = skip."""
    implicit_draws: int = 10
    """(t, ε) draws averaged per pair by the implicit reward (S4.1)."""
    cache: bool = True
    """Keep the base model's samples and scores in the cross-run cache (`rlkit_diffusion.eval_cache`): computed by
    the first run of a world and these settings, reused by every later one (never changes a number)."""

    def __post_init__(self) -> None:
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval.mode={self.mode!r} is not a valid choice; available: {', '.join(EVAL_MODES)}")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"eval.strength must be in (0, 1], got {self.strength}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"eval.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")


METRIC_LABELS = {
    "best_of_n_equivalent": "mean-reward crossing: N at which E[max of N base draws, by gold] reaches the trained "
    "policy's mean gold reward (not S8's statistic)",
    "best_of_n_equivalent_by_proxy": "mean-reward crossing with the base draws picked by the proxy reward",
    "s8_p_base_best_of_n_beats_policy": "S8 (paper): per caption P(best of n base draws beats one trained draw), "
    "n = 1..samples_per_prompt, averaged over captions",
    "s8_base_draws_for_half": "S8 (paper): base draws n at which P(best of n base beats one trained draw) = 1/2",
}
"""What each best-of-N number in eval.json is (written into eval.json as ``metric_labels``)."""


def win_rate(r_trained: np.ndarray, r_base: np.ndarray) -> np.ndarray:
    """Per-pair outcome: 1 win, ½ tie, 0 loss."""
    return (r_trained > r_base).astype(np.float64) + 0.5 * (r_trained == r_base)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


@torch.no_grad()
def sample_split(
    world: World,
    policy: DiffusionPolicy,
    prompts: list[str],
    cfg: EvalConfig,
    *,
    ref_policy: DiffusionPolicy | None = None,
    desc: str = "sample",
    x_input: Tensor | None = None,
    strength: float = 1.0,
    sampler: Any = None,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Sample ``policy`` on ``prompts`` with the evaluation noises; optionally the path KL to ``ref_policy``.

    Every draw is an episode of the MDP (`DenoisingCore.rollout`): ρ_0 gives x_T (the evaluation's noise, or for
    SDEdit — ``x_input`` (B, ...) in model space and ``strength`` < 1 — a draw of q(x_t | x_input)), then the one
    sampling loop. Returns ``{"x0": (B, ...), "kl": (B,), "nfe": sampling UNet evaluations}``; rows are ordered
    as ``prompts``. With a ``sampler`` (module docstring) it replaces plain sampling and no path KL is computed.
    """
    core = DenoisingCore(world, reward=None, num_inference_steps=cfg.num_inference_steps, strength=strength)
    # Progress: one tick per denoising step of a chunk (a forward hook; the reference's steps tick too).
    n_chunks = math.ceil(len(prompts) / cfg.batch_size)
    total = None if sampler is not None else n_chunks * core.horizon * (1 if ref_policy is None else 2)
    bar = tqdm(total=total, desc=desc, unit="step", leave=False, disable=not progress)
    modules = {
        id(m): m for m in (policy.eps_model, getattr(ref_policy, "eps_model", None)) if isinstance(m, torch.nn.Module)
    }

    def tick(*_: Any) -> None:  # a forward hook must return None (anything else replaces the module's output)
        bar.update(1)

    hooks = [m.register_forward_hook(tick) for m in modules.values()]
    try:
        return _sample_chunks(core, policy, prompts, cfg, ref_policy, x_input, sampler)
    finally:
        for h in hooks:
            h.remove()
        bar.close()


def _sample_chunks(core: DenoisingCore, policy, prompts, cfg, ref_policy, x_input, sampler) -> dict[str, Any]:
    """`sample_split` chunk by chunk. Noises come from CPU generators seeded by ``cfg.seed`` (x_T for all rows at
    once, the step noises per chunk): `DiffusionPolicy.sample` draws each step's noise on the generator's device,
    so CPU and CUDA runs see the same numbers (common random numbers everywhere)."""
    world = core.world
    x0s, kls, nfe = [], [], 0
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    noise_all = torch.randn((len(prompts), *world.sample_shape), generator=g)
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        noise = noise_all[start : start + len(chunk)].to(world.device)  # (B, *sample_shape)
        cond = world.encoder(chunk)
        x_in = None if x_input is None else x_input[start : start + len(chunk)].to(world.device)
        episode = dict(x_input=x_in, cond=cond, **NO_REWARD)
        step_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1 + start)
        nfe0 = policy.nfe
        if sampler is not None:  # an inference-time procedure (best-of-N) draws through the same episodes

            def draw(x_T: Tensor, cond: Any, gen: torch.Generator, chunk=chunk, x_in=x_in) -> Tensor:
                return core.rollout(policy, chunk, x_T=x_T, x_input=x_in, cond=cond, generator=gen, **NO_REWARD).x0

            x0s.append(sampler.sample(draw, chunk, noise, cond, step_gen))
            nfe += policy.nfe - nfe0
        elif ref_policy is None:
            x0s.append(core.rollout(policy, chunk, x_T=noise, generator=step_gen, **episode).x0)
            nfe += policy.nfe - nfe0
        elif deterministic_steps(policy):  # η = 0: the samples, then the KL on a stochastic (η = 1) pass
            x0s.append(core.rollout(policy, chunk, x_T=noise, generator=step_gen, **episode).x0)
            nfe += policy.nfe - nfe0
            kl_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1 + start)
            with stochastic_steps(policy, ref_policy):
                ro = core.rollout(policy, chunk, x_T=noise, generator=kl_gen, return_trajectory=True, **episode)
                kls.append(core.path_kl(policy, ref_policy, ro))
        else:
            ro = core.rollout(policy, chunk, x_T=noise, generator=step_gen, return_trajectory=True, **episode)
            nfe += policy.nfe - nfe0  # before the reference's forwards
            x0s.append(ro.x0)
            kls.append(core.path_kl(policy, ref_policy, ro))
    res = {"x0": torch.cat(x0s), "nfe": nfe}
    if kls:
        res["kl"] = torch.cat(kls)
    return res


def deterministic_steps(policy: DiffusionPolicy) -> bool:
    """True when every denoising step is deterministic (DDIM with η = 0): the path KL of such samples is 0."""
    return getattr(policy, "sampler", "ddim") == "ddim" and float(getattr(policy, "eta", 1.0)) == 0.0


class stochastic_steps:
    """Context: DDIM η = 1 on the given policies (restored afterwards) — the KL pass of η = 0 samplers."""

    def __init__(self, *policies: DiffusionPolicy):
        self.policies = policies
        self.saved = [p.eta for p in policies]

    def __enter__(self) -> None:
        for p in self.policies:
            p.eta = 1.0

    def __exit__(self, *exc: Any) -> None:
        for p, eta in zip(self.policies, self.saved):
            p.eta = eta


@torch.no_grad()
def score(world: World, name: str, x0: Tensor, prompts: list[str], batch_size: int = 256) -> np.ndarray:
    """Reward ``name`` of samples x0 (decoded), as a numpy vector."""
    reward = world.reward(name)
    out = []
    for s in range(0, len(prompts), batch_size):
        out.append(reward(world.decode(x0[s : s + batch_size]), prompts[s : s + batch_size]).float().cpu())
    return torch.cat(out).numpy()


def _summary(prefix: str, values: np.ndarray, cfg: EvalConfig) -> dict[str, float]:
    """Mean, median and the caption-cluster bootstrap CI of one per-sample metric (rows caption-major)."""
    lo, hi = cluster_bootstrap_ci(
        values, caption_clusters(len(values), cfg.samples_per_prompt), None, cfg.bootstrap, cfg.seed
    )
    return {
        prefix: float(np.mean(values)),
        f"{prefix}_median": float(np.median(values)),
        f"{prefix}_ci_low": lo,
        f"{prefix}_ci_high": hi,
    }


def default_diversity(x0: Tensor, prompts: list[str]) -> float:
    """Mean pairwise distance between samples of the same prompt, averaged over prompts."""
    vals = []
    for p in sorted(set(prompts)):
        idx = [i for i, q in enumerate(prompts) if q == p]
        if len(idx) > 1:
            x = x0[idx].flatten(1).double()
            d = torch.cdist(x, x)
            vals.append(float(d.sum() / (len(idx) * (len(idx) - 1))))
    return float(np.mean(vals)) if vals else float("nan")


def category_win_rates(
    wins: np.ndarray, prompts: list[str], categories: dict[str, str], cfg: EvalConfig
) -> dict[str, dict[str, float]]:
    """Win rate vs base per prompt category (e.g. PartiPrompts' ``People``): ``{category: {win_rate, ci_low,
    ci_high, n}}``, n = number of (prompt, noise) pairs; prompts without a category count as ``other``. Intervals:
    caption-cluster bootstrap."""
    labels = np.array([categories.get(p, "other") for p in prompts])
    clusters = caption_clusters(len(prompts), cfg.samples_per_prompt)
    out = {}
    for cat in sorted(set(labels.tolist())):
        w = wins[labels == cat]
        lo, hi = cluster_bootstrap_ci(w, clusters[labels == cat], None, cfg.bootstrap, cfg.seed)
        out[cat] = {"win_rate": float(w.mean()), "ci_low": lo, "ci_high": hi, "n": int(len(w))}
    return out


def expected_best_of_n(rewards: np.ndarray, select_by: np.ndarray | None = None) -> np.ndarray:
    """E[reward of the best of N draws] for N = 1..n, from n draws per prompt (supp. S8), averaged over prompts.

    Args:
        rewards: (P, n) rewards of n independent draws for each of P prompts.
        select_by: (P, n) scores that pick the best draw (e.g. the proxy reward, as the best-of-N baseline does);
            None = the rewards themselves (an oracle best-of-N).

    Returns:
        (n,) curve; entry N−1 is the unbiased order-statistics estimate Σ_i r_(i) C(i−1, N−1) / C(n, N) over N draws
        without replacement from the n, with the draws sorted ascending by ``select_by`` (r_(i) = the reward of the
        i-th), averaged over prompts. Entry 0 is the mean reward.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    keys = rewards if select_by is None else np.asarray(select_by, dtype=np.float64)
    r = np.take_along_axis(rewards, np.argsort(keys, axis=1, kind="stable"), axis=1)  # (P, n) in selection order
    n = r.shape[1]
    finite = bool(np.isfinite(r).all())  # else `weighted_sums`: a −inf draw outside a subset's top is no NaN
    curve = np.empty(n)
    for big_n in range(1, n + 1):
        w = np.array([math.comb(i - 1, big_n - 1) for i in range(1, n + 1)], dtype=np.float64) / math.comb(n, big_n)
        curve[big_n - 1] = float((r @ w).mean() if finite else weighted_sums(w, r.T).mean())
    return curve


def best_of_n_equivalent(curve: np.ndarray, target: float) -> tuple[float, bool]:
    """The N at which the best-of-N curve reaches ``target`` (linear between integers): ``(N, censored)``.

    N = 1 when the target does not beat plain sampling; ``censored`` = True (and N = n) when even best-of-n falls
    short of the target.
    """
    if target <= curve[0]:
        return 1.0, False
    if target > curve[-1]:
        return float(len(curve)), True
    k = int(np.argmax(curve >= target))  # first index with curve[k] >= target; k >= 1
    frac = (target - curve[k - 1]) / max(curve[k] - curve[k - 1], 1e-12)
    return float(k + frac), False


def edit_inputs(world: World, prompts: list[str], cfg: EvalConfig) -> Tensor | None:
    """The SDEdit inputs of the rows (``eval.mode=sdedit``), or None for plain sampling."""
    if cfg.mode != "sdedit":
        return None
    make = world.extras.get("sdedit_inputs")
    if make is None:
        raise ValueError(
            f"eval.mode=sdedit: world {world.name!r} has no edit inputs (extras['sdedit_inputs']); available "
            "for world=shapes"
        )
    return make(prompts, cfg.seed)


def evaluate(
    world: World,
    policy: DiffusionPolicy,
    base_policy: DiffusionPolicy,
    cfg: EvalConfig,
    *,
    proxy: str = "proxy",
    base_cache: dict[str, Any] | None = None,
    sampler: Any = None,
    implicit_scale: tuple[float, str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``policy`` against ``base_policy`` (the initial model). Returns flat metrics.

    ``base_cache`` (a dict, filled on first use) keeps the base samples and scores across calls, so periodic
    evaluations during training sample the base only once. ``sampler``: an inference-time procedure used for
    ``policy``'s samples instead of plain sampling (module docstring). ``implicit_scale``: (β, convention) of the
    implicit reward for the preference accuracy on validation pairs (Table 2; None = skip it, e.g. for learning
    curves); the accuracy does not depend on it, the reported margin does.
    """
    t0 = time.perf_counter()
    cache = base_cache if base_cache is not None else {}
    out: dict[str, Any] = {}
    splits = [("train", world.train_prompts)]
    if cfg.heldout and world.heldout_prompts:
        splits.append(("heldout", world.heldout_prompts))
    was_training = policy.eps_model.training
    policy.eps_model.eval()
    for split, plist in splits:
        plist = plist[: cfg.max_prompts] if cfg.max_prompts else plist
        pre = "" if split == "train" else "heldout_"
        out.update(_evaluate_split(world, policy, base_policy, cfg, split, plist, cache, proxy, sampler, pre))
    # Aliases of the foundation schema.
    out["reward_base"] = out["gold_reward_base"]
    out["reward_trained"] = out["gold_reward_trained"]
    out["eval_mode"] = cfg.mode
    if cfg.mode == "sdedit":
        out["eval_strength"] = cfg.strength
    if implicit_scale is not None:
        out.update(preference_accuracies(world, policy, base_policy, cfg, implicit_scale))
    out["eval_wall_s"] = time.perf_counter() - t0
    out["peak_mem_mb"] = peak_memory_mb(world.device)
    if was_training:
        policy.eps_model.train()
    return out


def preference_accuracies(
    world: World, policy: DiffusionPolicy, base_policy: DiffusionPolicy, cfg: EvalConfig, scale: tuple[float, str]
) -> dict[str, float]:
    """Table 2 for any trained policy: the preference accuracy of its implicit reward against the base on the
    world's validation pairs (``implicit_acc``, ``implicit_margin``), and of each explicit reward on the same pairs
    (``reward_acc_<name>``; JPEG compressibility is not a preference model and is left out)."""
    if cfg.implicit_pairs <= 0 or world.val_pairs is None:
        return {}
    beta, convention = scale
    out = implicit_reward_accuracy(
        policy,
        base_policy,
        world,
        n_pairs=cfg.implicit_pairs,
        n_draws=cfg.implicit_draws,
        beta=beta,
        convention=convention,
    )
    names = [n for n in world.rewards if not n.startswith("jpeg")]
    out.update(reward_preference_accuracy(world, names, n_pairs=cfg.implicit_pairs))
    return out


def _base_split(world: World, base_policy, cfg: EvalConfig, prompts: list[str], proxy: str, edit: dict, split: str):
    """The base model's samples and scores on one split (computed once per evaluation cache)."""
    b = sample_split(world, base_policy, prompts, cfg, desc=f"eval base [{split}]", **edit)
    base = {
        "x0": b["x0"],
        "nfe": b["nfe"],
        "gold": score(world, cfg.reward, b["x0"], prompts, cfg.batch_size),
        "proxy": score(world, proxy, b["x0"], prompts, cfg.batch_size) if proxy in world.rewards else None,
    }
    for name in cfg.rewards:
        base[f"reward:{name}"] = score(world, name, b["x0"], prompts, cfg.batch_size)
    return base


def _evaluate_split(world, policy, base_policy, cfg: EvalConfig, split, plist, cache, proxy, sampler, pre: str):
    """Every metric of one split (module docstring), keys prefixed by ``pre``."""
    out: dict[str, Any] = {}
    prompts = [p for p in plist for _ in range(cfg.samples_per_prompt)]
    x_in = edit_inputs(world, prompts, cfg)
    edit = {"x_input": x_in, "strength": cfg.strength if x_in is not None else 1.0}
    if split not in cache:
        cache[split] = _base_split(world, base_policy, cfg, prompts, proxy, edit, split)
    base = cache[split]
    s = sample_split(
        world, policy, prompts, cfg, ref_policy=base_policy, desc=f"eval policy [{split}]", sampler=sampler, **edit
    )
    r_t = score(world, cfg.reward, s["x0"], prompts, cfg.batch_size)
    wins = win_rate(r_t, base["gold"])
    out.update(_best_of_n_metrics(base, r_t, (len(plist), cfg.samples_per_prompt), pre, cfg))
    if cfg.rewards:
        out[f"{pre}win_rate_vs_base_by_reward"] = _wins_by_reward(world, cfg, s["x0"], prompts, base)
    clusters = caption_clusters(len(prompts), cfg.samples_per_prompt)  # (B,) caption of each row
    lo, hi = cluster_bootstrap_ci(wins, clusters, None, cfg.bootstrap, cfg.seed)
    out[f"{pre}win_rate_vs_base"] = float(wins.mean())
    out[f"{pre}win_rate_vs_base_ci_low"], out[f"{pre}win_rate_vs_base_ci_high"] = lo, hi
    categories = world.extras.get("prompt_categories")
    if categories:
        out[f"{pre}win_rate_by_category"] = category_win_rates(wins, prompts, categories, cfg)
    out.update(_summary(f"{pre}gold_reward_base", base["gold"], cfg))
    out.update(_summary(f"{pre}gold_reward_trained", r_t, cfg))
    proxy_wins = {}
    if base["proxy"] is not None:
        out.update(_summary(f"{pre}proxy_reward_base", base["proxy"], cfg))
        proxy_trained = score(world, proxy, s["x0"], prompts, cfg.batch_size)
        out.update(_summary(f"{pre}proxy_reward_trained", proxy_trained, cfg))
        proxy_wins = {"proxy_wins": win_rate(proxy_trained, base["proxy"])}  # (B,) the same rows under the proxy
    out[f"{pre}kl_to_ref"] = float(s["kl"].mean()) if "kl" in s else float(getattr(sampler, "kl_to_ref", "nan"))
    if "kl" in s:
        kl = s["kl"].double().cpu().numpy()
        out[f"{pre}kl_to_ref_ci_low"], out[f"{pre}kl_to_ref_ci_high"] = cluster_bootstrap_ci(
            kl, clusters, None, cfg.bootstrap, cfg.seed
        )
        if sampler is None and deterministic_steps(policy):
            out[f"{pre}kl_to_ref_eta"] = 1.0
    out[f"{pre}inference_nfe_per_sample"] = s["nfe"] / len(prompts)
    out[f"{pre}inference_nfe_per_sample_base"] = base["nfe"] / len(prompts)
    out[f"{pre}inference_reward_queries_per_sample"] = float(getattr(sampler, "reward_queries_per_sample", 0))
    div = world.extras.get("diversity", default_diversity)
    out[f"{pre}diversity"] = div(s["x0"], prompts)
    out[f"{pre}diversity_base"] = div(base["x0"], prompts)
    if cfg.samples_per_prompt > 1:
        out[f"{pre}diversity_ci_low"], out[f"{pre}diversity_ci_high"] = _diversity_ci(div, s["x0"], prompts, cfg)
    if world.optimum is not None and world.distance is not None:
        out.update(_distance_to_optimum(world, cfg, plist, prompts, s["x0"], base["x0"], pre))
    out[f"{pre}per_sample"] = {  # (B,) rows caption-major: the pooled intervals over seeds need them
        "wins": wins,
        "gold_trained": r_t,
        "gold_base": base["gold"],
        **proxy_wins,
        **({"kl": s["kl"].double().cpu().numpy()} if "kl" in s else {}),
    }
    return out


def _diversity_ci(div, x0: Tensor, prompts: list[str], cfg: EvalConfig) -> tuple[float, float]:
    """Caption bootstrap of the mean per-caption diversity (the world's measure on each caption's draws alone)."""
    m = cfg.samples_per_prompt
    per_caption = np.array([div(x0[i : i + m], prompts[i : i + m]) for i in range(0, len(prompts), m)])
    ok = np.isfinite(per_caption)
    if not ok.any():
        return float("nan"), float("nan")
    return cluster_bootstrap_ci(per_caption[ok], np.arange(int(ok.sum())), None, cfg.bootstrap, cfg.seed)


def best_of_n_beats_probability(base: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Supp. S8's statistic per caption: P(the best of n base draws beats one trained draw), n = 1..m.

    Args:
        base: (P, m) gold rewards of m base draws per caption.
        trained: (P, k) gold rewards of k trained draws of the same captions.

    Returns:
        (P, m); entry [c, n−1] = mean over the trained draws y of 1 − ½(C(k_<, n) + C(k_≤, n)) / C(m, n), with k_<
        (k_≤) the number of base draws below (not above) y: the exact probability for n base draws without
        replacement from the m, a tie with the best base draw counting ½ (as the win rate does).
    """
    base, trained = np.asarray(base, dtype=np.float64), np.asarray(trained, dtype=np.float64)
    m = base.shape[1]
    k_lt = (base[:, None, :] < trained[:, :, None]).sum(2)  # (P, k)
    k_le = (base[:, None, :] <= trained[:, :, None]).sum(2)  # (P, k)
    comb = np.array([[math.comb(k, n) for n in range(1, m + 1)] for k in range(m + 1)], dtype=np.float64)  # (m+1, m)
    total = comb[m]  # (m,) C(m, n)
    p_not_beaten = 0.5 * (comb[k_lt] + comb[k_le]) / total  # (P, k, m)
    return 1.0 - p_not_beaten.mean(1)


def draws_for_half(curve: np.ndarray) -> tuple[float, bool]:
    """The n at which an increasing curve of P(best of n base beats the policy) reaches ½: ``(n, censored)``.

    n = 1 when one base draw already wins half the time or more; ``censored`` (n = m) when even n = m stays below.
    """
    return best_of_n_equivalent(np.asarray(curve, dtype=np.float64), 0.5)


def _best_of_n_metrics(
    base: dict, r_t: np.ndarray, per_prompt: tuple[int, int], pre: str, cfg: EvalConfig
) -> dict[str, Any]:
    """Supp. S8 from the base's draws: the best-of-N curves (picked by gold, and by the proxy) and the N at which
    they reach the trained policy's mean gold reward (the mean-reward crossing); S8's own statistic, the per-caption
    P(best of n base draws beats one trained draw), and the n at which it reaches ½; caption-bootstrap intervals."""
    out: dict[str, Any] = {}
    curve = expected_best_of_n(base["gold"].reshape(per_prompt))
    n_eq, censored = best_of_n_equivalent(curve, float(r_t.mean()))
    out[f"{pre}best_of_n_equivalent"], out[f"{pre}best_of_n_equivalent_censored"] = n_eq, censored
    out[f"{pre}best_of_n_curve"] = [float(v) for v in curve]
    # Caption bootstrap: each replicate reweights the captions of the per-caption curves and means.
    n_p, m = per_prompt
    weights = cluster_bootstrap_weights(n_p, cfg)  # (n_boot, P)
    per_caption_max = np.stack([expected_best_of_n(row[None]) for row in base["gold"].reshape(per_prompt)])  # (P, m)
    mean_t = r_t.reshape(per_prompt).mean(1)  # (P,)
    boot_curves = weighted_sums(weights, per_caption_max) / n_p  # (n_boot, m)
    boot_t = weighted_sums(weights, mean_t) / n_p  # (n_boot,); a −inf reward is −inf only where drawn
    crossings = np.array([best_of_n_equivalent(c, t)[0] for c, t in zip(boot_curves, boot_t)])
    lo, hi = percentile_interval(crossings)
    out[f"{pre}best_of_n_equivalent_ci_low"], out[f"{pre}best_of_n_equivalent_ci_high"] = lo, hi
    p_beat = best_of_n_beats_probability(base["gold"].reshape(per_prompt), r_t.reshape(per_prompt))  # (P, m)
    s8 = p_beat.mean(0)
    boot_s8 = weights @ p_beat / n_p  # (n_boot, m)
    out[f"{pre}s8_p_base_best_of_n_beats_policy"] = [float(v) for v in s8]
    out[f"{pre}s8_p_base_best_of_n_beats_policy_ci_low"] = [float(v) for v in np.percentile(boot_s8, 2.5, 0)]
    out[f"{pre}s8_p_base_best_of_n_beats_policy_ci_high"] = [float(v) for v in np.percentile(boot_s8, 97.5, 0)]
    n_half, half_censored = draws_for_half(s8)
    out[f"{pre}s8_base_draws_for_half"], out[f"{pre}s8_base_draws_for_half_censored"] = n_half, half_censored
    halves = np.array([draws_for_half(c)[0] for c in boot_s8])
    lo, hi = percentile_interval(halves)
    out[f"{pre}s8_base_draws_for_half_ci_low"], out[f"{pre}s8_base_draws_for_half_ci_high"] = lo, hi
    if not pre:
        out["metric_labels"] = dict(METRIC_LABELS)
    if base["proxy"] is not None:  # the realistic baseline: base draws picked by the proxy, scored by gold
        curve_proxy = expected_best_of_n(base["gold"].reshape(per_prompt), base["proxy"].reshape(per_prompt))
        out[f"{pre}best_of_n_curve_by_proxy"] = [float(v) for v in curve_proxy]
        out[f"{pre}best_of_n_equivalent_by_proxy"] = best_of_n_equivalent(curve_proxy, float(r_t.mean()))[0]
    return out


def cluster_bootstrap_weights(n_captions: int, cfg: EvalConfig) -> np.ndarray:
    """(cfg.bootstrap, n_captions) multinomial caption counts of the caption bootstrap (seeded by ``cfg.seed``)."""
    return cluster_weights(np.random.default_rng(cfg.seed), cfg.bootstrap, n_captions)


def _wins_by_reward(world: World, cfg: EvalConfig, x0: Tensor, prompts: list[str], base: dict) -> dict[str, dict]:
    """Win rate vs base under each of ``cfg.rewards`` (Fig. 6's AI-feedback matrix)."""
    by_reward = {}
    for name in cfg.rewards:
        r_name = score(world, name, x0, prompts, cfg.batch_size)
        w = win_rate(r_name, base[f"reward:{name}"])
        clusters = caption_clusters(len(prompts), cfg.samples_per_prompt)
        lo_r, hi_r = cluster_bootstrap_ci(w, clusters, None, cfg.bootstrap, cfg.seed)
        by_reward[name] = {
            "win_rate": float(w.mean()),
            "ci_low": lo_r,
            "ci_high": hi_r,
            "reward_base": float(base[f"reward:{name}"].mean()),
            "reward_trained": float(r_name.mean()),
        }
    return by_reward


def _distance_to_optimum(world: World, cfg: EvalConfig, plist, prompts, x0: Tensor, x0_base: Tensor, pre: str):
    """toy2d: energy distance of the trained and the base samples to draws of p* (β* = ``cfg.optimum_beta``)."""
    d_t, d_b = [], []
    for p in plist:
        idx = [i for i, q in enumerate(prompts) if q == p]
        target = world.optimum.samples(p, max(256, 2 * len(idx)), cfg.optimum_beta).to(x0.device)
        d_t.append(world.distance(x0[idx], target))
        d_b.append(world.distance(x0_base[idx], target))
    return {
        f"{pre}distance_to_optimum_trained": float(np.mean(d_t)),
        f"{pre}distance_to_optimum_base": float(np.mean(d_b)),
    }
