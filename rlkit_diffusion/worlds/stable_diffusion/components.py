"""The pieces of a Stable Diffusion pipeline as the ``sd15`` / ``sdxl`` / ``sd3`` worlds use them: loading and checking
the checkpoint (`load_components`, `check_architecture`, `check_sd3_architecture`), the network wrappers
(`SDEpsModel` for the UNet, `SD3VelocityModel` for SD3's transformer), the frozen text encoders (`SD15TextEncoder`,
`SDXLTextEncoder`, `SD3TextEncoder`) and the VAE between pixels and latents (`LatentCodec`).

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
SD3_SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
T5_SUBFOLDERS = ("text_encoder_3", "tokenizer_3")  # SD3's optional third encoder (``world.t5=false`` drops it)


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
    """Pad/truncate to ``max_length`` tokens (default the tokenizer's length, 77 for CLIP), warning once when a
    prompt is truncated."""

    def __init__(self, tokenizer: Any, what: str, max_length: int | None = None) -> None:
        self.tokenizer, self.what, self.warned = tokenizer, what, False
        self.max_length = int(max_length or tokenizer.model_max_length)

    def __call__(self, prompts: list[str], device: torch.device) -> Tensor:
        tok, length = self.tokenizer, self.max_length
        ids = tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        if not self.warned:
            lengths = [len(x) for x in tok(prompts, verbose=False).input_ids]  # batched, until the first warning
            long = [p for p, n in zip(prompts, lengths) if n > length]
            if long:
                self.warned = True
                warnings.warn(
                    f"{self.what}: prompt(s) longer than {length} tokens are truncated "
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


class SD3VelocityModel(nn.Module):
    """``SD3Transformer2DModel`` as the velocity model of `FlowMatchingPolicy`: ``(x_σ, σ·T, cond) -> v``, with
    ``cond = {"encoder_hidden_states": (B, L, D), "pooled_projections": (B, P)}`` (`SD3TextEncoder`). Inputs are
    cast to the transformer's dtype and the output returned in float32, as `SDEpsModel` does for the UNet."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype  # the first weight, not the walk of `.dtype`
        return self.transformer(
            hidden_states=x_t.to(dtype),
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            return_dict=False,
        )[0].float()


class SD3TextEncoder:
    """Prompts → SD3 conditioning ``{"encoder_hidden_states" (B, 77 + L₅, J), "pooled_projections" (B, P₁ + P₂)}``.

    As ``StableDiffusion3Pipeline.encode_prompt`` (``clip_skip=None``): the penultimate hidden states of the two
    CLIP encoders (``CLIPTextModelWithProjection``, CLIP-L and CLIP-G) concatenated along features and zero-padded
    to the transformer's ``joint_attention_dim`` J, then the T5 encoder's last hidden states (B, L₅ =
    ``max_sequence_length``, J) appended along the sequence; without T5, zeros of that shape (the pipeline's
    ``text_encoder_3=None``). The pooled projection is both CLIP encoders' projected outputs concatenated. The
    unconditional branch is the encoded empty prompt (SD3 has no ``force_zeros_for_empty_prompt``).
    """

    def __init__(
        self,
        tokenizers: list[Any],
        text_encoders: list[nn.Module],
        *,
        joint_attention_dim: int,
        max_sequence_length: int = 256,
    ) -> None:
        self.clip_tokenizers = [_Tokenize(t, f"sd3 text encoder {i + 1}") for i, t in enumerate(tokenizers[:2])]
        self.clip_encoders = [te.eval().requires_grad_(False) for te in text_encoders[:2]]
        self.t5 = text_encoders[2].eval().requires_grad_(False) if len(text_encoders) > 2 else None
        self.t5_tokenize = (
            _Tokenize(tokenizers[2], "sd3 text encoder 3 (T5, world.max_sequence_length)", max_sequence_length)
            if len(tokenizers) > 2
            else None
        )
        self.joint_attention_dim, self.max_sequence_length = int(joint_attention_dim), int(max_sequence_length)
        self._uncond: dict[str, Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.clip_encoders[0].parameters()).device

    def _t5_states(self, prompts: list[str], like: Tensor) -> Tensor:
        n, length = len(prompts), self.max_sequence_length
        if self.t5 is None:
            return like.new_zeros((n, length, self.joint_attention_dim))
        return self.t5(self.t5_tokenize(prompts, self.device))[0]  # (B, L5, J)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        states, pooled = [], []
        for tokenize, encoder in zip(self.clip_tokenizers, self.clip_encoders):
            out = encoder(tokenize(prompts, self.device), output_hidden_states=True)
            pooled.append(out[0])  # (B, P_i): text_embeds of CLIPTextModelWithProjection
            states.append(out.hidden_states[-2])  # (B, 77, D_i)
        clip = torch.cat(states, dim=-1)  # (B, 77, D1 + D2)
        t5 = self._t5_states(prompts, clip)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, J)
        return {
            "encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),  # (B, 77 + L5, J)
            "pooled_projections": torch.cat(pooled, dim=-1),  # (B, P1 + P2)
        }

    def uncond(self, n: int) -> dict[str, Tensor]:
        """The empty prompt's conditioning, (n, ...) (``StableDiffusion3Pipeline``'s default negative prompt)."""
        if self._uncond is None:
            self._uncond = self([""])
        return cond_map(lambda v: v.expand(n, *v.shape[1:]), self._uncond)


