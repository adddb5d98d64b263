"""The learned rewards of the `shapes` world: quick training, save/load round trip, gradient routing, bad weights."""

from __future__ import annotations

import copy
import json
import shutil

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rlkit_diffusion.rewards.base import checked_reward
from rlkit_diffusion.worlds.shapes.optim import AdamWStage, warmup_cosine
from rlkit_diffusion.worlds.shapes.pairs import make_shapes_pairs
from rlkit_diffusion.worlds.shapes.proxy import (
    EOT_ID,
    SOT_ID,
    UNK_ID,
    WEIGHT_FILES,
    ProxyModelConfig,
    ShapesTokenizer,
    build_clip,
    build_vocabulary,
    load_proxy_rewards,
    preprocess,
    save_proxy_models,
)
from rlkit_diffusion.worlds.shapes.proxy_train import train_proxy
from rlkit_diffusion.worlds.shapes.render import render, sample_scenes

torch.set_num_threads(1)

HEADS = ("proxy", "clip", "aesthetic")
PROMPTS = ["a red circle", "a small blue square at the top on a gray background", "a crimson disc", "a cross"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quick training on a tiny pair set: (output directory, returned metrics)."""
    root = tmp_path_factory.mktemp("proxy")
    make_shapes_pairs(root / "pairs", n_train_pairs=48, n_val_captions=12, seed=0, temperature=1.0)
    metrics = train_proxy(root / "pairs", root / "out", seed=0, quick=True)
    return root / "out", metrics


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return render(sample_scenes(len(PROMPTS), g), g)  # (4, 3, 16, 16)


def test_quick_training_writes_files_and_metrics(trained):
    out, metrics = trained
    for file in [*WEIGHT_FILES.values(), "config.json", "metrics.json"]:
        assert (out / file).is_file(), file
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for head in (*HEADS, "gold"):
        assert 0.0 <= metrics[f"val_acc_{head}"] <= 1.0
    assert metrics["reload_max_abs_diff"] == 0.0  # in-memory models == the reloaded files


def test_save_load_round_trip_is_exact(trained, tmp_path, images):
    out, _ = trained
    first = load_proxy_rewards(out)
    config = ProxyModelConfig.from_dict(json.loads((out / "config.json").read_text())["model"])
    save_proxy_models(tmp_path, config, first["clip"].model, first["proxy"].model, first["aesthetic"].head)
    second = load_proxy_rewards(tmp_path)
    with torch.no_grad():
        for head in HEADS:
            assert torch.equal(first[head](images, PROMPTS), second[head](images, PROMPTS)), head


@pytest.mark.parametrize("size", [16, 32])
def test_rewards_shape_and_finite(trained, size):
    rewards = load_proxy_rewards(trained[0])
    g = torch.Generator().manual_seed(2)
    x = torch.rand(len(PROMPTS), 3, size, size, generator=g)
    for head in HEADS:
        assert rewards[head].name == head and rewards[head].differentiable
        out = checked_reward(rewards[head], x, PROMPTS)  # (B,), finite, or ValueError
        assert out.dtype == torch.float32
        torch.testing.assert_close(rewards[head](x.double(), PROMPTS), out)  # inputs are cast to the model dtype
    clip = rewards["clip"](x, PROMPTS)
    assert bool((clip.abs() <= 1.0 + 1e-5).all())


def test_gradient_reaches_images_not_parameters(trained, images):
    rewards = load_proxy_rewards(trained[0])
    for head in HEADS:
        x = images.clone().requires_grad_(True)
        rewards[head](x, PROMPTS).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, head
        modules = [rewards[head].model] + ([rewards[head].head] if head == "aesthetic" else [])
        for module in modules:
            for name, p in module.named_parameters():
                assert not p.requires_grad and p.grad is None, f"{head}: {name}"


def test_text_cache_is_reused_and_frozen(trained, images):
    proxy = load_proxy_rewards(trained[0])["proxy"]
    first = proxy.text_embeddings(PROMPTS)
    assert not first.requires_grad and set(proxy.text_cache._cache) == set(PROMPTS)
    assert torch.equal(proxy.text_embeddings(PROMPTS[::-1]), first.flip(0))


def test_a_captions_text_embedding_does_not_depend_on_the_captions_it_came_with(trained):
    """Each caption is encoded on its own, so the cache's contents do not depend on the run's history (a batched
    encode differed by ~6e-8 with the batch's size, and a resumed run drifted from an uninterrupted one, #15)."""
    alone = {}
    for p in PROMPTS:
        proxy = load_proxy_rewards(trained[0])["proxy"]
        alone[p] = proxy.text_embeddings([p])[0]
    proxy = load_proxy_rewards(trained[0])["proxy"]
    together = proxy.text_embeddings(PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert torch.equal(together[i], alone[p]), p


def test_mismatched_weights_give_clear_error(trained, tmp_path):
    out, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    config = ProxyModelConfig.from_dict(json.loads((out / "config.json").read_text())["model"])
    other = build_clip(ProxyModelConfig(vocabulary=config.vocabulary, vision_width=32, vision_head_width=16))
    save_file(other.state_dict(), str(bad / WEIGHT_FILES["proxy"]))
    with pytest.raises(ValueError, match=r"proxy\.safetensors: does not match the proxy CLIP .*shape mismatch"):
        load_proxy_rewards(bad)

    shutil.copy(out / WEIGHT_FILES["proxy"], bad / WEIGHT_FILES["proxy"])
    save_file({"0.weight": torch.zeros(3)}, str(bad / WEIGHT_FILES["aesthetic"]))
    with pytest.raises(ValueError, match=r"aesthetic\.safetensors: does not match .*missing tensors") as err:
        load_proxy_rewards(bad)
    assert "\n" not in str(err.value)

    (bad / WEIGHT_FILES["clip"]).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"clip\.safetensors: cannot read"):
        load_proxy_rewards(bad)


def test_preprocess_matches_open_clip_transform():
    g = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
    transform = open_clip.image_transform(16, is_train=False)  # Resize, CenterCrop, RGB, ToTensor, Normalize
    reference = transform(Image.fromarray(pixels.numpy()))  # (3, 16, 16)
    ours = preprocess(pixels.permute(2, 0, 1)[None].float() / 255.0)[0]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)

    big = torch.rand(2, 3, 32, 32, generator=g)  # area resize of an exact 2x upscale is a 2x2 mean
    torch.testing.assert_close(preprocess(big), preprocess(torch.nn.functional.avg_pool2d(big, 2)))


def test_tokenizer_offline_and_unknown_words():
    vocabulary = build_vocabulary(["a red circle", "a blue square on a navy background"])
    tokenizer = ShapesTokenizer(vocabulary, context_length=8)
    tokens = tokenizer(["a red circle", "a crimson disc", "a red circle " * 10])  # (3, 8)
    assert tokens.shape == (3, 8)
    assert tokens[0, 0] == SOT_ID and tokens[0, 4] == EOT_ID and bool((tokens[0, 1:4] > UNK_ID).all())
    assert tokens[1, 2] == UNK_ID and tokens[1, 3] == UNK_ID  # held-out synonyms are <unk>
    assert tokens[2, -1] == EOT_ID  # truncation keeps the pooled end-of-text token
    assert int(tokens.max()) < ProxyModelConfig(vocabulary=vocabulary).vocab_size


def test_config_round_trip():
    config = ProxyModelConfig(vocabulary=[320, 736], aesthetic_hidden=(8, 4))
    assert ProxyModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown keys"):
        ProxyModelConfig.from_dict({**config.to_dict(), "depth": 3})


def test_training_stage_schedule_and_optimiser():
    """`AdamWStage`: linear warm-up to the peak, cosine to 0 at the last step; weight decay 0 is plain Adam."""
    stage = AdamWStage(steps=10, batch_size=4, lr=0.5, warmup=4)
    param = torch.nn.Parameter(torch.zeros(3))
    optimiser, scheduler = stage.optimizer([param])
    lrs = []
    for _ in range(stage.steps + 1):
        lrs.append(optimiser.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        optimiser.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])  # (s + 1)/W · lr
    assert lrs[4] == pytest.approx(0.5) and lrs[7] == pytest.approx(0.25)  # ½[1 + cos(π · 3/6)] · lr
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)  # decayed to 0 at S
    assert warmup_cosine(0, 4)(0) == 1.0  # no warm-up: the peak at once

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    twin = copy.deepcopy(head)
    ours, _ = AdamWStage(steps=20, batch_size=8, lr=1e-3).optimizer(head.parameters())
    adam = torch.optim.Adam(twin.parameters(), lr=1e-3)  # what stage (c) used before the shared stage
    for _ in range(20):
        x = torch.randn(8, 8)
        for net, opt in ((head, ours), (twin, adam)):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(head.parameters(), twin.parameters()))
