"""Captions of the shapes world: templates, parser (with held-out synonyms), splits, and the frozen encoder."""

import warnings

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
from rlkit_diffusion.worlds.shapes.text_encoder import SentenceEncoder


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


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(max_length=24)


def test_encoder_shapes_and_normalisation(encoder):
    out = encoder.encode(["a red circle", "on a navy background, a tiny crimson disc at the top"])
    assert out.hidden.shape == (2, 24, 384) and out.hidden.dtype == torch.float32
    assert out.mask.shape == (2, 24) and out.mask.dtype == torch.bool
    assert out.mask[0].sum() == 5  # [CLS] a red circle [SEP]
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not out.hidden.requires_grad
    cond = encoder(["a red circle"])
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}


def test_encoder_is_deterministic_and_cached(encoder):
    first = encoder.encode(["a blue square at the top"])
    encoder.clear_cache()
    second = encoder.encode(["a blue square at the top"])
    assert torch.equal(first.hidden, second.hidden) and torch.equal(first.pooled, second.pooled)
    batch = encoder.encode(["a blue square at the top", "a green cross"])
    assert torch.allclose(batch.hidden[0], first.hidden[0], atol=1e-5)


def test_encoder_knows_synonyms(encoder):
    pooled = encoder.encode(["a crimson circle", "a red circle", "a blue square"]).pooled
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]


def test_encoder_truncation_warns_and_empty_raises(encoder):
    long_caption = "a small red circle " + "with many more words " * 10
    with pytest.warns(UserWarning, match="truncated") as record:
        out = encoder.encode([long_caption])
    assert long_caption in str(record[0].message)
    assert out.mask.sum() == 24
    with pytest.raises(ValueError, match="caption 1 is empty"):
        encoder.encode(["a red circle", "   "])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["a red circle"])  # short captions never warn


def test_unconditional_embedding(encoder):
    uncond = encoder.encode_uncond(3)
    assert uncond.hidden.shape == (3, 24, 384)
    assert uncond.mask.sum(-1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    assert torch.equal(uncond.hidden[0], uncond.hidden[2])
    assert encoder.uncond(2)["encoder_hidden_states"].shape == (2, 24, 384)