# ----------------------------------------------------------------------------------------------------------------
# Latent space: the VAE codec
# ----------------------------------------------------------------------------------------------------------------
class LatentCodec:
    """The VAE between images in [0, 1] and latents z = (E(2x − 1) − shift_factor) · scaling_factor.

    ``shift_factor`` is 0 for the SD1.x/SDXL VAEs and set in the config of SD3's 16-channel VAE (0.0609), as
    diffusers' SD3 pipeline and training scripts apply it. ``decode`` keeps autograd (DRaFT backpropagates the reward
    through it); ``posterior`` and ``encode`` do not.
    """

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)
        self.scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def decode(self, z: Tensor) -> Tensor:
        """(B, C, h, w) latents → (B, 3, h·s, w·s) float32 images in [0, 1]."""
        x = self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def posterior(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [−1, 1] → the Gaussian posterior's (mean, std), unscaled, float32."""
        dist = self.vae.encode(pixels.to(device=self.device, dtype=self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def to_latent(self, sample: Tensor) -> Tensor:
        """An unscaled VAE sample (or posterior mean) → the diffusion space: (sample − shift) · scaling_factor."""
        return (sample - self.shift_factor) * self.scaling_factor

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → latents (of the posterior mean), e.g. SDEdit inputs."""
        return self.to_latent(self.posterior(images * 2 - 1)[0])

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
    denoiser: nn.Module  # the UNet (sd15, sdxl) or the MMDiT transformer (sd3)
    vae: nn.Module
    tokenizers: list[Any]
    text_encoders: list[nn.Module]
    scheduler: Any
    pipeline_config: dict[str, Any]


KINDS = ("sd15", "sdxl", "sd3")


def load_components(
    pretrained: str,
    *,
    kind: str,
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    t5: bool = True,
) -> SDComponents:
    """The denoiser, VAE, tokenizers, text encoders and scheduler with ``from_pretrained(path, subfolder=...)``.

    ``kind``: ``sd15`` (UNet, one CLIP encoder, DDIM), ``sdxl`` (UNet, two CLIP encoders, DDIM) or ``sd3``
    (``SD3Transformer2DModel``, two CLIP encoders with projection and — unless ``t5=False`` — the T5 encoder,
    ``FlowMatchEulerDiscreteScheduler``).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiffusionPipeline,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"load_components: kind must be one of {KINDS}, got {kind!r}")
    folders = {"sd15": SD15_SUBFOLDERS, "sdxl": SDXL_SUBFOLDERS, "sd3": SD3_SUBFOLDERS + (T5_SUBFOLDERS if t5 else ())}
    subfolders = tuple(s for s in folders[kind] if not (vae and s == "vae"))
    check_pipeline_kind(pretrained, kind)  # a local pipeline of another architecture: say so before missing folders
    path = check_pretrained(pretrained, "world.pretrained", subfolders)
    if vae is not None:
        vae = check_pretrained(vae, "world.vae")
    kw = {k: v for k, v in (("revision", revision),) if v is not None}
    what = "world.pretrained"

    def load(cls: Any, subfolder: str, weights: bool = True) -> Any:
        return load_pretrained(cls, path, what, subfolder=subfolder, **({"variant": variant} if weights else {}), **kw)

    if kind == "sd3":
        denoiser = load(SD3Transformer2DModel, "transformer")
        clip = [CLIPTextModelWithProjection, CLIPTextModelWithProjection]
    else:
        denoiser = load(UNet2DConditionModel, "unet")
        clip = [CLIPTextModel, CLIPTextModelWithProjection][: 2 if kind == "sdxl" else 1]
    vae_model = load_pretrained(AutoencoderKL, vae, "world.vae") if vae is not None else load(AutoencoderKL, "vae")
    suffixes = ["", "_2"][: len(clip)]
    tokenizers = [load(CLIPTokenizer, f"tokenizer{s}", weights=False) for s in suffixes]
    text_encoders = [load(cls, f"text_encoder{s}") for cls, s in zip(clip, suffixes)]
    if kind == "sd3" and t5:
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizers.append(load(AutoTokenizer, "tokenizer_3", weights=False))
        text_encoders.append(load(T5EncoderModel, "text_encoder_3"))
    scheduler = load(FlowMatchEulerDiscreteScheduler if kind == "sd3" else DDIMScheduler, "scheduler", weights=False)
    try:
        pipeline_config = dict(DiffusionPipeline.load_config(path, **kw))
    except (OSError, ValueError):  # a layout without model_index.json: the pipeline defaults apply
        pipeline_config = {}
    return SDComponents(denoiser, vae_model, tokenizers, text_encoders, scheduler, pipeline_config)


def check_pipeline_kind(pretrained: str, kind: str) -> None:
    """A local pipeline directory of another architecture fails with the world to use: an SD3 pipeline has a
    ``transformer/``, an SD1.x/2.x or SDXL one a ``unet/`` (told apart by the UNet's ``addition_embed_type``)."""
    root = Path(pretrained).expanduser()
    unet_config = root / "unet" / "config.json"
    if kind != "sd3" and (root / "transformer").is_dir() and not unet_config.is_file():
        raise ValueError(
            f"world.pretrained={pretrained}: the pipeline has a transformer/ (SD3 / flow matching), not a unet/; "
            f"use world=sd3 instead of world={kind}"
        )
    if not unet_config.is_file():
        return
    embed = json.loads(unet_config.read_text()).get("addition_embed_type")
    if kind == "sd3":
        other = "sdxl" if embed == "text_time" else "sd15"
        raise ValueError(
            f"world.pretrained={pretrained}: the pipeline has a unet/, not an SD3 transformer/; "
            f"use world={other} instead of world=sd3"
        )
    check_unet_kind(embed, sdxl=kind == "sdxl", pretrained=pretrained)


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
    cfg = c.denoiser.config
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
        expected = int(c.denoiser.add_embedding.linear_1.in_features)
        if passed != expected:
            raise ValueError(
                f"{where}: the UNet's added embedding expects {expected} features, but "
                f"addition_time_embed_dim·{len(time_ids)} + text_encoder_2 projection_dim = {passed}"
            )


def check_sd3_architecture(c: SDComponents, *, pretrained: str, resolution: int) -> None:
    """One-line errors for an SD3 checkpoint that does not fit the ``sd3`` world (module docstring, "Bad input")."""
    cfg, where = c.denoiser.config, f"world.pretrained={pretrained}"
    latent = int(c.vae.config.latent_channels)
    if int(cfg.in_channels) != latent or int(cfg.out_channels) != latent:
        raise ValueError(
            f"{where}: transformer in/out_channels=({cfg.in_channels}, {cfg.out_channels}) do not match the VAE "
            f"latent_channels={latent}"
        )
    clips = c.text_encoders[:2]
    pooled = sum(int(te.config.projection_dim) for te in clips)
    if int(cfg.pooled_projection_dim) != pooled:
        raise ValueError(
            f"{where}: transformer pooled_projection_dim={cfg.pooled_projection_dim} does not match the CLIP "
            f"encoders' projection_dim {' + '.join(str(te.config.projection_dim) for te in clips)} = {pooled}"
        )
    joint, clip_dim = int(cfg.joint_attention_dim), sum(int(te.config.hidden_size) for te in clips)
    if clip_dim > joint:
        raise ValueError(f"{where}: the CLIP hidden sizes add up to {clip_dim} > joint_attention_dim={joint}")
    if len(c.text_encoders) > 2 and int(c.text_encoders[2].config.d_model) != joint:
        raise ValueError(
            f"{where}: the T5 encoder's d_model={c.text_encoders[2].config.d_model} does not match the "
            f"transformer's joint_attention_dim={joint}"
        )
    scale = 2 ** (len(c.vae.config.block_out_channels) - 1)
    patch = int(cfg.patch_size)
    if resolution % (scale * patch):
        raise ValueError(
            f"world.resolution={resolution} must be a multiple of the VAE downsampling factor × patch size "
            f"{scale} × {patch}"
        )
    max_side = cfg.get("pos_embed_max_size")
    if max_side and resolution // scale // patch > int(max_side):
        raise ValueError(
            f"world.resolution={resolution} gives {resolution // scale // patch} patches per side, more than the "
            f"transformer's pos_embed_max_size={max_side}"
        )


__all__ = [
    "KINDS",
    "SD15_SUBFOLDERS",
    "SD3_SUBFOLDERS",
    "SD3TextEncoder",
    "SD3VelocityModel",
    "T5_SUBFOLDERS",
    "SD15TextEncoder",
    "SDComponents",
    "SDEpsModel",
    "SDXL_SUBFOLDERS",
    "SDXLTextEncoder",
    "LatentCodec",
    "check_architecture",
    "check_pipeline_kind",
    "check_sd3_architecture",
    "check_unet_kind",
    "load_components",
]
