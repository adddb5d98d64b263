"""The ``sd15`` and ``sdxl`` worlds: real Stable Diffusion, loaded with diffusers/transformers ``from_pretrained``.

What researchers run on GPUs. ``world.pretrained`` is a hub id (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``) or a local directory in the diffusers layout (``unet/ vae/
text_encoder/ tokenizer/ scheduler/``, plus ``text_encoder_2/ tokenizer_2/`` for SDXL). The tests build tiny random
pipelines (`rlkit_diffusion.tiny`), ``save_pretrained`` them to a temporary directory and load them back through
this same code.

Where things are: ``components.py`` loads and checks the checkpoint and holds the ε-model wrapper, the text encoders
and the VAE codec; ``world.py`` holds the settings (`SDWorldConfig`, `SDXLWorldConfig`: the YAML keys of
``world=sd15`` / ``world=sdxl``), the reward and prompt wiring and the builders `build_sd15` / `build_sdxl`; the
Pick-a-Pic pairs in latent space (`LatentPairs`, `LatentCache`) are `rlkit_diffusion.data.latent_pairs`.

=========================  ==========================================================================================
piece                      here
=========================  ==========================================================================================
ε-model                    ``UNet2DConditionModel`` in a `SDEpsModel` (casts inputs to the UNet's dtype)
diffusion space            VAE latents z = E(x) · scaling_factor, shape (4, H/8, W/8) for the released VAEs
sampler                    ``DDIMScheduler`` maths of `DiffusionPolicy` (η = 1 by default: every step Gaussian)
text (SD1.5)               ``CLIPTextModel`` last hidden state (B, 77, 768); uncond = the empty prompt's states
text (SDXL)                penultimate hidden states of ``CLIPTextModel`` ⊕ ``CLIPTextModelWithProjection`` (B, 77,
                           2048), pooled ``text_embeds`` of the second encoder, ``time_ids`` = (original_size,
                           crops_coords_top_left, target_size) as in ``StableDiffusionXLPipeline._get_add_time_ids``;
                           uncond = zeros when the pipeline's ``force_zeros_for_empty_prompt`` is set (the default)
decode (rewards)           x = D(z / scaling_factor), mapped from [−1, 1] to [0, 1]; differentiable (DRaFT)
DPO pairs                  Pick-a-Pic parquet streamed (`StreamingPairs`), JPEG → resize/crop → VAE posterior,
                           cached on disk by image hash (`LatentCache`), z = (μ + σ ε) · scaling_factor per draw
rewards                    ``pickscore`` (default), ``hpsv2``, ``clip``, ``aesthetic`` — each loaded when its weights
                           are given — and ``jpeg`` / ``jpeg_incompressibility``; ``proxy`` (what online algorithms
                           optimise) and ``gold`` (what the evaluation's win rate uses) are aliases of two of them
prompts                    ``world.prompts`` (training/online + first evaluation split) and ``world.eval_prompts``
                           (held-out split): PartiPrompts, HPSv2, Pick-a-Pic captions or text files; categories go
                           to ``extras["prompt_categories"]`` for per-category win rates
=========================  ==========================================================================================

LoRA: ``reference.lora_rank=8`` makes the runner inject peft adapters into the UNet's attention projections and use
"adapters off" as the reference — ONE UNet in memory, so offloading the reference is never needed with LoRA. Without
LoRA the reference is a frozen copy of the UNet (full fine-tuning; twice the UNet's weights in memory).

Precision: ``dtype`` (fp32 | bf16 | fp16) is the weight dtype of every network of the world. For LoRA, bf16/fp16
base weights are fine (peft keeps the adapters in fp32); for full fine-tuning keep fp32 weights and use accelerate's
mixed precision (``accelerate launch --mixed_precision bf16``). A VAE whose config sets ``force_upcast`` (the SDXL
VAE) stays in fp32 under fp16, as in the diffusers pipelines (or pass ``vae=madebyollin/sdxl-vae-fp16-fix``).

Bad input fails before training with a one-line error naming the setting: a missing ``pretrained`` path or
subfolder, a UNet of the other architecture (SDXL UNet in ``sd15`` and vice versa), a UNet whose
``cross_attention_dim`` or ``in_channels`` do not match the text encoder(s) / VAE, SDXL added-embedding sizes that
do not match, a parquet without the Pick-a-Pic columns, a reward weights file of the wrong shape.
"""

from rlkit_diffusion.worlds.stable_diffusion.components import (
    SD3_SUBFOLDERS,
    SD15_SUBFOLDERS,
    SDXL_SUBFOLDERS,
    T5_SUBFOLDERS,
    LatentCodec,
    SD3TextEncoder,
    SD3VelocityModel,
    SD15TextEncoder,
    SDComponents,
    SDEpsModel,
    SDXLTextEncoder,
    check_architecture,
    check_pipeline_kind,
    check_sd3_architecture,
    check_unet_kind,
    load_components,
)
from rlkit_diffusion.worlds.stable_diffusion.world import (
    DEFAULT_PROMPTS,
    PipelineWorldConfig,
    SD3WorldConfig,
    SDWorldConfig,
    SDXLWorldConfig,
    build_sd3,
    build_sd15,
    build_sdxl,
)

__all__ = [
    "DEFAULT_PROMPTS",
    "SD3_SUBFOLDERS",
    "SD15_SUBFOLDERS",
    "SDXL_SUBFOLDERS",
    "T5_SUBFOLDERS",
    "LatentCodec",
    "PipelineWorldConfig",
    "SD3TextEncoder",
    "SD3VelocityModel",
    "SD3WorldConfig",
    "SD15TextEncoder",
    "SDComponents",
    "SDEpsModel",
    "SDWorldConfig",
    "SDXLTextEncoder",
    "SDXLWorldConfig",
    "build_sd3",
    "build_sd15",
    "build_sdxl",
    "check_architecture",
    "check_pipeline_kind",
    "check_sd3_architecture",
    "check_unet_kind",
    "load_components",
]
