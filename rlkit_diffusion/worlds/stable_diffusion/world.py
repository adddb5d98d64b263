"""The ``sd15``, ``sdxl`` and ``sd3`` worlds: their settings (`SDWorldConfig`, `SDXLWorldConfig`, `SD3WorldConfig`,
the Hydra schemas of ``world=sd15`` / ``sdxl`` / ``sd3``), the reward models and prompt sets they load, and the
builders `build_sd15` / `build_sdxl` / `build_sd3` that assemble a `World` from the components (`.components`) and
the latent pairs (`rlkit_diffusion.data.latent_pairs`). The package docstring has the overview.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlkit_diffusion.data.hf_pairs import open_pair_stream
from rlkit_diffusion.data.latent_pairs import LatentCache, LatentPairs
from rlkit_diffusion.data.pickapic_stream import dreamlike_only as is_dreamlike_pair
from rlkit_diffusion.data.prompts import PromptSet, load_prompts
from rlkit_diffusion.policy import DiffusionPolicy, FlowMatchingPolicy
from rlkit_diffusion.rewards.clip_utils import torch_dtype
from rlkit_diffusion.worlds.base import World
from rlkit_diffusion.worlds.stable_diffusion.components import (
    LatentCodec,
    SD3TextEncoder,
    SD3VelocityModel,
    SD15TextEncoder,
    SDEpsModel,
    SDXLTextEncoder,
    check_architecture,
    check_sd3_architecture,
    load_components,
)

# Online-training prompts when none are given: simple animal names, as DDPO's aesthetic-quality experiment.
DEFAULT_PROMPTS = (
    "cat dog horse cow sheep pig goat rabbit mouse hamster fox wolf bear panda koala kangaroo lion tiger leopard "
    "cheetah zebra giraffe elephant rhinoceros hippopotamus camel deer moose raccoon squirrel hedgehog otter seal "
    "dolphin whale shark octopus turtle frog owl eagle parrot penguin flamingo duck swan butterfly"
).split()


# ----------------------------------------------------------------------------------------------------------------
# Settings (the fields are the YAML keys of benchmarks/conf/world/sd15.yaml, sdxl.yaml and sd3.yaml)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PipelineWorldConfig:
    """The settings every Stable Diffusion world has (`SDWorldConfig`, `SDXLWorldConfig`, `SD3WorldConfig` add their
    sampler's and conditioning's): the checkpoint, precision, resolution, guidance, pairs, prompts and rewards."""

    pretrained: str = "runwayml/stable-diffusion-v1-5"
    """Hub id or local directory in the diffusers layout."""
    vae: str | None = None
    """An alternative VAE (hub id or directory), e.g. ``madebyollin/sdxl-vae-fp16-fix``."""
    revision: str | None = None
    """Passed to ``from_pretrained``."""
    variant: str | None = None
    """Passed to ``from_pretrained`` (e.g. ``fp16`` weight files)."""
    dtype: str = "fp32"
    """Weight dtype ``fp32 | bf16 | fp16`` of the UNet, VAE, text encoder(s) and rewards (package docstring)."""
    resolution: int = 512
    """Image side in pixels; latents are resolution / 8 for the released VAEs."""
    num_inference_steps: int = 50
    """Sampler steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale w."""
    gradient_checkpointing: bool = False
    """The UNet's own activation checkpointing (``enable_gradient_checkpointing``)."""
    pairs: str | None = None
    """Pick-a-Pic v2 parquet file, directory or glob: the training stream of preference pairs; or a hub id
    (``yuvalkirstain/pickapic_v2[@split]``) or ``datasets:<path>``, streamed through ``datasets``
    (`rlkit_diffusion.data.hf_pairs`; exact resume only with ``shuffle_buffer=0``)."""
    val_pairs: str | None = None
    """The same for the validation pairs (implicit-reward accuracy)."""
    dreamlike_only: bool = False
    """Keep only the pairs where both images are Dreamlike's."""
    shuffle_buffer: int = 1000
    """Pairs in the streaming shuffle buffer."""
    hflip: bool = False
    """Data augmentation: flip each image horizontally with probability ½."""
    caption_dropout: float = 0.0
    """Data augmentation: replace a caption by "" with this probability, in [0, 1)."""
    skip_bad_rows: bool = False
    """Skip corrupt rows / replace pairs with corrupt images instead of failing."""
    latent_cache: str | None = None
    """Directory of the VAE-latent cache (None: encode every time)."""
    prompts: str | None = None
    """Prompt set ``[parti|hpsv2|pickapic|txt:]<path>`` of online training and the first evaluation split (None:
    ``DEFAULT_PROMPTS``)."""
    eval_prompts: str | None = None
    """Prompt set of the held-out evaluation split (None: no held-out split)."""
    max_eval_prompts: int | None = None
    """Size of the stratified subset of ``eval_prompts`` (None: all)."""
    proxy_reward: str = "pickscore"
    """The loaded reward the name ``proxy`` points to (what online algorithms optimise)."""
    eval_reward: str = "pickscore"
    """The loaded reward the name ``gold`` points to (what the evaluation's win rate uses)."""
    pickscore_model: str | None = "yuvalkirstain/PickScore_v1"
    """PickScore model (None: not loaded)."""
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    """PickScore's processor."""
    hpsv2_checkpoint: str | None = None
    """HPSv2 checkpoint (None: not loaded)."""
    hpsv2_arch: str = "ViT-H-14"
    """HPSv2's open_clip architecture."""
    clip_checkpoint: str | None = None
    """open_clip checkpoint of the CLIP score (None: not loaded)."""
    clip_arch: str = "ViT-H-14"
    """The CLIP score's open_clip architecture."""
    aesthetic_weights: str | None = None
    """LAION aesthetic predictor MLP weights (None: not loaded)."""
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    """The CLIP model whose image embeddings the aesthetic MLP reads."""
    seed: int = 0
    """Seed of the data order, the augmentation and the prompt subset."""


