"""The ``sd15``, ``sdxl`` and ``sd3`` worlds: real Stable Diffusion, loaded with diffusers/transformers
``from_pretrained``.

What researchers run on GPUs. ``world.pretrained`` is a hub id (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``, ``stabilityai/stable-diffusion-3.5-medium``) or a local directory in
the diffusers layout (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``, plus ``text_encoder_2/ tokenizer_2/`` for
SDXL; SD3: ``transformer/`` instead of ``unet/``, and ``text_encoder_3/ tokenizer_3/`` for T5). The tests build tiny
random pipelines (`rlkit_diffusion.tiny`), ``save_pretrained`` them to a temporary directory and load them back
through this same code.

Where things are: ``components.py`` loads and checks the checkpoint and holds the network wrappers, the text encoders
and the VAE codec; ``world.py`` holds the settings (`SDWorldConfig`, `SDXLWorldConfig`, `SD3WorldConfig`: the YAML
keys of ``world=sd15`` / ``sdxl`` / ``sd3``), the reward and prompt wiring and the builders `build_sd15` /
`build_sdxl` / `build_sd3`; the
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
SD3 (``world=sd3``)        ``SD3Transformer2DModel`` in `SD3VelocityModel` (v = ε − x_0 on x_σ = (1 − σ) x_0 + σ ε),
                           sampled by `FlowMatchingPolicy` (the Flow-GRPO SDE by default, or the Euler ODE);
                           text = `SD3TextEncoder`: both CLIP encoders' penultimate states ⊕, zero-padded to
                           ``joint_attention_dim``, then T5's states along the sequence (zeros with ``t5=false``),
                           pooled = both projections ⊕; uncond = the encoded empty prompt; 16-channel latents
decode (rewards)           x = D(z / scaling_factor + shift_factor), mapped from [−1, 1] to [0, 1]; differentiable
                           (DRaFT); shift_factor = 0 except SD3's VAE
DPO pairs                  Pick-a-Pic parquet streamed (`StreamingPairs`), JPEG → resize/crop → VAE posterior,
                           cached on disk by image hash (`LatentCache`), z = (μ + σ ε − shift) · scaling_factor
                           per draw
rewards                    ``pickscore`` (default), ``hpsv2``, ``clip``, ``aesthetic`` — each loaded when its weights
                           are given — and ``jpeg`` / ``jpeg_incompressibility``; ``proxy`` (what online algorithms
                           optimise) and ``gold`` (what the evaluation's win rate uses) are aliases of two of them
prompts                    ``world.prompts`` (training/online + first evaluation split) and ``world.eval_prompts``
                           (held-out split): PartiPrompts, HPSv2, Pick-a-Pic captions or text files; categories go
                           to ``extras["prompt_categories"]`` for per-category win rates
=========================  ==========================================================================================

LoRA: ``reference.lora_rank=8`` makes the runner inject peft adapters into the UNet's attention projections (SD3: both
streams of the joint attention, ``add_{q,k,v}_proj`` and ``to_add_out`` too) and use
"adapters off" as the reference — ONE UNet in memory, so offloading the reference is never needed with LoRA. Without
LoRA the reference is a frozen copy of the UNet (full fine-tuning; twice the UNet's weights in memory).

Precision: ``dtype`` (fp32 | bf16 | fp16) is the weight dtype of every network of the world. For LoRA, bf16/fp16
base weights are fine (peft keeps the adapters in fp32); for full fine-tuning keep fp32 weights and use accelerate's
mixed precision (``accelerate launch --mixed_precision bf16``). A VAE whose config sets ``force_upcast`` (the SDXL
VAE) stays in fp32 under fp16, as in the diffusers pipelines (or pass ``vae=madebyollin/sdxl-vae-fp16-fix``).

Bad input fails before training with a one-line error naming the setting: a missing ``pretrained`` path or
subfolder, a UNet of the other architecture (SDXL UNet in ``sd15`` and vice versa), a UNet whose
``cross_attention_dim`` or ``in_channels`` do not match the text encoder(s) / VAE, SDXL added-embedding sizes that
do not match, an SD3 pipeline in ``sd15``/``sdxl`` or a UNet pipeline in ``sd3``, SD3 pooled / joint / T5 widths
that do not match, a resolution that is not a whole number of patches (or more than ``pos_embed_max_size``), a
parquet without the Pick-a-Pic columns, a reward weights file of the wrong shape.
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
