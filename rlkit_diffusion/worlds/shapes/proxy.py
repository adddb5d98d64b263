"""Learned rewards of the `shapes` world: a PickScore-like proxy, a CLIP score and an aesthetic head.

All three are built on a tiny CLIP made by ``open_clip`` itself (``open_clip.CLIP`` from a custom config: a ViT with
4x4 patches on 16x16 images and a 2-layer causal text transformer) and trained by
:mod:`rlkit_diffusion.worlds.shapes.proxy_train` exactly as PickScore was (Kirstain et al., 2023): contrastive
pre-training on image-caption pairs, then Bradley-Terry fine-tuning on preference pairs.

Notation (``x`` an image, ``c`` a caption, ``f_I``/``f_T`` the image/text towers, ``t`` the learned log-temperature):

=========  =====================================================================  ===================================
reward     score                                                                  model
=========  =====================================================================  ===================================
proxy      ``s(c, x) = exp(t) * <u_I(x), u_T(c)>``, ``u = f / ||f||``             CLIP fine-tuned with Bradley-Terry
clip       ``s(c, x) = <u_I(x), u_T(c)>`` (cosine, in [-1, 1])                    contrastive CLIP only
aesthetic  ``s(x) = MLP(u_I(x))``, trained to regress ``10 * q(x)``               frozen contrastive image tower + MLP
=========  =====================================================================  ===================================

where ``q(x)`` is the *quality* component of the gold reward (``GoldShapesReward.components(...)["quality"]``), the
analogue of the LAION aesthetic predictor's human ratings. The proxy's form is PickScore's
``logit_scale.exp() * text_embs @ image_embs.T``.

Image preprocessing is plain torch so every score is differentiable w.r.t. the pixels (DRaFT/AlignProp backpropagate
through it): images ``(B, 3, H, W)`` in [0, 1] are area-resized to 16x16 if needed and normalised with open_clip's
``OPENAI_DATASET_MEAN``/``OPENAI_DATASET_STD``, i.e. ``(x - mean) / std`` per channel, what open_clip's own
``image_transform`` does after ``ToTensor``. The reward models' parameters are frozen (``requires_grad=False``) and
text embeddings are cached per caption string (computed without gradient, each caption on its own so that its
embedding does not depend on the captions it first arrived with).

Tokens: captions are split by open_clip's bundled BPE tokenizer (``open_clip.tokenizer.SimpleTokenizer``, no network)
and the BPE ids are mapped to a compact vocabulary, the BPE tokens seen in the training captions (saved in
``config.json``); 0 is padding, 1 start-of-text, 2 end-of-text (the pooled token, ``pool_type="eos"``) and 3
``<unk>`` for every BPE token never seen in training (e.g. the held-out synonyms "crimson", "disc"). The compact
table keeps the token embedding at ~40 rows instead of CLIP's 49,408.

Files (``load_proxy_rewards``): ``config.json`` (model config, vocabulary, file names; no pickle),
``clip.safetensors`` (contrastive CLIP), ``proxy.safetensors`` (fine-tuned CLIP), ``aesthetic.safetensors`` (MLP).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from rlkit_diffusion.checkpoint import atomic_write, atomic_write_json, state_mismatch
from rlkit_diffusion.rewards.clip_utils import TextFeatureCache

CONFIG_FORMAT = "rlkit-diffusion/shapes-proxy/v1"
WEIGHT_FILES: dict[str, str] = {
    "clip": "clip.safetensors",
    "proxy": "proxy.safetensors",
    "aesthetic": "aesthetic.safetensors",
}

PAD_ID, SOT_ID, EOT_ID, UNK_ID = 0, 1, 2, 3
N_SPECIAL = 4


@dataclasses.dataclass
class ProxyModelConfig:
    """Architecture of the tiny CLIP and of the aesthetic MLP (what ``config.json`` stores under ``"model"``).

    Attributes:
        vocabulary: BPE ids of open_clip's tokenizer that get their own embedding row (``N_SPECIAL + i``).
        embed_dim: joint embedding size.
        image_size, patch_size: ViT input side and patch side (16 / 4 = a 4x4 grid of patches + the class token).
        vision_width, vision_layers, vision_head_width: ViT width, depth and width per attention head.
        text_width, text_layers, text_heads, context_length: text transformer width, depth, heads, token length.
        mlp_ratio: MLP hidden size / width in both towers.
        aesthetic_hidden: hidden sizes of the aesthetic MLP (GELU between layers).
    """

    vocabulary: list[int]
    embed_dim: int = 32
    image_size: int = 16
    patch_size: int = 4
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 32
    text_width: int = 48
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 24
    mlp_ratio: float = 2.0
    aesthetic_hidden: tuple[int, ...] = (64, 16)

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + len(self.vocabulary)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["aesthetic_hidden"] = list(self.aesthetic_hidden)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"ProxyModelConfig: unknown keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        data = dict(data)
        data["vocabulary"] = [int(v) for v in data["vocabulary"]]
        if "aesthetic_hidden" in data:
            data["aesthetic_hidden"] = tuple(int(v) for v in data["aesthetic_hidden"])
        return cls(**data)


@functools.lru_cache(maxsize=4)
def bpe_tokenizer(context_length: int) -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's bundled CLIP BPE tokenizer (its vocabulary ships inside the package: works offline)."""
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def build_vocabulary(captions: Iterable[str], context_length: int = 24) -> list[int]:
    """Sorted BPE ids (special tokens and padding excluded) that occur in ``captions``."""
    tokenizer = bpe_tokenizer(context_length)
    special = {0, tokenizer.sot_token_id, tokenizer.eot_token_id}
    ids: set[int] = set()
    for text in dict.fromkeys(captions):
        ids.update(tokenizer.encode(text))
    return sorted(ids - special)


