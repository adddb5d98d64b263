"""The real reward models (PickScore, HPSv2, CLIP score, LAION aesthetic), loaded from tiny random checkpoints saved
in the real formats, against the reference computations of their authors; and the torch preprocessing against the
transformers processors and open_clip's preprocess on the same image.

Preprocessing tolerance: max |Δ| ≤ 0.03 and mean |Δ| ≤ 0.008 on normalised pixels (after (x − mean)/std, std ≈
0.27). The references resize uint8 images and round the result to uint8 (PIL's or torchvision's bicubic), ours
resizes floats (torch bicubic, antialiased) without rounding, so differences of about one uint8 level (1/255/0.27 ≈
0.015) are expected; measured here: max 0.016, mean 0.0045.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rlkit_diffusion.tiny import save_aesthetic_mlp, save_tiny_clip, save_tiny_open_clip

torch.set_num_threads(1)

PIXEL_MAX_TOL = 0.03
PIXEL_MEAN_TOL = 0.008
PROMPTS = ["a red cat", "an owl made of glass", "a red cat"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("rewards")
    config, weights = save_tiny_open_clip(d / "open_clip")
    return {
        "clip": str(save_tiny_clip(d / "clip")),
        "open_clip_config": str(config),
        "open_clip_weights": str(weights),
        "aesthetic": str(save_aesthetic_mlp(d / "aesthetic.pth", input_size=16)),
        "dir": d,
    }


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A uint8 (3, H, W) image with structure at several scales (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=g)
    img = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear", align_corners=False)[0]
    return (img * 255).round().to(torch.uint8)


def as_pil(u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(u8.permute(1, 2, 0).numpy())


def images_batch(n: int = 3, size: int = 40) -> torch.Tensor:
    return torch.stack([smooth_image(size, size + 8, seed=i) for i in range(n)]).float() / 255


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing parity
# ----------------------------------------------------------------------------------------------------------------
def hf_processors():
    from transformers import CLIPImageProcessor

    processors = [("torchvision", CLIPImageProcessor())]
    try:  # transformers >= 5 also ships the PIL backend under its own name
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        processors.append(("pil", CLIPImageProcessorPil()))
    except ImportError:
        pass
    return processors


@pytest.mark.parametrize("height,width", [(300, 260), (512, 512), (64, 96)])
def test_torch_preprocessing_matches_hf_clip_processor(height, width):
    from rlkit_diffusion.rewards.clip_utils import ClipImagePreprocess

    u8 = smooth_image(height, width)
    ours = ClipImagePreprocess.from_hf(hf_processors()[0][1])(u8.float()[None] / 255)
    for name, processor in hf_processors():
        ref = processor(images=as_pil(u8), return_tensors="pt").pixel_values
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        diff = (ours - ref).abs()
        assert diff.max() <= PIXEL_MAX_TOL, (name, float(diff.max()))
        assert diff.mean() <= PIXEL_MEAN_TOL, (name, float(diff.mean()))


@pytest.mark.parametrize("height,width", [(300, 260), (64, 96)])
def test_torch_preprocessing_matches_open_clip_preprocess(assets, height, width):
    import open_clip

    from rlkit_diffusion.rewards.clip_utils import ClipImagePreprocess

    model, _, preprocess_val = open_clip.create_model_and_transforms(
        "tiny-open-clip", pretrained=None, force_image_size=224
    )
    u8 = smooth_image(height, width)
    ours = ClipImagePreprocess.from_open_clip(model)(u8.float()[None] / 255)
    ref = preprocess_val(as_pil(u8))[None]
    diff = (ours - ref).abs()
    assert ours.shape == ref.shape
    assert diff.max() <= PIXEL_MAX_TOL and diff.mean() <= PIXEL_MEAN_TOL, (float(diff.max()), float(diff.mean()))


def test_torch_preprocessing_is_differentiable():
    from transformers import CLIPImageProcessor

    from rlkit_diffusion.rewards.clip_utils import ClipImagePreprocess

    x = torch.rand(2, 3, 50, 70, requires_grad=True)
    ClipImagePreprocess.from_hf(CLIPImageProcessor())(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# The reward models against their reference computations
# ----------------------------------------------------------------------------------------------------------------
def test_pickscore_matches_reference_snippet(assets):
    """yuvalkirstain/PickScore_v1's model card: processor → get_*_features → normalise → logit_scale.exp() · dot."""
    from transformers import AutoProcessor, CLIPModel

    from rlkit_diffusion.rewards.pickscore import PickScoreReward, pooled

    reward = PickScoreReward(assets["clip"], assets["clip"])
    images = images_batch()
    ours = reward(images, PROMPTS)
    processor = AutoProcessor.from_pretrained(assets["clip"])
    model = CLIPModel.from_pretrained(assets["clip"]).eval()
    pils = [as_pil((img * 255).round().to(torch.uint8)) for img in images]
    with torch.no_grad():
        inputs = processor(images=pils, return_tensors="pt")
        img = pooled(model.get_image_features(**inputs))
        txt = pooled(model.get_text_features(**processor(text=PROMPTS, padding=True, return_tensors="pt")))
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    ref = model.logit_scale.exp() * (img * txt).sum(-1)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0)  # the preprocessing tolerance, through random weights
    torch.testing.assert_close(reward(images[:1], PROMPTS[:1]), ours[:1])  # rows are scored independently


