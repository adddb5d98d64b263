"""Prompt sets from local files (PartiPrompts TSV, HPSv2 JSON, Pick-a-Pic captions, text); per-category win rates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rlkit_diffusion.data.prompts import (
    infer_kind,
    load_hpsv2_prompts,
    load_partiprompts,
    load_pickapic_captions,
    load_prompt_file,
    load_prompts,
)
from rlkit_diffusion.tiny import write_hpsv2, write_partiprompts, write_pickapic


def test_partiprompts_keeps_categories_quotes_and_drops_duplicates(tmp_path):
    ps = load_partiprompts(write_partiprompts(tmp_path / "PartiPrompts.tsv"))
    assert ps.name == "parti"
    assert ps.prompts == [
        "a man riding a bicycle",
        'a sign that says "hello"',
        "two dogs playing chess",
        "a portrait of a woman",
        "an owl made of glass",
    ]
    assert ps.categories["a man riding a bicycle"] == "People"  # first label of a repeated prompt
    assert ps.by_category() == {
        "People": ["a man riding a bicycle", "a portrait of a woman"],
        "Outdoor Scenes": ['a sign that says "hello"'],
        "Animals": ["two dogs playing chess", "an owl made of glass"],
    }
    challenge = load_partiprompts(tmp_path / "PartiPrompts.tsv", label="Challenge")
    assert challenge.categories["two dogs playing chess"] == "Quantity"


def test_partiprompts_missing_column_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nhello\tPeople\n")
    with pytest.raises(ValueError) as err:
        load_partiprompts(bad)
    assert (
        "\n" not in str(err.value) and "missing columns ['Prompt']" in str(err.value) and "bad.tsv" in str(err.value)
    )


def test_hpsv2_styles_from_a_directory_or_one_file(tmp_path):
    ps = load_hpsv2_prompts(write_hpsv2(tmp_path / "hps", per_style=3))
    assert len(ps) == 12
    assert {c: len(v) for c, v in ps.by_category().items()} == {
        "anime": 3,
        "concept-art": 3,
        "paintings": 3,
        "photo": 3,
    }
    one = load_hpsv2_prompts(tmp_path / "hps" / "photo.json")
    assert one.prompts == ["photo picture number 0", "photo picture number 1", "photo picture number 2"]
    (tmp_path / "broken.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="JSON list of strings"):
        load_hpsv2_prompts(tmp_path / "broken.json")


def test_pickapic_unique_captions(tmp_path):
    path = write_pickapic(tmp_path / "validation_unique.parquet", n=12)
    ps = load_pickapic_captions(path)
    assert len(ps) == len(set(ps.prompts)) == 12 and set(ps.categories.values()) == {"pickapic"}
    assert load_pickapic_captions(tmp_path).prompts == ps.prompts  # a directory of shards


def test_text_file_and_kind_inference(tmp_path):
    txt = tmp_path / "animals.txt"
    txt.write_text("cat\n\n dog \ncat\n")
    assert load_prompt_file(txt).prompts == ["cat", "dog"]
    write_partiprompts(tmp_path / "p.tsv")
    write_hpsv2(tmp_path / "hps")
    write_pickapic(tmp_path / "pp" / "val.parquet", n=4)
    assert [infer_kind(tmp_path / x) for x in ("p.tsv", "hps", "pp", "animals.txt")] == [
        "parti",
        "hpsv2",
        "pickapic",
        "txt",
    ]
    assert load_prompts(f"txt:{txt}").prompts == ["cat", "dog"]
    assert load_prompts(str(tmp_path / "p.tsv")).name == "parti"
    assert load_prompts(f"pickapic:{tmp_path / 'pp'}").name == "pickapic"
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_stratified_subset_is_deterministic_and_balanced(tmp_path):
    ps = load_hpsv2_prompts(write_hpsv2(tmp_path / "hps", per_style=5))
    sub = ps.subset(8, seed=3)
    assert sub.prompts == ps.subset(8, seed=3).prompts and sub.prompts != ps.subset(8, seed=4).prompts
    assert {c: len(v) for c, v in sub.by_category().items()} == {
        "anime": 2,
        "concept-art": 2,
        "paintings": 2,
        "photo": 2,
    }
    assert ps.subset(None) is ps and ps.subset(100) is ps


def test_category_win_rates():
    from rlkit_diffusion.evaluate import EvalConfig, category_win_rates

    prompts = ["a", "a", "b", "c"]
    wins = np.array([1.0, 0.0, 0.5, 1.0])
    out = category_win_rates(wins, prompts, {"a": "People", "b": "Animals"}, EvalConfig(bootstrap=50))
    assert out["People"]["win_rate"] == 0.5 and out["People"]["n"] == 2
    assert out["Animals"]["win_rate"] == 0.5 and out["other"]["win_rate"] == 1.0
    assert out["People"]["ci_low"] <= 0.5 <= out["People"]["ci_high"]
