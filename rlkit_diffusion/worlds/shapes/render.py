"""Vectorised renderer of the `shapes` world: 16x16 RGB scenes of one coloured shape on a plain background.

A scene is a point of a small grammar plus nuisance "quality" factors that a person dislikes:

==============  ==========================================================================================
attribute       values
==============  ==========================================================================================
shape           circle, square, triangle, cross, diamond
colour          red, green, blue, yellow, purple, orange, white, black, pink, cyan (``COLOURS``)
background      navy, gray, black, white, beige (``BACKGROUNDS``)
size            small (half-extent 2.5 px), large (half-extent 4.5 px)
position        center, top, bottom, left, right and the four corners (``POSITIONS``)
==============  ==========================================================================================

The values, their RGB / sizes / directions and the words for them are data: ``vocabulary.json`` (`vocabulary`).

==============  ==========================================================================================
nuisance        effect at strength ``s`` in [0, 1]
==============  ==========================================================================================
blur            Gaussian blur, sigma = ``s * BLUR_MAX_SIGMA`` px
noise           additive Gaussian pixel noise, std = ``s * NOISE_MAX_STD`` (then clamped to [0, 1])
contrast        low contrast: every channel is pulled to its image mean by the factor ``1 - s * CONTRAST_MAX_LOSS``
jitter          placement off its anchor by ``s * JITTER_MAX_PX`` px in a random direction
clutter         ``round(s * CLUTTER_MAX_BLOBS)`` small extra discs of random colours behind the object
drift           object colour shifted by ``s * DRIFT_MAX`` (L2 in RGB) in a random direction
==============  ==========================================================================================

Scenes are batched in a :class:`SceneSpec` (integer attribute index tensors, float nuisance strengths and the
random directions/positions the nuisances need). :func:`render` is a pure function of the spec and the pixel-noise
generator; it draws every shape as a soft anti-aliased mask from a signed distance function evaluated with
broadcasting over the pixel grid, so there is no per-image Python loop. Pixel centres sit at ``j + 0.5``; the image
centre is ``(8, 8)``; ``y`` grows downwards. Every shape is built so that its area centroid is its anchor point.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rlkit_diffusion.worlds.shapes.vocabulary import ATTRIBUTES, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

IMAGE_SIZE = 16
NUISANCES: tuple[str, ...] = ("blur", "noise", "contrast", "jitter", "clutter", "drift")

MARGIN_PX = 1.0  # an object at an edge anchor keeps this distance to the image border
BLUR_MAX_SIGMA = 1.2
NOISE_MAX_STD = 0.2
CONTRAST_MAX_LOSS = 0.75
JITTER_MAX_PX = 2.0
CLUTTER_MAX_BLOBS = 4
CLUTTER_RADIUS_PX = 1.0
DRIFT_MAX = 0.4
MIN_COLOUR_CONTRAST = 0.4  # object colours closer than this (L2 RGB) to the background are never sampled

COLOUR_RGB = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (n_colours, 3)
BACKGROUND_RGB = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32)  # (n_backgrounds, 3)
SIZE_PX = torch.tensor(list(SIZES.values()), dtype=torch.float32)  # (n_sizes,)
POSITION_DIR = torch.tensor(list(POSITIONS.values()), dtype=torch.float32)  # (n_positions, 2) as (x, y)
# (n_colours, n_backgrounds): True where the object colour stands out from the background.
COMPATIBLE = torch.cdist(COLOUR_RGB, BACKGROUND_RGB) > MIN_COLOUR_CONTRAST

# Shape geometry in units of the half-extent `he` (see `shape_sdf`).
SQUARE_HALF = 0.85
DIAMOND_RADIUS = 1.15
CROSS_HALF_WIDTH = 0.4
TRIANGLE_APEX_Y = -1.2
TRIANGLE_BASE_Y = 0.6
TRIANGLE_BASE_HALF = 1.15
# Area of each shape in units of he**2 (used by the gold reward to turn a measured area into a half-extent).
SHAPE_AREA: dict[str, float] = {
    "circle": math.pi,
    "square": 4 * SQUARE_HALF**2,
    "triangle": TRIANGLE_BASE_HALF * (TRIANGLE_BASE_Y - TRIANGLE_APEX_Y),
    "cross": 8 * CROSS_HALF_WIDTH - 4 * CROSS_HALF_WIDTH**2,
    "diamond": 2 * DIAMOND_RADIUS**2,
}


def attribute_index(attribute: str, name: str) -> int:
    """Index of a canonical attribute value, e.g. ``attribute_index("colour", "red") == 0``."""
    try:
        return ATTRIBUTES[attribute].index(name)
    except (KeyError, ValueError):
        raise ValueError(f"unknown {attribute} {name!r}; expected one of {ATTRIBUTES.get(attribute)}") from None


def pixel_grid(size: int = IMAGE_SIZE, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(x, y)``, each of shape (size, size); ``x`` varies along the last axis."""
    coords = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x, y


