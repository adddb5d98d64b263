"""The ``shapes`` world: a real text-to-image task that trains on a CPU in minutes (the benchmark's default).

It mirrors the Diffusion-DPO setting (SD + Pick-a-Pic + PickScore) at 16×16 pixels:

============================  ======================================================================================
paper                         shapes
============================  ======================================================================================
Stable Diffusion UNet         a ~2 M-parameter diffusers ``UNet2DConditionModel`` pretrained by the project
                              (`base_model`), pixel space x_0 ∈ [−1, 1]^{3×16×16}
CLIP text encoder (frozen)    all-MiniLM-L6-v2 (frozen, from PyPI), per-token states feed cross-attention
Pick-a-Pic v2 pairs           renders of the grammar at several corruption levels + base-model samples, labelled by
                              a Bradley–Terry draw on the gold reward (label noise ≈ Pick-a-Pic's), same columns
human raters (hidden)         ``gold``: pixel-measured prompt fidelity + image quality (`gold`)
PickScore                     ``proxy``: a tiny open_clip scorer, contrastive then Bradley–Terry fine-tuned
CLIP score / aesthetics       ``clip`` / ``aesthetic`` heads (AI feedback); ``jpeg`` compressibility (DDPO)
PartiPrompts / held-out       held-out captions: unseen (colour, shape) combinations and paraphrases
============================  ======================================================================================

Diversity is the entropy of the attributes a caption leaves unspecified, measured by the gold reward's attribute
read-out over the samples of one caption (not pixel distance, which noise inflates).
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlkit_diffusion.data.pickapic import PreferencePairDataset
from rlkit_diffusion.policy import DiffusionPolicy, FlowMatchingPolicy, UNetEpsModel
from rlkit_diffusion.rewards.jpeg import JpegReward
from rlkit_diffusion.worlds.base import World
from rlkit_diffusion.worlds.shapes.base_model import (
    BASE_DIR,
    FLOW_BASE_DIR,
    load_unet,
    make_flow_scheduler,
    make_scheduler,
    to_images,
    to_model_space,
)
from rlkit_diffusion.worlds.shapes.captions import (
    caption_targets,
    is_paraphrase,
    parse_caption,
    sample_captions,
    scenes_for_captions,
)
from rlkit_diffusion.worlds.shapes.gold import GoldShapesReward, measure
from rlkit_diffusion.worlds.shapes.render import ATTRIBUTES, COMPATIBLE, render
from rlkit_diffusion.worlds.shapes.text_encoder import SentenceEncoder

ASSETS = Path(__file__).parents[1] / "assets"
PAIRS_DIR = ASSETS / "shapes_pairs"
PROXY_DIR = ASSETS / "shapes_proxy"


class PairsInModelSpace:
    """A `PairSource` over a Pick-a-Pic-format dataset: images → x_0 in [−1, 1] on the world's device."""

    def __init__(self, batcher, device: torch.device):
        self.batcher, self.device = batcher, device

    def next_batch(self, batch_size: int) -> tuple[list[str], Tensor, Tensor]:
        captions, x_w, x_l = self.batcher.next_batch(batch_size)
        return list(captions), to_model_space(x_w).to(self.device), to_model_space(x_l).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)


