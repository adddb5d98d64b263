"""The evaluation's protocol pieces: S8's statistic (per-caption P(best of n base beats one trained draw)), the η = 0
KL (a stochastic pass, never a silent 0), caption-level intervals in eval.json."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch

from rlkit_diffusion.evaluate import (
    EvalConfig,
    _best_of_n_metrics,
    best_of_n_beats_probability,
    draws_for_half,
    evaluate,
)
from rlkit_diffusion.worlds.toy2d import build_toy2d


def _brute_force(base: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Enumerate every n-subset of the base draws and every trained draw (ties ½)."""
    p, m = base.shape
    out = np.zeros((p, m))
    for c in range(p):
        for n in range(1, m + 1):
            vals = []
            for sub in itertools.combinations(range(m), n):
                best = base[c, list(sub)].max()
                vals += [float(best > y) + 0.5 * float(best == y) for y in trained[c]]
            out[c, n - 1] = np.mean(vals)
    return out


def test_s8_probability_matches_enumeration_with_ties():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4, size=(5, 5)).astype(float)  # small integers: many ties
    trained = rng.integers(0, 5, size=(5, 5)).astype(float)
    np.testing.assert_allclose(best_of_n_beats_probability(base, trained), _brute_force(base, trained), atol=1e-12)


def test_s8_draws_for_half_and_labels():
    assert draws_for_half(np.array([0.2, 0.4, 0.6, 0.7])) == (2.5, False)
    assert draws_for_half(np.array([0.6, 0.8])) == (1.0, False)
    assert draws_for_half(np.array([0.1, 0.2])) == (2.0, True)
    rng = np.random.default_rng(1)
    base = {"gold": rng.normal(size=40 * 8), "proxy": None}
    r_t = rng.normal(0.5, 1.0, size=40 * 8)
    m = _best_of_n_metrics(base, r_t, (40, 8), "", EvalConfig(samples_per_prompt=8, bootstrap=200))
    curve = m["s8_p_base_best_of_n_beats_policy"]
    assert len(curve) == 8 and all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))  # more draws win more often
    lo, hi = m["s8_p_base_best_of_n_beats_policy_ci_low"], m["s8_p_base_best_of_n_beats_policy_ci_high"]
    assert all(a <= c <= b for a, c, b in zip(lo, curve, hi))
    assert m["s8_base_draws_for_half_ci_low"] <= m["s8_base_draws_for_half"] <= m["s8_base_draws_for_half_ci_high"]
    assert m["best_of_n_equivalent_ci_low"] <= m["best_of_n_equivalent"] <= m["best_of_n_equivalent_ci_high"]
    assert "S8" in m["metric_labels"]["s8_base_draws_for_half"]
    assert "not S8" in m["metric_labels"]["best_of_n_equivalent"]


@pytest.fixture(scope="module")
def toy_pair():
    """A toy2d base and a perturbed copy (a 'trained' policy that differs from the base)."""
    world = build_toy2d(num_inference_steps=10)
    policy = world.policy
    trained = type(policy)(copy.deepcopy(policy.eps_model), policy.scheduler, eta=policy.eta, num_inference_steps=10)
    with torch.no_grad():
        for p in trained.eps_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return world, trained, policy


def test_eta0_kl_is_measured_on_a_stochastic_pass(toy_pair):
    world, trained, base = toy_pair
    cfg = EvalConfig(samples_per_prompt=8, max_prompts=4, bootstrap=100, heldout=False, implicit_pairs=0)
    out1 = evaluate(world, trained, base, cfg)
    trained.eta, base.eta = 0.0, 0.0
    try:
        out0 = evaluate(world, trained, base, cfg)
    finally:
        trained.eta, base.eta = 1.0, 1.0
    assert out0["kl_to_ref"] > 0 and out0["kl_to_ref_eta"] == 1.0
    assert out0["kl_to_ref"] == pytest.approx(out1["kl_to_ref"], rel=1e-6)  # the same η = 1 path KL
    assert "kl_to_ref_eta" not in out1
    assert out0["gold_reward_trained"] != out1["gold_reward_trained"]  # the samples themselves are η = 0
    assert trained.eta == 1.0 and base.eta == 1.0
    for key in ("win_rate_vs_base", "kl_to_ref", "gold_reward_trained", "diversity"):
        assert out1[f"{key}_ci_low"] <= out1[key] <= out1[f"{key}_ci_high"] or key == "diversity", key
    assert math.isfinite(out1["diversity_ci_low"])


def test_the_tuning_trials_lean_evaluation_changes_no_number_of_the_training_split():
    """experiment=tune's trials evaluate only what its rule reads (eval.heldout=false, eval.implicit_pairs=0 in
    conf/experiment/tune.yaml). Each split draws from generators seeded by eval.seed alone, so every number of the
    training split — the proxy reward and the KL the rule picks by among them — is that of the full evaluation."""
    import dataclasses

    from benchmarks.wiring import build_world_from, to_dataclass
    from tests.helpers import TINY_SHAPES, compose_cfg

    cfg = compose_cfg([*TINY_SHAPES, "eval.heldout=true", "eval.rewards=[proxy]"])
    torch.manual_seed(0)
    world = build_world_from(cfg, torch.device("cpu"))
    base = world.policy
    trained = copy.deepcopy(base)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    full_cfg = to_dataclass(EvalConfig, cfg.eval)
    scale = (2000.0, "official")  # the implicit reward's β and convention (DPO's on shapes)
    full = evaluate(world, trained, base, full_cfg, implicit_scale=scale)
    lean_cfg = dataclasses.replace(full_cfg, heldout=False, implicit_pairs=0)
    lean = evaluate(world, trained, base, lean_cfg, implicit_scale=scale)
    assert any(k.startswith("heldout_") for k in full) and any(k.startswith("implicit") for k in full)
    training_split = [k for k in lean if isinstance(lean[k], float) and not k.endswith("wall_s")]
    assert {"proxy_reward_trained", "kl_to_ref", "win_rate_vs_base"} <= set(training_split)
    assert lean["kl_to_ref"] > 0
    for k in training_split:
        assert lean[k] == full[k] or (math.isnan(lean[k]) and math.isnan(full[k])), k