@dataclass
class SDWorldConfig(PipelineWorldConfig):
    """Settings of the ``sd15`` world: Stable Diffusion 1.x (and 2.x: v-prediction is read from the scheduler)."""

    eta: float = 1.0
    """DDIM η (1: every step Gaussian, as online RL needs)."""


@dataclass
class SDXLWorldConfig(SDWorldConfig):
    """Settings of the ``sdxl`` world: Stable Diffusion XL (base). What SDXL adds to `SDWorldConfig` is the crop
    corner of its added time ids; the other changes are defaults (1024 px, guidance 5 and UNet gradient
    checkpointing on, as the official SDXL training). For fp16 use ``vae=madebyollin/sdxl-vae-fp16-fix`` (else the
    SDXL VAE is kept in fp32)."""

    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
    """The SDXL base checkpoint (its two text encoders and the added-conditioning UNet)."""
    resolution: int = 1024
    """SDXL's native resolution (128 × 128 latents)."""
    guidance_scale: float = 5.0
    """The default of the diffusers SDXL pipeline."""
    gradient_checkpointing: bool = True
    """On, as the official SDXL training: the UNet's activations at 1024 px do not fit otherwise."""
    crops_coords_top: int = 0
    """``crops_coords_top_left[0]`` of the added time ids."""
    crops_coords_left: int = 0
    """``crops_coords_top_left[1]`` of the added time ids."""

    def time_ids(self) -> list[int]:
        """(original_size, crops_coords_top_left, target_size), original size = target size = the training
        resolution, as in the Diffusion-DPO SDXL training."""
        r = self.resolution
        return [r, r, self.crops_coords_top, self.crops_coords_left, r, r]


