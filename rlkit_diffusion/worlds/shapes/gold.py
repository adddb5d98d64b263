"""Hidden gold ("human") reward of the `shapes` world, measured from pixels only.

It labels preference pairs and scores evaluations; it never feeds an online algorithm. The caption is parsed by
:func:`rlkit_diffusion.worlds.shapes.captions.parse_caption` (canonical words and held-out synonyms alike); only the
attributes a caption specifies are scored and unknown words are ignored.

Scale: ``r = 10 * (0.6 * fidelity + 0.4 * quality)`` in [0, 10]; a perfect render of its caption scores about 10.

Measurement (all per image, vectorised over the batch; images other than 16x16 are area-resized to 16x16):

1. background colour ``b`` = per-channel median of the 60 border pixels;
2. distance map ``d = ||x - b||``; foreground ``F = d > max(0.5 * max(avgpool3(d)), 0.08)``;
3. the object ``O`` = largest 8-connected component of ``F`` (label propagation by max-pooling); every other
   foreground pixel, away from the 1-pixel dilation of ``O``, is clutter;
4. object colour ``c`` = mean colour of the 30 % of ``O``'s pixels farthest from ``b``;
5. soft mask ``m = clip(<x - b, c - b> / ||c - b||^2, 0, 1)`` on the dilation of ``O``; area ``A = sum m``;
   centroid ``(cx, cy)``;
6. for each shape s: half-extent ``h_s = sqrt(A / area_s)`` and template ``t_s`` (the renderer's mask at the
   centroid); ``IoU_s = sum min(m, t_s) / sum max(m, t_s)``; ``h = sum_s p_s h_s`` with ``p = softmax(IoU / 0.03)``;
7. the nine position anchors of the renderer for half-extent ``h``.

Fidelity (weights: shape 1, colour 1, background 0.5, size 0.5, position 0.5; the weighted mean over the
*specified* attributes; 1 when the caption specifies none):

* shape: ``p_s`` of the caption's shape;
* colour: ``softmax_k(-||c - C_k||^2 / (2 * 0.1^2))`` of the caption's colour over the named colours ``C_k``;
* background: the same for ``b`` over the named background colours (sigma 0.1);
* size: ``sigmoid((log h - log sqrt(2.5 * 4.5)) / 0.08)`` for "large", one minus that for "small";
* position: ``softmax_j(-||(cx, cy) - a_j||^2 / (2 * 0.8^2))`` of the caption's anchor ``a_j``.

Quality (weighted mean, weights in brackets; every term is 1 for a perfect render):

* sharpness [0.25]: ``clip((max_s IoU_s - 0.55) / 0.4, 0, 1)`` -- blur (and anything else that smears the object)
  lowers the fit of the best crisp template;
* noise [0.2]: ``1 / (1 + (sigma / 0.03)^2)`` with ``sigma = 1.4826 * median|x - avgpool3(x)| / sqrt(8/9)``;
* contrast [0.15]: ``clip(||c - b|| / ||C(c) - B(b)||, 0, 1)^2`` where ``C(c)``, ``B(b)`` are the nearest named
  colours: the measured contrast relative to what the named colours would give;
* placement [0.15]: ``exp(-min_j ||(cx, cy) - a_j||^2 / (2 * 0.6^2))``, distance to the nearest anchor;
* clutter [0.15]: ``exp(-n / 3)`` with ``n`` the number of clutter pixels;
* colour purity [0.1]: ``exp(-min_k ||c - C_k||^2 / (2 * 0.08^2))``, how close the object is to a named colour.

An image without any foreground gets 0 for shape, colour, size, position, sharpness, contrast and purity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkit_diffusion.worlds.shapes.captions import caption_targets
from rlkit_diffusion.worlds.shapes.render import (
    BACKGROUND_RGB,
    COLOUR_RGB,
    IMAGE_SIZE,
    POSITIONS,
    SHAPE_AREA,
    SHAPES,
    SIZES,
    anchor_points,
    pixel_grid,
    shape_masks,
)

FIDELITY_WEIGHTS: dict[str, float] = {"shape": 1.0, "colour": 1.0, "background": 0.5, "size": 0.5, "position": 0.5}
QUALITY_WEIGHTS: dict[str, float] = {
    "sharpness": 0.25,
    "noise": 0.2,
    "contrast": 0.15,
    "placement": 0.15,
    "clutter": 0.15,
    "purity": 0.1,
}
FIDELITY_SHARE = 0.6
SCALE = 10.0

_SHAPE_TEMPERATURE = 0.03
_COLOUR_SIGMA = 0.1
_POSITION_SIGMA = 0.8
_PLACEMENT_SIGMA = 0.6
_PURITY_SIGMA = 0.08
_NOISE_REF = 0.03
_CLUTTER_REF = 3.0
_SIZE_SPLIT = math.log(math.sqrt(SIZES["small"] * SIZES["large"]))
_SIZE_TEMPERATURE = 0.08
_MIN_THRESHOLD = 0.08
_TOP_FRACTION = 0.3
_LABEL_ITERS = 32


@dataclass
class ShapesMeasurement:
    """What the gold reward measures in a batch of B images (all tensors have batch dimension B).

    Attributes:
        background_rgb: (B, 3) estimated background colour.
        object_rgb: (B, 3) estimated object colour.
        mask: (B, H, W) soft object mask in [0, 1].
        area: (B,) object area in pixels.
        center: (B, 2) object centroid (x, y) in pixels.
        half_extent: (B,) estimated half-extent in pixels.
        shape_iou: (B, S) IoU of the mask with each shape template.
        p_shape, p_colour, p_background, p_position: (B, n_values) probabilities over the named values.
        p_large: (B,) probability that the object is "large".
        has_object: (B,) bool, False when no foreground was found.
        quality: per-term quality scores, each (B,) in [0, 1].
    """

    background_rgb: Tensor
    object_rgb: Tensor
    mask: Tensor
    area: Tensor
    center: Tensor
    half_extent: Tensor
    shape_iou: Tensor
    p_shape: Tensor
    p_colour: Tensor
    p_background: Tensor
    p_position: Tensor
    p_large: Tensor
    has_object: Tensor
    quality: dict[str, Tensor]

    def predicted(self) -> dict[str, Tensor]:
        """Most likely named value of each attribute: ``{attribute: (B,) long}`` (for diversity statistics)."""
        return {
            "shape": self.p_shape.argmax(-1),
            "colour": self.p_colour.argmax(-1),
            "background": self.p_background.argmax(-1),
            "size": (self.p_large > 0.5).long(),
            "position": self.p_position.argmax(-1),
        }


def _border(images: Tensor) -> Tensor:
    """(B, C, 4W - 4) border pixels of (B, C, H, W) images."""
    top, bottom = images[:, :, 0, :], images[:, :, -1, :]
    left, right = images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]
    return torch.cat([top, bottom, left, right], dim=-1)


def _dilate(mask: Tensor) -> Tensor:
    """3x3 dilation of a (B, H, W) bool mask."""
    return F.max_pool2d(mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0


def _largest_component(fg: Tensor) -> Tensor:
    """Largest 8-connected component of a (B, H, W) bool mask, by label propagation with max-pooling."""
    b, h, w = fg.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=fg.device).view(1, 1, h, w)
    labels = ids * fg[:, None]  # (B, 1, H, W), 0 on the background
    for _ in range(_LABEL_ITERS):
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * fg[:, None]
        if torch.equal(spread, labels):  # converged: every component carries its largest pixel id
            break
        labels = spread
    labels = labels.view(b, h * w).long()
    counts = torch.zeros(b, h * w + 1, device=fg.device).scatter_add_(1, labels, fg.view(b, -1).float())
    counts[:, 0] = 0.0
    main = counts.argmax(-1)  # (B,)
    return (labels == main[:, None]).view(b, h, w) & fg


def measure(images: Tensor) -> ShapesMeasurement:
    """Pixel measurements behind the gold reward (see the module docstring).

    Args:
        images: (B, 3, H, W) floats in [0, 1].

    Returns:
        A :class:`ShapesMeasurement`.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"gold_shapes: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    x = images.detach().float().clamp(0.0, 1.0)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    b, _, h, w = x.shape
    device = x.device

    # 1-3. background, foreground, main object and clutter.
    background = _border(x).median(dim=-1).values  # (B, 3)
    diff = x - background[:, :, None, None]  # (B, 3, H, W)
    dist = diff.norm(dim=1)  # (B, H, W)
    peak = F.avg_pool2d(dist[:, None], 3, stride=1, padding=1, count_include_pad=False).amax(dim=(1, 2, 3))  # (B,)
    threshold = torch.clamp(0.5 * peak, min=_MIN_THRESHOLD)
    fg = dist > threshold[:, None, None]  # (B, H, W)
    obj = _largest_component(fg)  # (B, H, W)
    region = _dilate(obj)
    clutter_px = (fg & ~region).sum(dim=(1, 2)).float()  # (B,)
    has_object = obj.flatten(1).any(-1)  # (B,)

    # 4. object colour from the object pixels farthest from the background.
    n_obj = obj.flatten(1).sum(-1)  # (B,)
    k = torch.clamp(torch.ceil(_TOP_FRACTION * n_obj), min=1)  # (B,)
    ranked = torch.where(obj, dist, torch.full_like(dist, -1.0)).flatten(1).argsort(dim=-1, descending=True)
    top = (torch.arange(h * w, device=device)[None] < k[:, None]).float()  # (B, HW)
    colours = x.flatten(2).gather(2, ranked[:, None].expand(b, 3, h * w))  # (B, 3, HW)
    object_rgb = (colours * top[:, None]).sum(-1) / k[:, None]  # (B, 3)
    object_rgb = torch.where(has_object[:, None], object_rgb, background)

    # 5. soft mask, area, centroid.
    direction = object_rgb - background  # (B, 3)
    norm2 = (direction**2).sum(-1).clamp(min=1e-6)  # (B,)
    mask = ((diff * direction[:, :, None, None]).sum(1) / norm2[:, None, None]).clamp(0.0, 1.0) * region
    area = mask.sum(dim=(1, 2))  # (B,)
    gx, gy = pixel_grid(h, device)
    safe_area = area.clamp(min=1e-6)
    center = torch.stack([(mask * gx).sum((1, 2)) / safe_area, (mask * gy).sum((1, 2)) / safe_area], -1)  # (B, 2)
    center = torch.where(has_object[:, None], center, torch.full_like(center, h / 2))

    # 6. shape templates at the measured area and centroid.
    shape_area = torch.tensor([SHAPE_AREA[s] for s in SHAPES], device=device)  # (S,)
    half_extents = torch.sqrt(area[:, None] / shape_area[None]).clamp(min=0.5)  # (B, S)
    ious = []
    for s in range(len(SHAPES)):
        template = shape_masks(center, half_extents[:, s], h, shape=s)  # (B, H, W)
        inter = torch.minimum(mask, template).sum((1, 2))
        union = torch.maximum(mask, template).sum((1, 2)).clamp(min=1e-6)
        ious.append(inter / union)
    shape_iou = torch.stack(ious, -1) * has_object[:, None]  # (B, S)
    p_shape = torch.softmax(shape_iou / _SHAPE_TEMPERATURE, -1)
    half_extent = (p_shape * half_extents).sum(-1)  # (B,)
    p_large = torch.sigmoid((torch.log(half_extent) - _SIZE_SPLIT) / _SIZE_TEMPERATURE)

    # 7. position from the anchors of the measured size.
    n_pos = len(POSITIONS)
    positions = torch.arange(n_pos, device=device).repeat(b)  # (B * P,)
    anchors = anchor_points(positions, half_extent.repeat_interleave(n_pos), h).view(b, n_pos, 2)
    dist2 = ((center[:, None] - anchors) ** 2).sum(-1)  # (B, P)
    p_position = torch.softmax(-dist2 / (2 * _POSITION_SIGMA**2), -1)

    # Colours.
    colour_d2 = torch.cdist(object_rgb, COLOUR_RGB.to(device)) ** 2  # (B, n_colours)
    background_d2 = torch.cdist(background, BACKGROUND_RGB.to(device)) ** 2  # (B, n_backgrounds)
    p_colour = torch.softmax(-colour_d2 / (2 * _COLOUR_SIGMA**2), -1)
    p_background = torch.softmax(-background_d2 / (2 * _COLOUR_SIGMA**2), -1)

    # Quality terms.
    residual = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    sigma = 1.4826 * residual.abs().flatten(1).median(-1).values / math.sqrt(8 / 9)  # (B,)
    named_object = COLOUR_RGB.to(device)[colour_d2.argmin(-1)]
    named_background = BACKGROUND_RGB.to(device)[background_d2.argmin(-1)]
    named_contrast = (named_object - named_background).norm(dim=-1).clamp(min=1e-3)
    contrast = ((object_rgb - background).norm(dim=-1) / named_contrast).clamp(0.0, 1.0) ** 2
    quality = {
        "sharpness": ((shape_iou.amax(-1) - 0.55) / 0.4).clamp(0.0, 1.0),
        "noise": 1.0 / (1.0 + (sigma / _NOISE_REF) ** 2),
        "contrast": contrast * has_object,
        "placement": torch.exp(-dist2.amin(-1) / (2 * _PLACEMENT_SIGMA**2)),
        "clutter": torch.exp(-clutter_px / _CLUTTER_REF),
        "purity": torch.exp(-colour_d2.amin(-1) / (2 * _PURITY_SIGMA**2)) * has_object,
    }
    zero_if_empty = has_object[:, None].float()
    return ShapesMeasurement(
        background_rgb=background,
        object_rgb=object_rgb,
        mask=mask,
        area=area,
        center=center,
        half_extent=half_extent,
        shape_iou=shape_iou,
        p_shape=p_shape * zero_if_empty,
        p_colour=p_colour * zero_if_empty,
        p_background=p_background,
        p_position=p_position * zero_if_empty,
        p_large=p_large,
        has_object=has_object,
        quality=quality,
    )


