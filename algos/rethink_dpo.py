"""Rethinking-DPO (Kang et al., "Rethinking Direct Preference Optimization in Diffusion Models", AAAI-26,
arXiv 2505.18736): Diffusion-DPO (eq. 14) with an updated reference and timestep-aware training. Two variants:

**``variant=paper`` (default): the paper's method.**

(P1) **Reference = a copy of the policy every τ optimizer steps** (τ = ``tau`` ∈ {16, 32, 64}, default 32), until
the monitor freezes it.
(P2) **Monitor.** After every copy, D_KL(p_ref ‖ p_init) is estimated on a fixed small subset of winners x^w_0
(``monitor_pairs``, ``monitor_draws`` fixed (t, ε) draws, t ≥ 1 with ᾱ_t > 0) by the difference of the two models'
DDPM ELBO terms, a weighted difference of their ε errors::

    D̂ = T · E_{t, x_t ~ q(x_t|x_0)} [ KL(q(x_{t−1}|x_0, x_t) ‖ p_init(x_{t−1}|x_t)) − KL(q(x_{t−1}|x_0, x_t) ‖ p_ref) ]
      = T · E_t [ c_t (‖ε − ε_init(x_t)‖² − ‖ε − ε_ref(x_t)‖²) ],   c_t = β_t / (2 α_t (1 − ᾱ_{t−1}))        (M1)

(both Gaussians have the posterior variance σ̃_t² = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) and means that differ by
β_t / (√α_t √(1 − ᾱ_t)) (ε − ε_θ), so each KL is ‖·‖² β_t² / (2 σ̃_t² α_t (1 − ᾱ_t)) = c_t ‖ε − ε_θ‖²). **Sign:** the
issue text writes KL(q ‖ p_ref) − KL(q ‖ p_init); with L = T·E_t KL(q ‖ p) the negative ELBO, D_KL(p_ref ‖ p_init) =
E_{p_ref}[log p_ref − log p_init] ≈ E[L_init − L_ref], i.e. init minus ref as above. The literal order is negative
whenever the reference fits the winners better than p_init (on toy2d −0.92 after 32 steps) and could never reach
δ > 0. The squared errors are per-dimension means (``kl_reduction=mean``, the scale on which the paper's δ is read
here) or sums. Once D̂ > δ (``kl_threshold``: 0.005 for SD1.5, 0.002 for SDXL) the reference is frozen for the rest
of training.
(P3) **Timesteps** t ~ Cat(γ^k / Σ_k' γ^k') with γ = ``ts_gamma`` = 0.9 over K = ``ts_bins`` equal bins of
{0, …, T − 1} ordered from the highest noise (k = 0 holds t ∈ [T − T/K, T)), uniform within a bin. The paper's
indexing of t in γ^t is ambiguous; K = T is the literal per-timestep reading (γ^(T−1−t)), K = 10 (default) a
mild skew over the whole schedule.
(P4) **λ(t) = 1 + norm(1/√SNR(t))**, norm = min-max over the schedule t = 0 … T − 1 (so λ ∈ [1, 2], largest at high
noise), multiplies the DPO argument: L = −E log σ(λ(t) · inside) (`algos.dpo.dpo_loss` with weight λ(t) ω(λ_t)).
On a flow policy σ = 1 has zero SNR (u = ∞, and no finite c_t in M1): λ takes the largest finite u there
(`snr_lambda`) and the monitor draws only timesteps with ᾱ_t > 0 (`monitor_timesteps`).
The paper's SD1.5 settings: β = 5000, lr 1e-8 (the config's β default).

**``variant=project``: the project's earlier interpretation** (before the paper's text was available), kept as a
named variant:

(a) **Updated reference, anchored to the pretrained model.** θ_0 = pretrained weights (``ctx.base``), φ = π_ref's
weights, γ = ``ref_reg``. After every optimizer step (EMA, α = ``ref_ema_decay``) or every τ = ``tau`` steps
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
With both parts off (``ref_update=none``, ``timestep_aware=false``) the project variant is exactly ``dpo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from algos.dpo import DPO, DPOConfig, dpo_loss, snr_weight
from rlkit_diffusion.algorithm import AlgoContext
from rlkit_diffusion.preference import implicit_margin, paired_predictions, per_sample_error, validation_batches
from rlkit_diffusion.reference import Reference, unwrap


@dataclass
class RethinkDPOConfig(DPOConfig):
    """Diffusion-DPO fields plus Rethinking-DPO's: the paper's (P1-P4) and the project variant's (a, b)."""

    beta: float = 5000.0
    """β of eq. 14 (the paper's SD1.5 setting: 5000, ``official`` convention)."""
    variant: str = "paper"
    """``paper`` (P1-P4, the paper's method) or ``project`` (a, b: the earlier interpretation)."""
    tau: int = 32
    """τ: the reference is replaced by a copy of the policy every τ optimizer steps (paper: 16, 32 or 64; also the
    hard-copy interval of the project variant's R2)."""
    kl_threshold: float = 0.005
    """δ: freeze the reference once the monitor's D̂_KL(p_ref ‖ p_init) exceeds it (0.005 SD1.5, 0.002 SDXL) (P2)."""
    kl_reduction: str = "mean"
    """How the monitor reduces ‖ε − ε_θ‖² over dimensions: ``mean`` (per dimension) or ``sum`` (M1)."""
    monitor_pairs: int = 16
    """Winners of the monitor's fixed subset (the first ones of the pair stream, which is rewound) (P2)."""
    monitor_draws: int = 4
    """Fixed (t, ε) draws per monitored winner (P2)."""
    ts_gamma: float = 0.9
    """γ of t ~ Cat(γ^k / Σ γ^k'), k = 0 the highest-noise bin (P3); 1 = uniform."""
    ts_bins: int = 10
    """K: bins of the timestep distribution (P3); K = T is the literal per-timestep γ^(T−1−t)."""
    snr_scale: bool = True
    """Multiply the DPO argument by λ(t) = 1 + norm(1/√SNR(t)) (P4)."""
    ref_update: str = "ema"
    """Project variant (a): ``none`` (frozen pretrained: plain DPO), ``ema`` (R1) or ``hard`` (R2)."""
    ref_ema_decay: float = 0.99
    """Project variant: α of the EMA reference (R1)."""
    ref_reg: float = 0.05
    """Project variant: γ, shrink of the reference toward the pretrained weights after each update (0 = none)."""
    timestep_aware: bool = True
    """Project variant (b): rescale the implicit reward by λ(t) (T1-T4)."""
    ts_buckets: int = 10
    """Project variant: K: number of equal timestep buckets of the running scale."""
    ts_decay: float = 0.9
    """Project variant: ρ: decay of each bucket's running |inside| scale (T1)."""
    ts_emphasis: float = 1.0
    """Project variant: κ: extra weight of high-noise (early sampling) buckets (T2); 0 = balancing only."""
    ts_max_scale: float = 10.0
    """Project variant: λ_max: λ(t) is clipped to [1/λ_max, λ_max] (T3)."""


