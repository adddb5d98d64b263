"""The ``sd15`` and ``sdxl`` worlds: real Stable Diffusion, loaded with diffusers/transformers ``from_pretrained``.

What researchers run on GPUs. ``world.pretrained`` is a hub id (``runwayml/stable-diffusion-v1-5``,
``stabilityai/stable-diffusion-xl-base-1.0``) or a local directory in the diffusers layout (``unet/ vae/
text_encoder/ tokenizer/ scheduler/``, plus ``text_encoder_2/ tokenizer_2/`` for SDXL). The tests build tiny random
pipelines, ``save_pretrained`` them to a temporary directory and load them back through this same code.

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

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rlkit_diffusion.data.hf_pairs import open_pair_stream
from rlkit_diffusion.data.pickapic_stream import RawPair, StreamingPairs
from rlkit_diffusion.data.pickapic_stream import dreamlike_only as is_dreamlike_pair
from rlkit_diffusion.data.prompts import PromptSet, load_prompts
from rlkit_diffusion.hub import check_pretrained, load_pretrained
from rlkit_diffusion.policy import Cond, DiffusionPolicy, UNetEpsModel, cond_map
from rlkit_diffusion.rewards.clip_utils import torch_dtype
from rlkit_diffusion.worlds.base import World

SD15_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_SUBFOLDERS = (*SD15_SUBFOLDERS, "text_encoder_2", "tokenizer_2")

# Online-training prompts when none are given: simple animal names, as DDPO's aesthetic-quality experiment.
DEFAULT_PROMPTS = (
    "cat dog horse cow sheep pig goat rabbit mouse hamster fox wolf bear panda koala kangaroo lion tiger leopard "
    "cheetah zebra giraffe elephant rhinoceros hippopotamus camel deer moose raccoon squirrel hedgehog otter seal "
    "dolphin whale shark octopus turtle frog owl eagle parrot penguin flamingo duck swan butterfly"
).split()


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
# Latent space: VAE codec and the on-disk latent cache
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


class LatentCache:
    """VAE posteriors on disk, one safetensors file per (image bytes, flip), so the VAE runs once per image.

    Layout: ``<root>/<fingerprint>/<h[:2]>/<sha256 of the image bytes>[-flip].safetensors`` with tensors ``mean``
    and ``std`` (float16; ≈ 64 KB per image at 512 px). Files are written to a temporary name and renamed, so
    concurrent ranks and interrupted runs never leave a half-written entry.
    """

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.dir = Path(root).expanduser() / fingerprint
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(data: bytes, flip: bool) -> str:
        return hashlib.sha256(data).hexdigest() + ("-flip" if flip else "")

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[Tensor, Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if not path.exists():
            self.misses += 1
            return None
        self.hits += 1
        t = load_file(str(path))
        return t["mean"].float(), t["std"].float()

    def put(self, key: str, mean: Tensor, std: Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tensors = {"mean": mean.half().contiguous().cpu(), "std": std.half().contiguous().cpu()}
        save_file(tensors, str(tmp))
        os.replace(tmp, path)


def load_image(data: bytes | None, resolution: int, flip: bool) -> Tensor:
    """JPEG/PNG bytes → (3, R, R) in [−1, 1]: resize the shorter side (bilinear), center crop, optional flip.

    The official Diffusion-DPO preprocessing (``Resize(R, BILINEAR)``, ``CenterCrop(R)``, flip, ``Normalize(½, ½)``).
    Raises ValueError for missing or undecodable bytes (`LatentPairs` checks every image before, naming the row).
    """
    if not data:
        raise ValueError("missing image bytes")
    try:
        with Image.open(io.BytesIO(data)) as pil:
            image = pil.convert("RGB")
    except Exception as err:  # PIL raises several exception types for corrupt data
        raise ValueError(f"undecodable image ({type(err).__name__}: {err})") from None
    image = TF.center_crop(TF.resize(image, [resolution], InterpolationMode.BILINEAR, antialias=True), [resolution])
    x = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)  # (3, R, R) in [0, 1]
    if flip:
        x = x.flip(-1)
    return x * 2 - 1


class LatentPairs:
    """A `PairSource` of Pick-a-Pic pairs in latent space: stream → decode → VAE posterior (cached) → sample.

    ``next_batch(B)`` returns ``(captions, z_w (B, C, h, w), z_l (B, C, h, w))`` on the VAE's device.

    Every random choice (horizontal flips, caption dropout, the posterior noise ε) is drawn for the GLOBAL batch
    (B × number of shards) from one seeded generator and sliced, like the stream itself, so that the union over
    ranks is exactly the single-process batch.

    Args:
        stream: the raw pairs.
        codec: the VAE.
        resolution: image side in pixels.
        cache: the latent cache (None: encode every time).
        hflip: flip each image horizontally with probability ½ (official Diffusion-DPO augmentation).
        caption_dropout: replace a caption by "" with this probability (keeps classifier-free guidance alive).
        skip_bad_images: replace a pair with an undecodable image by another pair of the same batch (counted in
            ``n_bad_images``) instead of raising.
        seed: seed of the random choices.
    """

    def __init__(
        self,
        stream: StreamingPairs,
        codec: LatentCodec,
        *,
        resolution: int,
        cache: LatentCache | None = None,
        hflip: bool = False,
        caption_dropout: float = 0.0,
        skip_bad_images: bool = False,
        seed: int = 0,
    ) -> None:
        self.stream, self.codec, self.resolution, self.cache = stream, codec, resolution, cache
        self.hflip, self.caption_dropout, self.skip_bad_images = hflip, caption_dropout, skip_bad_images
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.num_shards = 0, 1
        self.n_bad_images = 0
        self.latent_shape = (codec.latent_channels, resolution // codec.scale, resolution // codec.scale)

    def shard(self, rank: int, num_shards: int) -> LatentPairs:
        """Serve rank ``rank``'s slice of every global batch (see ``rlkit_diffusion.worlds.base.shard_pairs``)."""
        self.rank, self.num_shards = rank, num_shards
        return self

    def next_batch(self, batch_size: int) -> tuple[list[str], Tensor, Tensor]:
        n, lo = batch_size * self.num_shards, self.rank * batch_size
        pairs = self.stream.take(batch_size, rank=self.rank, num_shards=self.num_shards)
        flips = (torch.rand(n, 2, generator=self.generator) < 0.5) & self.hflip  # (nW, 2)
        drop = torch.rand(n, generator=self.generator) < self.caption_dropout  # (nW,)
        eps = torch.randn((n, 2, *self.latent_shape), generator=self.generator)  # (nW, 2, C, h, w)
        flips, drop, eps = flips[lo : lo + batch_size], drop[lo : lo + batch_size], eps[lo : lo + batch_size]
        good = self._check_images(pairs)
        rows = [i if good[i] else good.index(True) for i in range(batch_size)]  # bad → the first good pair
        mean, std = self._posteriors(pairs, rows, flips)  # (B, 2, C, h, w) each
        z = (mean + std * eps) * self.codec.scaling_factor
        captions = ["" if drop[i] else pairs[r].caption for i, r in enumerate(rows)]
        device = self.codec.device
        return captions, z[:, 0].to(device), z[:, 1].to(device)

    def _check_images(self, pairs: list[RawPair]) -> list[bool]:
        """Decode-check every image once (cheap next to the VAE); one-line error or replacement on failure."""
        good = []
        for p in pairs:
            ok = True
            for data, name in ((p.image_w, "winner"), (p.image_l, "loser")):
                try:
                    with Image.open(io.BytesIO(data or b"")) as pil:
                        pil.verify()
                except Exception as err:  # PIL raises several exception types for corrupt data
                    if not self.skip_bad_images:
                        raise ValueError(
                            f"Pick-a-Pic pairs: {p.where}: bad {name} image ({type(err).__name__})"
                        ) from None
                    ok = False
            good.append(ok)
        if not any(good):
            raise ValueError(f"Pick-a-Pic pairs: every pair of a batch has a bad image (first: {pairs[0].where})")
        self.n_bad_images += good.count(False)
        return good

    def _posteriors(self, pairs: list[RawPair], rows: list[int], flips: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior (mean, std) of both images of each pair, from the cache or one batched VAE encode."""
        keys, images, todo = [], [], []
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for i, r in enumerate(rows):
            for j, data in enumerate((pairs[r].image_w, pairs[r].image_l)):
                flip = bool(flips[i, j])
                slot = 2 * i + j
                key = LatentCache.key(data, flip) if self.cache is not None else ""
                hit = self.cache.get(key) if self.cache is not None else None
                if hit is not None:
                    out[slot] = hit
                else:
                    keys.append(key)
                    todo.append(slot)
                    images.append(load_image(data, self.resolution, flip))
        if images:
            mean, std = self.codec.posterior(torch.stack(images))
            for k, slot, m, s in zip(keys, todo, mean.cpu(), std.cpu()):
                if self.cache is not None:
                    self.cache.put(k, m, s)
                    m, s = m.half().float(), s.half().float()  # what a cache hit returns: same numbers either way
                out[slot] = (m, s)
        b = len(rows)
        mean = torch.stack([out[s][0] for s in range(2 * b)]).view(b, 2, *self.latent_shape)
        std = torch.stack([out[s][1] for s in range(2 * b)]).view(b, 2, *self.latent_shape)
        return mean, std

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.generator.set_state(torch.as_tensor(state["generator"], dtype=torch.uint8))


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


def _prompt_sets(prompts: str | None, eval_prompts: str | None, max_eval_prompts: int | None, seed: int):
    train = load_prompts(prompts) if prompts else PromptSet("animals", list(DEFAULT_PROMPTS), {})
    held = load_prompts(eval_prompts).subset(max_eval_prompts, seed) if eval_prompts else PromptSet("none", [], {})
    return train, held


def _rewards(device, dtype: str, proxy_reward: str, eval_reward: str, weights: dict[str, Any]) -> dict[str, Any]:
    """Load the reward models whose weights are given, plus JPEG, and alias ``proxy`` / ``gold``."""
    from rlkit_diffusion.rewards.jpeg import JpegReward

    rewards: dict[str, Any] = {"jpeg": JpegReward(False), "jpeg_incompressibility": JpegReward(True)}
    if weights["pickscore_model"]:
        from rlkit_diffusion.rewards.pickscore import PickScoreReward

        rewards["pickscore"] = PickScoreReward(
            weights["pickscore_model"], weights["pickscore_processor"], device=device, dtype=dtype
        )
    if weights["hpsv2_checkpoint"]:
        from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward

        rewards["hpsv2"] = HPSv2Reward(weights["hpsv2_checkpoint"], weights["hpsv2_arch"], device=device, dtype=dtype)
    if weights["clip_checkpoint"]:
        from rlkit_diffusion.rewards.clip_score import ClipScoreReward

        rewards["clip"] = ClipScoreReward(weights["clip_arch"], weights["clip_checkpoint"], device=device, dtype=dtype)
    if weights["aesthetic_weights"]:
        from rlkit_diffusion.rewards.aesthetic import AestheticReward

        rewards["aesthetic"] = AestheticReward(
            weights["aesthetic_weights"], weights["aesthetic_clip"], device=device, dtype=dtype
        )
    for alias, setting, target in (("proxy", "proxy_reward", proxy_reward), ("gold", "eval_reward", eval_reward)):
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


def _build(
    *,
    sdxl: bool,
    device: str | torch.device,
    pretrained: str,
    vae: str | None,
    revision: str | None,
    variant: str | None,
    dtype: str,
    resolution: int,
    num_inference_steps: int,
    eta: float,
    guidance_scale: float,
    gradient_checkpointing: bool,
    pairs: str | None,
    val_pairs: str | None,
    dreamlike_only_pairs: bool,
    shuffle_buffer: int,
    hflip: bool,
    caption_dropout: float,
    skip_bad_rows: bool,
    latent_cache: str | None,
    prompts: str | None,
    eval_prompts: str | None,
    max_eval_prompts: int | None,
    proxy_reward: str,
    eval_reward: str,
    reward_weights: dict[str, Any],
    seed: int,
    time_ids: list[int],
) -> World:
    device = torch.device(device)
    weight_dtype = torch_dtype(dtype)
    if caption_dropout < 0 or caption_dropout >= 1:
        raise ValueError(f"world.caption_dropout must be in [0, 1), got {caption_dropout}")
    # Cheap inputs first (prompt files, parquet schemas), then the pipeline, then the reward models.
    train_set, held_set = _prompt_sets(prompts, eval_prompts, max_eval_prompts, seed)
    stream = val_stream = None
    filter_kw: dict[str, Any] = (
        {"filter": is_dreamlike_pair, "filter_columns": ("model_0", "model_1")} if dreamlike_only_pairs else {}
    )
    if pairs:  # local parquet: the project's streamer; a hub id or datasets:<path>: `datasets` streaming
        stream = open_pair_stream(
            pairs, buffer_size=shuffle_buffer, seed=seed, skip_bad_rows=skip_bad_rows, **filter_kw
        )
    if val_pairs:
        val_stream = open_pair_stream(val_pairs, buffer_size=0, seed=seed, skip_bad_rows=skip_bad_rows, **filter_kw)
    c = load_components(pretrained, sdxl=sdxl, vae=vae, revision=revision, variant=variant)
    check_architecture(c, sdxl=sdxl, pretrained=pretrained, resolution=resolution, time_ids=time_ids)
    rewards = _rewards(device, dtype, proxy_reward, eval_reward, reward_weights)

    unet = _place(c.unet, device, weight_dtype)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    vae_dtype = torch.float32 if weight_dtype == torch.float16 and c.vae.config.get("force_upcast") else weight_dtype
    codec = LatentCodec(_place(c.vae, device, vae_dtype))
    text_encoders = [_place(te, device, weight_dtype) for te in c.text_encoders]
    if sdxl:
        force_zeros = bool(c.pipeline_config.get("force_zeros_for_empty_prompt", True))
        encoder: Any = SDXLTextEncoder(c.tokenizers, text_encoders, time_ids, force_zeros_for_empty_prompt=force_zeros)
    else:
        encoder = SD15TextEncoder(c.tokenizers[0], text_encoders[0])
    policy = DiffusionPolicy(
        SDEpsModel(unet),
        c.scheduler,
        sampler="ddim",
        eta=eta,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    ).to(device)

    cache = LatentCache(latent_cache, codec.fingerprint(resolution)) if latent_cache else None
    pair_kw = {"resolution": resolution, "cache": cache, "skip_bad_images": skip_bad_rows, "seed": seed}
    train_pairs = (
        LatentPairs(stream, codec, hflip=hflip, caption_dropout=caption_dropout, **pair_kw) if stream else None
    )
    held_pairs = LatentPairs(val_stream, codec, **pair_kw) if val_stream else None
    side = resolution // codec.scale
    return World(
        name="sdxl" if sdxl else "sd15",
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
        guidance_scale=guidance_scale,
        extras={
            "prompt_categories": {**train_set.categories, **held_set.categories},
            "prompt_sets": {"train": train_set.name, "heldout": held_set.name},
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# The builders (their keyword arguments are the Hydra schema of world=sd15 / world=sdxl)
# ----------------------------------------------------------------------------------------------------------------
def build_sd15(
    *,
    device: str | torch.device = "cpu",
    pretrained: str = "runwayml/stable-diffusion-v1-5",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str = "fp32",
    resolution: int = 512,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 7.5,
    gradient_checkpointing: bool = False,
    pairs: str | None = None,
    val_pairs: str | None = None,
    dreamlike_only: bool = False,
    shuffle_buffer: int = 1000,
    hflip: bool = False,
    caption_dropout: float = 0.0,
    skip_bad_rows: bool = False,
    latent_cache: str | None = None,
    prompts: str | None = None,
    eval_prompts: str | None = None,
    max_eval_prompts: int | None = None,
    proxy_reward: str = "pickscore",
    eval_reward: str = "pickscore",
    pickscore_model: str | None = "yuvalkirstain/PickScore_v1",
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    hpsv2_checkpoint: str | None = None,
    hpsv2_arch: str = "ViT-H-14",
    clip_checkpoint: str | None = None,
    clip_arch: str = "ViT-H-14",
    aesthetic_weights: str | None = None,
    aesthetic_clip: str = "openai/clip-vit-large-patch14",
    seed: int = 0,
) -> World:
    """Stable Diffusion 1.x (and 2.x: v-prediction is read from the scheduler config).

    Args:
        pretrained: hub id or local directory (diffusers layout). vae: an alternative VAE (hub id or directory).
        revision, variant: passed to ``from_pretrained`` (e.g. ``variant=fp16`` weight files).
        dtype: weight dtype ``fp32 | bf16 | fp16`` of the UNet, VAE, text encoder and rewards (module docstring).
        resolution: image side (512 for SD1.5); latents are resolution / 8.
        num_inference_steps, eta, guidance_scale: the sampler (DDIM η; CFG scale w).
        gradient_checkpointing: the UNet's own activation checkpointing (``enable_gradient_checkpointing``).
        pairs / val_pairs: Pick-a-Pic v2 parquet file, directory or glob (training stream, validation pairs for the
            implicit-reward accuracy); a hub id (``yuvalkirstain/pickapic_v2[@split]``) or ``datasets:<path>``
            streams through ``datasets`` (`rlkit_diffusion.data.hf_pairs`). dreamlike_only: keep pairs where both
            images are Dreamlike's.
        shuffle_buffer: pairs in the streaming shuffle buffer. hflip, caption_dropout: data augmentation.
        skip_bad_rows: skip corrupt rows / replace pairs with corrupt images instead of failing.
        latent_cache: directory of the VAE-latent cache (None = encode every time).
        prompts / eval_prompts: prompt sets ``[parti|hpsv2|pickapic|txt:]<path>`` for online training + the first
            evaluation split, and for the held-out evaluation split; max_eval_prompts: stratified subset size.
        proxy_reward / eval_reward: which loaded reward the names ``proxy`` and ``gold`` point to.
        pickscore_model, pickscore_processor: PickScore (None = not loaded). hpsv2_checkpoint, hpsv2_arch: HPSv2.
        clip_checkpoint, clip_arch: open_clip CLIP score. aesthetic_weights, aesthetic_clip: LAION aesthetic.
        seed: data order, augmentation and prompt-subset seed.
    """
    return _build(
        sdxl=False,
        time_ids=[],
        dreamlike_only_pairs=dreamlike_only,
        reward_weights=_weights(locals()),
        **_common(locals()),
    )


def build_sdxl(
    *,
    device: str | torch.device = "cpu",
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str = "fp32",
    resolution: int = 1024,
    crops_coords_top: int = 0,
    crops_coords_left: int = 0,
    num_inference_steps: int = 50,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    gradient_checkpointing: bool = True,
    pairs: str | None = None,
    val_pairs: str | None = None,
    dreamlike_only: bool = False,
    shuffle_buffer: int = 1000,
    hflip: bool = False,
    caption_dropout: float = 0.0,
    skip_bad_rows: bool = False,
    latent_cache: str | None = None,
    prompts: str | None = None,
    eval_prompts: str | None = None,
    max_eval_prompts: int | None = None,
    proxy_reward: str = "pickscore",
    eval_reward: str = "pickscore",
    pickscore_model: str | None = "yuvalkirstain/PickScore_v1",
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    hpsv2_checkpoint: str | None = None,
    hpsv2_arch: str = "ViT-H-14",
    clip_checkpoint: str | None = None,
    clip_arch: str = "ViT-H-14",
    aesthetic_weights: str | None = None,
    aesthetic_clip: str = "openai/clip-vit-large-patch14",
    seed: int = 0,
) -> World:
    """Stable Diffusion XL (base): two text encoders, pooled text embeddings and added time ids.

    ``time_ids`` = (resolution, resolution, crops_coords_top, crops_coords_left, resolution, resolution): original
    size = target size = the training resolution, as in the Diffusion-DPO SDXL training. Other arguments as
    `build_sd15` (defaults: 1024 px, guidance 5, UNet gradient checkpointing on, as the official SDXL training).
    For fp16 use ``vae=madebyollin/sdxl-vae-fp16-fix`` (else the SDXL VAE is kept in fp32).
    """
    return _build(
        sdxl=True,
        time_ids=[resolution, resolution, crops_coords_top, crops_coords_left, resolution, resolution],
        dreamlike_only_pairs=dreamlike_only,
        reward_weights=_weights(locals()),
        **_common(locals()),
    )


REWARD_WEIGHT_ARGS = (
    "pickscore_model",
    "pickscore_processor",
    "hpsv2_checkpoint",
    "hpsv2_arch",
    "clip_checkpoint",
    "clip_arch",
    "aesthetic_weights",
    "aesthetic_clip",
)


def _weights(args: dict[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in REWARD_WEIGHT_ARGS}


def _common(args: dict[str, Any]) -> dict[str, Any]:
    """The builder's arguments that `_build` takes as they are."""
    skip = {*REWARD_WEIGHT_ARGS, "dreamlike_only", "crops_coords_top", "crops_coords_left"}
    return {k: v for k, v in args.items() if k not in skip}


__all__ = [
    "DEFAULT_PROMPTS",
    "LatentCache",
    "LatentCodec",
    "LatentPairs",
    "SD15TextEncoder",
    "SDEpsModel",
    "SDXLTextEncoder",
    "build_sd15",
    "build_sdxl",
    "check_architecture",
    "check_unet_kind",
    "load_components",
    "load_image",
]
