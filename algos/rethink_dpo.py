"""Rethinking-DPO (Kang et al., seed 003): Diffusion-DPO with (a) an updated, regularised reference and (b) a
timestep-aware scale of the implicit reward. Both parts are switchable; with both off this is exactly ``dpo``.

The seed gives the ideas, not the formulas; the ones implemented here are:

(a) **Updated reference, anchored to the pretrained model.** θ_0 = pretrained weights (``ctx.base``), φ = π_ref's
weights, γ = ``ref_reg``. After every optimizer step (EMA, α = ``ref_ema_decay``) or every τ = ``ref_tau`` steps
(hard copy)::

    EMA :  φ ← (1 − γ) [α φ + (1 − α) θ] + γ θ_0                                                     (R1)
    hard:  φ ← (1 − γ) θ + γ θ_0                       (only when step % τ == 0)                      (R2)

i.e. the plain reference update φ̃ (a convex step toward the policy) followed by a shrink toward θ_0, which is the
exact minimiser of ‖φ − φ̃‖² + γ/(1 − γ) ‖φ − θ_0‖²: a proximal L2 regulariser that keeps the reference near the
pretrained model. γ = 0 gives the unregularised updated reference; ``ref_update=none`` keeps π_ref = θ_0 (DPO).

(b) **Timestep-aware scale λ(t).** The timesteps are split into K = ``ts_buckets`` equal buckets; bucket k keeps a
running scale s_k of the implicit-reward magnitude |inside| (`rlkit_diffusion.preference.implicit_margin`) of its
samples, and the DPO argument of every sample is rescaled by a stop-gradient factor::

    s_k   ← ρ s_k + (1 − ρ) mean_{i ∈ k} |inside_i|          (first visit: s_k ← the mean)   ρ = ts_decay  (T1)
    e_k   = (1 + κ c_k) / mean_j (1 + κ c_j),   c_k = (k + ½) / K   (bucket centre in t/T)    κ = ts_emphasis (T2)
    λ(t)  = clip( e_k (s̄ + ε) / (s_k + ε), 1/λ_max, λ_max ),   s̄ = mean_j s_j,   k = bucket(t)            (T3)
    L     = −E log σ( sg[λ(t)] · inside )                                                                    (T4)

(an unvisited bucket counts as s_k = s̄). (T3) equalises the reward scale across buckets — every bucket then
contributes margins of typical size e_k s̄ — while keeping the average margin size: mean_k λ_k s_k = s̄ mean_k e_k = s̄
(before clipping), so β keeps its meaning. (T2) tilts it toward large t, the early, high-noise steps of sampling that
decide layout and semantics; κ = 0 is pure balancing. At initialisation (inside = 0 everywhere) λ = e_k.
On toy2d the running scale falls ~100× from t ≈ 0 to t ≈ T, so λ spans the whole clip range [1/λ_max, λ_max].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algos.dpo import DPO, DPOConfig, dpo_loss
from rlkit_diffusion.algorithm import AlgoContext
from rlkit_diffusion.preference import implicit_margin
from rlkit_diffusion.reference import Reference, unwrap


@dataclass
class RethinkDPOConfig(DPOConfig):
    """Diffusion-DPO fields plus the two Rethinking-DPO parts."""

    ref_update: str = "ema"
    """(a) How π_ref moves: ``none`` (frozen pretrained: plain DPO), ``ema`` (R1) or ``hard`` (R2)."""
    ref_ema_decay: float = 0.99
    """α of the EMA reference (R1)."""
    ref_tau: int = 50
    """τ of the hard-copy reference (R2): copy every τ optimizer steps."""
    ref_reg: float = 0.05
    """γ: shrink of the reference toward the pretrained weights after each reference update (0 = none)."""
    timestep_aware: bool = True
    """(b) Rescale the implicit reward by λ(t) (T1-T4)."""
    ts_buckets: int = 10
    """K: number of equal timestep buckets of the running scale."""
    ts_decay: float = 0.9
    """ρ: decay of each bucket's running |inside| scale (T1)."""
    ts_emphasis: float = 1.0
    """κ: extra weight of high-noise (early sampling) buckets (T2); 0 = balancing only."""
    ts_max_scale: float = 10.0
    """λ_max: λ(t) is clipped to [1/λ_max, λ_max] (T3)."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def regularise_reference(reference: torch.nn.Module, anchor: dict[str, Tensor], gamma: float) -> None:
    """The shrink of (R1)/(R2): φ ← (1 − γ) φ + γ θ_0 for every anchored parameter, in place."""
    if gamma <= 0:
        return
    for name, p in reference.named_parameters():
        if name in anchor:
            p.lerp_(anchor[name].to(p), gamma)


def emphasis(n_buckets: int, kappa: float) -> Tensor:
    """e_k of (T2): linear in the bucket centre c_k = (k + ½)/K, normalised to mean 1. (K,)"""
    c = (torch.arange(n_buckets, dtype=torch.float64) + 0.5) / n_buckets
    e = 1 + kappa * c
    return (e / e.mean()).float()


def timestep_scale(
    t: Tensor, scales: Tensor, visited: Tensor, num_train_timesteps: int, kappa: float, max_scale: float
) -> Tensor:
    """λ(t) of (T3) for timesteps ``t`` (B,) given bucket scales s (K,) and which buckets were visited (K,) bool."""
    k = scales.shape[0]
    bucket = (t.long() * k // num_train_timesteps).clamp(0, k - 1).cpu()
    s = scales.double().clone()
    s_bar = scales[visited].mean() if visited.any() else torch.tensor(0.0, dtype=torch.float64)
    s[~visited] = s_bar
    lam = (emphasis(k, kappa).double() * (s_bar + 1e-12) / (s + 1e-12))[bucket]  # (B,)
    return lam.clamp(1.0 / max_scale, max_scale).to(t.device)


class TimestepScaler:
    """The running per-bucket |inside| scale of (T1) and λ(t) of (T3); ``state_dict`` for resume."""

    def __init__(self, n_buckets: int, num_train_timesteps: int, decay: float, kappa: float, max_scale: float):
        if n_buckets < 1 or not 0.0 <= decay < 1.0 or max_scale < 1.0:
            raise ValueError(
                f"timestep scale needs ts_buckets >= 1, 0 <= ts_decay < 1, ts_max_scale >= 1; got "
                f"{n_buckets}, {decay}, {max_scale}"
            )
        self.k, self.T, self.decay, self.kappa, self.max_scale = (
            n_buckets,
            num_train_timesteps,
            decay,
            kappa,
            max_scale,
        )
        self.scales = torch.zeros(n_buckets, dtype=torch.float64)
        self.visited = torch.zeros(n_buckets, dtype=torch.bool)

    def update(self, t: Tensor, abs_inside: Tensor) -> None:
        """(T1) with one batch of (t, |inside|)."""
        bucket = (t.long() * self.k // self.T).clamp(0, self.k - 1).cpu()
        a = abs_inside.detach().double().cpu()
        for k in bucket.unique().tolist():
            m = a[bucket == k].mean()
            self.scales[k] = m if not self.visited[k] else self.decay * self.scales[k] + (1 - self.decay) * m
            self.visited[k] = True

    def __call__(self, t: Tensor) -> Tensor:
        return timestep_scale(t, self.scales, self.visited, self.T, self.kappa, self.max_scale).float()

    def state_dict(self) -> dict[str, Tensor]:
        return {"scales": self.scales.clone(), "visited": self.visited.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.scales = torch.as_tensor(state["scales"], dtype=torch.float64).clone()
        self.visited = torch.as_tensor(state["visited"], dtype=torch.bool).clone()


# --------------------------------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------------------------------
class RethinkDPO(DPO):
    """Diffusion-DPO with the updated, regularised reference (a) and the timestep-aware scale (b)."""

    name = "rethink_dpo"
    config_class = RethinkDPOConfig

    def setup(self, ctx: AlgoContext) -> None:
        super().setup(ctx)
        cfg = self.config
        if cfg.ref_update not in ("none", "ema", "hard"):
            raise ValueError(f"rethink_dpo: ref_update must be none|ema|hard, got {cfg.ref_update!r}")
        if not 0.0 <= cfg.ref_reg < 1.0:
            raise ValueError(f"rethink_dpo: ref_reg (γ) must be in [0, 1), got {cfg.ref_reg}")
        net = unwrap(ctx.policy.eps_model)
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        if cfg.ref_update != "none":
            self.reference = Reference(ctx.policy, cfg.ref_update, tau=cfg.ref_tau, ema_decay=cfg.ref_ema_decay)
        # θ_0 of the trainable parameters: the frozen base's own tensors when there is one, else (LoRA: the base is
        # the same network with adapters off) a snapshot of the adapters' initial values.
        base_params = dict(ctx.base.network.named_parameters()) if ctx.base.kind == "frozen" else {}
        self.anchor = {
            n: base_params[n] if n in base_params else net.get_parameter(n).detach().clone() for n in trainable
        }
        self.scaler = TimestepScaler(
            cfg.ts_buckets, ctx.policy.num_train_timesteps, cfg.ts_decay, cfg.ts_emphasis, cfg.ts_max_scale
        )

    def loss(self, batch) -> dict[str, Tensor]:
        cfg = self.config
        e = self.errors(*batch)
        errs = (e["model_w"], e["model_l"], e["ref_w"], e["ref_l"])
        weight = e["weight"]
        logs: dict[str, Tensor] = {}
        if cfg.timestep_aware:
            inside = implicit_margin(*errs, cfg.beta, convention=cfg.beta_convention, weight=weight)  # (B,)
            self.scaler.update(e["t"], inside.abs())  # (T1)
            lam = self.scaler(e["t"])  # (T2-T3), no gradient
            weight = weight * lam  # (T4): λ(t) multiplies the inside term
            early = e["t"] >= self.ctx.policy.num_train_timesteps // 2
            logs["lambda_early"] = lam[early].mean() if early.any() else torch.tensor(float("nan"))
            logs["lambda_late"] = lam[~early].mean() if (~early).any() else torch.tensor(float("nan"))
        out = dpo_loss(*errs, cfg.beta, convention=cfg.beta_convention, weight=weight)
        out.update(logs)
        return self._extras(out, e["model_w"])

    def after_update(self, update: int) -> dict[str, float]:
        if self.config.ref_update == "none" or not self.reference.update(update):
            return {}
        regularise_reference(self.reference.network, self.anchor, self.config.ref_reg)  # (R1)/(R2)
        ref = dict(self.reference.network.named_parameters())
        dist = sum(float((ref[n].float() - a.float().to(ref[n].device)).pow(2).sum()) for n, a in self.anchor.items())
        return {"ref_to_base_sq": dist}

    def state_dict(self) -> dict:
        return {"timestep_scale": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("timestep_scale"):
            self.scaler.load_state_dict(state["timestep_scale"])