# --------------------------------------------------------------------------------------------------------------
# Pure pieces of the paper's variant (P2-P4)
# --------------------------------------------------------------------------------------------------------------
def timestep_probs(num_train_timesteps: int, gamma: float, bins: int) -> Tensor:
    """p(t) of (P3): bin k = (T − 1 − t)·K // T (k = 0: highest noise) has mass γ^k / Σ γ^k', spread evenly. (T,)"""
    T = num_train_timesteps
    if not 1 <= bins <= T or not 0.0 < gamma <= 1.0:
        raise ValueError(f"rethink_dpo: need 1 <= ts_bins <= {T} and 0 < ts_gamma <= 1, got {bins}, {gamma}")
    k = (T - 1 - torch.arange(T)) * bins // T  # (T,) bin of each t
    mass = torch.tensor(gamma, dtype=torch.float64) ** torch.arange(bins, dtype=torch.float64)  # (K,) γ^k
    size = torch.bincount(k, minlength=bins).double()  # timesteps per bin
    return (mass / mass.sum() / size)[k]


def snr_lambda(alphas_cumprod: Tensor) -> Tensor:
    """λ(t) = 1 + (u_t − min u)/(max u − min u), u_t = 1/√SNR(t) = √((1 − ᾱ_t)/ᾱ_t), over the schedule (P4). (T,)

    A timestep of zero SNR (ᾱ_t = 0: σ = 1 of a flow policy, or a zero-terminal-SNR schedule) has u_t = ∞, which
    the paper's SD1.5 schedule never has; it takes the largest finite u, so λ stays in [1, 2] with 2 at the highest
    noise (the literal min-max would give NaN there and 1 everywhere else)."""
    a = alphas_cumprod.double()
    u = ((1 - a) / a).sqrt()  # (T,), ∞ where ᾱ_t = 0
    top = u[torch.isfinite(u)].max()
    u = torch.minimum(u, top)
    return (1 + (u - u.min()) / (top - u.min())).float()


