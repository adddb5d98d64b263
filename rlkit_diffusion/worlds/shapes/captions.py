"""Captions of the `shapes` world: compositional templates, a parser and the train/held-out splits.

Captions
    Training captions are the *canonical* rendering of an attribute set, with unspecified attributes left out::

        a small red circle at the top on a navy background
        a red circle
        a circle on a gray background

    so one caption is satisfied by several images (what makes mode collapse measurable).

Held-out captions (never among training captions) test open-vocabulary transfer:
    * unseen combinations: the (colour, shape) pairs of ``HELDOUT_COMBOS`` are never written in a training caption;
    * paraphrases: synonyms ("crimson" for red, "disc" for circle, "box" for square, ...) and other word orders
      ("on a navy background, a red circle"). A caption is a paraphrase exactly when its text differs from the
      canonical rendering of its parsed attributes.

Parser
    :func:`parse_caption` maps any caption (canonical or paraphrase) to a :class:`Caption` record of canonical
    attribute names, ``None`` for unspecified ones. Unknown words are ignored, never an error: the text encoder
    sees them anyway (the open vocabulary; see `text_encoder`).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rlkit_diffusion.worlds.shapes.render import COMPATIBLE, SceneSpec, sample_scenes
from rlkit_diffusion.worlds.shapes.vocabulary import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    SYNONYMS,
)

# Probability that a training caption specifies each attribute (the shape noun is always there).
P_SPECIFY: dict[str, float] = {"shape": 1.0, "colour": 0.8, "background": 0.5, "size": 0.5, "position": 0.5}

# (colour, shape) pairs that never appear together in a training caption: one pair per colour, two per shape.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("purple", "circle"),
        ("cyan", "circle"),
        ("orange", "square"),
        ("pink", "square"),
        ("green", "triangle"),
        ("white", "triangle"),
        ("blue", "cross"),
        ("yellow", "cross"),
        ("red", "diamond"),
        ("black", "diamond"),
    }
)

# Position words: the parser reads a position from these, in any order ("upper left", "left ... top").
_VERTICAL_WORDS = {"top": -1, "upper": -1, "bottom": 1, "lower": 1}
_HORIZONTAL_WORDS = {"left": -1, "right": 1}
_CENTER_WORDS = {"center", "centre", "middle", "centered", "centred"}

# Paraphrase templates (held out), documented as patterns; a missing attribute drops its words (`_paraphrase`).
PARAPHRASE_TEMPLATES: tuple[str, ...] = (
    "on a {background} background, a {size} {colour} {shape} {position}",
    "{position}, a {size} {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} against a {background} backdrop {position}",
    "there is a {size} {colour} {shape} {position} on a {background} background",
    "a {shape} that is {size} and {colour}, {position}, on a {background} background",
)
SPLITS = ("train", "heldout_combo", "heldout_paraphrase", "heldout")


@dataclasses.dataclass(frozen=True)
class Caption:
    """A caption and the structured truth of what it specifies (canonical names; ``None`` = unspecified).

    Attributes:
        text: the caption string.
        shape, colour, background, size, position: canonical attribute values or ``None``.
        template: ``"canonical"``, the paraphrase template index as ``"paraphrase:<i>"``, or ``"parsed"`` for
            records made by :func:`parse_caption`.
    """

    text: str
    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    size: str | None = None
    position: str | None = None
    template: str = "canonical"

    def attributes(self) -> dict[str, str | None]:
        """``{attribute: value or None}`` for the five attributes."""
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}

    def specified(self) -> tuple[str, ...]:
        """Names of the attributes the caption specifies."""
        return tuple(name for name in ATTRIBUTE_NAMES if getattr(self, name) is not None)


def _check_attributes(attrs: Mapping[str, str | None]) -> None:
    for name, value in attrs.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {name!r}; expected one of {ATTRIBUTE_NAMES}")
        if value is not None and value not in ATTRIBUTES[name]:
            raise ValueError(f"unknown {name} {value!r}; expected one of {ATTRIBUTES[name]}")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _noun_phrase(slots: Mapping[str, str]) -> str:
    """``a [size] [colour] shape`` with the right article."""
    words = " ".join(slots[k] for k in ("size", "colour", "shape") if slots.get(k))
    return f"{_article(words)} {words}"


def _join(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _paraphrase(index: int, slots: Mapping[str, str]) -> str:
    """Fill paraphrase template ``index`` (see ``PARAPHRASE_TEMPLATES``); missing slots drop their clause."""
    position, background = slots.get("position"), slots.get("background")
    on_background = f"on {_article(background)} {background} background" if background else None
    if index == 0:
        return _join(f"{on_background}," if background else None, _noun_phrase(slots), position)
    if index == 1:
        return _join(f"{position}," if position else None, _noun_phrase(slots), on_background)
    if index == 2:
        backdrop = f"against {_article(background)} {background} backdrop" if background else None
        return _join(_noun_phrase(slots), backdrop, position)
    if index == 3:
        return _join("there is", _noun_phrase(slots), position, on_background)
    adjectives = " and ".join(slots[k] for k in ("size", "colour") if slots.get(k))
    head = f"{_article(slots['shape'])} {slots['shape']}" + (f" that is {adjectives}" if adjectives else "")
    return ", ".join(p for p in (head, position, on_background) if p)


def canonical_text(attrs: Mapping[str, str | None]) -> str:
    """Training-template caption: ``a [size] [colour] shape [position phrase] [on a <bg> background]``."""
    _check_attributes(attrs)
    if attrs.get("shape") is None:
        raise ValueError("canonical_text: a caption needs a shape")
    slots = {k: v for k, v in attrs.items() if v is not None}
    position = POSITION_PHRASES[attrs["position"]] if attrs.get("position") else None
    background = attrs.get("background")
    return _join(
        _noun_phrase(slots), position, f"on {_article(background)} {background} background" if background else None
    )


def paraphrase_text(attrs: Mapping[str, str | None], rng: random.Random, p_synonym: float = 0.5) -> tuple[str, str]:
    """Held-out caption: a paraphrase template and, per word, a synonym with probability ``p_synonym``.

    Returns:
        ``(text, template)`` with ``template = "paraphrase:<i>"``. The text always differs from the canonical one.
    """
    _check_attributes(attrs)
    if attrs.get("shape") is None:
        raise ValueError("paraphrase_text: a caption needs a shape")
    slots: dict[str, str] = {}
    for name, value in attrs.items():
        if value is None:
            continue
        canonical = POSITION_PHRASES[value] if name == "position" else value
        slots[name] = rng.choice(SYNONYMS[name][value]) if rng.random() < p_synonym else canonical
    index = rng.randrange(len(PARAPHRASE_TEMPLATES))
    text = _paraphrase(index, slots)
    if text == canonical_text(attrs):  # e.g. "a red circle" from template 0 with no clause: force a synonym
        slots["shape"] = rng.choice(SYNONYMS["shape"][attrs["shape"]])
        text = _paraphrase(index, slots)
    return text, f"paraphrase:{index}"


def _normalise(text: str) -> str:
    text = text.lower().replace("-", " ")
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _lexicon(canonical: Sequence[str], synonyms: Mapping[str, Sequence[str]]) -> dict[str, str]:
    table = {_normalise(c): c for c in canonical}
    for c, words in synonyms.items():
        for w in words:
            table[_normalise(w)] = c
    return table


_SHAPE_LEX = _lexicon(SHAPES, SYNONYMS["shape"])
_COLOUR_LEX = _lexicon(tuple(COLOURS), SYNONYMS["colour"])
_BACKGROUND_LEX = _lexicon(tuple(BACKGROUNDS), SYNONYMS["background"])
_SIZE_LEX = _lexicon(tuple(SIZES), SYNONYMS["size"])
_OBJECT_LEX: dict[str, tuple[str, str]] = {
    **{k: ("size", v) for k, v in _SIZE_LEX.items()},
    **{k: ("colour", v) for k, v in _COLOUR_LEX.items()},
    **{k: ("shape", v) for k, v in _SHAPE_LEX.items()},
}
_MAX_PHRASE = max(len(k.split()) for k in [*_OBJECT_LEX, *_BACKGROUND_LEX])
_BACKGROUND_RE = re.compile(rf"\b((?:[a-z]+ ){{0,{_MAX_PHRASE}}})(?:background|backdrop)\b")
_POSITION_BY_DIR = {v: k for k, v in POSITIONS.items()}


@functools.lru_cache(maxsize=65536)
def parse_caption(text: str) -> Caption:
    """Structured truth of a caption (canonical, paraphrase or free text); unknown words are ignored.

    Rules: the background is the colour phrase right before "background"/"backdrop"; the object's size, colour
    and shape are the first matching (longest) phrases elsewhere; the position combines the words
    top/upper/bottom/lower with left/right, or center/centre/middle alone.
    """
    words = _normalise(text)
    attrs: dict[str, str | None] = dict.fromkeys(ATTRIBUTE_NAMES)
    match = _BACKGROUND_RE.search(words)
    if match:
        before = match.group(1).split()
        for n in range(min(_MAX_PHRASE, len(before)), 0, -1):
            phrase = " ".join(before[-n:])
            if phrase in _BACKGROUND_LEX:
                attrs["background"] = _BACKGROUND_LEX[phrase]
                before = before[:-n]
                break
        words = (words[: match.start()] + " ".join(before) + " " + words[match.end() :]).strip()
    tokens = words.split()
    i = 0
    while i < len(tokens):
        for n in range(min(_MAX_PHRASE, len(tokens) - i), 0, -1):
            phrase = " ".join(tokens[i : i + n])
            if phrase in _OBJECT_LEX:
                name, value = _OBJECT_LEX[phrase]
                if attrs[name] is None:
                    attrs[name] = value
                i += n
                break
        else:
            i += 1
    vertical = next((_VERTICAL_WORDS[t] for t in tokens if t in _VERTICAL_WORDS), 0)
    horizontal = next((_HORIZONTAL_WORDS[t] for t in tokens if t in _HORIZONTAL_WORDS), 0)
    if vertical or horizontal or any(t in _CENTER_WORDS for t in tokens):
        attrs["position"] = _POSITION_BY_DIR[(horizontal, vertical)]
    return Caption(text=text, template="parsed", **attrs)


def is_paraphrase(text: str) -> bool:
    """True when the caption differs from the canonical wording of what it specifies."""
    parsed = parse_caption(text)
    if parsed.shape is None:
        return True
    return text != canonical_text(parsed.attributes())


def is_heldout(text: str) -> bool:
    """True for captions of the held-out split: an unseen (colour, shape) pair or a paraphrase."""
    parsed = parse_caption(text)
    return (parsed.colour, parsed.shape) in HELDOUT_COMBOS or is_paraphrase(text)


def _as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _sample_attributes(
    rng: random.Random, p_specify: Mapping[str, float], heldout_combo: bool
) -> dict[str, str | None]:
    while True:
        attrs: dict[str, str | None] = {
            name: (rng.choice(values) if rng.random() < p_specify.get(name, 0.0) else None)
            for name, values in ATTRIBUTES.items()
        }
        if attrs["shape"] is None:
            attrs["shape"] = rng.choice(SHAPES)
        if heldout_combo:
            attrs["colour"], attrs["shape"] = rng.choice(sorted(HELDOUT_COMBOS))
        elif (attrs["colour"], attrs["shape"]) in HELDOUT_COMBOS:
            continue
        if attrs["colour"] and attrs["background"]:
            colour = ATTRIBUTES["colour"].index(attrs["colour"])
            background = ATTRIBUTES["background"].index(attrs["background"])
            if not COMPATIBLE[colour, background]:
                continue
        return attrs


def sample_captions(
    n: int,
    rng: random.Random | int,
    split: str = "train",
    p_specify: Mapping[str, float] | None = None,
) -> list[Caption]:
    """Draw ``n`` caption records of a split (deterministic from the seed or ``random.Random``).

    Args:
        n: number of captions (repeats allowed).
        rng: seed or ``random.Random``.
        split: ``"train"`` (canonical wording, no held-out pair), ``"heldout_combo"`` (canonical wording of a
            held-out (colour, shape) pair), ``"heldout_paraphrase"`` (paraphrase of a training attribute set) or
            ``"heldout"`` (each caption one of the two held-out kinds with probability 1/2).
        p_specify: probability that each attribute is written, default ``P_SPECIFY``.

    Returns:
        ``n`` :class:`Caption` records.
    """
    if split not in SPLITS:
        raise ValueError(f"sample_captions: unknown split {split!r}; expected one of {SPLITS}")
    rng = _as_rng(rng)
    p_specify = dict(P_SPECIFY if p_specify is None else p_specify)
    captions = []
    for _ in range(n):
        kind = split if split != "heldout" else rng.choice(("heldout_combo", "heldout_paraphrase"))
        attrs = _sample_attributes(rng, p_specify, heldout_combo=kind == "heldout_combo")
        if kind == "heldout_paraphrase":
            text, template = paraphrase_text(attrs, rng)
        else:
            text, template = canonical_text(attrs), "canonical"
        captions.append(Caption(text=text, template=template, **attrs))
    return captions


def all_canonical_captions(split: str = "train") -> list[Caption]:
    """Every canonical caption of the grammar (shape always written), in a fixed order.

    Args:
        split: ``"train"`` excludes the held-out (colour, shape) pairs, ``"heldout_combo"`` keeps only them.
    """
    if split not in ("train", "heldout_combo"):
        raise ValueError(f"all_canonical_captions: split must be 'train' or 'heldout_combo', got {split!r}")
    out = []
    options = {name: (None, *values) for name, values in ATTRIBUTES.items()}
    for shape in SHAPES:
        for colour in options["colour"]:
            if ((colour, shape) in HELDOUT_COMBOS) != (split == "heldout_combo"):
                continue
            for background in options["background"]:
                if colour and background:
                    c, b = ATTRIBUTES["colour"].index(colour), ATTRIBUTES["background"].index(background)
                    if not COMPATIBLE[c, b]:
                        continue
                for size in options["size"]:
                    for position in options["position"]:
                        attrs = {
                            "shape": shape,
                            "colour": colour,
                            "background": background,
                            "size": size,
                            "position": position,
                        }
                        out.append(Caption(text=canonical_text(attrs), **attrs))
    return out


def caption_targets(captions: Sequence[str | Caption], device: torch.device | str | None = None) -> dict[str, Tensor]:
    """Attribute indices each caption asks for: ``{attribute: (B,) long}``, -1 where unspecified."""
    records = [c if isinstance(c, Caption) else parse_caption(c) for c in captions]
    return {
        name: torch.tensor(
            [values.index(v) if (v := getattr(r, name)) is not None else -1 for r in records],
            dtype=torch.long,
            device=device,
        )
        for name, values in ATTRIBUTES.items()
    }


def scenes_for_captions(
    captions: Sequence[str | Caption], generator: torch.Generator, **sample_kwargs: object
) -> SceneSpec:
    """Random scenes that satisfy each caption (specified attributes fixed, the rest random).

    Args:
        captions: B caption strings or records.
        generator: CPU generator passed to :func:`sample_scenes`.
        **sample_kwargs: ``p_nuisance``, ``strength``, ``device`` of :func:`sample_scenes`.
    """
    return sample_scenes(len(captions), generator, fixed=caption_targets(captions), **sample_kwargs)


__all__ = [
    "ATTRIBUTE_NAMES",
    "HELDOUT_COMBOS",
    "PARAPHRASE_TEMPLATES",
    "POSITION_PHRASES",
    "P_SPECIFY",
    "SPLITS",
    "Caption",
    "all_canonical_captions",
    "canonical_text",
    "caption_targets",
    "is_heldout",
    "is_paraphrase",
    "paraphrase_text",
    "parse_caption",
    "sample_captions",
    "scenes_for_captions",
]