@dataclass
class SD3WorldConfig(PipelineWorldConfig):
    """Settings of the ``sd3`` world: Stable Diffusion 3 / 3.5 (rectified flow, ``SD3Transformer2DModel``), sampled by
    `FlowMatchingPolicy`. Defaults: SD3.5-Medium at 512 px (Flow-GRPO's training resolution), its model card's 40
    steps and guidance 4.5, the Flow-GRPO SDE (noise level a = 0.7) so that every step is a Gaussian policy, and
    transformer gradient checkpointing on."""

    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"
    resolution: int = 512
    num_inference_steps: int = 40
    guidance_scale: float = 4.5
    gradient_checkpointing: bool = True
    sampler: str = "sde"
    """``sde`` (the Gaussian policy with the ODE's marginals, what likelihood-ratio methods need) or ``ode``
    (deterministic Euler: diffusers' ``FlowMatchEulerDiscreteScheduler``, what the pipeline samples)."""
    noise_level: float = 0.7
    """a of the SDE's σ_t = a·√(t/(1 − t)) (Flow-GRPO: 0.7); ignored by ``ode``."""
    t5: bool = True
    """Load the T5 text encoder (``text_encoder_3``); false: its states are zeros, as the pipeline without T5 (saves
    ~9 GB in fp16)."""
    max_sequence_length: int = 256
    """T5 tokens per prompt (the pipeline's default)."""


# ----------------------------------------------------------------------------------------------------------------
# Prompts and rewards
# ----------------------------------------------------------------------------------------------------------------
def _prompt_sets(prompts: str | None, eval_prompts: str | None, max_eval_prompts: int | None, seed: int):
    train = load_prompts(prompts) if prompts else PromptSet("animals", list(DEFAULT_PROMPTS), {})
    held = load_prompts(eval_prompts).subset(max_eval_prompts, seed) if eval_prompts else PromptSet("none", [], {})
    return train, held