def anchor_points(position: Tensor, half_extent: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Anchor (x, y) of each position for each half-extent.

    Args:
        position: (B,) long position indices into ``POSITIONS``.
        half_extent: (B,) float half-extents in pixels.
        size: image side in pixels.

    Returns:
        (B, 2) anchor coordinates: the centre moved towards the named edge(s) until the object keeps ``MARGIN_PX``.
    """
    direction = POSITION_DIR.to(half_extent.device)[position]  # (B, 2)
    offset = (size / 2 - MARGIN_PX - half_extent).clamp(min=0.0)  # (B,)
    return size / 2 + direction * offset[:, None]


def _circle(dx: Tensor, dy: Tensor, he: Tensor) -> Tensor:
    return torch.sqrt(dx**2 + dy**2) - he


def _square(dx: Tensor, dy: Tensor, he: Tensor) -> Tensor:
    return torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF * he


def _triangle(dx: Tensor, dy: Tensor, he: Tensor) -> Tensor:
    # Apex up: the intersection of the base half-plane and two slanted half-planes (zero on the edges).
    height = (TRIANGLE_BASE_Y - TRIANGLE_APEX_Y) * he
    half_base = TRIANGLE_BASE_HALF * he
    slanted = (height * dx.abs() - half_base * (dy - TRIANGLE_APEX_Y * he)) / torch.sqrt(height**2 + half_base**2)
    return torch.maximum(dy - TRIANGLE_BASE_Y * he, slanted)


def _cross(dx: Tensor, dy: Tensor, he: Tensor) -> Tensor:
    ax, ay, arm = dx.abs(), dy.abs(), CROSS_HALF_WIDTH * he
    return torch.minimum(torch.maximum(ax - he, ay - arm), torch.maximum(ax - arm, ay - he))


def _diamond(dx: Tensor, dy: Tensor, he: Tensor) -> Tensor:
    return (dx.abs() + dy.abs() - DIAMOND_RADIUS * he) / math.sqrt(2.0)


# Approximate signed distance (pixels, negative inside) of each shape, in the order of SHAPES.
_SDF = (_circle, _square, _triangle, _cross, _diamond)


def shape_sdf(dx: Tensor, dy: Tensor, half_extent: Tensor, shape: int | None = None) -> Tensor:
    """Approximate signed distances (pixels, negative inside) of the shapes in ``SHAPES``.

    Args:
        dx: (..., H, W) x offset of each pixel centre from the shape anchor, in pixels.
        dy: (..., H, W) y offset (downwards), in pixels.
        half_extent: (..., 1, 1) half-extent ``he`` of the shapes, in pixels.
        shape: index of one shape, or None for all of them.

    Returns:
        (..., H, W) for one shape, else (..., S, H, W) with the ``S`` axis inserted before ``H``.
    """
    if shape is not None:
        return _SDF[shape](dx, dy, half_extent)
    return torch.stack([sdf(dx, dy, half_extent) for sdf in _SDF], dim=-3)


def soft_mask(sdf: Tensor) -> Tensor:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels (a one-pixel linear ramp)."""
    return (0.5 - sdf).clamp(0.0, 1.0)


def shape_masks(
    center: Tensor, half_extent: Tensor, size: int = IMAGE_SIZE, shape: Tensor | int | None = None
) -> Tensor:
    """Soft masks of shapes placed at ``center`` with half-extent ``half_extent``.

    Args:
        center: (B, 2) anchor (x, y) in pixels.
        half_extent: (B,) half-extent in pixels.
        size: image side in pixels.
        shape: None for every shape, an int for one shape, or a (B,) long tensor of one shape per image.

    Returns:
        (B, S, size, size) coverage of each of the S shapes in ``SHAPES`` when ``shape`` is None, else
        (B, size, size).
    """
    x, y = pixel_grid(size, center.device)  # (H, W)
    dx = x - center[:, 0, None, None]  # (B, H, W)
    dy = y - center[:, 1, None, None]
    he = half_extent[:, None, None]  # (B, 1, 1)
    if not isinstance(shape, Tensor):
        return soft_mask(shape_sdf(dx, dy, he, shape))
    sdf = torch.empty_like(dx)
    for s in torch.unique(shape).tolist():  # one vectorised call per shape present, never per image
        rows = torch.nonzero(shape == s)[:, 0]
        sdf[rows] = shape_sdf(dx[rows], dy[rows], he[rows], s)
    return soft_mask(sdf)


@dataclasses.dataclass
class SceneSpec:
    """A batch of B scenes. Attribute fields are (B,) long indices into the tuples of ``ATTRIBUTES``.

    Attributes:
        shape: (B,) index into ``SHAPES``.
        colour: (B,) index into ``COLOURS``.
        background: (B,) index into ``BACKGROUNDS``.
        size: (B,) index into ``SIZES``.
        position: (B,) index into ``POSITIONS``.
        blur, noise, contrast, jitter, clutter, drift: (B,) float nuisance strengths in [0, 1].
        jitter_dir: (B, 2) unit vector (x, y) of the placement jitter.
        drift_dir: (B, 3) unit vector in RGB of the colour drift.
        clutter_xy: (B, CLUTTER_MAX_BLOBS, 2) centres (x, y) of the clutter blobs in pixels.
        clutter_colour: (B, CLUTTER_MAX_BLOBS) long index into ``COLOURS`` of each clutter blob.
    """

    shape: Tensor
    colour: Tensor
    background: Tensor
    size: Tensor
    position: Tensor
    blur: Tensor
    noise: Tensor
    contrast: Tensor
    jitter: Tensor
    clutter: Tensor
    drift: Tensor
    jitter_dir: Tensor
    drift_dir: Tensor
    clutter_xy: Tensor
    clutter_colour: Tensor

    def __len__(self) -> int:
        return self.shape.shape[0]

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> SceneSpec:
        """Sub-batch; an integer index keeps the batch dimension (a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        elif not isinstance(index, (slice, Tensor)):
            index = torch.as_tensor(index, dtype=torch.long)
        return SceneSpec(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @property
    def device(self) -> torch.device:
        return self.shape.device

    def to(self, device: torch.device | str) -> SceneSpec:
        return SceneSpec(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def replace(self, **changes: Tensor) -> SceneSpec:
        """Copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def names(self, i: int) -> dict[str, str]:
        """Canonical attribute names of scene ``i``, e.g. ``{"shape": "circle", "colour": "red", ...}``."""
        return {attr: values[int(getattr(self, attr)[i])] for attr, values in ATTRIBUTES.items()}

    @classmethod
    def cat(cls, specs: Sequence[SceneSpec]) -> SceneSpec:
        return cls(**{f.name: torch.cat([getattr(s, f.name) for s in specs]) for f in dataclasses.fields(cls)})

    @classmethod
    def from_names(
        cls,
        shape: Sequence[str],
        colour: Sequence[str],
        background: Sequence[str],
        size: Sequence[str],
        position: Sequence[str],
        device: torch.device | str | None = None,
        **nuisance: Sequence[float],
    ) -> SceneSpec:
        """Hand-made scenes from canonical names; nuisances default to zero, directions to fixed unit vectors.

        Example:
            ``SceneSpec.from_names(["circle"], ["red"], ["navy"], ["large"], ["top"], blur=[0.5])``
        """
        columns = {"shape": shape, "colour": colour, "background": background, "size": size, "position": position}
        lengths = {len(v) for v in columns.values()} | {len(v) for v in nuisance.values()}
        if len(lengths) != 1:
            raise ValueError(f"SceneSpec.from_names: all arguments need the same length, got lengths {lengths}")
        unknown = set(nuisance) - set(NUISANCES)
        if unknown:
            raise ValueError(f"SceneSpec.from_names: unknown nuisance(s) {sorted(unknown)}; expected {NUISANCES}")
        (n,) = lengths
        fields = {
            attr: torch.tensor([attribute_index(attr, v) for v in values], dtype=torch.long, device=device)
            for attr, values in columns.items()
        }
        for name in NUISANCES:
            fields[name] = torch.tensor(list(nuisance.get(name, [0.0] * n)), dtype=torch.float32, device=device)
        fields["jitter_dir"] = torch.tensor([[1.0, 0.0]], device=device).repeat(n, 1)
        fields["drift_dir"] = torch.tensor([[1.0, -1.0, 1.0]], device=device).repeat(n, 1) / math.sqrt(3.0)
        corners = torch.tensor([[2.5, 2.5], [13.5, 13.5], [13.5, 2.5], [2.5, 13.5]], device=device)
        fields["clutter_xy"] = corners[:CLUTTER_MAX_BLOBS].expand(n, -1, -1).clone()
        first_visible = COMPATIBLE.float().argmax(0).to(device)[fields["background"]]  # (n,) a colour that shows
        fields["clutter_colour"] = first_visible[:, None].repeat(1, CLUTTER_MAX_BLOBS)
        return cls(**fields)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def sample_scenes(
    n: int,
    generator: torch.Generator,
    *,
    p_nuisance: float = 0.5,
    strength: tuple[float, float] = (0.0, 1.0),
    fixed: Mapping[str, Tensor] | None = None,
    device: torch.device | str | None = None,
) -> SceneSpec:
    """Draw ``n`` random scenes; a pure function of the generator state.

    Attributes are uniform, except that the object colour always stands out from the background (``COMPATIBLE``).
    Each nuisance factor is switched on independently with probability ``p_nuisance`` and then has a strength
    drawn uniformly from ``strength``.

    Args:
        n: number of scenes.
        generator: a CPU ``torch.Generator``; every draw comes from it.
        p_nuisance: probability that each nuisance factor is present in a scene (0 gives perfect renders).
        strength: (low, high) range of the strength of a present nuisance factor.
        fixed: optional ``{attribute: (n,) long tensor}``; entries >= 0 fix the attribute, -1 leaves it random.
        device: device of the returned tensors.

    Returns:
        A ``SceneSpec`` of batch size ``n``.
    """
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"sample_scenes: unknown attribute(s) in fixed: {sorted(unknown)}")
    g = generator
    fields: dict[str, Tensor] = {}
    for attr in ("shape", "size", "position"):
        fields[attr] = torch.randint(len(ATTRIBUTES[attr]), (n,), generator=g)
    # Colour and background are drawn so that they stay compatible; a fixed value constrains the other one.
    colour_fixed = fixed.get("colour", torch.full((n,), -1)).cpu().long()
    background_fixed = fixed.get("background", torch.full((n,), -1)).cpu().long()
    weights_colour = torch.where(
        (background_fixed >= 0)[:, None], COMPATIBLE[:, background_fixed.clamp(min=0)].T.float(), 1.0
    )  # (n, n_colours)
    colour = torch.multinomial(weights_colour, 1, generator=g)[:, 0]
    colour = torch.where(colour_fixed >= 0, colour_fixed, colour)
    weights_background = COMPATIBLE[colour].float()  # (n, n_backgrounds)
    weights_background[weights_background.sum(1) == 0] = 1.0
    background = torch.multinomial(weights_background, 1, generator=g)[:, 0]
    fields["colour"] = colour
    fields["background"] = torch.where(background_fixed >= 0, background_fixed, background)
    for attr in ("shape", "size", "position"):
        if attr in fixed:
            value = fixed[attr].cpu().long()
            fields[attr] = torch.where(value >= 0, value, fields[attr])
    low, high = strength
    for name in NUISANCES:
        present = torch.rand(n, generator=g) < p_nuisance
        fields[name] = torch.where(present, low + (high - low) * torch.rand(n, generator=g), 0.0)
    fields["jitter_dir"] = _unit(torch.randn(n, 2, generator=g))
    fields["drift_dir"] = _unit(torch.randn(n, 3, generator=g))
    fields["clutter_xy"] = MARGIN_PX + (IMAGE_SIZE - 2 * MARGIN_PX) * torch.rand(n, CLUTTER_MAX_BLOBS, 2, generator=g)
    blob_weights = COMPATIBLE.T[fields["background"]].float()  # (n, n_colours)
    fields["clutter_colour"] = torch.multinomial(blob_weights, CLUTTER_MAX_BLOBS, replacement=True, generator=g)
    return SceneSpec(**fields).to(device) if device is not None else SceneSpec(**fields)


