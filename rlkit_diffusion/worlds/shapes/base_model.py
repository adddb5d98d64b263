"""The `shapes` base model: a small diffusers ``UNet2DConditionModel`` pretrained by the project.

Recipe (``python -m benchmarks.prepare world=shapes``; the shipped weights were produced by exactly that command):

* data: captions from the training grammar (`captions.sample_captions`), images rendered for them with nuisance
  factors switched on half of the time (`render.sample_scenes(p_nuisance=0.5)`), and **caption noise**: a
  fraction ``caption_noise`` of the images is rendered for another random caption. The base model therefore follows
  captions only part of the time and makes mixed-quality images — what alignment has to fix.
* pixel space: x_0 = 2·image − 1 ∈ [−1, 1]^{3×16×16}; the world decodes with (x + 1)/2 clamped to [0, 1].
* objective: eq. 2 with ω = 1 (ε-prediction), cosine noise schedule, 10% unconditional dropout (for guidance).
* optimiser: AdamW, linear warm-up then cosine decay (`optim.AdamWStage`); an EMA of the weights is what is saved.

The ``shapes_flow`` base (``python -m benchmarks.prepare world=shapes_flow`` → ``assets/shapes_flow_base``) is the
same UNet, data, draws and recipe with the flow-matching objective (``pretrain(..., flow=True)``): the network, called
at σ·T, regresses the velocity ε − x_0 on the rectified path x_σ = (1 − σ) x_0 + σ ε (`FlowMatchingPolicy`,
``make_flow_scheduler``), ‖(ε − x_0) − v_θ(x_σ, σ, c)‖² in place of ‖ε − ε_θ(x_t, t, c)‖².
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from rlkit_diffusion.checkpoint import atomic_write_json
from rlkit_diffusion.policy import DiffusionPolicy, FlowMatchingPolicy, UNetEpsModel
from rlkit_diffusion.worlds.base import ddim_scheduler, flow_scheduler
from rlkit_diffusion.worlds.shapes.captions import sample_captions, scenes_for_captions
from rlkit_diffusion.worlds.shapes.optim import AdamWStage
from rlkit_diffusion.worlds.shapes.render import render
from rlkit_diffusion.worlds.shapes.text_encoder import SentenceEncoder

BASE_DIR = Path(__file__).parents[1] / "assets" / "shapes_base"
FLOW_BASE_DIR = Path(__file__).parents[1] / "assets" / "shapes_flow_base"
NUM_TRAIN_TIMESTEPS = 1000

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 96),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=384,
    attention_head_dim=8,
    norm_num_groups=16,
)


def make_scheduler() -> DDIMScheduler:
    """Cosine schedule (suits 16×16 pixels), ε-prediction, no clipping, ᾱ_final = ᾱ_0 as Stable Diffusion."""
    return ddim_scheduler(NUM_TRAIN_TIMESTEPS, "squaredcos_cap_v2")


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The rectified-flow schedule of shapes_flow: σ linear in the step (shift 1), T = 1000 training grid points."""
    return flow_scheduler(NUM_TRAIN_TIMESTEPS)


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] → x_0 in [−1, 1]."""
    return images * 2 - 1


def to_images(x0: torch.Tensor) -> torch.Tensor:
    """x_0 → images in [0, 1] (what the rewards score)."""
    return ((x0 + 1) / 2).clamp(0, 1)


@dataclass
class PretrainConfig:
    """The shapes base model's pretraining recipe (`pretrain`; the shipped weights use these defaults)."""

    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 64
    """Renders per step."""
    lr: float = 1e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay)."""
    warmup: int = 200
    """Warm-up steps."""
    ema_decay: float = 0.999
    """Decay of the EMA weights that are shipped."""
    caption_noise: float = 0.15
    """Probability that a training image is rendered for another random caption (imperfect conditioning)."""
    p_nuisance: float = 0.5
    """Probability of each nuisance factor in a training render (`render.sample_scenes`)."""
    uncond_prob: float = 0.1
    """Probability of the empty caption (classifier-free guidance training)."""
    seed: int = 0
    """Seed of the initial weights, the renders and the captions."""
    checkpoint_every: int = 500
    """Steps between resumable checkpoints of a long pretraining."""


def _mix_cond(cond: dict, uncond: dict, drop: torch.Tensor) -> dict:
    """Rows where ``drop`` is True get the unconditional embedding (classifier-free guidance training)."""
    out = {}
    for k in cond:
        d = drop.reshape(-1, *([1] * (cond[k].ndim - 1)))
        out[k] = torch.where(d, uncond[k], cond[k])
    return out


def pretrain(
    out_dir: Path | str | None = None, cfg: PretrainConfig | None = None, *, encoder=None, flow: bool = False
) -> Path:
    """Train the base UNet and save it with ``save_pretrained`` (config.json + safetensors) into ``out_dir``
    (default: the shipped ``BASE_DIR``, or ``FLOW_BASE_DIR`` when ``flow``).

    ``flow``: the shapes_flow base — the same network, draws and recipe, trained as a velocity model on the
    rectified-flow path (`FlowMatchingPolicy.add_noise` / ``training_target``: x_σ = (1 − σ) x_0 + σ ε, v = ε − x_0;
    the integer t of a draw indexes σ_t = (t + 1)/T). Otherwise ε-prediction (eq. 2, ω = 1).

    Resumable: an interrupted run continues from ``out_dir/.pretrain_state`` (safetensors + json, no pickle).
    """
    from safetensors.torch import load_file, save_file

    cfg = cfg or PretrainConfig()
    torch.set_num_threads(max(1, int(os.environ.get("RLKIT_PRETRAIN_THREADS", "1"))))  # tiny tensors: 1 is fastest
    out_dir = Path(out_dir or (FLOW_BASE_DIR if flow else BASE_DIR))
    state_dir = out_dir / ".pretrain_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    encoder = encoder or SentenceEncoder()
    unet = make_unet(cfg.seed)
    if flow:
        policy = FlowMatchingPolicy(UNetEpsModel(unet), make_flow_scheduler())
    else:
        policy = DiffusionPolicy(UNetEpsModel(unet), make_scheduler())
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt, sched = AdamWStage(cfg.steps, cfg.batch_size, cfg.lr, warmup=cfg.warmup).optimizer(unet.parameters())
    start = 0
    if (state_dir / "state.json").exists():
        meta = json.loads((state_dir / "state.json").read_text())
        if meta["config"] == asdict(cfg) and meta.get("flow", False) == flow:
            unet.load_state_dict(load_file(str(state_dir / "unet.safetensors")))
            ema.load_state_dict(load_file(str(state_dir / "ema.safetensors")))
            opt_state = torch.load(state_dir / "optimizer.pt", weights_only=True)
            opt.load_state_dict(opt_state["optimizer"])
            sched.load_state_dict(opt_state["scheduler"])
            start = meta["step"]
    rng = random.Random(cfg.seed * 7919 + start)
    g = torch.Generator().manual_seed(cfg.seed * 104729 + start)
    uncond = encoder.uncond(cfg.batch_size)
    t0 = time.time()
    name = "shapes_flow" if flow else "shapes"
    bar = tqdm(range(start, cfg.steps), desc=f"pretrain {name} UNet", initial=start, total=cfg.steps)
    for step in bar:
        captions = [c.text for c in sample_captions(cfg.batch_size, rng, "train")]
        render_for = list(captions)
        for i in range(cfg.batch_size):  # caption noise: the image shows another caption
            if rng.random() < cfg.caption_noise:
                render_for[i] = sample_captions(1, rng, "train")[0].text
        spec = scenes_for_captions(render_for, g, p_nuisance=cfg.p_nuisance)
        x0 = to_model_space(render(spec, g))  # (B, 3, 16, 16)
        cond = _mix_cond(encoder(captions), uncond, torch.rand(cfg.batch_size, generator=g) < cfg.uncond_prob)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=g)
        pred = policy.model_output(policy.add_noise(x0, noise, t), t, cond)  # ε̂, or v̂ at σ_t·T (flow)
        loss = (pred - policy.training_target(x0, noise, t)).pow(2).mean()  # eq. 2, ω = 1: target ε, or ε − x_0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(state_dir / "unet.safetensors"))
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(state_dir / "ema.safetensors"))
            torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, state_dir / "optimizer.pt")
            atomic_write_json(state_dir / "state.json", {"step": done, "config": asdict(cfg), "flow": flow})
    # Stored in fp16 (half the bytes; loaded back as fp32 by `load_unet`).
    ema.to(torch.float16).save_pretrained(str(out_dir), safe_serialization=True)
    recipe = {
        "command": f"python -m benchmarks.prepare world={name}",
        "config": asdict(cfg),
        "objective": "flow matching: v = noise - x0 on x_sigma = (1 - sigma) x0 + sigma noise" if flow else "epsilon",
        "params": sum(p.numel() for p in ema.parameters()),
        "pretrain_seconds_this_session": round(time.time() - t0, 1),
    }
    atomic_write_json(out_dir / "recipe.json", recipe)
    return out_dir


def load_unet(path: Path | str = BASE_DIR, world: str = "shapes") -> UNet2DConditionModel:
    """``UNet2DConditionModel.from_pretrained`` with one-line errors for a missing or wrong checkpoint."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"{world} base model not found at {path} (expected config.json + diffusion_pytorch_model.safetensors); "
            f"run `python -m benchmarks.prepare world={world}`"
        )
    unet = UNet2DConditionModel.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
    if unet.config.sample_size != 16 or unet.config.in_channels != 3:
        raise ValueError(
            f"{path} is not a {world} UNet (expected 3×16×16 input, got {unet.config.in_channels}×"
            f"{unet.config.sample_size}×{unet.config.sample_size})"
        )
    return unet.eval()