def _rewards(cfg: PipelineWorldConfig, device: torch.device) -> dict[str, Any]:
    """Load the reward models whose weights are given, plus JPEG, and alias ``proxy`` / ``gold``."""
    from rlkit_diffusion.rewards.jpeg import JpegReward

    dtype = cfg.dtype
    rewards: dict[str, Any] = {"jpeg": JpegReward(False), "jpeg_incompressibility": JpegReward(True)}
    if cfg.pickscore_model:
        from rlkit_diffusion.rewards.pickscore import PickScoreReward

        rewards["pickscore"] = PickScoreReward(
            cfg.pickscore_model, cfg.pickscore_processor, device=device, dtype=dtype
        )
    if cfg.hpsv2_checkpoint:
        from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward

        rewards["hpsv2"] = HPSv2Reward(cfg.hpsv2_checkpoint, cfg.hpsv2_arch, device=device, dtype=dtype)
    if cfg.clip_checkpoint:
        from rlkit_diffusion.rewards.clip_score import ClipScoreReward

        rewards["clip"] = ClipScoreReward(cfg.clip_arch, cfg.clip_checkpoint, device=device, dtype=dtype)
    if cfg.aesthetic_weights:
        from rlkit_diffusion.rewards.aesthetic import AestheticReward

        rewards["aesthetic"] = AestheticReward(cfg.aesthetic_weights, cfg.aesthetic_clip, device=device, dtype=dtype)
    for alias, setting in (("proxy", "proxy_reward"), ("gold", "eval_reward")):
        target = getattr(cfg, setting)
        if target not in rewards:
            hint = {"pickscore": "pickscore_model", "hpsv2": "hpsv2_checkpoint", "clip": "clip_checkpoint"}.get(
                target, "aesthetic_weights"
            )
            raise ValueError(
                f"world.{setting}={target!r} is not loaded (loaded: {sorted(rewards)}); set world.{hint}=<path>"
            )
        rewards[alias] = rewards[target]
    return rewards


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to ``device``, and cast only when the dtype changes (fp32 checkpoints stay untouched)."""
    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


def _check_sampler(cfg: PipelineWorldConfig) -> None:
    if isinstance(cfg, SD3WorldConfig):
        if cfg.sampler not in ("sde", "ode"):
            raise ValueError(f"world.sampler must be 'sde' or 'ode', got {cfg.sampler!r}")
        if cfg.noise_level < 0:
            raise ValueError(f"world.noise_level must be >= 0, got {cfg.noise_level}")
        if cfg.max_sequence_length < 1:
            raise ValueError(f"world.max_sequence_length must be >= 1, got {cfg.max_sequence_length}")


def _encoder_and_policy(cfg: PipelineWorldConfig, kind: str, c: Any, text_encoders: list[nn.Module], time_ids):
    """The text conditioning and the policy of ``kind``: the ε-UNet under DDIM (sd15, sdxl) or SD3's transformer
    under the flow sampler (sd3)."""
    common = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}
    if kind == "sd3":
        joint = int(c.denoiser.config.joint_attention_dim)
        encoder: Any = SD3TextEncoder(
            c.tokenizers, text_encoders, joint_attention_dim=joint, max_sequence_length=cfg.max_sequence_length
        )
        policy: DiffusionPolicy = FlowMatchingPolicy(
            SD3VelocityModel(c.denoiser), c.scheduler, sampler=cfg.sampler, noise_level=cfg.noise_level, **common
        )
        return encoder, policy
    if kind == "sdxl":
        force_zeros = bool(c.pipeline_config.get("force_zeros_for_empty_prompt", True))
        encoder = SDXLTextEncoder(c.tokenizers, text_encoders, time_ids, force_zeros_for_empty_prompt=force_zeros)
    else:
        encoder = SD15TextEncoder(c.tokenizers[0], text_encoders[0])
    return encoder, DiffusionPolicy(SDEpsModel(c.denoiser), c.scheduler, sampler="ddim", eta=cfg.eta, **common)


def _build(cfg: PipelineWorldConfig, *, kind: str, device: str | torch.device, time_ids: list[int]) -> World:
    """The world of ``cfg``: inputs checked cheapest first, then the pipeline placed on ``device`` in ``cfg.dtype``."""
    device = torch.device(device)
    weight_dtype = torch_dtype(cfg.dtype)
    if cfg.caption_dropout < 0 or cfg.caption_dropout >= 1:
        raise ValueError(f"world.caption_dropout must be in [0, 1), got {cfg.caption_dropout}")
    _check_sampler(cfg)
    # Cheap inputs first (prompt files, parquet schemas), then the pipeline, then the reward models.
    train_set, held_set = _prompt_sets(cfg.prompts, cfg.eval_prompts, cfg.max_eval_prompts, cfg.seed)
    stream = val_stream = None
    filter_kw: dict[str, Any] = (
        {"filter": is_dreamlike_pair, "filter_columns": ("model_0", "model_1")} if cfg.dreamlike_only else {}
    )
    stream_kw = {"seed": cfg.seed, "skip_bad_rows": cfg.skip_bad_rows, **filter_kw}
    if cfg.pairs:  # local parquet: the project's streamer; a hub id or datasets:<path>: `datasets` streaming
        stream = open_pair_stream(cfg.pairs, buffer_size=cfg.shuffle_buffer, **stream_kw)
    if cfg.val_pairs:
        val_stream = open_pair_stream(cfg.val_pairs, buffer_size=0, **stream_kw)
    c = load_components(
        cfg.pretrained,
        kind=kind,
        vae=cfg.vae,
        revision=cfg.revision,
        variant=cfg.variant,
        t5=getattr(cfg, "t5", True),
    )
    if kind == "sd3":
        check_sd3_architecture(c, pretrained=cfg.pretrained, resolution=cfg.resolution)
    else:
        check_architecture(
            c, sdxl=kind == "sdxl", pretrained=cfg.pretrained, resolution=cfg.resolution, time_ids=time_ids
        )
    rewards = _rewards(cfg, device)

    c.denoiser = _place(c.denoiser, device, weight_dtype)
    if cfg.gradient_checkpointing:
        c.denoiser.enable_gradient_checkpointing()
    vae_dtype = torch.float32 if weight_dtype == torch.float16 and c.vae.config.get("force_upcast") else weight_dtype
    codec = LatentCodec(_place(c.vae, device, vae_dtype))
    text_encoders = [_place(te, device, weight_dtype) for te in c.text_encoders]
    encoder, policy = _encoder_and_policy(cfg, kind, c, text_encoders, time_ids)
    policy = policy.to(device)

    cache = LatentCache(cfg.latent_cache, codec.fingerprint(cfg.resolution)) if cfg.latent_cache else None
    pair_kw = {"resolution": cfg.resolution, "cache": cache, "skip_bad_images": cfg.skip_bad_rows, "seed": cfg.seed}
    train_pairs = (
        LatentPairs(stream, codec, hflip=cfg.hflip, caption_dropout=cfg.caption_dropout, **pair_kw) if stream else None
    )
    held_pairs = LatentPairs(val_stream, codec, **pair_kw) if val_stream else None
    side = cfg.resolution // codec.scale
    return World(
        name=kind,
        policy=policy,
        encoder=encoder,
        sample_shape=(codec.latent_channels, side, side),
        rewards=rewards,
        train_prompts=train_set.prompts,
        heldout_prompts=held_set.prompts,
        pairs=train_pairs,
        val_pairs=held_pairs,
        decode=codec.decode,
        encode=codec.encode,
        guidance_scale=cfg.guidance_scale,
        extras={
            "prompt_categories": {**train_set.categories, **held_set.categories},
            "prompt_sets": {"train": train_set.name, "heldout": held_set.name},
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# The builders (`rlkit_diffusion.worlds.build_world` makes their config from the world's keyword arguments)
# ----------------------------------------------------------------------------------------------------------------
def _config_of(config: Any, cls: type, builder: str) -> Any:
    """``config`` (None: ``cls()``), refused unless it is a ``cls``: each builder takes its own world's settings."""
    config = config if config is not None else cls()
    if not isinstance(config, cls):
        raise TypeError(f"{builder} takes an {cls.__name__}, got {type(config).__name__}")
    return config


