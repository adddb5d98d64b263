"""`DiffusionPolicy`: an ε-predictor plus the scheduler maths, viewed as a Gaussian policy π_θ(x_{t-1} | x_t, c).

This file holds THE ONLY denoising step of the repository (`DiffusionPolicy.step_distribution`) and the one
sampling loop (`DiffusionPolicy.sample`). Every algorithm, the environment and the evaluation go through them.

Notation (diffusers name → paper symbol; Diffusion-DPO eq. 1-2, DDIM paper eq. 12/16, DDPM paper eq. 7):

=====================  ==============================================================================
code                   maths
=====================  ==============================================================================
``x_t``                noisy sample x_t at timestep t (image or latent, any shape (B, ...))
``alphas_cumprod[t]``  ᾱ_t, so that q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)   (α_t = √ᾱ_t, σ_t² = 1 − ᾱ_t)
``t_prev``             the next timestep of the sampling schedule (t − T/N for N inference steps); < 0 at the end
``eps``                ε_θ(x_t, t, c), the network's noise prediction (after classifier-free guidance)
``x0_pred``            x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t
``eta``                η of DDIM: 0 = deterministic, 1 = DDPM-like posterior variance
``std``                σ_t(η) of the policy's Gaussian step
``mean``               μ_θ(x_t, t, c), the policy's mean
=====================  ==============================================================================

Conventions stated once:

* ``log_prob`` is the Gaussian log-density **summed** over every non-batch dimension (a log-likelihood of the whole
  action x_{t-1}); DDPO implementations that average over pixels differ from this by the constant factor 1/D.
* A step whose std is 0 (DDIM η = 0, or DDPM's last step) is deterministic; its log-probability is reported as 0.
* Classifier-free guidance runs conditional and unconditional branches in ONE batched forward.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``train.precision`` → the autocast dtype of the network forward (None = plain fp32)."""

Cond = Any  # a Tensor, or a (nested) dict of tensors with batch dimension 0 (e.g. SDXL's added_cond_kwargs)
GradMode = Literal["none", "full", "last_k"]


# ----------------------------------------------------------------------------------------------------------------
# Conditioning helpers: conditions are tensors or nested dicts of tensors, batched along dim 0.
# ----------------------------------------------------------------------------------------------------------------
def cond_map(fn: Callable[[Tensor], Tensor], cond: Cond) -> Cond:
    """Apply ``fn`` to every tensor of a (nested) conditioning structure."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return fn(cond)
    if isinstance(cond, Mapping):
        return {k: cond_map(fn, v) for k, v in cond.items()}
    raise TypeError(f"conditioning must be a Tensor or a dict of tensors, got {type(cond).__name__}")


def cond_cat(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension."""
    first = conds[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(conds, dim=0)
    return {k: cond_cat([c[k] for c in conds]) for k in first}


def _expand_t(t: Tensor | int, batch: int, device: torch.device) -> Tensor:
    """Timesteps as a long tensor of shape (B,)."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t.long()


Rows = tuple[int, slice]
"""``(n, rows)``: a batch that is the rows ``rows`` of a batch of n drawn as one (`AlgoContext.global_rows`)."""


def _randn_like(x: Tensor, generator: torch.Generator | None, rows: Rows | None = None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (a CPU generator gives the same
    numbers on every device) and moved to ``x``'s device. ``rows = (n, rows)``: the noise of all n rows of the
    batch ``x`` is part of is drawn and ``x``'s rows are kept (one process: n = B, every row; the same numbers)."""
    device = generator.device if generator is not None else x.device
    if rows is None:
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    n, keep = rows
    return torch.randn((n, *x.shape[1:]), generator=generator, device=device, dtype=x.dtype)[keep].to(x.device)


def check_rows(rows: Rows | None, batch: int) -> None:
    """A ``rows = (n, slice)`` argument must select exactly ``batch`` of the n rows."""
    kept = batch if rows is None else len(range(rows[0])[rows[1]])
    if kept != batch:
        raise ValueError(f"rows={rows} selects {kept} of {rows[0]} rows, but the batch has {batch}")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) so that it broadcasts against ``like`` (B, ...)."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------------------------------