class ShapesTokenizer:
    """Captions -> (B, L) compact token ids: open_clip's BPE, then a lookup table into the compact vocabulary.

    Args:
        vocabulary: BPE ids with an embedding row each (``ProxyModelConfig.vocabulary``).
        context_length: L; longer captions are truncated with end-of-text kept last (open_clip's rule).
    """

    def __init__(self, vocabulary: Sequence[int], context_length: int = 24) -> None:
        self.bpe = bpe_tokenizer(context_length)
        self.context_length = context_length
        table = torch.full((self.bpe.vocab_size,), UNK_ID, dtype=torch.long)
        table[torch.as_tensor(list(vocabulary), dtype=torch.long)] = torch.arange(len(vocabulary)) + N_SPECIAL
        table[0] = PAD_ID  # open_clip pads with 0
        table[self.bpe.sot_token_id] = SOT_ID
        table[self.bpe.eot_token_id] = EOT_ID
        self.table = table  # (49408,) BPE id -> compact id

    def __call__(self, captions: Sequence[str]) -> Tensor:
        """(B, L) long compact ids of B captions (on the CPU)."""
        if isinstance(captions, str):
            raise TypeError("ShapesTokenizer expects a sequence of captions, not a single string")
        return self.table[self.bpe(list(captions), context_length=self.context_length)]


def build_clip(config: ProxyModelConfig) -> open_clip.CLIP:
    """A randomly initialised ``open_clip.CLIP`` of the given (tiny) size."""
    vision_cfg = open_clip.CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.vision_head_width,
        mlp_ratio=config.mlp_ratio,
        patch_size=config.patch_size,
        image_size=config.image_size,
    )
    text_cfg = open_clip.CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=config.vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
        mlp_ratio=config.mlp_ratio,
        pad_id=PAD_ID,
        eos_id=EOT_ID,
        pool_type="eos",
    )
    return open_clip.CLIP(config.embed_dim, vision_cfg, text_cfg)


