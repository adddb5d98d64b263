"""Training of the `shapes` world's learned rewards, the PickScore recipe at toy scale.

Three stages (all deterministic from ``seed`` on the CPU):

(a) **Contrastive pre-training** of a tiny ``open_clip.CLIP`` on fresh renders and their captions, with nuisance
    factors in the images (blur, noise, clutter, ... as a web-scale CLIP would see them). Symmetric InfoNCE, i.e.
    ``open_clip.ClipLoss``::

        L_clip = 1/2 [ CE(exp(t) U_I U_T^T, I) + CE(exp(t) U_T U_I^T, I) ]

    with ``U_I``, ``U_T`` the (B, E) unit embeddings of a batch of B matching (image, caption) pairs and ``t`` the
    learned log-temperature, clamped to ``t <= ln 100`` as in open_clip's training script.
(b) **Bradley-Terry fine-tuning** of a copy on the training preference pairs (Diffusion-DPO eq. 4; PickScore's
    objective with hard labels)::

        L_BT = -E_{(c, x_w, x_l)} log sigmoid( s(c, x_w) - s(c, x_l) ),   s(c, x) = exp(t) <u_I(x), u_T(c)>

    A dev split carved from the *training* pairs picks the checkpoint (evaluated every ``eval_every`` steps); the
    validation pairs are only reported.
(c) **Aesthetic head**: an MLP on the frozen contrastive image embedding regressing ``10 * q(x)`` (the gold
    reward's quality component) on the training pairs' images, by mean squared error.

:func:`train_proxy` runs the three stages, saves the weights (:func:`~rlkit_diffusion.worlds.shapes.proxy.
save_proxy_models`), reloads them and reports preference accuracies on the validation pairs for the proxy, the CLIP
score, the aesthetic head and the gold reward itself (the gold reward's accuracy against the labels *is* the
label/gold agreement, the ceiling set by label noise), plus every head's agreement with the gold ordering on pairs
for held-out captions (unseen combinations and paraphrases; their unseen words are ``<unk>`` to the proxy).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlkit_diffusion.checkpoint import atomic_write_json
from rlkit_diffusion.data.pickapic import PreferencePairDataset
from rlkit_diffusion.worlds.shapes.captions import all_canonical_captions, sample_captions, scenes_for_captions
from rlkit_diffusion.worlds.shapes.gold import GoldShapesReward
from rlkit_diffusion.worlds.shapes.optim import AdamWStage
from rlkit_diffusion.worlds.shapes.pairs import generate_pairs
from rlkit_diffusion.worlds.shapes.proxy import (
    WEIGHT_FILES,
    ProxyModelConfig,
    ShapesTokenizer,
    build_aesthetic_head,
    build_clip,
    build_vocabulary,
    image_embeddings,
    load_proxy_rewards,
    proxy_rewards,
    save_proxy_models,
    text_embeddings,
)
from rlkit_diffusion.worlds.shapes.render import render

ScoreFn = Callable[[Tensor, Sequence[str]], Tensor]


@dataclasses.dataclass
class ProxyTrainConfig:
    """Hyper-parameters of :func:`train_proxy` (defaults: the shipped weights; ``quick()``: a smoke test).

    Stage (a) is contrastive CLIP pre-training on renders, stage (b) Bradley–Terry tuning on the training pairs,
    stage (c) the aesthetic head on frozen image embeddings. Each is an `AdamWStage` (AdamW, linear warm-up, cosine
    decay); the shipped ``config.json`` records them under the flat names of its time (``clip_steps``, ...)."""

    clip: AdamWStage = dataclasses.field(
        default_factory=lambda: AdamWStage(steps=1600, batch_size=128, lr=2e-3, weight_decay=0.1, warmup=100)
    )
    """Stage (a): a batch is that many renders (the contrastive batch)."""
    p_nuisance: float = 0.5
    """Probability of each nuisance factor in a pre-training render (strength U(0, 1))."""
    bt: AdamWStage = dataclasses.field(
        default_factory=lambda: AdamWStage(steps=800, batch_size=64, lr=1e-4, warmup=50)
    )
    """Stage (b): a batch is that many training pairs."""
    dev_pairs: int = 1000
    """Training pairs held out of stage (b) to select its checkpoint and to score stage (c)."""
    eval_every: int = 100
    """Stage (b) steps between dev evaluations."""
    aesthetic_images: int = 20_000
    """Training-pair images used in stage (c) (at most twice the number of pairs)."""
    aesthetic: AdamWStage = dataclasses.field(default_factory=lambda: AdamWStage(steps=2000, batch_size=256, lr=1e-3))
    """Stage (c): a batch is that many image embeddings; no warm-up, no weight decay."""
    heldout_pairs: int = 1000
    """Pairs for held-out captions generated for the transfer report (0 skips it)."""
    architecture: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of :class:`ProxyModelConfig` fields (not ``vocabulary``)."""

    @classmethod
    def quick(cls) -> ProxyTrainConfig:
        """A few steps of everything (tests)."""
        return cls(
            clip=AdamWStage(steps=6, batch_size=16, lr=2e-3, weight_decay=0.1, warmup=2),
            bt=AdamWStage(steps=6, batch_size=8, lr=1e-4, warmup=2),
            dev_pairs=8,
            eval_every=3,
            aesthetic_images=64,
            aesthetic=AdamWStage(steps=10, batch_size=32, lr=1e-3),
            heldout_pairs=16,
        )


