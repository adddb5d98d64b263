"""Tiny random stand-ins of the real checkpoints, for the tests and the perf benchmark (``benchmarks.perf --world
sd_tiny``): they build small random components, save them in the real on-disk formats and load them back through the
real loading code (diffusers' ``get_dummy_components`` habit), so ``from_pretrained`` / file-path loading is what is
exercised, on a CPU in seconds.

What is here: SD1.5-, SDXL- and SD3-shaped pipelines (``save_tiny_sd15``, ``save_tiny_sdxl``, ``save_tiny_sd3``), a
CLIPModel + processor (PickScore / aesthetic CLIP, ``save_tiny_clip``), an open_clip model (HPSv2 / CLIP score,
``save_tiny_open_clip``), the LAION aesthetic MLP (``save_aesthetic_mlp``), Pick-a-Pic parquet shards
(``write_pickapic``) and PartiPrompts / HPSv2 prompt files (``write_partiprompts``, ``write_hpsv2``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_LEN = 32  # tokens (the real CLIP uses 77)


def tiny_tokenizer(max_length: int = TEXT_LEN):
    """A byte-level CLIP BPE tokenizer with no merges: 512 byte tokens + <|startoftext|> (512), <|endoftext|> (513)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def text_config(hidden: int = 32, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=514,
        max_position_embeddings=TEXT_LEN,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **kw,
    )


