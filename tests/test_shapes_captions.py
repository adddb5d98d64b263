"""Captions of the shapes world: templates, parser (with held-out synonyms) and splits; the vocabulary file."""

import json
import re
from pathlib import Path

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
from rlkit_diffusion.worlds.shapes.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SIZES,
    SYNONYMS,
    VOCABULARY_FILE,
    load_vocabulary,
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


def _edited_vocabulary(tmp_path, edit) -> Path:
    raw = json.loads(VOCABULARY_FILE.read_text())
    edit(raw)
    path = tmp_path / "vocabulary.json"
    path.write_text(json.dumps(raw))
    return path


def test_vocabulary_file_round_trips_and_every_synonym_parses_to_its_value(tmp_path):
    vocab = load_vocabulary(_edited_vocabulary(tmp_path, lambda raw: None))  # written back by json: same tables
    assert vocab["drawn"] == {"colour": COLOURS, "background": BACKGROUNDS, "size": SIZES, "position": POSITIONS}
    assert vocab["synonyms"] == SYNONYMS and list(vocab["values"]["colour"]) == list(COLOURS)
    for attr in ("shape", "colour", "size"):
        for value, words in SYNONYMS[attr].items():
            for word in words:
                text = {"shape": f"a {word}", "colour": f"a {word} circle", "size": f"a {word} circle"}[attr]
                assert getattr(parse_caption(text), attr) == value, (attr, word)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw.pop("size"), "size: missing"),
        (lambda raw: raw["shape"]["values"].append("circle"), "shape: a value is listed twice"),
        (lambda raw: raw["colour"]["rgb"].update(red=[1.2, 0.0, 0.0]), "colour 'red': rgb must be three numbers"),
        (lambda raw: raw["colour"]["synonyms"].pop("cyan"), "colour: synonyms must list every value once"),
        (lambda raw: raw["shape"]["synonyms"].update(square=["circle"]), "shape 'square': needs a list of held-out"),
        (lambda raw: raw["size"]["synonyms"].update(large="big"), "size 'large': needs a list of held-out words"),
        (lambda raw: raw["background"]["rgb"].update(gray=0.5), "background 'gray': rgb must be three numbers"),
        (lambda raw: raw["position"]["direction"].update(top=[0, 0]), "position: two positions share a direction"),
        (lambda raw: raw["position"]["phrase"].pop("left"), "position: phrase must list every position"),
        (lambda raw: raw["size"]["half_extent_px"].update(small=-1), "size 'small': needs a positive px"),
    ],
)
def test_a_broken_vocabulary_file_is_named(tmp_path, edit, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_vocabulary(_edited_vocabulary(tmp_path, edit))