def eval_prompts(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Fixed evaluation captions: ``n_train`` unique training-distribution captions and ``n_heldout`` held-out ones
    (half unseen combinations, half paraphrases). Deterministic in ``seed``; shared by every algorithm."""
    rng = random.Random(f"shapes-eval-{seed}")
    train: dict[str, None] = {}
    while len(train) < n_train:
        for c in sample_captions(n_train, rng, "train"):
            if len(train) < n_train:
                train.setdefault(c.text)
    held: dict[str, None] = {}
    for split in ("heldout_combo", "heldout_paraphrase"):
        want = len(held) + (n_heldout + 1) // 2 if split == "heldout_combo" else n_heldout
        while len(held) < want:
            for c in sample_captions(n_heldout, rng, split):
                if len(held) < want and c.text not in train:
                    held.setdefault(c.text)
    return list(train), list(held)


def attribute_entropy(images: Tensor, prompts: list[str]) -> float:
    """Mean entropy (nats) of each caption-unspecified attribute across that caption's samples.

    For each caption with ≥ 2 samples and each attribute the caption does not specify, the attribute of every
    sample is read by the gold reward's measurement; the entropy of the empirical distribution is averaged over
    (caption, attribute). 0 = mode collapse; log(#values) = uniform.
    """
    pred = measure(images.float()).predicted()
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    ents = []
    for p, rows in by_prompt.items():
        if len(rows) < 2:
            continue
        cap = parse_caption(p)
        for attr, values in pred.items():
            if getattr(cap, attr) is not None:
                continue
            counts = Counter(values[rows].tolist())
            n = len(rows)
            ents.append(-sum(c / n * math.log(c / n) for c in counts.values()))
    return float(sum(ents) / len(ents)) if ents else float("nan")


EDIT_ATTRIBUTES = ("colour", "shape", "background", "size", "position")
"""The attribute an SDEdit input gets wrong: the first of these that the caption specifies."""


def sdedit_scenes(prompts: list[str], seed: int, strength: tuple[float, float] = (0.2, 0.6)):
    """The scenes behind the SDEdit inputs (`sdedit_inputs`): each satisfies its caption except for the first
    specified attribute of ``EDIT_ATTRIBUTES`` (usually the colour: "a red circle" gets, say, a green circle), which
    takes another value (an object colour always stays visible on its background); every nuisance factor is present
    with a strength drawn from ``strength``. Deterministic in ``seed``. Returns ``(SceneSpec, edited attribute or
    None per caption)``."""
    g = torch.Generator().manual_seed(seed)
    spec = scenes_for_captions(prompts, g, p_nuisance=1.0, strength=strength)
    targets = caption_targets(prompts)
    fields = {name: getattr(spec, name).clone() for name in EDIT_ATTRIBUTES}
    edited: list[str | None] = [None] * len(prompts)
    for i in range(len(prompts)):
        for attr in EDIT_ATTRIBUTES:
            want = int(targets[attr][i])
            if want < 0:
                continue
            allowed = [v for v in range(len(ATTRIBUTES[attr])) if v != want]
            if attr == "colour":
                allowed = [v for v in allowed if COMPATIBLE[v, fields["background"][i]]]
            elif attr == "background":
                allowed = [v for v in allowed if COMPATIBLE[fields["colour"][i], v]]
            if allowed:
                fields[attr][i] = allowed[int(torch.randint(len(allowed), (1,), generator=g))]
                edited[i] = attr
                break
    return spec.replace(**fields), edited


def sdedit_inputs(prompts: list[str], seed: int) -> Tensor:
    """Inputs of ``eval.mode=sdedit`` on shapes (paper §5.3): corrupted renders that contradict their caption in one
    attribute (`sdedit_scenes`), so that the caption asks for a change. Returns (B, 3, 16, 16) in model space."""
    spec, _ = sdedit_scenes(prompts, seed)
    return to_model_space(render(spec, generator=torch.Generator().manual_seed(seed + 1)))


def prompt_categories(train: list[str], heldout: list[str]) -> dict[str, str]:
    """Categories of the evaluation captions for per-category win rates: training captions by how many attributes
    they specify (``2 attributes``), held-out captions as ``paraphrase`` or ``unseen colour+shape``."""
    out = {}
    for p in train:
        n = len(parse_caption(p).specified())
        out[p] = f"{n} attribute{'' if n == 1 else 's'}"
    out.update({p: "paraphrase" if is_paraphrase(p) else "unseen colour+shape" for p in heldout})
    return out


@dataclass
class ShapesSettings:
    """What the two shapes worlds share: everything but the base policy (the YAML keys of
    ``benchmarks/conf/world/shapes*.yaml``)."""

    weights: str | None = None
    """Directory of the base UNet (``save_pretrained`` layout); None: the shipped one of the world."""
    proxy_weights: str | None = None
    """Directory of the proxy/clip/aesthetic reward weights; None: the shipped one."""
    pairs_dir: str | None = None
    """Directory with ``train.parquet`` and ``val.parquet`` (Pick-a-Pic columns); None: the shipped one."""
    num_inference_steps: int = 20
    """Length of the sampling schedule."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale w."""
    n_train_prompts: int = 64
    """Size of the fixed training prompt set (online training and evaluation)."""
    n_heldout_prompts: int = 64
    """Size of the fixed held-out prompt set (evaluation)."""
    seed: int = 0
    """Seed of the prompt sets and of the pair batcher."""
    text_cache: str | None = None
    """Directory of the persistent caption-embedding cache (`SentenceEncoder` ``store``; None: memory only). A cache
    location, not a setting: the numbers are the same with and without it. `benchmarks.run` puts it under the
    evaluation cache (``<out_dir>/.eval_cache/text``) when ``eval.cache`` is on."""


@dataclass
class ShapesWorldConfig(ShapesSettings):
    """Settings of the ``shapes`` world (`build_shapes`)."""

    eta: float = 1.0
    """DDIM η (1 keeps every step a proper Gaussian policy, as DDPO needs)."""


@dataclass
class ShapesFlowWorldConfig(ShapesSettings):
    """Settings of the ``shapes_flow`` world (`build_shapes_flow`)."""

    sampler: str = "sde"
    """``sde`` (the Gaussian policy of Flow-GRPO, noise level a = ``noise_level``) or ``ode`` (Euler)."""
    noise_level: float = 0.7
    """a of the SDE sampler (`FlowMatchingPolicy`)."""


def build_shapes(
    config: ShapesWorldConfig | None = None, *, device: str | torch.device = "cpu", **settings: Any
) -> World:
    """Build the shapes world from the shipped (or given) base UNet, proxy reward weights and pairs.

    Args:
        config: the settings (`ShapesWorldConfig`); None: its defaults updated by ``settings``
            (``build_shapes(num_inference_steps=10)``).
        device: where the networks live.
    """
    cfg = _settings(ShapesWorldConfig, config, settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    policy = DiffusionPolicy(
        UNetEpsModel(load_unet(cfg.weights or BASE_DIR)),
        make_scheduler(),
        sampler="ddim",
        eta=cfg.eta,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
    )
    return _shapes_world("shapes", policy, device, cfg)


def build_shapes_flow(
    config: ShapesFlowWorldConfig | None = None, *, device: str | torch.device = "cpu", **settings: Any
) -> World:
    """shapes with a flow-matching base: the same UNet architecture and size, pretrained by the same recipe as a
    rectified-flow velocity model (``python -m benchmarks.prepare world=shapes_flow`` → ``assets/shapes_flow_base``),
    sampled by `FlowMatchingPolicy`; the captions, text encoder, gold and proxy rewards, preference pairs, prompts
    and evaluation are shapes' own, so ε-UNet and flow compare on one task.

    Args:
        config: the settings (`ShapesFlowWorldConfig`; ``weights`` None: the shipped ``assets/shapes_flow_base``);
            None: its defaults updated by ``settings``.
        device: where the networks live.
    """
    cfg = _settings(ShapesFlowWorldConfig, config, settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    policy = FlowMatchingPolicy(
        UNetEpsModel(load_unet(cfg.weights or FLOW_BASE_DIR, world="shapes_flow")),
        make_flow_scheduler(),
        sampler=cfg.sampler,
        noise_level=cfg.noise_level,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
    )
    return _shapes_world("shapes_flow", policy, device, cfg)


def _settings(kind: type, config: ShapesSettings | None, settings: dict[str, Any]) -> Any:
    """``config`` or ``kind(**settings)``: one way of giving the settings, not both."""
    if config is not None and settings:
        raise TypeError(f"give the settings as a {kind.__name__} or as keywords, not both (got {sorted(settings)})")
    return config if config is not None else kind(**settings)


def _shapes_world(name: str, policy: DiffusionPolicy, device: str | torch.device, cfg: ShapesSettings) -> World:
    """Everything of a shapes world but its base policy: encoder, rewards, prompts, pairs and extras."""
    proxy_weights, pairs_dir, seed = cfg.proxy_weights, cfg.pairs_dir, cfg.seed
    device = torch.device(device)
    policy = policy.to(device)
    encoder = SentenceEncoder(device=device, store=cfg.text_cache)
    rewards: dict[str, Any] = {
        "gold": GoldShapesReward(),
        "jpeg": JpegReward(incompressible=False),
        "jpeg_incompressibility": JpegReward(incompressible=True),
    }
    proxy_dir = Path(proxy_weights) if proxy_weights else PROXY_DIR
    if proxy_weights or (proxy_dir / "config.json").exists():
        from rlkit_diffusion.worlds.shapes.proxy import load_proxy_rewards

        rewards.update(load_proxy_rewards(proxy_dir, device))
    train_prompts, heldout_prompts = eval_prompts(cfg.n_train_prompts, cfg.n_heldout_prompts, seed)
    pdir = Path(pairs_dir) if pairs_dir else PAIRS_DIR
    pairs = val_pairs = None
    if pairs_dir or (pdir / "train.parquet").exists():
        for fname in ("train.parquet", "val.parquet"):
            if not (pdir / fname).exists():
                raise FileNotFoundError(
                    f"shapes pairs: {pdir / fname} not found (run `python -m benchmarks.prepare "
                    "world=shapes stage=pairs`)"
                )
        pairs = PairsInModelSpace(PreferencePairDataset.from_parquet(pdir / "train.parquet").batcher(seed), device)
        val_pairs = PairsInModelSpace(PreferencePairDataset.from_parquet(pdir / "val.parquet").batcher(seed), device)
    return World(
        name=name,
        policy=policy,
        encoder=encoder,
        sample_shape=(3, 16, 16),
        rewards=rewards,
        train_prompts=train_prompts,
        heldout_prompts=heldout_prompts,
        pairs=pairs,
        val_pairs=val_pairs,
        decode=to_images,
        encode=to_model_space,
        guidance_scale=policy.guidance_scale,
        extras={
            "diversity": lambda x0, prompts: attribute_entropy(to_images(x0), prompts),
            "sdedit_inputs": sdedit_inputs,
            "prompt_categories": prompt_categories(train_prompts, heldout_prompts),
        },
    )


def base_sampler(world: World, batch_size: int = 256, seed: int = 0):
    """``captions -> images (B, 3, 16, 16)`` from the world's base policy (for the pair zoo and the picture), sampled
    through `World.denoise` (the one wiring of the sampling loop) with one generator for the noise and the steps."""
    g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def sample(captions: list[str]) -> Tensor:
        out = []
        for s in range(0, len(captions), batch_size):
            chunk = list(captions[s : s + batch_size])
            x_T = torch.randn((len(chunk), *world.sample_shape), generator=g).to(world.device)
            x0 = world.denoise(world.policy, x_T, world.encoder(chunk), generator=g).x0
            out.append(world.decode(x0).cpu())
        return torch.cat(out)

    return sample
