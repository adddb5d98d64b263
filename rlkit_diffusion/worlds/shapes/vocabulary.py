"""The words of the `shapes` world, read from ``vocabulary.json`` beside this file.

The file holds, per attribute, the values in index order, what the renderer draws for each value and the held-out
words that name it — the world's vocabulary as data, the way CLEVR keeps its ``properties.json`` and
``synonyms.json``, so that a colour's RGB and the words for it sit in one place. `render` and `captions` import
their tables from here.

==============  ================================  ===============================================================
attribute       drawn as                          in a caption
==============  ================================  ===============================================================
shape           a signed distance (`render`)      the value; held out: ``synonyms``
colour          ``rgb`` in [0, 1]                 the value; held out: ``synonyms``
background      ``rgb`` in [0, 1]                 the value + "background"; held out: ``synonyms``
size            ``half_extent_px``                the value; held out: ``synonyms``
position        ``direction`` (x, y) ∈ {−1,0,1}²  ``phrase`` ("at the top"); held out: ``synonyms`` (phrases)
==============  ================================  ===============================================================

:func:`load_vocabulary` checks a file and names what is wrong with it; the module tables are the shipped file's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VOCABULARY_FILE = Path(__file__).with_name("vocabulary.json")
ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "colour", "background", "size", "position")
_DRAWN = {"colour": "rgb", "background": "rgb", "size": "half_extent_px", "position": "direction"}


def _check(ok: bool, path: Path, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"shapes vocabulary {path}: {where}: {what}")


def load_vocabulary(path: Path | str = VOCABULARY_FILE) -> dict[str, Any]:
    """Read and check a vocabulary file.

    Returns:
        ``{"values": {attribute: (value, ...)}, "drawn": {attribute: {value: rgb | px | (x, y)}},
        "phrase": {position: phrase}, "synonyms": {attribute: {value: (word, ...)}}}``, tuples in file order.

    Raises:
        ValueError naming the attribute and value when an attribute is missing, a shape is listed twice, a value has
        no drawing, no synonyms or a synonym that is another value's name, an RGB is not three numbers in [0, 1], a
        direction is not in {−1, 0, 1}² or two positions share one, or a position has no phrase.
    """
    path = Path(path)
    raw = json.loads(path.read_text())
    values: dict[str, tuple[str, ...]] = {}
    drawn: dict[str, dict[str, Any]] = {}
    synonyms: dict[str, dict[str, tuple[str, ...]]] = {}
    for attr in ATTRIBUTE_NAMES:
        _check(attr in raw, path, attr, "missing")
        entry = raw[attr]
        table = entry.get(_DRAWN[attr], {}) if attr in _DRAWN else dict.fromkeys(entry.get("values", ()))
        values[attr] = tuple(table)
        if attr == "shape":
            _check(len(values[attr]) == len(entry.get("values", ())), path, "shape", "a value is listed twice")
        _check(len(values[attr]) > 0, path, attr, f"no values (expected a {_DRAWN.get(attr, 'values')!r} table)")
        _check(set(entry.get("synonyms", {})) == set(values[attr]), path, attr, "synonyms must list every value once")
        for v in values[attr]:
            words = entry["synonyms"][v]
            clash = isinstance(words, list) and sorted(set(words) & set(values[attr]) - {v})
            ok = isinstance(words, list) and len(words) > 0 and all(isinstance(w, str) for w in words) and not clash
            what = f"needs a list of held-out words, none of them another value's name (got {words!r})"
            _check(ok, path, f"{attr} {v!r}", what)
        synonyms[attr] = {v: tuple(entry["synonyms"][v]) for v in values[attr]}
        if attr in ("colour", "background"):
            for v, rgb in table.items():
                numbers = isinstance(rgb, list) and all(isinstance(c, (int, float)) for c in rgb)
                ok = numbers and len(rgb) == 3 and all(0 <= c <= 1 for c in rgb)
                _check(ok, path, f"{attr} {v!r}", f"rgb must be three numbers in [0, 1], got {rgb}")
            drawn[attr] = {v: tuple(float(c) for c in rgb) for v, rgb in table.items()}
        elif attr == "size":
            for v, px in table.items():
                _check(isinstance(px, (int, float)) and px > 0, path, f"size {v!r}", f"needs a positive px, got {px}")
            drawn[attr] = {v: float(px) for v, px in table.items()}
        elif attr == "position":
            for v, d in table.items():
                ok = isinstance(d, list) and len(d) == 2 and all(c in (-1, 0, 1) for c in d)
                _check(ok, path, f"position {v!r}", f"direction must be (x, y) in {{-1, 0, 1}}², got {d}")
            drawn[attr] = {v: (int(d[0]), int(d[1])) for v, d in table.items()}
            _check(len(set(drawn[attr].values())) == len(table), path, "position", "two positions share a direction")
            _check(set(entry.get("phrase", {})) == set(table), path, "position", "phrase must list every position")
    return {"values": values, "drawn": drawn, "phrase": dict(raw["position"]["phrase"]), "synonyms": synonyms}


_VOCABULARY = load_vocabulary()
SHAPES: tuple[str, ...] = _VOCABULARY["values"]["shape"]
COLOURS: dict[str, tuple[float, float, float]] = _VOCABULARY["drawn"]["colour"]
BACKGROUNDS: dict[str, tuple[float, float, float]] = _VOCABULARY["drawn"]["background"]
SIZES: dict[str, float] = _VOCABULARY["drawn"]["size"]  # half-extent in pixels
POSITIONS: dict[str, tuple[int, int]] = _VOCABULARY["drawn"]["position"]  # grid direction (x, y), y down
ATTRIBUTES: dict[str, tuple[str, ...]] = _VOCABULARY["values"]
POSITION_PHRASES: dict[str, str] = _VOCABULARY["phrase"]  # the training captions' words for a position
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = _VOCABULARY["synonyms"]  # held out: never in a training caption

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_NAMES",
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "POSITION_PHRASES",
    "SHAPES",
    "SIZES",
    "SYNONYMS",
    "VOCABULARY_FILE",
    "load_vocabulary",
]