def build_aesthetic_head(config: ProxyModelConfig) -> nn.Sequential:
    """MLP ``embed_dim -> hidden... -> 1`` with GELUs (a small LAION-aesthetic-style predictor)."""
    layers: list[nn.Module] = []
    width = config.embed_dim
    for hidden in config.aesthetic_hidden:
        layers += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def preprocess(images: Tensor, image_size: int = 16) -> Tensor:
    """Differentiable CLIP preprocessing: ``(resize(x) - mean) / std`` per channel.

    Args:
        images: (B, 3, H, W) floats in [0, 1].
        image_size: model input side; other sizes are area-resized (``F.interpolate(mode="area")``).

    Returns:
        (B, 3, image_size, image_size) normalised pixels (same dtype and device as ``images``).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"shapes proxy: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="area")
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(OPENAI_DATASET_STD, dtype=images.dtype, device=images.device)[:, None, None]
    return (images - mean) / std


def image_embeddings(model: open_clip.CLIP, images: Tensor) -> Tensor:
    """``u_I(x)``: (B, embed_dim) unit image embeddings of (B, 3, H, W) images in [0, 1]."""
    return model.encode_image(preprocess(images, model.visual.image_size[0]), normalize=True)


def text_embeddings(model: open_clip.CLIP, tokens: Tensor) -> Tensor:
    """``u_T(c)``: (B, embed_dim) unit text embeddings of (B, L) compact token ids."""
    return model.encode_text(tokens, normalize=True)


class ShapesClipBase:
    """Shared machinery of the three rewards: a frozen ``open_clip.CLIP``, its tokenizer and a text-embedding cache.

    Args:
        model: the CLIP; it is put in eval mode and frozen (``requires_grad_(False)``) in place.
        tokenizer: captions -> compact token ids.
    """

    differentiable = True

    def __init__(self, model: open_clip.CLIP, tokenizer: ShapesTokenizer) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_cache = TextFeatureCache(self._encode_text)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: torch.device | str) -> ShapesClipBase:
        self.model.to(device)
        self.text_cache.clear()
        return self

    def image_embeddings(self, images: Tensor) -> Tensor:
        """(B, E) unit image embeddings (float32 for a float32 model); gradients flow to ``images``."""
        return image_embeddings(self.model, images.to(device=self.device, dtype=self.model.logit_scale.dtype))

    def _encode_text(self, prompts: list[str]) -> Tensor:
        return text_embeddings(self.model, self.tokenizer(prompts).to(self.device))

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """(B, E) unit text embeddings, computed once per caption string, each on its own (no gradient)."""
        return self.text_cache(prompts)


class ShapesProxyReward(ShapesClipBase):
    """PickScore-like proxy reward: ``s(c, x) = exp(t) * cos(f_I(x), f_T(c))`` of the Bradley-Terry-tuned CLIP.

    Attributes:
        name: ``"proxy"``.
        differentiable: True (gradients flow to the images, never to the frozen parameters).
    """

    name = "proxy"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B,) scores of (B, 3, H, W) images in [0, 1] for B prompts (about -100..100; higher is better)."""
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)  # (B,)
        return self.model.logit_scale.exp() * cosine


class ShapesClipScore(ShapesClipBase):
    """CLIP score (AI feedback): ``s(c, x) = cos(f_I(x), f_T(c))`` of the contrastive-only CLIP, in [-1, 1].

    Attributes:
        name: ``"clip"``.
        differentiable: True.
    """

    name = "clip"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B,) cosine similarities."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)