# ε-model adapters
# ----------------------------------------------------------------------------------------------------------------
class UNetEpsModel(nn.Module):
    """Adapts a diffusers ``UNet2DConditionModel`` to the ``eps_model(x_t, t, cond)`` signature.

    ``cond`` is either the ``encoder_hidden_states`` tensor (B, L, D) or a dict with the keys
    ``encoder_hidden_states`` and optionally ``encoder_attention_mask`` and ``added_cond_kwargs`` (SDXL).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        if isinstance(cond, Tensor):
            cond = {"encoder_hidden_states": cond}
        return self.unet(x_t, t, **cond, return_dict=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class StepOutput:
    """One Gaussian step π(x_{t-1} | x_t, c) = N(mean, std² I), and the action drawn from it."""

    prev_sample: Tensor | None  # (B, ...) x_{t-1} (None when only the distribution was asked for: `mdp.rescore`)
    mean: Tensor  # (B, ...) μ_θ(x_t, t, c)
    std: Tensor  # (B,) σ_t(η)
    log_prob: Tensor | None  # (B,) log π(x_{t-1} | x_t, c), summed over non-batch dims
    eps: Tensor  # (B, ...) guided network output in the step's parameterisation: ε, or v for `FlowMatchingPolicy`
    x0_pred: Tensor  # (B, ...) x̂_0


@dataclass
class Schedule:
    """A sampling schedule: timesteps t_N > ... > t_1 and, for each, the timestep it steps to."""

    timesteps: Tensor  # (N,) long (ε-policy) or float σ ∈ (0, 1] (`FlowMatchingPolicy`)
    prev_timesteps: Tensor  # (N,) long, negative = "step to x_0"; or float σ, 0 = x_0 (flow)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


@dataclass
class SampleOutput:
    """A rollout of the denoising MDP."""

    x0: Tensor  # (B, ...) final sample
    latents: list[Tensor] = field(default_factory=list)  # N+1 tensors x_{t_N}, ..., x_0 (if requested)
    log_probs: Tensor | None = None  # (B, N) log π(x_{t-1} | x_t) of each step taken
    means: list[Tensor] = field(default_factory=list)  # N tensors μ (if requested)
    stds: Tensor | None = None  # (B, N)
    schedule: Schedule | None = None


# ----------------------------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------------------------
class DiffusionPolicy(nn.Module):
    """A diffusion model as a stochastic policy over the denoising chain.

    Args:
        eps_model: any module ``eps_model(x_t, t, cond) -> Tensor`` (wrap a diffusers UNet in `UNetEpsModel`).
        scheduler: a diffusers ``DDPMScheduler`` or ``DDIMScheduler`` (or anything with ``alphas_cumprod`` and a
            compatible ``config``); its noise schedule, prediction type, clipping and timestep spacing are used.
        sampler: ``"ddim"`` (with ``eta``) or ``"ddpm"`` (posterior variance "fixed_small").
        eta: DDIM's η. DDPO uses η = 1 so that every step is a proper Gaussian policy.
        num_inference_steps: default length of the sampling schedule.
        guidance_scale: default classifier-free guidance scale w (ε = ε_u + w (ε_c − ε_u)); 1 disables it.
    """

    def __init__(
        self,
        eps_model: nn.Module,
        scheduler: Any,
        *,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        eta: float = 1.0,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        cfg = scheduler.config
        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if cfg.get("thresholding", False):
            raise ValueError("dynamic thresholding is not supported by DiffusionPolicy (set thresholding=False)")
        variance_type = cfg.get("variance_type", "fixed_small")
        if sampler == "ddpm" and variance_type not in ("fixed_small", None):
            raise ValueError(f"DDPM sampling supports variance_type='fixed_small' only, got {variance_type!r}")
        self._init_policy(eps_model, scheduler, sampler, eta, num_inference_steps, guidance_scale)
        self.clip_sample = bool(cfg.get("clip_sample", False))
        self.clip_sample_range = float(cfg.get("clip_sample_range", 1.0))
        alphas_cumprod = scheduler.alphas_cumprod.detach().clone().double()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # What ᾱ_{t_prev} is when t_prev < 0: DDIM uses `final_alpha_cumprod` (1 if set_alpha_to_one else ᾱ_0),
        # DDPM uses 1.
        if sampler == "ddim":
            final = 1.0 if cfg.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
        else:
            final = 1.0
        self.final_alpha_cumprod = final

    def _init_policy(
        self,
        network: nn.Module,
        scheduler: Any,
        sampler: str,
        eta: float,
        num_inference_steps: int,
        guidance_scale: float,
    ) -> None:
        """The attributes of every policy (this class and `FlowMatchingPolicy`): the network, the sampling defaults,
        T, the NFE counter and the precision."""
        self.eps_model = network
        self.scheduler = copy.deepcopy(scheduler)  # only used for its schedule (set_timesteps)
        self.sampler = sampler
        self.eta = float(eta)
        self.num_inference_steps = int(num_inference_steps)
        self.guidance_scale = float(guidance_scale)
        self.num_train_timesteps = int(scheduler.config["num_train_timesteps"])
        # UNet function evaluations, one per sample per forward (CFG counts two; checkpoint recomputation counts).
        # Shared with every `with_eps_model` view so that reference forwards are counted too.
        self.counter = {"nfe": 0}
        # Precision and compilation of the network forward (`set_precision`); the step maths stay fp32.
        self.precision = "fp32"
        self.compile_network = False
        self._compiled: dict[int, Any] = {}  # id(network) → its torch.compile'd callable (shared with the views)

    @property
    def nfe(self) -> int:
        """UNet function evaluations so far (this policy and every view made by `with_eps_model`)."""
        return self.counter["nfe"]

    def with_eps_model(self, eps_model: nn.Module) -> DiffusionPolicy:
        """The same scheduler maths around another network (used for reference models)."""
        other = copy.copy(self)
        other._modules = dict(self._modules)
        other._modules["eps_model"] = eps_model
        other._buffers = dict(self._buffers)
        other._parameters = dict(self._parameters)
        return other

    def schedule(self, num_inference_steps: int | None = None, strength: float = 1.0) -> Schedule:
        """The sampling schedule of diffusers' ``set_timesteps`` (same spacing), with each step's target.

        Args:
            num_inference_steps: N; defaults to ``self.num_inference_steps``.
            strength: for image-to-image (SDEdit): keep only the last ``round(strength * N)`` steps.
        """
        n = int(self.num_inference_steps if num_inference_steps is None else num_inference_steps)
        if n < 1 or n > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {n}")
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(n)
        timesteps = sched.timesteps.long().cpu()
        if self.sampler == "ddim":  # DDIMScheduler.step: prev = t - T // N
            prev = timesteps - self.num_train_timesteps // n
        else:  # DDPMScheduler.previous_timestep: the next entry of the schedule, -1 at the end
            prev = torch.cat([timesteps[1:], torch.tensor([-1])])
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        keep = max(1, min(n, round(strength * n)))
        return Schedule(timesteps=timesteps[n - keep :], prev_timesteps=prev[n - keep :])

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t for a tensor of timesteps (negative → the final value of the sampler)."""
        t = t.to(self.alphas_cumprod.device)
        final = torch.full_like(self.alphas_cumprod[:1], self.final_alpha_cumprod).expand(t.shape)
        return torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0)], final)

    # ------------------------------------------------------------------------------------------------------------
    # Forward process q(x_t | x_0) — the off-policy behaviour policy of Diffusion-DPO (eq. 2, supp. S3).
    # ------------------------------------------------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε  (eq. 2); identical to diffusers' ``scheduler.add_noise``."""
        a = _bcast(self.alphas_cumprod[t.to(self.alphas_cumprod.device)], x0).to(x0.dtype)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The regression target of the network output for the diffusion loss (eq. 2)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a = _bcast(self.alphas_cumprod[t.to(self.alphas_cumprod.device)], x0).to(x0.dtype)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # v = α ε − σ x_0

    # ------------------------------------------------------------------------------------------------------------
    # The network
    # ------------------------------------------------------------------------------------------------------------
    def set_precision(self, precision: str = "fp32", compile: bool = False) -> DiffusionPolicy:
        """Run the network forward in ``precision`` (``fp32``, ``bf16`` or ``fp16`` autocast; on CPU bf16 uses
        AVX-512-bf16/AMX where present) and/or through ``torch.compile``. Only the network forward changes
        (`model_output`): its output is cast back to fp32, so the step maths — means, log-probabilities and their
        differences, the DPO/GRPO arguments, the path KL — stay fp32. Applies to every view (`with_eps_model`, the
        reference's policy) made afterwards. Returns self."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.compile_network = bool(compile)
        return self

    def _network(self) -> Any:
        """The ε-model, or its compiled callable (compiled once per network, the reference's included)."""
        if not self.compile_network:
            return self.eps_model
        key = id(self.eps_model)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(self.eps_model)
        return self._compiled[key]

    def model_output(self, x_t: Tensor, t: Tensor | int, cond: Cond) -> Tensor:
        """Raw network output (ε, v or x̂_0 according to ``prediction_type``), no guidance; fp32 whatever the
        precision of the forward (`set_precision`)."""
        t = self._expand(t, x_t.shape[0], x_t.device)
        self.counter["nfe"] += x_t.shape[0]
        net, dtype = self._network(), PRECISIONS[self.precision]
        amp = contextlib.nullcontext() if dtype is None else torch.autocast(x_t.device.type, dtype=dtype)
        if torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            with amp:
                out = net(x_t, t, cond)
            return out if dtype is None else out.float()
        # No autograd wanted (sampling, reference forwards under no_grad): inference mode also skips the per-op
        # version-counter and view bookkeeping that no_grad keeps (~5% of a small UNet's forward on CPU,
        # benchmarks/perf.py); the clone hands back an ordinary tensor that later autograd code may use freely.
        with torch.inference_mode(), amp:
            out = net(x_t, t, cond)
        return out.clone() if dtype is None else out.to(torch.float32, copy=True)

    def predict_noise(
        self,
        x_t: Tensor,
        t: Tensor | int,
        cond: Cond,
        *,
        uncond: Cond = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        """ε_θ(x_t, t, c), with classifier-free guidance in one batched forward when ``uncond`` is given.

        Args:
            x_t: (B, ...) noisy samples.
            t: timesteps, int or (B,).
            cond: conditioning with batch size B.
            uncond: unconditional conditioning with batch size B (or None: no guidance).
            guidance_scale: w; defaults to ``self.guidance_scale``.

        Returns:
            (B, ...) the noise prediction ε (converted from v / x̂_0 if the model predicts those).
        """
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        t = self._expand(t, x_t.shape[0], x_t.device)
        if uncond is not None and w != 1.0:
            out = self.model_output(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat([uncond, cond]))
            out_u, out_c = out.chunk(2)
            out = out_u + w * (out_c - out_u)
        else:
            out = self.model_output(x_t, t, cond)
        return self._to_eps(out, x_t, t)

    def _expand(self, t: Tensor | int, batch: int, device: torch.device) -> Tensor:
        """Timesteps as the (B,) tensor the network and the step maths take (long here; σ floats for flow)."""
        return _expand_t(t, batch, device)

    @property
    def stochastic(self) -> bool:
        """Whether the sampler's steps are Gaussian with std > 0 (what likelihood-ratio methods need)."""
        return not (self.sampler == "ddim" and self.eta == 0.0)

    def eps_error_weight(self, t: Tensor) -> Tensor | None:
        """Factor turning the squared regression error of the network output into the ε-error of Diffusion-DPO's
        eq. 14 (None: the output is already compared as trained, no factor). Overridden by `FlowMatchingPolicy`."""
        return None

    def _to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return out
        a = _bcast(self.alphas_cumprod[t], x_t).to(x_t.dtype)
        if self.prediction_type == "v_prediction":
            return a.sqrt() * out + (1 - a).sqrt() * x_t  # ε = α v + σ x_t
        return (x_t - a.sqrt() * out) / (1 - a).sqrt()  # from x̂_0

    # ------------------------------------------------------------------------------------------------------------
    # THE denoising step
    # ------------------------------------------------------------------------------------------------------------
    def step_distribution(
        self, x_t: Tensor, t: Tensor | int, t_prev: Tensor | int, eps: Tensor, *, eta: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and std of π(x_{t-1} | x_t, c) given the noise prediction ε.

        ``eta``: DDIM's η for this step (None = ``self.eta``; MixGRPO's deterministic steps pass 0). DDPM ignores it.

        DDIM (Song et al. eq. 12 and 16), as in diffusers ``DDIMScheduler.step``::

            x̂_0   = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                                   (1)
            σ_t   = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)                    (2)
            mean  = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ_t²) ε                          (3)

        DDPM (Ho et al. eq. 7, "fixed_small" variance), as in diffusers ``DDPMScheduler.step``::

            β̃_t  = 1 − ᾱ_t/ᾱ_prev
            mean  = √ᾱ_prev β̃_t/(1−ᾱ_t) x̂_0 + √(1−β̃_t)(1−ᾱ_prev)/(1−ᾱ_t) x_t     (4)
            σ_t²  = max((1−ᾱ_prev)/(1−ᾱ_t) β̃_t, 1e-20), and σ_t = 0 at t = 0         (5)

        Returns:
            ``(mean (B, ...), std (B,), x0_pred (B, ...))``.
        """
        b = x_t.shape[0]
        t = _expand_t(t, b, x_t.device)
        t_prev = _expand_t(t_prev, b, x_t.device)
        a_t = self.alpha_bar(t).to(x_t.dtype)  # (B,)
        a_prev = self.alpha_bar(t_prev).to(x_t.dtype)  # (B,)
        at, ap = _bcast(a_t, x_t), _bcast(a_prev, x_t)
        x0_pred = (x_t - (1 - at).sqrt() * eps) / at.sqrt()  # (1)
        if self.clip_sample:
            x0_pred = x0_pred.clamp(-self.clip_sample_range, self.clip_sample_range)
        if self.sampler == "ddim":
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = (self.eta if eta is None else float(eta)) * var.clamp(min=0).sqrt()  # (2)
            s = _bcast(std, x_t)
            mean = ap.sqrt() * x0_pred + (1 - ap - s**2).clamp(min=0).sqrt() * eps  # (3)
        else:
            beta = 1 - a_t / a_prev
            mean = (ap.sqrt() * _bcast(beta, x_t) / (1 - at)) * x0_pred + (
                (1 - _bcast(beta, x_t)).sqrt() * (1 - ap) / (1 - at)
            ) * x_t  # (4)
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
            std = torch.where(t > 0, var.sqrt(), torch.zeros_like(var))  # (5)
        return mean, std, x0_pred

    @staticmethod
    def log_prob(x_prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """log N(x_prev; mean, std² I), summed over all non-batch dimensions → (B,).

        Equal to ``torch.distributions.Normal(mean, std).log_prob(x_prev).sum(dims)``; rows with std = 0
        (deterministic steps) get 0.
        """
        s = _bcast(std, mean).to(mean.dtype)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        d = mean[0].numel()
        lp = -((x_prev - mean) ** 2) / (2 * safe**2) - safe.log() - 0.5 * math.log(2 * math.pi)
        lp = lp.flatten(1).sum(1)
        return torch.where(std.reshape(-1) > 0, lp, torch.zeros_like(lp)) if d else lp

    @staticmethod
    def gaussian_kl(mean_p: Tensor, mean_q: Tensor, std: Tensor) -> Tensor:
        """KL(N(mean_p, σ²I) || N(mean_q, σ²I)) = ‖mean_p − mean_q‖² / (2σ²), summed over dims → (B,).

        The per-step path KL of DPOK and of the evaluation (both policies share σ_t). Deterministic steps give 0.
        """
        s = _bcast(std, mean_p).to(mean_p.dtype)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        kl = ((mean_p - mean_q) ** 2 / (2 * safe**2)).flatten(1).sum(1)
        return torch.where(std.reshape(-1) > 0, kl, torch.zeros_like(kl))

    def step(
        self,
        x_t: Tensor,
        t: Tensor | int,
        t_prev: Tensor | int,
        cond: Cond,
        *,
        uncond: Cond = None,
        guidance_scale: float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        prev_sample: Tensor | None = None,
        eta: float | None = None,
    ) -> StepOutput:
        """Evaluate the policy at state (c, t, x_t) and draw (or score) the action x_{t-1}.

        Args:
            noise: the standard normal z of x_{t-1} = mean + σ z (drawn from ``generator`` if None).
            prev_sample: score this given action instead of drawing one (DDPO's re-evaluation of old actions).
            eta: DDIM's η of this step (None = ``self.eta``).
        """
        eps = self.predict_noise(x_t, t, cond, uncond=uncond, guidance_scale=guidance_scale)
        mean, std, x0_pred = self.step_distribution(x_t, t, t_prev, eps, eta=eta)
        if prev_sample is None:
            if noise is None:
                noise = _randn_like(x_t, generator)
            prev_sample = mean + _bcast(std, mean).to(mean.dtype) * noise
        log_prob = self.log_prob(prev_sample, mean, std)
        return StepOutput(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob, eps=eps, x0_pred=x0_pred)

    # ------------------------------------------------------------------------------------------------------------
    # THE sampling loop
    # ------------------------------------------------------------------------------------------------------------
    def sample(
        self,
        x_T: Tensor,
        cond: Cond,
        *,
        schedule: Schedule | None = None,
        uncond: Cond = None,
        guidance_scale: float | None = None,
        grad: GradMode = "none",
        k: int = 1,
        checkpoint: bool = False,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        stochastic: Tensor | None = None,
        rows: Rows | None = None,
    ) -> SampleOutput:
        """Roll out the chain x_{t_N} → ... → x_0 (DESIGN.md: the MDP's ρ_0 gives x_T, every action is a step).

        Args:
            x_T: (B, ...) the initial state's noise (or, for SDEdit, q(x_t | x_input)).
            cond: conditioning with batch size B. ``uncond`` and ``guidance_scale``: classifier-free guidance.
            schedule: the timestep schedule (the environment's); defaults to ``self.schedule()``.
            grad: ``"none"`` (no autograd at all), ``"full"`` (backprop through every step) or ``"last_k"``
                (DRaFT-K / AlignProp: only the last ``k`` steps are tracked; earlier steps run without grad and
                their output is a leaf).
            checkpoint: recompute each tracked step in the backward pass (activation memory flat in k).
            generator: source of the per-step noise z (seed it for common random numbers).
            return_trajectory: keep x_t of every step and the step means (for DDPO / KL).
            stochastic: (N,) bool, MixGRPO's per-step mask: steps marked False run with η = 0 (deterministic DDIM,
                σ_t = 0, log-prob 0), the others with ``self.eta``. None = every step with ``self.eta`` (the default,
                bit-identical to no mask). The noise z of every step is drawn either way, so the generator's stream
                and hence the other steps' noise do not depend on the mask.
            rows: ``(n, rows)``: this batch is the rows ``rows`` of a batch of n sampled as one (data parallelism,
                `AlgoContext.global_rows`): every step's z is drawn for all n rows from ``generator`` and the batch's
                rows kept, so the noise of a row does not depend on how the n rows are split over processes.
                None = the batch's own rows (the same numbers as ``(B, slice(0, B))``).
        """
        schedule = schedule or self.schedule()
        n = len(schedule)
        check_rows(rows, x_T.shape[0])
        if stochastic is not None:
            if self.sampler not in ("ddim", "sde"):
                raise ValueError("a per-step stochastic mask needs the DDIM sampler (η is DDIM's) or the flow SDE")
            if tuple(stochastic.shape) != (n,):
                raise ValueError(f"stochastic must be a bool mask of shape ({n},), got {tuple(stochastic.shape)}")
            stochastic = stochastic.bool().tolist()
        if grad not in ("none", "full", "last_k"):
            raise ValueError(f"grad must be 'none', 'full' or 'last_k', got {grad!r}")
        if grad == "last_k" and not 1 <= k <= n:  # k = 0 would track no step: no gradient at all
            raise ValueError(f"k must be in [1, {n}] for a {n}-step schedule, got {k}")
        n_tracked = {"none": 0, "full": n, "last_k": k}[grad]
        x = x_T
        latents, means, log_probs, stds = [x_T], [], [], []
        for i in range(n):
            t, t_prev = schedule.timesteps[i], schedule.prev_timesteps[i]
            noise = _randn_like(x, generator, rows)
            tracked = i >= n - n_tracked
            eta = None if stochastic is None or stochastic[i] else 0.0
            with torch.set_grad_enabled(tracked and torch.is_grad_enabled()):
                if tracked and checkpoint:
                    out = torch_checkpoint(
                        self._checkpointed_step,
                        x,
                        t,
                        t_prev,
                        cond,
                        uncond,
                        guidance_scale,
                        noise,
                        eta,
                        use_reentrant=False,
                    )
                    prev, mean, lp, std = out
                else:
                    o = self.step(
                        x, t, t_prev, cond, uncond=uncond, guidance_scale=guidance_scale, noise=noise, eta=eta
                    )
                    prev, mean, lp, std = o.prev_sample, o.mean, o.log_prob, o.std
            x = prev
            log_probs.append(lp)
            stds.append(std)
            if return_trajectory:
                latents.append(x)
                means.append(mean)
        return SampleOutput(
            x0=x,
            latents=latents if return_trajectory else [],
            log_probs=torch.stack(log_probs, dim=1),
            means=means,
            stds=torch.stack(stds, dim=1),
            schedule=schedule,
        )

    def _checkpointed_step(self, x, t, t_prev, cond, uncond, guidance_scale, noise, eta=None):
        o = self.step(x, t, t_prev, cond, uncond=uncond, guidance_scale=guidance_scale, noise=noise, eta=eta)
        return o.prev_sample, o.mean, o.log_prob, o.std


# ----------------------------------------------------------------------------------------------------------------
# The rectified-flow parameterisation (SD3 / FLUX class)
# ----------------------------------------------------------------------------------------------------------------
class FlowMatchingPolicy(DiffusionPolicy):
    """A velocity model on the rectified-flow path x_σ = (1 − σ) x_0 + σ ε, as the same Gaussian policy.

    It shares THE sampling loop (`DiffusionPolicy.sample`), `step`, `log_prob`, `gaussian_kl` and classifier-free
    guidance with the ε-policy and overrides only the parameterisation: what the network is given and predicts
    (v_θ ≈ ε − x_0), the schedule (σ_N = 1 > … > σ_1 > 0 = σ_0 of diffusers' ``FlowMatchEulerDiscreteScheduler``,
    with its ``shift``) and the step (docs/derivation.md, "Flow-matching policies")::

        ode:  x_{σ'} = x_σ + (σ' − σ) v                                                          (F1)
        sde:  s_σ  = a √(σ / (1 − σ))        (σ = 1: the denominator uses 1 − σ', as Flow-GRPO)      (F2)
              mean = x_σ + (σ' − σ) [v + s_σ²/(2σ) (x_σ + (1 − σ) v)]                                (F3)
              std  = s_σ √(σ − σ')                                                                (F4)

    (F1) is ``FlowMatchEulerDiscreteScheduler.step`` op for op; (F3)-(F4) is the Euler–Maruyama step of the SDE
    whose marginals equal the ODE's (Flow-GRPO, Liu et al. 2025, eq. 8-9), a = ``noise_level``.

    Timesteps: the schedule's entries are σ floats; the network is called at σ·T (diffusers' ``timesteps``).
    Integer timesteps are indices of the training grid σ_i = shift(i+1)/T (i = 0 … T−1, ascending noise), the
    convention of the ε-policy's q(x_t | x_0) draws (DPO, SFT); ``alphas_cumprod[i]`` = (1−σ_i)²/((1−σ_i)²+σ_i²)
    gives the same signal-to-noise ratio λ_i = ((1−σ_i)/σ_i)² to the SNR weightings.

    Args:
        velocity_model: any module ``velocity_model(x_t, σ·T, cond) -> v`` (e.g. `SD3VelocityModel`).
        scheduler: a diffusers ``FlowMatchEulerDiscreteScheduler`` (``shift``; no dynamic shifting).
        sampler: ``"ode"`` (deterministic Euler, F1) or ``"sde"`` (Gaussian policy, F2-F4).
        noise_level: a of (F2); Flow-GRPO uses 0.7. Ignored by ``"ode"``.
        num_inference_steps, guidance_scale: as `DiffusionPolicy`.
    """

    def __init__(
        self,
        velocity_model: nn.Module,
        scheduler: Any,
        *,
        sampler: Literal["ode", "sde"] = "sde",
        noise_level: float = 0.7,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
    ):
        nn.Module.__init__(self)
        if sampler not in ("ode", "sde"):
            raise ValueError(f"a flow-matching policy samples with 'ode' or 'sde', got {sampler!r}")
        cfg = scheduler.config
        for option in ("use_dynamic_shifting", "invert_sigmas", "stochastic_sampling", "shift_terminal"):
            if cfg.get(option):
                raise ValueError(f"FlowMatchingPolicy does not support the scheduler option {option}")
        if any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
            raise ValueError("FlowMatchingPolicy supports the shifted linear σ schedule only")
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        self.prediction_type = "flow"
        eta = noise_level if sampler == "sde" else 0.0  # a of (F2); 0 = deterministic
        self._init_policy(velocity_model, scheduler, sampler, eta, num_inference_steps, guidance_scale)
        self.clip_sample = False
        shift = float(cfg.get("shift", 1.0))
        s = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float32) / self.num_train_timesteps
        sigmas = shift * s / (1 + (shift - 1) * s)  # (T,) ascending: the training grid of diffusers, reversed
        self.register_buffer("sigmas", sigmas, persistent=False)
        snr_like = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
        self.register_buffer("alphas_cumprod", snr_like, persistent=False)
        self.final_alpha_cumprod = 1.0

    @property
    def noise_level(self) -> float:
        """a of (F2); 0 for the ODE sampler."""
        return self.eta

    @property
    def stochastic(self) -> bool:
        return self.sampler == "sde" and self.eta > 0

    def _expand(self, t: Tensor | int | float, batch: int, device: torch.device) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        return t if torch.is_floating_point(t) else t.long()

    def sigma(self, t: Tensor) -> Tensor:
        """σ of timesteps: a float tensor is σ itself, an integer tensor indexes the training grid. (B,)"""
        if torch.is_floating_point(t):
            return t
        return self.sigmas[t.to(self.sigmas.device)].to(t.device)

    def schedule(self, num_inference_steps: int | None = None, strength: float = 1.0) -> Schedule:
        """σ_N = 1 > … > σ_1 of diffusers' ``set_timesteps`` (with ``shift``), each step's target σ' (0 at the end)."""
        n = int(self.num_inference_steps if num_inference_steps is None else num_inference_steps)
        if n < 1 or n > self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {n}")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(n)
        sigmas = sched.sigmas.float().cpu()  # (N+1,) with the terminal 0
        keep = max(1, min(n, round(strength * n)))
        return Schedule(timesteps=sigmas[n - keep : n], prev_timesteps=sigmas[n - keep + 1 :])

    def alpha_bar(self, t: Tensor) -> Tensor:
        """The ᾱ with the same SNR as x_σ: (1−σ)²/((1−σ)²+σ²) (σ = 0 → 1)."""
        s = self.sigma(t.to(self.alphas_cumprod.device) if not torch.is_floating_point(t) else t)
        return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_σ = (1 − σ) x_0 + σ ε, op for op ``FlowMatchEulerDiscreteScheduler.scale_noise``."""
        s = _bcast(self.sigma(t), x0).to(x0.dtype)
        return s * noise + (1.0 - s) * x0

    def training_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The flow-matching target v = dx_σ/dσ = ε − x_0."""
        return noise - x0

    def eps_error_weight(self, t: Tensor) -> Tensor:
        """(1 − σ)²: at fixed x_σ, ε̂ = x_σ + (1 − σ) v̂, so ‖ε − ε̂‖² = (1 − σ)² ‖v − v̂‖² and the weighted velocity
        error IS the ε-error of eq. 14 (docs/derivation.md, "DPO in velocity form"). (B,)"""
        return (1 - self.sigma(t)) ** 2

    def model_output(self, x_t: Tensor, t: Tensor | int | float, cond: Cond) -> Tensor:
        """v_θ(x_σ, σ, c): the network is called at σ·T, as diffusers' pipelines call SD3 / FLUX."""
        sigma = self.sigma(self._expand(t, x_t.shape[0], x_t.device))
        return super().model_output(x_t, sigma * self.num_train_timesteps, cond)

    def _to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return out  # the step takes the velocity itself

    def step_distribution(
        self, x_t: Tensor, t: Tensor | float, t_prev: Tensor | float, eps: Tensor, *, eta: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and std of π(x_{σ'} | x_σ, c) given the (guided) velocity ``eps`` = v: (F1) or (F2)-(F4).

        ``eta``: the noise level a of this step (None = ``self.eta``; MixGRPO's deterministic steps pass 0 → F1).

        Returns:
            ``(mean (B, ...), std (B,), x0_pred (B, ...))`` with x̂_0 = x_σ − σ v.
        """
        b = x_t.shape[0]
        sigma = self.sigma(self._expand(t, b, x_t.device)).to(x_t.device)  # (B,)
        sigma_next = self.sigma(self._expand(t_prev, b, x_t.device)).to(x_t.device)  # (B,)
        v = eps
        x = x_t.to(torch.float32)  # diffusers upcasts the sample
        s, dt = _bcast(sigma, x), _bcast(sigma_next - sigma, x)
        x0_pred = (x - s * v).to(v.dtype)
        a = self.eta if eta is None else float(eta)
        if self.sampler == "ode" or a == 0:
            mean = (x + dt * v).to(v.dtype)  # (F1)
            return mean, torch.zeros_like(sigma), x0_pred
        denom = 1 - torch.where(sigma == 1, sigma_next, sigma)
        s_sde = a * (sigma / denom).sqrt()  # (F2) (B,)
        ss = _bcast(s_sde, x)
        mean = x + dt * (v + ss**2 / (2 * s) * (x + (1 - s) * v))  # (F3)
        std = s_sde * (sigma - sigma_next).sqrt()  # (F4)
        return mean.to(v.dtype), std, x0_pred
