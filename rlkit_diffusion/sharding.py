"""Fully-sharded data parallelism (FSDP2) of the policy network, and the gathers that keep ONE checkpoint format.

``train.parallel=fsdp`` shards the trainable network with PyTorch's ``torch.distributed.fsdp.fully_shard`` — the
call accelerate's FSDP2 plugin makes (`accelerate.utils.fsdp_utils.fsdp2_prepare_model`): every module whose class
is named in ``train.fsdp_blocks`` becomes its own FSDP unit (bottom-up), then the root. Each rank holds 1/N of every
parameter, gradient and Adam moment as a ``DTensor`` (``Shard(0)``); a unit's parameters are all-gathered for its
forward and backward, and gradients are reduce-scattered (averaged over ranks, as DDP's all-reduce averages them).

Why the loop calls ``fully_shard`` itself instead of ``accelerate launch --use_fsdp``: accelerate enables its FSDP
plugin only for GPU distributed types; on CPU processes (``MULTI_CPU``, gloo) ``--use_fsdp`` silently gives DDP.
Calling ``fully_shard`` here runs the same sharded code on CPU (tested: ``tests/test_scale.py``) and on GPUs. A run
launched with accelerate's own FSDP2 plugin (``accelerate launch --config_file fsdp.yaml`` on GPUs) is prepared by
accelerate and goes through the same helpers below (they only look at whether a parameter is a ``DTensor``).

One checkpoint format (`rlkit_diffusion.checkpoint`): the sharded parameters and optimizer moments are gathered to
full tensors (`gathered_trainable_state`, `gathered_optimizer_state`: collectives, every rank calls them) and
written by rank 0 exactly as a single process writes them; reading scatters them back (`local_like`,
`sharded_optimizer_state`): every rank reads the file and keeps its own shard, so a checkpoint moves between a
sharded run, a DDP run and one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

FSDP_BLOCKS = ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "JointTransformerBlock")
"""The default FSDP units: diffusers' UNet ResNet blocks and attention blocks (SD1.5/SDXL) and SD3 transformer blocks
(accelerate's TRANSFORMER_BASED_WRAP with these class names)."""


def shard_model(model: nn.Module, blocks: list[str] | tuple[str, ...], device: torch.device, num_processes: int):
    """``fully_shard`` every module whose class name is in ``blocks`` (children before parents), then ``model``
    itself, over a 1-D device mesh of all processes. In place; returns ``model`` (now an ``FSDPModule``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (num_processes,))
    units = [m for m in model.modules() if m is not model and type(m).__name__ in set(blocks)]
    for module in reversed(units):  # reversed pre-order: a nested unit is sharded before the unit holding it
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Allocate the unsharded parameters once now, outside inference mode: created by a first forward under
    # torch.inference_mode (rollouts, `DiffusionPolicy.model_output`) they would be inference tensors, which a later
    # training forward cannot save for backward.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.reshard()
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when the network's parameters are sharded ``DTensor``s (FSDP2)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full(t: Tensor) -> Tensor:
    """The full tensor of a ``DTensor`` (an all-gather: every rank must call it), any other tensor unchanged."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_like(value: Tensor, like: Tensor) -> Tensor:
    """A full tensor read from a checkpoint, as ``like`` holds it: this rank's shard of a ``DTensor`` (no
    communication: every rank has the full value), else on ``like``'s device and dtype."""
    value = value.to(like.device, like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def gathered_trainable_state(model: nn.Module) -> dict[str, Tensor] | None:
    """The trainable parameters gathered to full CPU tensors (collective) — the layout of
    `rlkit_diffusion.checkpoint.trainable_state`; None when the network is not sharded (nothing to gather)."""
    if not is_sharded(model):
        return None
    return {n: full(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def gathered_optimizer_state(optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded moment gathered to a full CPU tensor (collective when
    ``sharded``): the same integer-keyed layout as the optimizer of one process over the same parameters."""
    state = optimizer.state_dict()
    if not sharded:
        return state
    state["state"] = {i: {k: full(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
    return state


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state (from a checkpoint) with every moment cut to this rank's shard of its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        return state
    out = dict(state)
    out["state"] = {
        i: {
            k: local_like(v, params[int(i)]) if torch.is_tensor(v) and v.shape == params[int(i)].shape else v
            for k, v in s.items()
        }
        for i, s in state["state"].items()
    }
    return out


def unshard_for_evaluation(model: nn.Module) -> None:
    """Gather every FSDP unit's parameters once and keep them gathered (collective): afterwards the network's
    parameters are plain full tensors and its forwards communicate no more, so rank 0 can evaluate alone."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