def _clamp_logit_scale(model: open_clip.CLIP) -> None:
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(100.0))


def pretrain_contrastive(
    model: open_clip.CLIP,
    tokenizer: ShapesTokenizer,
    config: ProxyTrainConfig,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Stage (a): symmetric InfoNCE on fresh (render, caption) batches; trains ``model`` in place.

    Returns:
        ``clip_loss`` (mean of the last 10% of steps) and ``clip_batch_top1`` (image-to-caption top-1 accuracy within
        the batch over the same steps; identical captions in a batch make this an underestimate).
    """
    rng = random.Random(f"shapes-proxy-clip-{seed}")
    generator = torch.Generator().manual_seed(seed)
    loss_fn = open_clip.ClipLoss()
    optimiser, scheduler = config.clip.optimizer(model.parameters())
    model.train()
    tail = max(1, config.clip.steps // 10)
    losses, top1 = [], []
    for step in range(config.clip.steps):
        captions = [c.text for c in sample_captions(config.clip.batch_size, rng)]
        scenes = scenes_for_captions(captions, generator, p_nuisance=config.p_nuisance)
        images = render(scenes, generator).to(device)  # (B, 3, 16, 16)
        u_image = image_embeddings(model, images)  # (B, E)
        u_text = text_embeddings(model, tokenizer(captions).to(device))  # (B, E)
        loss = loss_fn(u_image, u_text, model.logit_scale.exp())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        _clamp_logit_scale(model)
        if step >= config.clip.steps - tail:
            losses.append(loss.item())
            hits = (u_image @ u_text.T).argmax(-1) == torch.arange(len(captions), device=device)
            top1.append(hits.float().mean().item())
    model.eval()
    return {"clip_loss": sum(losses) / len(losses), "clip_batch_top1": sum(top1) / len(top1)}


def pick_scores(model: open_clip.CLIP, tokenizer: ShapesTokenizer, images: Tensor, captions: Sequence[str]) -> Tensor:
    """``s(c, x) = exp(t) <u_I(x), u_T(c)>``: (B,) PickScore-form scores with gradients to the model."""
    device = model.logit_scale.device
    u_text = text_embeddings(model, tokenizer(captions).to(device))  # (B, E)
    u_image = image_embeddings(model, images.to(device))  # (B, E)
    return model.logit_scale.exp() * (u_image * u_text).sum(-1)


def preference_accuracy(score: ScoreFn, dataset: PreferencePairDataset, batch_size: int = 512) -> float:
    """Fraction of pairs with ``score(x_w) > score(x_l)`` (a tie counts 1/2), scored without gradient."""
    correct = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            captions = dataset.captions[start : start + batch_size]
            s_w = score(dataset.x_w[start : start + batch_size], captions).cpu()
            s_l = score(dataset.x_l[start : start + batch_size], captions).cpu()
            correct += float((s_w > s_l).sum()) + 0.5 * float((s_w == s_l).sum())
    return correct / len(dataset)


def finetune_bradley_terry(
    model: open_clip.CLIP,
    tokenizer: ShapesTokenizer,
    train: PreferencePairDataset,
    dev: PreferencePairDataset,
    config: ProxyTrainConfig,
    seed: int,
) -> dict[str, float]:
    """Stage (b): ``L_BT = -log sigmoid(s(c, x_w) - s(c, x_l))`` on ``train``; keeps the best checkpoint on ``dev``.

    Returns:
        ``bt_loss`` (last 10% of steps), ``bt_best_step``, ``dev_acc_proxy`` (best) and ``dev_acc_clip`` (step 0).
    """
    score = lambda images, captions: pick_scores(model, tokenizer, images, captions)  # noqa: E731
    batcher = train.batcher(seed)
    optimiser, scheduler = config.bt.optimizer(model.parameters())
    model.eval()
    best_acc = start_acc = preference_accuracy(score, dev)
    best_step, best_state = 0, copy.deepcopy(model.state_dict())
    tail = max(1, config.bt.steps // 10)
    losses = []
    model.train()
    for step in range(1, config.bt.steps + 1):
        captions, x_w, x_l = batcher.next_batch(config.bt.batch_size)
        b = len(captions)
        scores = pick_scores(model, tokenizer, torch.cat([x_w, x_l]), captions + captions)  # (2B,)
        loss = -F.logsigmoid(scores[:b] - scores[b:]).mean()  # eq. 4
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        _clamp_logit_scale(model)
        if step > config.bt.steps - tail:
            losses.append(loss.item())
        if step % config.eval_every == 0 or step == config.bt.steps:
            model.eval()
            acc = preference_accuracy(score, dev)
            model.train()
            if acc > best_acc:
                best_acc, best_step, best_state = acc, step, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return {
        "bt_loss": sum(losses) / len(losses),
        "bt_best_step": best_step,
        "dev_acc_proxy": best_acc,
        "dev_acc_before_bt": start_acc,
    }


def _embed(model: open_clip.CLIP, images: Tensor, batch_size: int = 1024) -> Tensor:
    with torch.no_grad():
        device = model.logit_scale.device
        return torch.cat(
            [image_embeddings(model, images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
        )


def _quality_targets(images: Tensor, gold: GoldShapesReward, batch_size: int = 4096) -> Tensor:
    """``10 * q(x)``: (N,) gold quality on a 0-10 scale (quality does not depend on the caption)."""
    parts = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        parts.append(gold.components(chunk, ["a circle"] * len(chunk))["quality"].cpu())
    return 10.0 * torch.cat(parts)


def fit_aesthetic_head(
    head: nn.Module,
    clip: open_clip.CLIP,
    train: PreferencePairDataset,
    dev: PreferencePairDataset,
    config: ProxyTrainConfig,
    seed: int,
    gold: GoldShapesReward,
) -> dict[str, float]:
    """Stage (c): ``min E (MLP(u_I(x)) - 10 q(x))^2`` over training-pair images, with the image tower frozen.

    Returns:
        ``aesthetic_train_mse`` and ``aesthetic_dev_r2`` (coefficient of determination on the dev pairs' images).
    """
    n_pairs = min(len(train), (config.aesthetic_images + 1) // 2)
    images = torch.cat([train.x_w[:n_pairs], train.x_l[:n_pairs]])  # (2n, 3, H, W)
    dev_images = torch.cat([dev.x_w, dev.x_l])
    features, dev_features = _embed(clip, images), _embed(clip, dev_images)  # (2n, E), (2m, E)
    device = features.device
    targets = _quality_targets(images, gold).to(device)
    dev_targets = _quality_targets(dev_images, gold).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimiser, scheduler = config.aesthetic.optimizer(head.parameters())
    head.train()
    for _ in range(config.aesthetic.steps):
        index = torch.randint(len(features), (config.aesthetic.batch_size,), generator=generator).to(device)
        loss = F.mse_loss(head(features[index])[:, 0], targets[index])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
    head.eval()
    with torch.no_grad():
        train_mse = F.mse_loss(head(features)[:, 0], targets).item()
        dev_mse = F.mse_loss(head(dev_features)[:, 0], dev_targets).item()
    dev_var = dev_targets.var(unbiased=False).item()
    return {"aesthetic_train_mse": train_mse, "aesthetic_dev_r2": 1.0 - dev_mse / max(dev_var, 1e-12)}


def _split_dev(
    dataset: PreferencePairDataset, n_dev: int, seed: int
) -> tuple[PreferencePairDataset, PreferencePairDataset]:
    """Random disjoint (train, dev) subsets of the training pairs."""
    if not 0 < n_dev < len(dataset):
        raise ValueError(f"train_proxy: dev_pairs={n_dev} must be in (0, {len(dataset)}) (the training pairs)")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 1))
    parts = []
    for index in (order[n_dev:], order[:n_dev]):
        rows = index.tolist()
        parts.append(
            PreferencePairDataset([dataset.captions[i] for i in rows], dataset.x_w[index], dataset.x_l[index])
        )
    return parts[0], parts[1]


def gold_order_agreement(
    score: ScoreFn, captions: Sequence[str], x_0: Tensor, x_1: Tensor, g_0: Tensor, g_1: Tensor
) -> float:
    """Fraction of pairs (with ``g_0 != g_1``) that ``score`` orders as the gold reward does."""
    keep = g_0 != g_1
    with torch.no_grad():
        s_0, s_1 = score(x_0, captions).cpu(), score(x_1, captions).cpu()
    return float(((s_0 - s_1).sign() == (g_0 - g_1).sign())[keep].float().mean())


def train_proxy(
    pairs_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    quick: bool = False,
    config: ProxyTrainConfig | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train the proxy, CLIP-score and aesthetic rewards on ``pairs_dir`` and save them into ``out_dir``.

    Args:
        pairs_dir: directory with Pick-a-Pic-format ``train.parquet`` and ``val.parquet`` (``make_shapes_pairs``).
        out_dir: output directory: ``config.json``, ``clip/proxy/aesthetic.safetensors``, ``metrics.json``.
        seed: seed of the initialisation and of every random draw.
        quick: a few steps of everything (``ProxyTrainConfig.quick()``) unless ``config`` is given.
        config: explicit hyper-parameters.
        device: training device (renders and parquet images are made on the CPU and moved).

    Returns:
        The metrics also written to ``metrics.json``: validation preference accuracies ``val_acc_<head>`` (against
        the labels) for proxy, clip, aesthetic and gold; ``val_gold_order_acc_<head>`` (against the gold ordering);
        ``heldout_gold_order_acc_<head>`` on pairs for held-out captions; stage losses; times; file sizes;
        ``reload_max_abs_diff`` between the in-memory and the reloaded rewards (0 when saving is exact).
    """
    config = config or (ProxyTrainConfig.quick() if quick else ProxyTrainConfig())
    pairs_dir, out_dir = Path(pairs_dir), Path(out_dir)
    times: dict[str, float] = {}
    start = time.perf_counter()
    pairs = PreferencePairDataset.from_parquet(pairs_dir / "train.parquet")
    val = PreferencePairDataset.from_parquet(pairs_dir / "val.parquet")
    train, dev = _split_dev(pairs, config.dev_pairs, seed)
    grammar = [c.text for c in all_canonical_captions("train")]
    model_config = ProxyModelConfig(vocabulary=build_vocabulary(grammar + pairs.captions), **config.architecture)
    tokenizer = ShapesTokenizer(model_config.vocabulary, model_config.context_length)
    gold = GoldShapesReward()
    times["seconds_load"] = time.perf_counter() - start

    metrics: dict[str, Any] = {"seed": seed, "train_pairs": len(train), "dev_pairs": len(dev), "val_pairs": len(val)}
    torch.manual_seed(seed)
    clip = build_clip(model_config).to(device)
    metrics["params_clip"] = sum(p.numel() for p in clip.parameters())
    t = time.perf_counter()
    metrics.update(pretrain_contrastive(clip, tokenizer, config, seed, device))
    times["seconds_contrastive"] = time.perf_counter() - t

    t = time.perf_counter()
    proxy = copy.deepcopy(clip)
    metrics.update(finetune_bradley_terry(proxy, tokenizer, train, dev, config, seed))
    times["seconds_bradley_terry"] = time.perf_counter() - t

    t = time.perf_counter()
    head = build_aesthetic_head(model_config).to(device)
    metrics.update(fit_aesthetic_head(head, clip, train, dev, config, seed, gold))
    times["seconds_aesthetic"] = time.perf_counter() - t
    times["seconds_train_total"] = time.perf_counter() - start

    # Save, reload, and measure what ships.
    training = {"seed": seed, "pairs_dir": str(pairs_dir), "config": dataclasses.asdict(config)}
    save_proxy_models(out_dir, model_config, clip, proxy, head, extra={"training": training})
    in_memory = proxy_rewards(model_config, clip, proxy, head)
    rewards = load_proxy_rewards(out_dir, device)
    probe = val.x_w[:64], val.captions[:64]
    with torch.no_grad():
        diffs = [(in_memory[k](*probe) - rewards[k](*probe)).abs().max().item() for k in rewards]
    metrics["reload_max_abs_diff"] = max(diffs)

    t = time.perf_counter()
    scorers: dict[str, ScoreFn] = {**rewards, "gold": gold}
    for name, score in scorers.items():
        metrics[f"val_acc_{name}"] = preference_accuracy(score, val)
    with torch.no_grad():
        g_w, g_l = gold(val.x_w, val.captions), gold(val.x_l, val.captions)
    for name, score in rewards.items():
        metrics[f"val_gold_order_acc_{name}"] = gold_order_agreement(score, val.captions, val.x_w, val.x_l, g_w, g_l)
    metrics["val_label_gold_agreement"] = float((g_w > g_l)[g_w != g_l].float().mean())
    if config.heldout_pairs > 0:
        captions = [c.text for c in sample_captions(config.heldout_pairs, random.Random(seed), split="heldout")]
        held = generate_pairs(captions, torch.Generator().manual_seed(seed), temperature=1.0, gold=gold)
        for name, score in rewards.items():
            metrics[f"heldout_gold_order_acc_{name}"] = gold_order_agreement(
                score, held.captions, held.images_0, held.images_1, held.gold_0, held.gold_1
            )
    times["seconds_eval"] = time.perf_counter() - t
    metrics.update(times)
    sizes = {name: (out_dir / file).stat().st_size for name, file in WEIGHT_FILES.items()}
    metrics.update({f"bytes_{name}": size for name, size in sizes.items()})
    metrics["bytes_total"] = sum(sizes.values()) + (out_dir / "config.json").stat().st_size
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


__all__ = [
    "ProxyTrainConfig",
    "finetune_bradley_terry",
    "fit_aesthetic_head",
    "gold_order_agreement",
    "pick_scores",
    "preference_accuracy",
    "pretrain_contrastive",
    "train_proxy",
]