def build_sd15(config: SDWorldConfig | None = None, *, device: str | torch.device = "cpu") -> World:
    """The ``sd15`` world: Stable Diffusion 1.x (and 2.x: v-prediction is read from the scheduler config).

    Args:
        config: the settings (`SDWorldConfig`; None: its defaults).
        device: where the networks live.
    """
    return _build(config or SDWorldConfig(), kind="sd15", device=device, time_ids=[])


def build_sdxl(config: SDXLWorldConfig | None = None, *, device: str | torch.device = "cpu") -> World:
    """The ``sdxl`` world: Stable Diffusion XL (base) — two text encoders, pooled text embeddings and the added
    time ids `SDXLWorldConfig.time_ids`.

    Args:
        config: the settings (`SDXLWorldConfig`; None: its defaults).
        device: where the networks live.
    """
    config = _config_of(config, SDXLWorldConfig, "build_sdxl")
    return _build(config, kind="sdxl", device=device, time_ids=config.time_ids())


def build_sd3(config: SD3WorldConfig | None = None, *, device: str | torch.device = "cpu") -> World:
    """The ``sd3`` world: Stable Diffusion 3 / 3.5 — ``SD3Transformer2DModel`` (velocity prediction on the rectified-
    flow path) in `FlowMatchingPolicy`, three text encoders (`SD3TextEncoder`) and the 16-channel VAE with its shift
    factor (`LatentCodec`).

    Args:
        config: the settings (`SD3WorldConfig`; None: its defaults).
        device: where the networks live.
    """
    return _build(_config_of(config, SD3WorldConfig, "build_sd3"), kind="sd3", device=device, time_ids=[])


__all__ = [
    "DEFAULT_PROMPTS",
    "PipelineWorldConfig",
    "SD3WorldConfig",
    "SDWorldConfig",
    "SDXLWorldConfig",
    "build_sd3",
    "build_sd15",
    "build_sdxl",
]
