"""The pieces of a Stable Diffusion pipeline as the ``sd15`` / ``sdxl`` worlds use them: loading and checking the
checkpoint (`load_components`, `check_architecture`), the ε-model wrapper (`SDEpsModel`), the frozen text encoders
(`SD15TextEncoder`, `SDXLTextEncoder`) and the VAE between pixels and latents (`LatentCodec`).

The worlds themselves are assembled in `rlkit_diffusion.worlds.stable_diffusion.world`; the package docstring has
the overview.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlkit_diffusion.hub import check_pretrained, load_pretrained
from rlkit_diffusion.policy import Cond, UNetEpsModel, cond_map

SD15_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = (*SD15_SUBFOLDERS, "text_encoder_2", "tokenizer_2")


# ----------------------------------------------------------------------------------------------------------------
# ε-model and text encoders
# ----------------------------------------------------------------------------------------------------------------
class SDEpsModel(UNetEpsModel):
    """`UNetEpsModel` that feeds the UNet in its own dtype (bf16/fp16 weights) and returns float32."""

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        # The UNet's first weight (conv_in), not `self.unet.dtype`: diffusers computes that by walking every parameter
        # (~3% of a tiny UNet's forward, benchmarks/perf.py); this read stays right after `.to(dtype)`.
        dtype = next(self.unet.parameters()).dtype
        if isinstance(cond, Tensor):
            cond = {"encoder_hidden_states": cond}
        cond = cond_map(lambda v: v.to(dtype) if v.is_floating_point() else v, cond)
        return super().forward(x_t.to(dtype), t, cond).float()


class _Tokenize:
    """Pad/truncate to the tokenizer's length (77), warning once when a prompt is truncated."""

    def __init__(self, tokenizer: Any, what: str) -> None:
        self.tokenizer, self.what, self.warned = tokenizer, what, False

    def __call__(self, prompts: list[str], device: torch.device) -> Tensor:
        tok = self.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        if not self.warned:
            lengths = [len(x) for x in tok(prompts).input_ids]  # one batched call, only until the first warning
            long = [p for p, n in zip(prompts, lengths) if n > tok.model_max_length]
            if long:
                self.warned = True
                warnings.warn(
                    f"{self.what}: prompt(s) longer than {tok.model_max_length} tokens are truncated "
                    f"(first: {long[0][:80]!r}); further truncations are not reported",
                    stacklevel=3,
                )
        return ids.input_ids.to(device)


