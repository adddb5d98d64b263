"""Pick-a-Pic-like preference pairs for the `shapes` world, labelled by the gold reward with human-like noise.

Recipe (deterministic from a seed):

1. captions: a validation split of ``n_val_captions`` unique training-distribution captions, and training captions
   drawn from the same distribution but never equal to a validation caption (held-out captions appear in neither);
2. two images per caption, each from a generator of the zoo drawn independently:

   ================  ===========================================================================================
   generator         images
   ================  ===========================================================================================
   render_clean      perfect renders of the caption (unspecified attributes random)
   render_mild       each nuisance present with probability 0.5, strength U(0, 0.4)
   render_heavy      each nuisance present with probability 0.7, strength U(0.3, 1)
   render_wrong      one specified attribute replaced by a wrong value, plus mild nuisances
   base_model        ``base_sampler(captions)`` if one is given (the project's base UNet)
   ================  ===========================================================================================

3. images are quantised to 8 bits (what the PNG stores), scored by the gold reward ``g``, and labelled by a
   Bradley-Terry draw ``P(image 0 preferred) = sigmoid((g_0 - g_1) / T)``; pairs with ``|g_0 - g_1| < tie_margin``
   are ties and are dropped;
4. the temperature ``T`` is calibrated (bisection) so that the *expected* agreement of the labels with the gold
   ordering, ``mean sigmoid(|g_0 - g_1| / T)``, equals ``target_agreement`` (default 0.7; Pick-a-Pic's raters
   disagree often) on a calibration sample of pairs from the same zoo;
5. pairs are written with :func:`rlkit_diffusion.data.pickapic.write_pairs`; the generator names go in the extra
   columns ``model_0``/``model_1`` and the gold scores in ``gold_0``/``gold_1`` (analysis only; the reader ignores
   them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlkit_diffusion.checkpoint import atomic_write_json
from rlkit_diffusion.data.pickapic import write_pairs
from rlkit_diffusion.worlds.shapes.captions import caption_targets, sample_captions
from rlkit_diffusion.worlds.shapes.gold import GoldShapesReward
from rlkit_diffusion.worlds.shapes.render import ATTRIBUTES, render, sample_scenes

BaseSampler = Callable[[list[str]], Tensor]

# name -> (p_nuisance, strength range, wrong attribute)
RENDER_ZOO: dict[str, tuple[float, tuple[float, float], bool]] = {
    "render_clean": (0.0, (0.0, 0.0), False),
    "render_mild": (0.5, (0.0, 0.4), False),
    "render_heavy": (0.7, (0.3, 1.0), False),
    "render_wrong": (0.5, (0.0, 0.4), True),
}
DEFAULT_ZOO_WEIGHTS: dict[str, float] = {
    "render_clean": 0.15,
    "render_mild": 0.35,
    "render_heavy": 0.25,
    "render_wrong": 0.25,
}
BASE_MODEL = "base_model"


@dataclass
class PairSet:
    """N generated pairs before writing.

    Attributes:
        captions: N prompts.
        images_0, images_1: (N, 3, 16, 16) images in [0, 1], quantised to multiples of 1/255.
        model_0, model_1: N generator names.
        gold_0, gold_1: (N,) gold rewards.
        label_0: (N,) 1.0 if image 0 is preferred, 0.0 if image 1 is, 0.5 for a tie.
    """

    captions: list[str]
    images_0: Tensor
    images_1: Tensor
    model_0: list[str]
    model_1: list[str]
    gold_0: Tensor
    gold_1: Tensor
    label_0: Tensor

    def __len__(self) -> int:
        return len(self.captions)

    def select(self, index: Tensor) -> PairSet:
        """Subset by a (K,) long index or (N,) bool mask."""
        idx = torch.nonzero(index)[:, 0] if index.dtype == torch.bool else index
        rows = idx.tolist()
        return PairSet(
            captions=[self.captions[i] for i in rows],
            images_0=self.images_0[idx],
            images_1=self.images_1[idx],
            model_0=[self.model_0[i] for i in rows],
            model_1=[self.model_1[i] for i in rows],
            gold_0=self.gold_0[idx],
            gold_1=self.gold_1[idx],
            label_0=self.label_0[idx],
        )

    def drop_ties(self) -> PairSet:
        return self.select(self.label_0 != 0.5)

    def agreement(self) -> float:
        """Fraction of (non-tied) labels that prefer the image with the higher gold reward."""
        return label_agreement(self.gold_0, self.gold_1, self.label_0)

    def write(self, path: str | Path) -> Path:
        """Write as Pick-a-Pic v2 parquet (PNG images) with ``model_*`` and ``gold_*`` extra columns."""
        return write_pairs(
            path,
            self.captions,
            self.images_0,
            self.images_1,
            self.label_0,
            extra_columns={
                "model_0": self.model_0,
                "model_1": self.model_1,
                "gold_0": self.gold_0.tolist(),
                "gold_1": self.gold_1.tolist(),
            },
        )


def label_agreement(gold_0: Tensor, gold_1: Tensor, label_0: Tensor) -> float:
    """Fraction of labels that agree with the gold ordering (ties and equal gold scores excluded).

    Args:
        gold_0, gold_1: (N,) gold rewards of the two images.
        label_0: (N,) labels of image 0 in {0, 0.5, 1}.
    """
    keep = (label_0 != 0.5) & (gold_0 != gold_1)
    if not bool(keep.any()):
        raise ValueError("label_agreement: no untied pair with different gold rewards")
    agree = (label_0[keep] == 1.0) == (gold_0[keep] > gold_1[keep])
    return float(agree.float().mean())


def expected_agreement(gold_diff: Tensor, temperature: float) -> float:
    """Expected agreement of Bradley-Terry labels with the gold ordering: ``mean sigmoid(|diff| / T)``."""
    return float(torch.sigmoid(gold_diff.abs() / temperature).mean())


def calibrate_temperature(gold_diff: Tensor, target_agreement: float = 0.7) -> float:
    """Bradley-Terry temperature T with ``expected_agreement(gold_diff, T) == target_agreement`` (bisection on log T).

    Args:
        gold_diff: (N,) gold differences of untied pairs.
        target_agreement: in (0.5, 1).
    """
    if not 0.5 < target_agreement < 1.0:
        raise ValueError(f"calibrate_temperature: target_agreement must be in (0.5, 1), got {target_agreement}")
    low, high = math.log(1e-4), math.log(1e4)  # agreement decreases with T
    for _ in range(100):
        mid = 0.5 * (low + high)
        if expected_agreement(gold_diff, math.exp(mid)) > target_agreement:
            low = mid
        else:
            high = mid
    return math.exp(0.5 * (low + high))


def _wrong_attribute_targets(targets: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """Targets with one specified attribute per caption replaced by a different value (vectorised)."""
    names = list(ATTRIBUTES)
    specified = torch.stack([targets[a] >= 0 for a in names], -1).float()  # (B, A)
    specified[specified.sum(-1) == 0] = 1.0  # a caption specifying nothing: change any attribute
    chosen = torch.multinomial(specified, 1, generator=generator)[:, 0]  # (B,)
    out = {}
    for j, name in enumerate(names):
        n_values = len(ATTRIBUTES[name])
        current = targets[name]
        shift = torch.randint(1, n_values, current.shape, generator=generator)
        base = torch.where(current >= 0, current, torch.randint(n_values, current.shape, generator=generator))
        out[name] = torch.where(chosen == j, (base + shift) % n_values, current)
    return out


def _quantise(images: Tensor) -> Tensor:
    return (images.clamp(0.0, 1.0) * 255).round() / 255


def render_zoo(
    captions: Sequence[str], generators: Sequence[str], generator: torch.Generator, base_sampler: BaseSampler | None
) -> Tensor:
    """One image per caption from the named zoo generator; (B, 3, 16, 16) quantised to 8 bits."""
    targets = caption_targets(list(captions))
    images: Tensor | None = None
    for name in sorted(set(generators)):
        rows = torch.tensor([i for i, g in enumerate(generators) if g == name], dtype=torch.long)
        subset = [captions[i] for i in rows.tolist()]
        if name == BASE_MODEL:
            if base_sampler is None:
                raise ValueError("render_zoo: generator 'base_model' needs a base_sampler")
            out = base_sampler(subset).detach().float().cpu()
        elif name in RENDER_ZOO:
            p_nuisance, strength, wrong = RENDER_ZOO[name]
            fixed = {a: t[rows] for a, t in targets.items()}
            if wrong:
                fixed = _wrong_attribute_targets(fixed, generator)
            spec = sample_scenes(len(rows), generator, p_nuisance=p_nuisance, strength=strength, fixed=fixed)
            out = render(spec, generator)
        else:
            raise ValueError(f"render_zoo: unknown generator {name!r}; expected {sorted(RENDER_ZOO)} or {BASE_MODEL}")
        if out.shape[0] != len(rows):
            raise ValueError(f"render_zoo: generator {name!r} returned {out.shape[0]} images for {len(rows)} captions")
        if images is None:
            images = torch.empty(len(captions), *out.shape[1:])
        images[rows] = out
    assert images is not None
    return _quantise(images)


def _zoo(weights: Mapping[str, float] | None, base_sampler: BaseSampler | None, base_weight: float) -> dict:
    zoo = dict(DEFAULT_ZOO_WEIGHTS if weights is None else weights)
    if base_sampler is not None and BASE_MODEL not in zoo:
        zoo = {k: v * (1 - base_weight) for k, v in zoo.items()}
        zoo[BASE_MODEL] = base_weight
    total = sum(zoo.values())
    return {k: v / total for k, v in zoo.items() if v > 0}


def generate_pairs(
    captions: Sequence[str],
    generator: torch.Generator,
    *,
    temperature: float,
    gold: GoldShapesReward | None = None,
    zoo_weights: Mapping[str, float] | None = None,
    base_sampler: BaseSampler | None = None,
    base_weight: float = 0.5,
    tie_margin: float = 0.01,
    chunk_size: int = 4096,
) -> PairSet:
    """One labelled pair per caption (ties kept with label 0.5; see :meth:`PairSet.drop_ties`).

    Args:
        captions: N prompts.
        generator: CPU generator for every random draw (zoo choice, renders, labels).
        temperature: Bradley-Terry temperature on the gold scale.
        gold: the gold reward (default ``GoldShapesReward()``).
        zoo_weights: probabilities of the render generators, default ``DEFAULT_ZOO_WEIGHTS``.
        base_sampler: optional ``captions -> (B, 3, 16, 16)`` sampler of the base model, drawn with probability
            ``base_weight`` (the render generators share the rest).
        base_weight: see ``base_sampler``.
        tie_margin: pairs with ``|g_0 - g_1| < tie_margin`` are ties.
        chunk_size: captions rendered and scored at a time.
    """
    gold = gold or GoldShapesReward()
    zoo = _zoo(zoo_weights, base_sampler, base_weight)
    names = list(zoo)
    probs = torch.tensor([zoo[k] for k in names])
    parts = []
    for start in range(0, len(captions), chunk_size):
        chunk = list(captions[start : start + chunk_size])
        n = len(chunk)
        pick = torch.multinomial(probs, 2 * n, replacement=True, generator=generator).view(2, n)
        model_0 = [names[i] for i in pick[0].tolist()]
        model_1 = [names[i] for i in pick[1].tolist()]
        images_0 = render_zoo(chunk, model_0, generator, base_sampler)
        images_1 = render_zoo(chunk, model_1, generator, base_sampler)
        gold_0, gold_1 = gold(images_0, chunk).cpu(), gold(images_1, chunk).cpu()
        p_0 = torch.sigmoid((gold_0 - gold_1) / temperature)  # Bradley-Terry
        label_0 = (torch.rand(n, generator=generator) < p_0).float()
        label_0 = torch.where((gold_0 - gold_1).abs() < tie_margin, 0.5, label_0)
        parts.append(PairSet(chunk, images_0, images_1, model_0, model_1, gold_0, gold_1, label_0))
    if not parts:
        raise ValueError("generate_pairs: no captions")
    return PairSet(
        captions=[c for p in parts for c in p.captions],
        images_0=torch.cat([p.images_0 for p in parts]),
        images_1=torch.cat([p.images_1 for p in parts]),
        model_0=[m for p in parts for m in p.model_0],
        model_1=[m for p in parts for m in p.model_1],
        gold_0=torch.cat([p.gold_0 for p in parts]),
        gold_1=torch.cat([p.gold_1 for p in parts]),
        label_0=torch.cat([p.label_0 for p in parts]),
    )


def split_captions(n_train: int, n_val_captions: int, seed: int) -> tuple[list[str], list[str]]:
    """Training captions (N draws, repeats allowed) and ``n_val_captions`` unique validation captions, disjoint.

    Both come from the training caption distribution of ``captions.sample_captions``; no held-out caption
    (unseen combination or paraphrase) is in either.
    """
    rng = random.Random(f"shapes-pairs-{seed}")
    val: dict[str, None] = {}
    while len(val) < n_val_captions:
        for caption in sample_captions(4 * n_val_captions, rng):
            val.setdefault(caption.text)
            if len(val) == n_val_captions:
                break
    train: list[str] = []
    while len(train) < n_train:
        train.extend(c.text for c in sample_captions(n_train, rng) if c.text not in val)
    return train[:n_train], list(val)


def calibration_temperature(
    seed: int,
    target_agreement: float = 0.7,
    n_pairs: int = 4096,
    tie_margin: float = 0.01,
    **generate_kwargs: object,
) -> float:
    """Temperature from a calibration sample of ``n_pairs`` pairs of the same zoo (its own seed stream)."""
    captions, _ = split_captions(n_pairs, 0, seed + 7919)
    generator = torch.Generator().manual_seed(seed + 7919)
    sample = generate_pairs(captions, generator, temperature=1.0, tie_margin=tie_margin, **generate_kwargs)
    diff = sample.gold_0 - sample.gold_1
    return calibrate_temperature(diff[diff.abs() >= tie_margin], target_agreement)


def make_shapes_pairs(
    out_dir: str | Path,
    *,
    n_train_pairs: int = 20_000,
    n_val_captions: int = 500,
    seed: int = 0,
    temperature: float | None = None,
    target_agreement: float = 0.7,
    tie_margin: float = 0.01,
    base_sampler: BaseSampler | None = None,
    base_weight: float = 0.5,
    zoo_weights: Mapping[str, float] | None = None,
) -> dict[str, object]:
    """Generate and write ``train.parquet`` and ``val.parquet`` (+ ``pairs_stats.json``) into ``out_dir``.

    The validation split has one untied pair for each of its ``n_val_captions`` unique captions (tied pairs are
    redrawn); the training split keeps its untied pairs (ties are dropped and counted).

    Returns:
        Statistics: paths, temperature, label agreement with the gold ordering (train and val), tie counts, the
        expected agreement, and the generator mix.
    """
    out_dir = Path(out_dir)
    kwargs = {"zoo_weights": zoo_weights, "base_sampler": base_sampler, "base_weight": base_weight}
    if temperature is None:
        temperature = calibration_temperature(seed, target_agreement, tie_margin=tie_margin, **kwargs)
    train_captions, val_captions = split_captions(n_train_pairs, n_val_captions, seed)
    generator = torch.Generator().manual_seed(seed)
    train = generate_pairs(train_captions, generator, temperature=temperature, tie_margin=tie_margin, **kwargs)
    train_ties = int((train.label_0 == 0.5).sum())
    train = train.drop_ties()

    val = generate_pairs(val_captions, generator, temperature=temperature, tie_margin=tie_margin, **kwargs)
    val_ties = int((val.label_0 == 0.5).sum())
    for _ in range(20):  # redraw tied validation pairs so every validation caption keeps one pair
        tied = torch.nonzero(val.label_0 == 0.5)[:, 0]
        if tied.numel() == 0:
            break
        redraw = generate_pairs(
            [val.captions[i] for i in tied.tolist()],
            generator,
            temperature=temperature,
            tie_margin=tie_margin,
            **kwargs,
        )
        for j, i in enumerate(tied.tolist()):
            val.images_0[i], val.images_1[i] = redraw.images_0[j], redraw.images_1[j]
            val.model_0[i], val.model_1[i] = redraw.model_0[j], redraw.model_1[j]
            val.gold_0[i], val.gold_1[i], val.label_0[i] = redraw.gold_0[j], redraw.gold_1[j], redraw.label_0[j]
    val = val.drop_ties()

    diff = torch.cat([train.gold_0 - train.gold_1, val.gold_0 - val.gold_1])
    models = train.model_0 + train.model_1
    stats: dict[str, object] = {
        "train_path": str(train.write(out_dir / "train.parquet")),
        "val_path": str(val.write(out_dir / "val.parquet")),
        "seed": seed,
        "temperature": temperature,
        "target_agreement": target_agreement,
        "expected_agreement": expected_agreement(diff, temperature),
        "train_agreement": train.agreement(),
        "val_agreement": val.agreement(),
        "train_pairs": len(train),
        "train_ties_dropped": train_ties,
        "val_pairs": len(val),
        "val_unique_captions": len(set(val.captions)),
        "val_ties_redrawn": val_ties,
        "generator_mix": {name: models.count(name) / len(models) for name in sorted(set(models))},
    }
    atomic_write_json(out_dir / "pairs_stats.json", stats)
    return stats


__all__ = [
    "BASE_MODEL",
    "DEFAULT_ZOO_WEIGHTS",
    "RENDER_ZOO",
    "PairSet",
    "calibrate_temperature",
    "calibration_temperature",
    "expected_agreement",
    "generate_pairs",
    "label_agreement",
    "make_shapes_pairs",
    "render_zoo",
    "split_captions",
]