def test_hpsv2_matches_official_formula(assets):
    """hpsv2/img_score.py: model(image, text) → diag(image_features @ text_features.T), open_clip preprocess_val."""
    import open_clip

    from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward

    reward = HPSv2Reward(assets["open_clip_weights"], assets["open_clip_config"])
    name = "tiny-open-clip"
    model, _, preprocess_val = open_clip.create_model_and_transforms(name, pretrained=None, output_dict=True)
    model.load_state_dict(torch.load(assets["open_clip_weights"], weights_only=True)["state_dict"])
    model.eval()
    images = images_batch()
    pixels = torch.stack([preprocess_val(as_pil((img * 255).round().to(torch.uint8))) for img in images])
    with torch.no_grad():
        out = model(pixels, open_clip.get_tokenizer(name)(PROMPTS))
    ref = torch.diagonal(out["image_features"] @ out["text_features"].T)
    torch.testing.assert_close(reward(images, PROMPTS), ref, atol=0.01, rtol=0)


def test_clip_score_is_100_cosine(assets):
    from rlkit_diffusion.rewards.clip_score import ClipScoreReward
    from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward

    clip = ClipScoreReward(assets["open_clip_config"], assets["open_clip_weights"])
    hps = HPSv2Reward(assets["open_clip_weights"], assets["open_clip_config"])  # same weights: score = cos
    images = images_batch()
    torch.testing.assert_close(clip(images, PROMPTS), 100 * hps(images, PROMPTS))


def test_aesthetic_is_mlp_of_normalised_clip_embedding(assets):
    from rlkit_diffusion.rewards.aesthetic import AestheticMLP, AestheticReward

    reward = AestheticReward(assets["aesthetic"], assets["clip"])
    images = images_batch()
    ours = reward(images, PROMPTS)
    mlp = AestheticMLP(16)
    mlp.load_state_dict(torch.load(assets["aesthetic"], weights_only=True))
    with torch.no_grad():
        emb = reward.image_features(images)  # the embedding path is tested by the PickScore parity above
        ref = mlp.eval()(emb)
    torch.testing.assert_close(ours, ref)
    assert [n for n, _ in mlp.named_parameters()] == [
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")
    ], "layer names of the released predictor"
    assert [m.out_features for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "clip", "aesthetic"])