def tiny_vae(latent_channels: int = 4, **config):
    """A random 2-level AutoencoderKL (2× downsampling); ``config``: further AutoencoderKL settings (SD3's
    ``shift_factor``, ...)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
        **config,
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_unet(
    cross_attention_dim: int,
    sdxl: bool = False,
    projection_dim: int = 32,
    *,
    sample_size: int = 16,
    channels: int = 4,
    block_out_channels: tuple[int, int] = (32, 64),
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
):
    """A random 2-level UNet2DConditionModel (cross-attention down, plain down; mirrored up); the defaults are the
    tiny SD components' (4-channel 16×16 latents), ``sdxl`` adds SDXL's text-time embedding."""
    from diffusers import UNet2DConditionModel

    xl = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 8 * 6 + projection_dim,
        }
        if sdxl
        else {}
    )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        **xl,
    )


def save_tiny_sd15(path: Path, *, cross_attention_dim: int = 32, seed: int = 0) -> Path:
    """A StableDiffusionPipeline directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=tiny_unet(cross_attention_dim),
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config()),
        tokenizer=tiny_tokenizer(),
        scheduler=tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_sdxl(path: Path, *, seed: int = 0) -> Path:
    """A StableDiffusionXLPipeline directory (two text encoders: 32 + 32 = 64 = the UNet's cross_attention_dim)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(text_config()),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=32)),
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=tiny_unet(64, sdxl=True, projection_dim=32),
        scheduler=tiny_scheduler(),
    )
    pipe.save_pretrained(path)
    return path


def tiny_t5_tokenizer(max_length: int = 16):
    """A character-level T5 (Unigram) tokenizer: <pad> 0, </s> 1, <unk> 2, the printable ASCII characters and ▁."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, -1.0) for c in string.printable[:94]), ("▁", -1.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def save_tiny_sd3(path: Path, *, t5: bool = True, clip_projection_dim: int = 16, seed: int = 0) -> Path:
    """A StableDiffusion3Pipeline directory (transformer/ vae/ text_encoder{,_2,_3}/ tokenizer{,_2,_3}/ scheduler/):
    a 2-block SD3Transformer2DModel on 16-channel latents, two CLIP encoders with projection (hidden 32 + 32 padded
    to joint_attention_dim 64, pooled 16 + 16 = the transformer's pooled_projection_dim 32; another
    ``clip_projection_dim`` makes a mismatched checkpoint), a 1-layer T5 encoder (d_model 64) and a VAE with SD3's
    latent_channels = 16 and shift_factor; the scheduler is SD3.5's (FlowMatchEulerDiscrete, shift 3)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,  # the last block is context_pre_only (no to_add_out): two blocks hold every projection
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    vae = tiny_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    t5_tokenizer = tiny_t5_tokenizer()
    t5_config = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=37,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_config(projection_dim=clip_projection_dim)),
        tokenizer=tiny_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(text_config(projection_dim=clip_projection_dim)),
        tokenizer_2=tiny_tokenizer(),
        text_encoder_3=T5EncoderModel(t5_config) if t5 else None,
        tokenizer_3=t5_tokenizer if t5 else None,
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_clip(path: Path, *, image_size: int = 32, projection_dim: int = 16, seed: int = 0) -> Path:
    """A transformers CLIPModel + CLIPProcessor in one directory (the PickScore / aesthetic-CLIP layout)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    vision = {
        "image_size": image_size,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
    }
    config = CLIPConfig(text_config=text_config().to_dict(), vision_config=vision, projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(path)
    return path


OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_open_clip(path: Path, *, name: str = "tiny-open-clip", seed: int = 0) -> tuple[Path, Path]:
    """An open_clip model-config JSON and an HPSv2-style checkpoint ``{"state_dict": ...}`` (torch.save)."""
    import open_clip

    path.mkdir(parents=True, exist_ok=True)
    config = path / f"{name}.json"
    config.write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    weights = path / f"{name}.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    return config, weights


def save_aesthetic_mlp(path: Path, input_size: int = 16, seed: int = 0) -> Path:
    """Random weights of the LAION aesthetic MLP (a plain state dict, like sac+logos+ava1-l14-linearMSE.pth)."""
    from rlkit_diffusion.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    torch.save(AestheticMLP(input_size).state_dict(), path)
    return path


def write_pickapic(path: Path, n: int = 12, *, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    """A Pick-a-Pic v2-format parquet (JPEG images, the real extra columns): every 4th row a tie, models alternating
    between Dreamlike and SDXL-beta."""
    from rlkit_diffusion.data.pickapic import write_pairs

    g = torch.Generator().manual_seed(seed)
    images_0 = torch.rand((n, 3, *size), generator=g)
    images_1 = torch.rand((n, 3, *size), generator=g)
    labels = [0.5 if i % 4 == 3 else float(i % 2) for i in range(n)]
    dream, xl = "dreamlike-art/dreamlike-photoreal-2.0", "stabilityai/stable-diffusion-xl-beta"
    extra = {
        "model_0": [dream if i % 3 else xl for i in range(n)],
        "model_1": [dream if i % 2 else xl for i in range(n)],
        "ranking_id": list(range(n)),
        "are_different": [True] * n,
    }
    captions = [f"a {c} {s}" for c, s in zip(["red", "blue", "green"] * n, ["cat", "dog", "owl", "fox"] * n)][:n]
    return write_pairs(
        path, captions, images_0, images_1, labels, extra_columns=extra, image_format="JPEG", row_group_size=4
    )


PARTI_ROWS = [
    ("a man riding a bicycle", "People", "Simple Detail", ""),
    ('a sign that says "hello"', "Outdoor Scenes", "Writing & Symbols", "quotes kept"),
    ("two dogs playing chess", "Animals", "Quantity", ""),
    ("a portrait of a woman", "People", "Simple Detail", ""),
    ("a man riding a bicycle", "Vehicles", "Simple Detail", "duplicate prompt"),
    ("an owl made of glass", "Animals", "Imagination", ""),
]


def write_partiprompts(path: Path, rows: list[tuple[str, str, str, str]] = PARTI_ROWS) -> Path:
    """A PartiPrompts-format TSV (header Prompt, Category, Challenge, Note)."""
    lines = ["Prompt\tCategory\tChallenge\tNote", *("\t".join(r) for r in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_hpsv2(path: Path, per_style: int = 3) -> Path:
    """An HPSv2 benchmark directory: anime.json, concept-art.json, paintings.json, photo.json (lists of strings)."""
    path.mkdir(parents=True, exist_ok=True)
    for style in ("anime", "concept-art", "paintings", "photo"):
        prompts = [f"{style} picture number {i}" for i in range(per_style)]
        (path / f"{style}.json").write_text(json.dumps(prompts), encoding="utf-8")
    return path