class GoldShapesReward:
    """The hidden gold reward of the `shapes` world (a ``RewardModel``; see the module docstring for the formula).

    Attributes:
        name: ``"gold_shapes"``.
        differentiable: ``False``: it labels data and scores evaluations, never feeds a gradient.
    """

    name = "gold_shapes"
    differentiable = False

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Gold reward in [0, 10].

        Args:
            images: (B, 3, H, W) floats in [0, 1].
            prompts: B captions.

        Returns:
            (B,) float32 rewards on the images' device.
        """
        return self.components(images, prompts)["reward"]

    def components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """The reward and every term behind it, each (B,): ``reward``, ``fidelity``, ``quality``,
        ``fidelity_<attribute>`` (NaN where the caption does not specify it) and ``quality_<term>``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"gold_shapes: {images.shape[0]} images but {len(prompts)} prompts")
        m = measure(images)
        device = images.device
        targets = caption_targets(list(prompts), device=device)  # {attribute: (B,) long, -1 = unspecified}
        match = {
            "shape": m.p_shape,
            "colour": m.p_colour,
            "background": m.p_background,
            "position": m.p_position,
            "size": torch.stack([1 - m.p_large, m.p_large], -1) * m.has_object[:, None],  # SIZES: small, large
        }
        out: dict[str, Tensor] = {}
        weighted = torch.zeros(images.shape[0], device=device)
        total_weight = torch.zeros(images.shape[0], device=device)
        for attribute, probs in match.items():
            target = targets[attribute]
            specified = target >= 0
            score = probs.gather(1, target.clamp(min=0)[:, None])[:, 0]  # (B,)
            out[f"fidelity_{attribute}"] = torch.where(specified, score, torch.full_like(score, float("nan")))
            weighted = weighted + FIDELITY_WEIGHTS[attribute] * score * specified
            total_weight = total_weight + FIDELITY_WEIGHTS[attribute] * specified
        fidelity = torch.where(total_weight > 0, weighted / total_weight.clamp(min=1e-6), torch.ones_like(weighted))
        quality = sum(QUALITY_WEIGHTS[k] * v for k, v in m.quality.items()) / sum(QUALITY_WEIGHTS.values())
        out.update({f"quality_{k}": v for k, v in m.quality.items()})
        out["fidelity"] = fidelity
        out["quality"] = quality
        out["reward"] = (SCALE * (FIDELITY_SHARE * fidelity + (1 - FIDELITY_SHARE) * quality)).float()
        return out

    @staticmethod
    def measure(images: Tensor) -> ShapesMeasurement:
        """Pixel measurements (e.g. the predicted attributes of samples, for diversity statistics)."""
        return measure(images)


__all__ = ["FIDELITY_WEIGHTS", "QUALITY_WEIGHTS", "GoldShapesReward", "ShapesMeasurement", "measure"]
