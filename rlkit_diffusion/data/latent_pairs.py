"""Pick-a-Pic preference pairs in a VAE's latent space, for the ``sd15`` / ``sdxl`` worlds' off-policy algorithms.

`LatentPairs` reads raw pairs from a `StreamingPairs` (parquet, shuffled, sharded), decodes each JPEG with the
official Diffusion-DPO preprocessing (`load_image`), encodes it to the VAE posterior (mean, std) — once per image
and flip, thanks to the on-disk `LatentCache` — and draws z = (μ + σ ε − shift) · scaling_factor per use.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rlkit_diffusion.checkpoint import atomic_write
from rlkit_diffusion.data.pickapic_stream import RawPair, StreamingPairs

if TYPE_CHECKING:  # the codec is the world's; only its type is named here
    from rlkit_diffusion.worlds.stable_diffusion.components import LatentCodec


class LatentCache:
    """VAE posteriors on disk, one safetensors file per (image bytes, flip), so the VAE runs once per image.

    Layout: ``<root>/<fingerprint>/<h[:2]>/<sha256 of the image bytes>[-flip].safetensors`` with tensors ``mean``
    and ``std`` (float16; ≈ 64 KB per image at 512 px). Files are written with `atomic_write` (a temporary
    name, then renamed), so concurrent ranks and interrupted runs never leave a half-written entry.
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
        tensors = {"mean": mean.half().contiguous().cpu(), "std": std.half().contiguous().cpu()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


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
        z = self.codec.to_latent(mean + std * eps)
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


__all__ = ["LatentCache", "LatentPairs", "load_image"]