def monitor_timesteps(alphas_cumprod: Tensor) -> int:
    """One past the largest t of the monitor's draws (t ∈ [1, this)): the timesteps with ᾱ_t > 0 (P2). The ε form
    of the DDPM posterior KL (M1) divides by α_t = ᾱ_t / ᾱ_{t−1}, so a zero-SNR timestep (σ = 1 of a flow policy)
    has no finite c_t; every timestep of an ε schedule with ᾱ_T > 0 is kept."""
    positive = int((alphas_cumprod > 0).sum())  # ᾱ decreases in t: the first `positive` timesteps
    if positive < 2:
        raise ValueError("rethink_dpo: the monitor needs a timestep t >= 1 with alphas_cumprod > 0")
    return positive


def posterior_kl_coef(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """c_t = β_t / (2 α_t (1 − ᾱ_{t−1})) of (M1), t ≥ 1 (B,).

    KL(q(x_{t−1}|x_0,x_t) ‖ p_θ(x_{t−1}|x_t)) = c_t ‖ε − ε_θ(x_t)‖² (DDPM posterior variance on both sides)."""
    if (t < 1).any():
        raise ValueError("the monitor's KL needs t >= 1 (t = 0 has no Gaussian posterior)")
    if (alphas_cumprod[t] <= 0).any():
        raise ValueError("the monitor's KL needs alphas_cumprod > 0 at t (the ε form of M1 divides by α_t)")
    a = alphas_cumprod.double()
    a_t, a_prev = a[t], a[t - 1]
    alpha = a_t / a_prev
    return ((1 - alpha) / (2 * alpha * (1 - a_prev))).float()


def kl_to_init_estimate(err_ref: Tensor, err_init: Tensor, coef: Tensor, num_train_timesteps: int) -> Tensor:
    """(M1): D̂ = T · mean over draws of c_t (‖ε − ε_init‖² − ‖ε − ε_ref‖²) ≈ D_KL(p_ref ‖ p_init). Scalar."""
    return num_train_timesteps * (coef * (err_init - err_ref)).mean()


# --------------------------------------------------------------------------------------------------------------
# Pure pieces of the project variant (a, b)
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
    """Rethinking-DPO: the paper's method (P1-P4, ``variant=paper``) or the project variant (a, b)."""

    name = "rethink_dpo"
    config_class = RethinkDPOConfig
    world_size_invariant = False  # its timesteps are drawn per rank (P3)

    def configure(self, ctx: AlgoContext, cfg: RethinkDPOConfig) -> None:
        super().configure(ctx, cfg)
        if cfg.variant == "paper":
            self._setup_paper(ctx)
        elif cfg.variant == "project":
            self._setup_project(ctx)
        else:
            raise ValueError(f"rethink_dpo: variant must be paper|project, got {cfg.variant!r}")

    # The paper (P1-P4) ---------------------------------------------------------------------------------------
    def _setup_paper(self, ctx: AlgoContext) -> None:
        cfg = self.config
        if cfg.kl_reduction not in ("mean", "sum") or cfg.monitor_pairs < 1 or cfg.monitor_draws < 1:
            raise ValueError("rethink_dpo: need kl_reduction mean|sum, monitor_pairs >= 1, monitor_draws >= 1")
        T = ctx.policy.num_train_timesteps
        self.reference = Reference(ctx.policy, "hard", tau=cfg.tau)  # (P1)
        self.t_probs = timestep_probs(T, cfg.ts_gamma, cfg.ts_bins)  # (P3), over t = 0 … T − 1
        self.lam = snr_lambda(ctx.policy.alphas_cumprod.cpu())  # (P4), (T,)
        # (P2): a fixed subset of winners and fixed (t ≥ 1, ε) draws, so D̂ is a function of the reference alone.
        prompts, x_w, _ = next(validation_batches(ctx.world.pairs, cfg.monitor_pairs, cfg.monitor_pairs))
        g = torch.Generator().manual_seed(0)
        n = cfg.monitor_draws
        self.monitor_prompts = list(prompts) * n
        self.monitor_x0 = x_w.repeat(n, *([1] * (x_w.ndim - 1)))  # (n·M, ...)
        t_end = monitor_timesteps(ctx.policy.alphas_cumprod.cpu())  # T on every ε schedule here
        self.monitor_t = torch.randint(1, t_end, (len(self.monitor_prompts),), generator=g).to(ctx.device)
        self.monitor_noise = torch.randn(self.monitor_x0.shape, generator=g).to(ctx.device)
        self.frozen = False
        self.ref_kl = 0.0

    @torch.no_grad()
    def monitor(self) -> float:
        """D̂_KL(p_ref ‖ p_init) of (M1) on the fixed winners and draws."""
        ctx, cfg = self.ctx, self.config
        t, noise = self.monitor_t, self.monitor_noise
        x_t = ctx.policy.add_noise(self.monitor_x0, noise, t)
        cond = ctx.world.encoder(self.monitor_prompts)
        target = ctx.policy.training_target(self.monitor_x0, noise, t)
        err_ref = per_sample_error(self.reference.policy.model_output(x_t, t, cond), target, cfg.kl_reduction)
        err_init = per_sample_error(ctx.base.policy.model_output(x_t, t, cond), target, cfg.kl_reduction)
        coef = posterior_kl_coef(ctx.policy.alphas_cumprod, t)
        return float(kl_to_init_estimate(err_ref, err_init, coef, ctx.policy.num_train_timesteps))

    def _loss_paper(self, batch) -> dict[str, Tensor]:
        ctx, cfg = self.ctx, self.config
        prompts, x_w, x_l = batch
        b = len(prompts)
        t = torch.multinomial(self.t_probs, b, replacement=True, generator=ctx.generator).to(ctx.device)  # (P3)
        noise = torch.randn(x_w.shape, generator=ctx.generator).to(ctx.device)
        cond = ctx.world.encoder(prompts)
        model, ref, target = paired_predictions(ctx.policy, self.reference.policy, x_w, x_l, cond, t, noise)
        reduction = "sum" if cfg.beta_convention == "paper" else "mean"
        m_err, r_err = per_sample_error(model, target, reduction), per_sample_error(ref, target, reduction)
        weight = snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting)
        if cfg.snr_scale:
            weight = weight * self.lam.to(weight.device)[t]  # (P4): λ(t) multiplies the DPO argument
        out = dpo_loss(m_err, r_err, self.scale(weight, m_err[:b]))
        out["lambda_mean"] = self.lam[t.cpu()].mean()
        out["t_mean"] = t.float().mean()
        out["ref_frozen"] = torch.tensor(float(self.frozen))
        return self._extras(out, m_err[:b])

    def _after_update_paper(self, update: int) -> dict[str, float]:
        if self.frozen or not self.reference.update(update):  # (P1): a copy every τ steps until frozen
            return {}
        self.ref_kl = self.monitor()  # (P2)
        self.frozen = self.ref_kl > self.config.kl_threshold
        return {"ref_kl_to_init": self.ref_kl, "ref_frozen": float(self.frozen)}

    # The project variant (a, b) ------------------------------------------------------------------------------
    def _setup_project(self, ctx: AlgoContext) -> None:
        cfg = self.config
        if cfg.ref_update not in ("none", "ema", "hard"):
            raise ValueError(f"rethink_dpo: ref_update must be none|ema|hard, got {cfg.ref_update!r}")
        if not 0.0 <= cfg.ref_reg < 1.0:
            raise ValueError(f"rethink_dpo: ref_reg (γ) must be in [0, 1), got {cfg.ref_reg}")
        net = unwrap(ctx.policy.eps_model)
        trainable = [n for n, p in net.named_parameters() if p.requires_grad]
        if cfg.ref_update != "none":
            self.reference = Reference(ctx.policy, cfg.ref_update, tau=cfg.tau, ema_decay=cfg.ref_ema_decay)
        # θ_0 of the trainable parameters: the frozen base's own tensors when there is one, else (LoRA: the base is
        # the same network with adapters off) a snapshot of the adapters' initial values.
        base_params = dict(ctx.base.network.named_parameters()) if ctx.base.kind == "frozen" else {}
        self.anchor = {
            n: base_params[n] if n in base_params else net.get_parameter(n).detach().clone() for n in trainable
        }
        self.scaler = TimestepScaler(
            cfg.ts_buckets, ctx.policy.num_train_timesteps, cfg.ts_decay, cfg.ts_emphasis, cfg.ts_max_scale
        )

    def _loss_project(self, batch) -> dict[str, Tensor]:
        cfg = self.config
        e = self.errors(*batch)
        errs, weight = (e["model"], e["ref"]), e["weight"]
        model_w = e["model"].chunk(2)[0]  # (B,) the winners' errors
        logs: dict[str, Tensor] = {}
        if cfg.timestep_aware:
            inside = implicit_margin(*errs, self.scale(weight, model_w))  # (B,)
            self.scaler.update(e["t"], inside.abs())  # (T1)
            lam = self.scaler(e["t"])  # (T2-T3), no gradient
            weight = weight * lam  # (T4): λ(t) multiplies the inside term
            early = e["t"] >= self.ctx.policy.num_train_timesteps // 2
            logs["lambda_early"] = lam[early].mean() if early.any() else torch.tensor(float("nan"))
            logs["lambda_late"] = lam[~early].mean() if (~early).any() else torch.tensor(float("nan"))
        out = dpo_loss(*errs, self.scale(weight, model_w))
        out.update(logs)
        return self._extras(out, model_w)

    def _after_update_project(self, update: int) -> dict[str, float]:
        if self.config.ref_update == "none" or not self.reference.update(update):
            return {}
        regularise_reference(self.reference.network, self.anchor, self.config.ref_reg)  # (R1)/(R2)
        ref = dict(self.reference.network.named_parameters())
        dist = sum(float((ref[n].float() - a.float().to(ref[n].device)).pow(2).sum()) for n, a in self.anchor.items())
        return {"ref_to_base_sq": dist}

    # The protocol ----------------------------------------------------------------------------------------------
    def loss(self, batch) -> dict[str, Tensor]:
        return self._loss_paper(batch) if self.config.variant == "paper" else self._loss_project(batch)

    def after_update(self, update: int) -> dict[str, float]:
        if self.config.variant == "paper":
            return self._after_update_paper(update)
        return self._after_update_project(update)

    def state_dict(self) -> dict:
        if self.config.variant == "paper":
            return {"frozen": self.frozen, "ref_kl": self.ref_kl}
        return {"timestep_scale": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.config.variant == "paper":
            self.frozen = bool(state.get("frozen", False))
            self.ref_kl = float(state.get("ref_kl", 0.0))
        elif state.get("timestep_scale"):
            self.scaler.load_state_dict(state["timestep_scale"])
