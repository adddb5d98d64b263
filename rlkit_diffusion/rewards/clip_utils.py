"""Pieces shared by the CLIP-based rewards (PickScore, HPSv2, CLIP score, LAION aesthetic).

* `ClipImagePreprocess` — the CLIP image preprocessing in torch, differentiable: resize the shorter side (bicubic,
  antialiased), center crop, normalise. Built from a transformers ``CLIPImageProcessor`` (`from_hf`) or an open_clip
  model's preprocess config (`from_open_clip`), so that it follows whatever checkpoint is loaded.
* `load_weights_file` — a state dict from a ``.safetensors`` file or a tensors-only torch file
  (``torch.load(weights_only=True)``; never unpickles objects), with one-line errors.
* `load_open_clip` — an open_clip architecture (a registered name such as ``ViT-H-14``, or a path to an open_clip
  model-config JSON) built with ``pretrained=None`` and filled from a weights file.
* `TextFeatureCache` — frozen text features memoised per prompt (prompts repeat across a run).

Why torch preprocessing: the processors work on PIL images or uint8 tensors and cut the graph, so DRaFT/AlignProp
could not backpropagate through them. Differences to the processors on the same image come from the resampling
(torch bicubic on floats vs. PIL's bicubic on uint8, or torchvision on uint8) and the uint8 rounding; they are
measured in ``tests/test_real_rewards.py``.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rlkit_diffusion.checkpoint import state_mismatch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """``fp32 | bf16 | fp16`` → the torch dtype (one-line error otherwise)."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class ClipImagePreprocess(nn.Module):
    """CLIP image preprocessing on float images in [0, 1], differentiable.

    ``x → resize(shorter side = resize_to, bicubic, antialias) → center_crop(crop_size) → (x − mean) / std``

    Args:
        resize_to: target of the shorter side (the processor's ``size["shortest_edge"]``); None skips the resize.
        crop_size: (height, width) of the center crop; None skips the crop.
        mean, std: per-channel normalisation.
    """

    def __init__(
        self,
        resize_to: int | None,
        crop_size: tuple[int, int] | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.resize_to = resize_to
        self.crop_size = crop_size
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_hf(cls, image_processor: Any) -> ClipImagePreprocess:
        """From a transformers ``CLIPImageProcessor`` (or a processor holding one as ``image_processor``)."""
        ip = getattr(image_processor, "image_processor", image_processor)
        size, crop = ip.size, ip.crop_size
        if getattr(ip, "do_resize", True):
            short = _get(size, "shortest_edge")
            if short is None:
                raise ValueError(f"CLIP image processor: expected size={{'shortest_edge': N}}, got {dict(size)}")
        else:
            short = None
        crop_hw = (
            (int(_get(crop, "height")), int(_get(crop, "width"))) if getattr(ip, "do_center_crop", True) else None
        )
        if not getattr(ip, "do_normalize", True):
            return cls(short, crop_hw, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        return cls(short, crop_hw, ip.image_mean, ip.image_std)

    @classmethod
    def from_open_clip(cls, model: nn.Module) -> ClipImagePreprocess:
        """From an open_clip model's preprocess config (the ``preprocess_val`` of ``create_model_and_transforms``)."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"open_clip preprocess: resize_mode {cfg['resize_mode']!r} unsupported (need 'shortest')")
        size = cfg["size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return cls(min(h, w), (h, w), cfg["mean"], cfg["std"])

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] → (B, 3, crop_h, crop_w) normalised (float32, gradients kept)."""
        x = images.float()
        if self.resize_to is not None:
            x = TF.resize(x, [self.resize_to], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.crop_size is not None:
            x = TF.center_crop(x, list(self.crop_size))
        return (x - self.mean) / self.std


def _get(size: Any, key: str) -> Any:
    """A field of a transformers ``SizeDict`` or plain dict."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def load_weights_file(path: str | Path, what: str) -> dict[str, Tensor]:
    """A state dict from ``path``: safetensors, or a torch file read with ``weights_only=True``.

    A ``{"state_dict": ...}`` wrapper and a DataParallel ``module.`` prefix are removed.

    Raises:
        FileNotFoundError / ValueError: one line naming ``what`` and the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch/safetensors raise many kinds of errors for foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{what}: {path} is not a tensors-only checkpoint (safetensors, or torch.save of a state dict): {first}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def check_state_dict(module: nn.Module, state: dict[str, Tensor], what: str, path: str | Path) -> None:
    """Raise a one-line ValueError if ``state`` does not fit ``module`` (missing/unexpected keys, shapes)."""
    problem = state_mismatch(module.state_dict(), state, "keys")
    if problem:
        raise ValueError(f"{what}: {path} does not match the expected architecture: {problem}")


def load_open_clip(arch: str, checkpoint: str | Path | None, what: str) -> tuple[nn.Module, Callable]:
    """An open_clip model of architecture ``arch`` with the weights of ``checkpoint``, and its tokenizer.

    Args:
        arch: a registered open_clip model name (``ViT-H-14``) or the path of an open_clip model-config JSON
            (``{"embed_dim": ..., "vision_cfg": ..., "text_cfg": ...}``; registered under the file's stem).
        checkpoint: weights file (`load_weights_file`); None keeps the random initialisation (only for tests).
        what: the reward's name for error messages.

    Returns:
        ``(model in eval mode with frozen weights, tokenizer)``.
    """
    import open_clip

    name = arch
    if arch.endswith(".json"):
        cfg_path = Path(arch).expanduser()
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{what}: open_clip model config {cfg_path} not found")
        try:
            json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{what}: {cfg_path} is not a JSON open_clip model config ({err})") from None
        open_clip.add_model_config(cfg_path)
        name = cfg_path.stem
    elif name not in open_clip.list_models():
        raise ValueError(
            f"{what}: unknown open_clip architecture {arch!r} (a name such as 'ViT-H-14' or a .json config)"
        )
    quiet = _DropMessage("No pretrained weights loaded")  # they are loaded just below, from `checkpoint`
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        logging.getLogger().removeFilter(quiet)
    if checkpoint is not None:
        state = load_weights_file(checkpoint, what)
        if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        state.pop("text.transformer.embeddings.position_ids", None)
        check_state_dict(model, state, f"{what} ({arch})", checkpoint)
        model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model, open_clip.get_tokenizer(name)


class _DropMessage(logging.Filter):
    """A logging filter that drops records containing ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class TextFeatureCache:
    """Memoise ``encode(prompts) -> (B, D)`` per prompt string (frozen text towers give the same features).

    A new prompt is encoded on its own (a batch of one), never together with the other new prompts of a call: a
    batched matmul's rounding depends on the batch's size, so a prompt's features would depend on which prompts
    first arrived with it, i.e. on the run's history. That made a resumed shapes run differ from an uninterrupted one
    (by 6e-8 in the proxy's text embeddings, then in the rewards, the advantages and the weights; issue #15). One
    prompt at a time, the features are a function of the prompt alone, also after an eviction.

    Args:
        encode: the batched text encoder (called without gradient on one prompt not cached yet at a time).
        max_size: least recently used prompts are evicted beyond this.
    """

    def __init__(self, encode: Callable[[list[str]], Tensor], max_size: int = 4096) -> None:
        self.encode = encode
        self.max_size = max_size
        self._cache: OrderedDict[str, Tensor] = OrderedDict()

    def clear(self) -> None:
        self._cache.clear()

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> Tensor:
        for p in dict.fromkeys(p for p in prompts if p not in self._cache):
            self._cache[p] = self.encode([p])[0]  # (D,): a batch of one (see the class docstring)
        for p in prompts:
            self._cache.move_to_end(p)
        out = torch.stack([self._cache[p] for p in prompts])
        while len(self._cache) > self.max_size:
            self._cache.popitem(last=False)
        return out


def normalize(x: Tensor) -> Tensor:
    """Unit L2 norm along the last dimension."""
    return x / x.norm(dim=-1, keepdim=True)


__all__ = [
    "ClipImagePreprocess",
    "DTYPES",
    "TextFeatureCache",
    "check_state_dict",
    "load_open_clip",
    "load_weights_file",
    "normalize",
    "torch_dtype",
]