class SD15TextEncoder:
    """Prompts → ``encoder_hidden_states`` (B, 77, D) of the frozen CLIP text encoder (SD1.x/2.x)."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.tokenize = _Tokenize(tokenizer, "sd15 text encoder")
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self._uncond: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        return self.text_encoder(self.tokenize(list(prompts), self.device))[0]  # (B, 77, D)

    def uncond(self, n: int) -> Tensor:
        """The empty prompt's states, (n, 77, D) (StableDiffusionPipeline's default negative prompt)."""
        if self._uncond is None:
            self._uncond = self([""])
        return self._uncond.expand(n, -1, -1)


class SDXLTextEncoder:
    """Prompts → SDXL conditioning ``{"encoder_hidden_states", "added_cond_kwargs": {"text_embeds", "time_ids"}}``.

    As ``StableDiffusionXLPipeline.encode_prompt`` (``clip_skip=None``): each encoder's penultimate hidden states,
    concatenated along features (B, 77, D1 + D2); the pooled projection ``text_embeds`` (B, P) of the second encoder;
    ``time_ids`` (B, 6) = original_size + crops_coords_top_left + target_size.

    Args:
        force_zeros_for_empty_prompt: the unconditional branch is all zeros (the SDXL pipeline's default) instead
            of the encoded empty prompt.
    """

    def __init__(
        self,
        tokenizers: list[Any],
        text_encoders: list[nn.Module],
        time_ids: list[int],
        *,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        self.tokenizers = [_Tokenize(t, f"sdxl text encoder {i + 1}") for i, t in enumerate(tokenizers)]
        self.text_encoders = [te.eval().requires_grad_(False) for te in text_encoders]
        self.time_ids = torch.tensor([time_ids], dtype=torch.float32)  # (1, 6)
        self.force_zeros = force_zeros_for_empty_prompt
        self._uncond: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.text_encoders[0].parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> dict[str, Any]:
        states, pooled = [], None
        for tokenize, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(tokenize(list(prompts), self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # only CLIPTextModelWithProjection returns (B, P) first
                pooled = out[0]
            states.append(out.hidden_states[-2])
        hidden = torch.cat(states, dim=-1)  # (B, 77, D1 + D2)
        time_ids = self.time_ids.to(device=hidden.device, dtype=hidden.dtype).expand(len(prompts), -1)
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def uncond(self, n: int) -> dict[str, Any]:
        if self._uncond is None:
            cond = self([""])
            if self.force_zeros:
                cond = cond_map(torch.zeros_like, cond)
                cond["added_cond_kwargs"]["time_ids"] = self.time_ids.to(cond["encoder_hidden_states"])
            self._uncond = cond
        return cond_map(lambda v: v.expand(n, *v.shape[1:]), self._uncond)


# ----------------------------------------------------------------------------------------------------------------
# Latent space: the VAE codec
# ----------------------------------------------------------------------------------------------------------------
class LatentCodec:
    """The VAE between images in [0, 1] and latents z = E(2x − 1) · scaling_factor.

    ``decode`` keeps autograd (DRaFT backpropagates the reward through it); ``posterior`` and ``encode`` do not.
    """

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def decode(self, z: Tensor) -> Tensor:
        """(B, C, h, w) latents → (B, 3, h·s, w·s) float32 images in [0, 1]."""
        x = self.vae.decode((z / self.scaling_factor).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [−1, 1] → the Gaussian posterior's (mean, std), unscaled, float32."""
        dist = self.vae.encode(pixels.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → latents (posterior mean × scaling_factor), e.g. SDEdit inputs."""
        return self.posterior(images * 2 - 1)[0] * self.scaling_factor

    def fingerprint(self, resolution: int) -> str:
        """Identifies what the cache stores: VAE config, encoder weights (a few tensors), dtype and resolution."""
        h = hashlib.sha256(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        h.update(f"{resolution}-{self.vae.dtype}".encode())
        enc = self.vae.encoder
        for tensor in (enc.conv_in.weight, enc.conv_out.weight, enc.conv_out.bias):
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking the pipeline
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SDComponents:
    unet: nn.Module
    vae: nn.Module
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    scheduler: Any
    pipeline_config: dict[str, Any]


def load_components(
    pretrained: str,
    *,
    sdxl: bool,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> SDComponents:
    """UNet, VAE, tokenizer(s), text encoder(s) and scheduler with ``from_pretrained(path, subfolder=...)``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    subfolders = tuple(s for s in (SDXL_SUBFOLDERS if sdxl else SD15_SUBFOLDERS) if not (vae and s == "vae"))
    unet_config = Path(pretrained).expanduser() / "unet" / "config.json"
    if unet_config.is_file():  # a local pipeline of the other architecture: say so before listing missing folders
        check_unet_kind(
            json.loads(unet_config.read_text()).get("addition_embed_type"), sdxl=sdxl, pretrained=pretrained
        )
    path = check_pretrained(pretrained, "world.pretrained", subfolders)
    if vae is not None:
        vae = check_pretrained(vae, "world.vae")
    kw = {k: v for k, v in (("revision", revision),) if v is not None}
    what = "world.pretrained"
    unet = load_pretrained(UNet2DConditionModel, path, what, subfolder="unet", variant=variant, **kw)
    vae_model = (
        load_pretrained(AutoencoderKL, vae, "world.vae")
        if vae is not None
        else load_pretrained(AutoencoderKL, path, what, subfolder="vae", variant=variant, **kw)
    )
    tokenizers = [load_pretrained(CLIPTokenizer, path, what, subfolder="tokenizer", **kw)]
    text_encoders = [load_pretrained(CLIPTextModel, path, what, subfolder="text_encoder", variant=variant, **kw)]
    if sdxl:
        tokenizers.append(load_pretrained(CLIPTokenizer, path, what, subfolder="tokenizer_2", **kw))
        text_encoders.append(
            load_pretrained(CLIPTextModelWithProjection, path, what, subfolder="text_encoder_2", variant=variant, **kw)
        )
    scheduler = load_pretrained(DDIMScheduler, path, what, subfolder="scheduler", **kw)
    try:
        pipeline_config = dict(DiffusionPipeline.load_config(path, **kw))
    except (OSError, ValueError):  # a layout without model_index.json: the pipeline defaults apply
        pipeline_config = {}
    return SDComponents(unet, vae_model, tokenizers, text_encoders, scheduler, pipeline_config)


def check_unet_kind(addition_embed_type: str | None, *, sdxl: bool, pretrained: str) -> None:
    """An SDXL UNet has ``addition_embed_type="text_time"``, an SD1.x/2.x UNet none."""
    is_xl = addition_embed_type == "text_time"
    if is_xl != sdxl:
        other = "an SDXL" if is_xl else "an SD1.x/2.x"
        raise ValueError(
            f"world.pretrained={pretrained}: the UNet is {other} UNet (addition_embed_type={addition_embed_type!r}); "
            f"use world={'sdxl' if is_xl else 'sd15'} instead of world={'sdxl' if sdxl else 'sd15'}"
        )


def check_architecture(c: SDComponents, *, sdxl: bool, pretrained: str, resolution: int, time_ids: list[int]) -> None:
    """One-line errors for a checkpoint that does not fit the world (module docstring, "Bad input")."""
    cfg = c.unet.config
    where = f"world.pretrained={pretrained}"
    check_unet_kind(cfg.get("addition_embed_type"), sdxl=sdxl, pretrained=pretrained)
    text_dim = sum(int(te.config.hidden_size) for te in c.text_encoders)
    if int(cfg.cross_attention_dim) != text_dim:
        sizes = " + ".join(str(te.config.hidden_size) for te in c.text_encoders)
        raise ValueError(
            f"{where}: UNet cross_attention_dim={cfg.cross_attention_dim} does not match the text "
            f"encoder hidden size {sizes} = {text_dim}"
        )
    latent = int(c.vae.config.latent_channels)
    if int(cfg.in_channels) != latent or int(cfg.out_channels) != latent:
        raise ValueError(
            f"{where}: UNet in/out_channels=({cfg.in_channels}, {cfg.out_channels}) do not match the "
            f"VAE latent_channels={latent} (inpainting/depth UNets are not supported)"
        )
    scale = 2 ** (len(c.vae.config.block_out_channels) - 1)
    if resolution % scale:
        raise ValueError(f"world.resolution={resolution} must be a multiple of the VAE downsampling factor {scale}")
    if sdxl:
        proj = int(c.text_encoders[1].config.projection_dim)
        passed = int(cfg.addition_time_embed_dim) * len(time_ids) + proj
        expected = int(c.unet.add_embedding.linear_1.in_features)
        if passed != expected:
            raise ValueError(
                f"{where}: the UNet's added embedding expects {expected} features, but "
                f"addition_time_embed_dim·{len(time_ids)} + text_encoder_2 projection_dim = {passed}"
            )


__all__ = [
    "SD15_SUBFOLDERS",
    "SD15TextEncoder",
    "SDComponents",
    "SDEpsModel",
    "SDXL_SUBFOLDERS",
    "SDXLTextEncoder",
    "LatentCodec",
    "check_architecture",
    "check_unet_kind",
    "load_components",
]