def _blur_matrix(sigma: Tensor, size: int) -> Tensor:
    """(B, size, size) row-normalised Gaussian blur matrices; sigma ~ 0 gives the identity."""
    idx = torch.arange(size, dtype=torch.float32, device=sigma.device)
    dist2 = (idx[:, None] - idx[None, :]) ** 2  # (size, size)
    kernel = torch.exp(-dist2 / (2 * sigma.clamp(min=1e-3)[:, None, None] ** 2))  # (B, size, size)
    return kernel / kernel.sum(-1, keepdim=True)


def render(spec: SceneSpec, generator: torch.Generator | None = None, size: int = IMAGE_SIZE) -> Tensor:
    """Render a batch of scenes.

    Args:
        spec: B scenes.
        generator: CPU generator of the pixel noise; ``None`` uses a fresh generator seeded 0, so the image is a
            pure function of ``spec``.
        size: image side in pixels (16 in the `shapes` world).

    Returns:
        (B, 3, size, size) float32 images in [0, 1].
    """
    device = spec.device
    n = len(spec)
    x, y = pixel_grid(size, device)  # (H, W)
    background = BACKGROUND_RGB.to(device)[spec.background]  # (B, 3)
    image = background[:, :, None, None].expand(n, 3, size, size)  # (B, 3, H, W)

    # Clutter: blobs painted on the background, behind the object (only images that have clutter).
    n_blobs = torch.round(spec.clutter * CLUTTER_MAX_BLOBS).long()  # (B,)
    rows = torch.nonzero(n_blobs > 0)[:, 0]
    if rows.numel():
        image = image.clone()
        blobs = int(n_blobs.max())
        active = torch.arange(blobs, device=device)[None, :] < n_blobs[rows, None]  # (R, M)
        blob_dx = x - spec.clutter_xy[rows, :blobs, 0, None, None]  # (R, M, H, W)
        blob_dy = y - spec.clutter_xy[rows, :blobs, 1, None, None]
        blob_mask = soft_mask(torch.sqrt(blob_dx**2 + blob_dy**2) - CLUTTER_RADIUS_PX) * active[:, :, None, None]
        blob_rgb = COLOUR_RGB.to(device)[spec.clutter_colour[rows, :blobs]]  # (R, M, 3)
        layer = image[rows]
        for m in range(blobs):  # a tiny loop over blob slots (not over images)
            alpha = blob_mask[:, m, None]  # (R, 1, H, W)
            layer = layer * (1 - alpha) + blob_rgb[:, m, :, None, None] * alpha
        image[rows] = layer

    # The object: soft mask of its shape at its (possibly jittered) anchor.
    half_extent = SIZE_PX.to(device)[spec.size]  # (B,)
    center = anchor_points(spec.position, half_extent, size) + spec.jitter_dir * (JITTER_MAX_PX * spec.jitter)[:, None]
    mask = shape_masks(center, half_extent, size, shape=spec.shape)[:, None]  # (B, 1, H, W)
    colour = COLOUR_RGB.to(device)[spec.colour] + spec.drift_dir * (DRIFT_MAX * spec.drift)[:, None]
    colour = colour.clamp(0.0, 1.0)  # (B, 3)
    image = image * (1 - mask) + colour[:, :, None, None] * mask  # (B, 3, H, W)

    # Blur (separable, per-image sigma): rows then columns.
    rows = torch.nonzero(spec.blur > 0)[:, 0]
    if rows.numel():
        blur = _blur_matrix(spec.blur[rows] * BLUR_MAX_SIGMA, size)[:, None]  # (R, 1, H, H)
        image[rows] = blur @ image[rows] @ blur.transpose(-1, -2)

    # Low contrast: pull each channel towards its image mean.
    rows = torch.nonzero(spec.contrast > 0)[:, 0]
    if rows.numel():
        factor = (1 - CONTRAST_MAX_LOSS * spec.contrast[rows])[:, None, None, None]
        mean = image[rows].mean(dim=(2, 3), keepdim=True)  # (R, 3, 1, 1)
        image[rows] = mean + factor * (image[rows] - mean)

    # Pixel noise last, so it is white.
    rows = torch.nonzero(spec.noise > 0)[:, 0]
    if rows.numel():
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        noise = torch.randn(rows.numel(), 3, size, size, generator=generator).to(device)
        image[rows] = image[rows] + noise * (NOISE_MAX_STD * spec.noise[rows])[:, None, None, None]
    return image.clamp(0.0, 1.0).float()


