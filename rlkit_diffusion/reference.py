"""Reference models π_ref, one API for the three kinds used by the algorithms.

=============  =====================================================================================================
kind           what π_ref is
=============  =====================================================================================================
``frozen``     a frozen deep copy of the initial network (two networks in memory)
``lora``       the SAME network with its LoRA adapters switched off (one network in memory; needs `add_lora` first)
``hard``       a copy that is overwritten by the current policy every ``tau`` optimizer steps (Rethinking-DPO)
``ema``        a copy updated as θ_ref ← α θ_ref + (1 − α) θ after every optimizer step
``none``       no reference (DDPO, DRaFT without KL); asking for its predictions is an error
=============  =====================================================================================================

``Reference.policy`` is a `DiffusionPolicy` view (same scheduler maths) whose network is the reference; use it
under ``torch.no_grad()`` — the reference never receives gradients. With LoRA, no offloading of the reference is
ever needed: it costs no memory beyond the adapters' on/off switch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from rlkit_diffusion.policy import DiffusionPolicy
from rlkit_diffusion.sharding import full

ReferenceKind = Literal["frozen", "lora", "hard", "ema", "none"]


# ----------------------------------------------------------------------------------------------------------------
# LoRA through peft
# ----------------------------------------------------------------------------------------------------------------
def add_lora(
    module: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: list[str] | str,
    dropout: float = 0.0,
    init: str | bool = "gaussian",
) -> nn.Module:
    """Inject LoRA adapters (peft) into ``module`` in place, freeze the base weights and return the module.

    Args:
        target_modules: names (or a regex) of the linear/conv layers to adapt, e.g. ``["to_q", "to_k", "to_v",
            "to_out.0"]`` for a diffusers UNet, as in diffusers' Diffusion-DPO example.
        init: peft's ``init_lora_weights``; with the default the B matrix starts at zero so the adapted network
            equals the base network at initialisation.

    Adapters of a bf16/fp16 base network are kept in fp32 (the optimizer updates fp32 weights; diffusers'
    ``cast_training_params`` habit).
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=target_modules,
        lora_dropout=dropout,
        init_lora_weights=init,
    )
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        inject_adapter_in_model(config, module)
    except ValueError as e:
        raise ValueError(
            f"add_lora: no layer of {type(module).__name__} matched target_modules={target_modules!r} ({e})"
        ) from None
    n_lora = 0
    for name, p in module.named_parameters():
        if "lora_" in name:
            if p.dtype in (torch.float16, torch.bfloat16):  # trainable weights in fp32 over a bf16/fp16 base;
                p.data = p.data.float()  # peft casts the adapter's input and output to match the base layer
            p.requires_grad_(True)
            n_lora += p.numel()
    if n_lora == 0:
        raise ValueError(f"add_lora: no layer of {type(module).__name__} matched target_modules={target_modules!r}")
    return module


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base network: every peft LoRA layer is switched off, then restored."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"adapters_disabled: {type(module).__name__} has no LoRA adapters")
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


class _AdaptersOff(nn.Module):
    """The base network of a LoRA-adapted module, as a module (holds no parameters of its own)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._target = [module]  # a list, so that the module is not registered twice in state dicts

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._target[0]):
            return self._target[0](*args, **kwargs)


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / accelerate wrappers."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


# ----------------------------------------------------------------------------------------------------------------
# The reference
# ----------------------------------------------------------------------------------------------------------------
class Reference:
    """π_ref for a `DiffusionPolicy`; see the module docstring for the kinds.

    Args:
        policy: the trainable policy.
        kind: ``frozen | lora | hard | ema | none``.
        tau: for ``hard``: copy θ → θ_ref every ``tau`` optimizer steps.
        ema_decay: for ``ema``: α in θ_ref ← α θ_ref + (1 − α) θ.
    """

    def __init__(self, policy: DiffusionPolicy, kind: ReferenceKind = "frozen", *, tau: int = 0, ema_decay=0.0):
        if kind not in ("frozen", "lora", "hard", "ema", "none"):
            raise ValueError(f"reference kind must be one of frozen|lora|hard|ema|none, got {kind!r}")
        if kind == "hard" and tau < 1:
            raise ValueError(f"reference kind 'hard' needs tau >= 1, got {tau}")
        if kind == "ema" and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"reference kind 'ema' needs 0 <= ema_decay < 1, got {ema_decay}")
        self.kind = kind
        self.tau = int(tau)
        self.ema_decay = float(ema_decay)
        self._policy = policy
        net = unwrap(policy.eps_model)
        if kind == "lora":
            if not has_lora(net):
                raise ValueError("reference kind 'lora' needs a LoRA-adapted policy network (see add_lora)")
            self.network: nn.Module | None = _AdaptersOff(net)
        elif kind == "none":
            self.network = None
        else:
            self.network = copy.deepcopy(net).requires_grad_(False).eval()
        self.updates = 0

    @property
    def policy(self) -> DiffusionPolicy:
        """A `DiffusionPolicy` view whose network is π_ref (no gradient ever reaches it)."""
        if self.network is None:
            raise RuntimeError("this algorithm was configured without a reference model (reference.kind=none)")
        return self._policy.with_eps_model(self.network)

    @torch.no_grad()
    def predict_noise(self, x_t: Tensor, t: Tensor, cond, **kwargs) -> Tensor:
        """ε_ref(x_t, t, c) without gradient."""
        return self.policy.predict_noise(x_t, t, cond, **kwargs)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Update an updated reference after optimizer step ``step`` (1-based). Returns True if it changed."""
        if self.kind not in ("hard", "ema"):
            return False
        src = dict(unwrap(self._policy.eps_model).named_parameters())
        dst = dict(self.network.named_parameters())
        if self.kind == "hard":
            if step % self.tau != 0:
                return False
            for name, p in dst.items():
                p.copy_(full(src[name]))  # FSDP: the gathered parameter (collective; every rank updates)
        else:
            for name, p in dst.items():
                p.lerp_(full(src[name]).detach(), 1.0 - self.ema_decay)
        self.updates += 1
        return True

    def distance_to(self, module: nn.Module) -> Tensor:
        """Squared L2 distance ‖θ_ref − θ_module‖² over the reference's parameters (for ref regularisation)."""
        other = dict(unwrap(module).named_parameters())
        total = torch.zeros(())
        for name, p in self.network.named_parameters():
            total = total + (p.float() - full(other[name]).float().to(p.device)).pow(2).sum().cpu()
        return total

    def state_dict(self) -> dict[str, Tensor]:
        """Only updated references carry state worth saving (frozen/lora are rebuilt from the base weights)."""
        if self.kind not in ("hard", "ema"):
            return {}
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.kind in ("hard", "ema") and state:
            self.network.load_state_dict(state)
