"""The hidden gold reward of the shapes world (hand-made images) and the reward protocol helpers."""

import pytest
import torch

from rlkit_diffusion.rewards.base import checked_reward
from rlkit_diffusion.worlds.shapes.captions import canonical_text
from rlkit_diffusion.worlds.shapes.gold import GoldShapesReward
from rlkit_diffusion.worlds.shapes.render import ATTRIBUTES, COMPATIBLE, NUISANCES, SceneSpec, render, sample_scenes
from tests.zoo_helpers import one_thread  # noqa: F401

SCENES = [
    {"shape": "circle", "colour": "red", "background": "navy", "size": "large", "position": "top"},
    {"shape": "triangle", "colour": "yellow", "background": "gray", "size": "small", "position": "left"},
    {"shape": "cross", "colour": "white", "background": "black", "size": "large", "position": "center"},
    {"shape": "diamond", "colour": "blue", "background": "white", "size": "small", "position": "bottom right"},
    {"shape": "square", "colour": "pink", "background": "navy", "size": "small", "position": "top left"},
    {"shape": "triangle", "colour": "black", "background": "beige", "size": "large", "position": "bottom"},
]


@pytest.fixture(scope="module")
def gold() -> GoldShapesReward:
    return GoldShapesReward()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread is fastest


def _spec(attrs: dict, **nuisance: float) -> SceneSpec:
    """One hand-made scene from attribute names, with optional nuisance strengths."""
    names = {name: [attrs[name]] for name in ATTRIBUTES}
    return SceneSpec.from_names(**names, **{k: [v] for k, v in nuisance.items()})


def _compatible(attrs: dict) -> bool:
    colour = ATTRIBUTES["colour"].index(attrs["colour"])
    background = ATTRIBUTES["background"].index(attrs["background"])
    return bool(COMPATIBLE[colour, background])


@pytest.mark.parametrize("attrs", SCENES, ids=lambda a: f"{a['colour']}-{a['shape']}")
def test_perfect_render_beats_each_corruption_and_each_wrong_attribute(gold, attrs):
    caption = canonical_text(attrs)
    specs, labels = [_spec(attrs)], ["perfect"]
    for nuisance in NUISANCES:
        for strength in (0.5, 1.0):
            specs.append(_spec(attrs, **{nuisance: strength}))
            labels.append(f"{nuisance}={strength}")
    for name, values in ATTRIBUTES.items():
        for value in values:
            wrong = {**attrs, name: value}
            if value != attrs[name] and _compatible(wrong):
                specs.append(_spec(wrong))
                labels.append(f"{name}={value}")
    images = render(SceneSpec.cat(specs), torch.Generator().manual_seed(0))
    rewards = gold(images, [caption] * len(specs))
    assert rewards[0] > 9.5
    for label, reward in zip(labels[1:], rewards[1:].tolist()):
        assert reward < rewards[0] - 0.1, f"{caption!r}: {label} scores {reward:.3f} >= perfect {rewards[0]:.3f}"


def test_fidelity_outweighs_mild_corruption(gold):
    attrs = SCENES[0]
    wrong_colour = _spec({**attrs, "colour": "green"})
    mild_noise = _spec(attrs, noise=0.3)
    images = render(SceneSpec.cat([wrong_colour, mild_noise]), torch.Generator().manual_seed(0))
    rewards = gold(images, [canonical_text(attrs)] * 2)
    assert rewards[1] > rewards[0]


def test_paraphrase_and_unknown_words_score_like_the_canonical_caption(gold):
    image = render(_spec(SCENES[0]))
    captions = [
        "a large red circle at the top on a navy background",
        "on a dark blue background, a big crimson disc near the top",
        "a large red circle at the top on a navy background, drawn with love by a zorp",
    ]
    rewards = gold(image.expand(3, -1, -1, -1), captions)
    assert torch.allclose(rewards, rewards[0].expand(3), atol=1e-5)


def test_unspecified_attributes_are_free(gold):
    g = torch.Generator().manual_seed(0)
    fixed = {"shape": torch.zeros(32, dtype=torch.long), "colour": torch.zeros(32, dtype=torch.long)}
    spec = sample_scenes(32, g, p_nuisance=0.0, fixed=fixed)  # red circles, everything else random
    assert len(set(spec.position.tolist())) > 3
    rewards = gold(render(spec), ["a red circle"] * 32)
    assert rewards.min() > 9.5


def test_measurement_recovers_attributes_of_clean_renders(gold):
    g = torch.Generator().manual_seed(1)
    spec = sample_scenes(300, g, p_nuisance=0.0)
    predicted = gold.measure(render(spec)).predicted()
    for name in ATTRIBUTES:
        assert torch.equal(predicted[name], getattr(spec, name)), name


def test_output_range_and_empty_image(gold):
    g = torch.Generator().manual_seed(2)
    spec = sample_scenes(64, g)
    images = torch.cat([render(spec, g), torch.full((1, 3, 16, 16), 0.5)])
    prompts = ["a small red circle at the top on a navy background"] * 65
    rewards = checked_reward(gold, images, prompts)
    assert rewards.shape == (65,) and rewards.dtype == torch.float32
    assert rewards.min() >= 0.0 and rewards.max() <= 10.0
    assert rewards[-1] < 5.0  # a blank gray image: no object
    blank = gold.components(images[-1:], prompts[-1:])
    for name in ("shape", "colour", "size", "position"):
        assert blank[f"fidelity_{name}"].item() == 0.0, name


def test_other_image_sizes_are_resized(gold):
    image = render(_spec(SCENES[2]))
    big = image.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)  # (1, 3, 32, 32)
    caption = [canonical_text(SCENES[2])]
    assert gold(big, caption).item() == pytest.approx(gold(image, caption).item(), abs=1e-4)


class _BadReward:
    name = "bad"
    differentiable = False

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output

    def __call__(self, images, prompts):
        return self.output


def test_checked_reward_names_the_reward():
    images = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"reward 'bad' returned shape \(2, 1\), expected \(2,\)"):
        checked_reward(_BadReward(torch.zeros(2, 1)), images, ["a", "b"])
    with pytest.raises(ValueError, match="reward 'bad' returned NaN or inf"):
        checked_reward(_BadReward(torch.tensor([0.0, float("nan")])), images, ["a", "b"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        checked_reward(_BadReward(torch.zeros(2)), images, ["a"])