def measure_throughput(
    batch_size: int = 2048, n_batches: int = 10, seed: int = 0, num_threads: int | None = None
) -> float:
    """Images per second of ``sample_scenes`` + ``render`` (all nuisances possible) on the CPU.

    Args:
        batch_size: scenes per call.
        n_batches: timed calls (after one warm-up call).
        seed: generator seed.
        num_threads: torch intra-op threads during the measurement (restored afterwards); None keeps the current.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        g = torch.Generator().manual_seed(seed)
        render(sample_scenes(batch_size, g), g)  # warm-up
        start = time.perf_counter()
        for _ in range(n_batches):
            render(sample_scenes(batch_size, g), g)
        return batch_size * n_batches / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)


__all__ = [
    "ATTRIBUTES",
    "BACKGROUNDS",
    "BACKGROUND_RGB",
    "COLOURS",
    "COLOUR_RGB",
    "COMPATIBLE",
    "IMAGE_SIZE",
    "NUISANCES",
    "POSITIONS",
    "SHAPES",
    "SHAPE_AREA",
    "SIZES",
    "SceneSpec",
    "anchor_points",
    "attribute_index",
    "measure_throughput",
    "pixel_grid",
    "render",
    "sample_scenes",
    "shape_masks",
    "shape_sdf",
]