def test_rewards_are_differentiable_and_frozen(assets, name):
    """DRaFT needs ∂r/∂x; the reward's own weights never get a gradient."""
    from rlkit_diffusion.rewards.aesthetic import AestheticReward
    from rlkit_diffusion.rewards.base import checked_reward
    from rlkit_diffusion.rewards.clip_score import ClipScoreReward
    from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward
    from rlkit_diffusion.rewards.pickscore import PickScoreReward

    make = {
        "pickscore": lambda: PickScoreReward(assets["clip"], assets["clip"]),
        "hpsv2": lambda: HPSv2Reward(assets["open_clip_weights"], assets["open_clip_config"]),
        "clip": lambda: ClipScoreReward(assets["open_clip_config"], assets["open_clip_weights"]),
        "aesthetic": lambda: AestheticReward(assets["aesthetic"], assets["clip"]),
    }
    reward = make[name]()
    assert reward.name == name and reward.differentiable
    x = images_batch().requires_grad_(True)
    r = checked_reward(reward, x, PROMPTS)
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    modules = [reward.model] + ([reward.mlp] if hasattr(reward, "mlp") else [])
    assert all(p.grad is None and not p.requires_grad for m in modules for p in m.parameters())


def test_text_features_are_cached(assets):
    from rlkit_diffusion.rewards.pickscore import PickScoreReward

    reward = PickScoreReward(assets["clip"], assets["clip"])
    calls = []
    encode = reward.text_features.encode
    reward.text_features.encode = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    reward(images_batch(), PROMPTS)
    reward(images_batch(2), PROMPTS[:2])
    assert calls == [["a red cat"], ["an owl made of glass"]]  # once per prompt, each on its own (a batch of one)


# ----------------------------------------------------------------------------------------------------------------
# Bad weights: one-line errors naming the reward and the file
# ----------------------------------------------------------------------------------------------------------------
def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_aesthetic_weights_of_the_wrong_shape(assets):
    from rlkit_diffusion.rewards.aesthetic import AestheticReward

    wrong = save_aesthetic_mlp(assets["dir"] / "aesthetic_768.pth", input_size=768)  # ViT-L/14 MLP, tiny CLIP (16)
    with pytest.raises(ValueError) as err:
        AestheticReward(str(wrong), assets["clip"])
    msg = one_line(err)
    assert "aesthetic" in msg and "aesthetic_768.pth" in msg and "shape" in msg and "(1024, 768)" in msg


def test_hpsv2_checkpoint_of_another_architecture(assets):
    from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward

    other = assets["dir"] / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, str(other))
    with pytest.raises(ValueError) as err:
        HPSv2Reward(str(other), assets["open_clip_config"])
    msg = one_line(err)
    assert msg.startswith("hpsv2") and "other.safetensors" in msg and "missing keys" in msg


def test_pickled_objects_are_refused(assets):
    """torch.load(weights_only=True): a file holding arbitrary Python objects is never unpickled."""
    from rlkit_diffusion.rewards.aesthetic import AestheticReward

    evil = assets["dir"] / "evil.pth"
    torch.save({"layers": np.array([1, 2, 3], dtype=object)}, evil)
    with pytest.raises(ValueError) as err:
        AestheticReward(str(evil), assets["clip"])
    assert "tensors-only" in one_line(err)


def test_missing_weights_and_unknown_architecture(assets):
    from rlkit_diffusion.rewards.clip_score import ClipScoreReward
    from rlkit_diffusion.rewards.hpsv2 import HPSv2Reward

    with pytest.raises(FileNotFoundError) as err:
        HPSv2Reward(str(assets["dir"] / "nope.pt"), assets["open_clip_config"])
    assert "nope.pt" in one_line(err)
    with pytest.raises(ValueError) as err:
        ClipScoreReward("ViT-Nope-99", assets["open_clip_weights"])
    assert "ViT-Nope-99" in one_line(err)


def test_pickscore_processor_that_does_not_fit_the_model(assets, tmp_path):
    from rlkit_diffusion.rewards.pickscore import PickScoreReward

    big = save_tiny_clip(tmp_path / "clip64", image_size=64)
    with pytest.raises(ValueError) as err:
        PickScoreReward(assets["clip"], str(big))
    assert "crops to (64, 64)" in one_line(err)
