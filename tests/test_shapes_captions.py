"""Captions of the shapes world: templates, parser (with held-out synonyms) and splits."""

import pytest
import torch

from rlkit_diffusion.worlds.shapes.captions import (
    HELDOUT_COMBOS,
    all_canonical_captions,
    canonical_text,
    caption_targets,
    is_heldout,
    is_paraphrase,
    parse_caption,
    sample_captions,
    scenes_for_captions,
)


def test_canonical_templates():
    full = {"shape": "circle", "colour": "red", "background": "navy", "size": "small", "position": "top"}
    assert canonical_text(full) == "a small red circle at the top on a navy background"
    assert canonical_text({"shape": "circle", "colour": "red"}) == "a red circle"
    assert canonical_text({"shape": "circle", "background": "gray"}) == "a circle on a gray background"
    assert canonical_text({"shape": "square", "colour": "orange"}) == "an orange square"
    with pytest.raises(ValueError, match="needs a shape"):
        canonical_text({"colour": "red"})


def test_parser_inverts_every_canonical_caption():
    for caption in all_canonical_captions("train")[::7] + all_canonical_captions("heldout_combo")[::7]:
        assert parse_caption(caption.text).attributes() == caption.attributes(), caption.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a crimson disc", {"shape": "circle", "colour": "red"}),
        ("a scarlet round shape", {"shape": "circle", "colour": "red"}),
        ("a big box to the right", {"shape": "square", "size": "large", "position": "right"}),
        (
            "on a dark blue background, a tiny emerald rhombus in the upper left corner",
            {"shape": "diamond", "colour": "green", "size": "small", "background": "navy", "position": "top left"},
        ),
        (
            "a turquoise plus sign against a cream backdrop",
            {"shape": "cross", "colour": "cyan", "background": "beige"},
        ),
        (
            "in the middle, a jet black trigon on a grey background",
            {"shape": "triangle", "colour": "black", "background": "gray", "position": "center"},
        ),
        (
            "a triangle that is little and golden, at the bottom-right",
            {"shape": "triangle", "size": "small", "colour": "yellow", "position": "bottom right"},
        ),
        ("A RED circle, on a NAVY background!", {"shape": "circle", "colour": "red", "background": "navy"}),
        ("a red circle wearing a tiara", {"shape": "circle", "colour": "red"}),
        ("a glittering zorp", {}),
    ],
)
def test_parser_understands_synonyms_and_ignores_unknown_words(text, expected):
    parsed = parse_caption(text)
    full = {name: expected.get(name) for name in ("shape", "colour", "background", "size", "position")}
    assert parsed.attributes() == full


def test_sampled_captions_parse_back_and_are_deterministic():
    for split in ("train", "heldout_combo", "heldout_paraphrase"):
        captions = sample_captions(400, 0, split)
        assert captions == sample_captions(400, 0, split)
        for caption in captions:
            assert parse_caption(caption.text).attributes() == caption.attributes(), caption.text
    assert sample_captions(50, 0) != sample_captions(50, 1)


def test_training_captions_leave_attributes_unspecified():
    captions = sample_captions(2000, 0)
    n_specified = [len(c.specified()) for c in captions]
    assert min(n_specified) == 1  # shape only, e.g. "a circle"
    assert max(n_specified) == 5
    assert all(c.shape is not None for c in captions)


def test_heldout_captions_never_appear_in_training():
    train = {c.text for c in sample_captions(20_000, 0, "train")}
    train |= {c.text for c in all_canonical_captions("train")}
    heldout = sample_captions(3000, 1, "heldout")
    assert not train & {c.text for c in heldout}
    assert not any(is_heldout(t) for t in train)
    assert all(is_heldout(c.text) for c in heldout)
    assert all((parse_caption(t).colour, parse_caption(t).shape) not in HELDOUT_COMBOS for t in train)
    paraphrases = sample_captions(500, 2, "heldout_paraphrase")
    assert all(is_paraphrase(c.text) for c in paraphrases)
    kinds = {c.template.split(":")[0] for c in heldout}
    assert kinds == {"canonical", "paraphrase"}


def test_caption_targets_and_scenes():
    targets = caption_targets(["a red circle", "a small box on a white background"])
    assert targets["colour"].tolist() == [0, -1]
    assert targets["shape"].tolist() == [0, 1]
    assert targets["background"].tolist() == [-1, 3]
    spec = scenes_for_captions(["a red circle"] * 16, torch.Generator().manual_seed(0), p_nuisance=0.0)
    assert (spec.colour == 0).all() and (spec.shape == 0).all()
    assert len(set(spec.position.tolist())) > 1  # unspecified attributes vary