class ShapesAestheticReward(ShapesClipBase):
    """Image-only aesthetic score (AI feedback): ``s(x) = MLP(u_I(x))`` on the frozen contrastive image embedding.

    Trained to regress ``10 * q(x)``, the gold reward's quality component on a 0-10 scale (the LAION aesthetic
    predictor's scale). The prompt is ignored.

    Attributes:
        name: ``"aesthetic"``.
        differentiable: True.
    """

    name = "aesthetic"

    def __init__(self, model: open_clip.CLIP, tokenizer: ShapesTokenizer, head: nn.Module) -> None:
        super().__init__(model, tokenizer)
        self.head = head.eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> ShapesAestheticReward:
        super().to(device)
        self.head.to(device)
        return self

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B,) predicted quality on a 0-10 scale."""
        return self.head(self.image_embeddings(images))[:, 0]


def proxy_rewards(
    config: ProxyModelConfig, clip: open_clip.CLIP, proxy: open_clip.CLIP, head: nn.Module
) -> dict[str, ShapesClipBase]:
    """``{"proxy", "clip", "aesthetic"}`` reward models around in-memory modules (which they freeze in place)."""
    tokenizer = ShapesTokenizer(config.vocabulary, config.context_length)
    return {
        "proxy": ShapesProxyReward(proxy, tokenizer),
        "clip": ShapesClipScore(clip, tokenizer),
        "aesthetic": ShapesAestheticReward(clip, tokenizer, head),
    }


def save_proxy_models(
    out_dir: str | Path,
    config: ProxyModelConfig,
    clip: open_clip.CLIP,
    proxy: open_clip.CLIP,
    head: nn.Module,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and the three safetensors files (float32) into ``out_dir``.

    Args:
        out_dir: directory (created).
        config: architecture and vocabulary.
        clip: the contrastive CLIP (the ``clip`` reward and the aesthetic head's image tower).
        proxy: the Bradley-Terry-tuned CLIP.
        head: the aesthetic MLP.
        extra: more JSON-able entries for ``config.json`` (e.g. the training config).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, module in (("clip", clip), ("proxy", proxy), ("aesthetic", head)):
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
        atomic_write(out_dir / WEIGHT_FILES[name], lambda tmp, t=tensors: save_file(t, str(tmp)))
    document = {"format": CONFIG_FORMAT, "model": config.to_dict(), "files": WEIGHT_FILES, **(extra or {})}
    atomic_write_json(out_dir / "config.json", document)
    return out_dir


def _load_weights(module: nn.Module, path: Path, what: str) -> None:
    """Load a safetensors file into ``module``, or raise a one-line ValueError naming the file and the mismatch."""
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: cannot read as safetensors {what} weights ({type(err).__name__}: {err})") from None
    expected = module.state_dict()
    problem = state_mismatch(expected, state, "tensors")
    if problem:
        raise ValueError(f"{path}: does not match the {what} of config.json ({len(expected)} tensors): {problem}")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def load_proxy_rewards(path: str | Path, device: torch.device | str = "cpu") -> dict[str, ShapesClipBase]:
    """Load the proxy, CLIP-score and aesthetic rewards saved by :func:`save_proxy_models`.

    Args:
        path: directory with ``config.json`` and the safetensors files (the shipped ones: ``world.PROXY_DIR``).
        device: device of the reward models.

    Returns:
        ``{"proxy": ShapesProxyReward, "clip": ShapesClipScore, "aesthetic": ShapesAestheticReward}``.

    Raises:
        FileNotFoundError: no ``config.json`` in ``path``.
        ValueError: (one line, naming the file) a config of another format or a weights file that does not match it.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"shapes proxy: no config.json in {path} (train one with proxy_train.train_proxy)")
    document = json.loads(config_path.read_text())
    if document.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{config_path}: format {document.get('format')!r}, expected {CONFIG_FORMAT!r}")
    config = ProxyModelConfig.from_dict(document["model"])
    files = {**WEIGHT_FILES, **document.get("files", {})}
    clip, proxy, head = build_clip(config), build_clip(config), build_aesthetic_head(config)
    _load_weights(clip, path / files["clip"], "contrastive CLIP")
    _load_weights(proxy, path / files["proxy"], "proxy CLIP")
    _load_weights(head, path / files["aesthetic"], "aesthetic MLP")
    rewards = proxy_rewards(config, clip, proxy, head)
    for reward in rewards.values():
        reward.to(device)
    return rewards


__all__ = [
    "CONFIG_FORMAT",
    "ShapesClipBase",
    "WEIGHT_FILES",
    "ProxyModelConfig",
    "ShapesAestheticReward",
    "ShapesClipScore",
    "ShapesProxyReward",
    "ShapesTokenizer",
    "build_aesthetic_head",
    "build_clip",
    "build_vocabulary",
    "bpe_tokenizer",
    "image_embeddings",
    "load_proxy_rewards",
    "preprocess",
    "proxy_rewards",
    "save_proxy_models",
    "text_embeddings",
]
