"""Pick-a-Pic v2 parquet: round trip, ties, bad rows, streaming, the in-memory batcher, and the shapes pairs."""

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rlkit_diffusion.data.pickapic import (
    PickAPicReader,
    PreferencePairDataset,
    encode_image,
    write_pairs,
)
from rlkit_diffusion.worlds.shapes.captions import is_heldout
from rlkit_diffusion.worlds.shapes.gold import GoldShapesReward
from rlkit_diffusion.worlds.shapes.pairs import (
    PairSet,
    calibrate_temperature,
    expected_agreement,
    generate_pairs,
    label_agreement,
    make_shapes_pairs,
    split_captions,
)
from tests.zoo_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread is fastest


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 8, 8, generator=g) * 255).round() / 255  # exactly representable in 8 bits


def _write(path, labels, **kwargs):
    n = len(labels)
    x0, x1 = _images(n, 0), _images(n, 1)
    captions = [f"caption {i}" for i in range(n)]
    write_pairs(path, captions, x0, x1, labels, **kwargs)
    return captions, x0, x1


def _raw_table(path, **overrides):
    """A valid 3-row Pick-a-Pic table with some columns overridden."""
    png = encode_image(_images(1, 0)[0])
    columns = {
        "caption": ["a", "b", "c"],
        "jpg_0": [png, png, png],
        "jpg_1": [png, png, png],
        "label_0": [1.0, 0.0, 1.0],
        "label_1": [0.0, 1.0, 0.0],
    }
    columns.update(overrides)
    pq.write_table(pa.table(columns), path)
    return path


def test_round_trip_winner_first_and_ties_dropped(tmp_path):
    labels = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
    captions, x0, x1 = _write(tmp_path / "pairs.parquet", labels, extra_columns={"model_0": ["m"] * 6})
    reader = PickAPicReader(tmp_path / "pairs.parquet")
    pairs = list(reader)
    assert reader.n_ties == 1 and reader.n_pairs == 5 and reader.n_rows == 6
    kept = [i for i, v in enumerate(labels) if v != 0.5]
    for (caption, x_w, x_l), i in zip(pairs, kept):
        assert caption == captions[i]
        winner, loser = (x0[i], x1[i]) if labels[i] == 1.0 else (x1[i], x0[i])
        assert x_w.shape == (3, 8, 8) and x_w.dtype == torch.float32
        assert torch.equal(x_w, winner) and torch.equal(x_l, loser)


def test_jpeg_bytes_are_read(tmp_path):
    _write(tmp_path / "j.parquet", [1.0, 0.0], image_format="JPEG")
    pairs = list(PickAPicReader(tmp_path / "j.parquet"))
    assert len(pairs) == 2 and pairs[0][1].shape == (3, 8, 8)


def test_streams_shards_with_row_indices_across_row_groups(tmp_path):
    _write(tmp_path / "a.parquet", [1.0, 0.0, 1.0], row_group_size=2)
    _write(tmp_path / "b.parquet", [1.0, 1.0, 1.0, 0.0, 1.0], row_group_size=2)
    data = pq.read_table(tmp_path / "b.parquet").to_pydict()
    data["jpg_1"][3] = b"not an image"
    pq.write_table(pa.table(data), tmp_path / "b.parquet", row_group_size=2)
    with pytest.raises(ValueError, match=r"b\.parquet: row 3: undecodable image in jpg_1"):
        list(PickAPicReader(tmp_path, batch_rows=2))
    reader = PickAPicReader([tmp_path / "a.parquet", str(tmp_path / "b*.parquet")], skip_bad_rows=True, batch_rows=2)
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        pairs = list(reader)
    assert len(pairs) == 7 and reader.n_bad_rows == 1 and reader.bad_rows[0][1] == 3


def test_missing_columns_error_names_columns_and_file(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""], "label_0": [1.0]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: missing columns \['jpg_1', 'label_1'\]"):
        list(PickAPicReader(tmp_path / "bad.parquet"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"jpg_0": [b"x", None, b"x"]}, "row 1: missing image bytes in jpg_0"),
        ({"jpg_1": [b"", b"x", b"x"]}, "row 0: missing image bytes in jpg_1"),
        ({"label_0": [1.0, 0.3, 1.0]}, r"row 1: label_0=0.3 not in \{0, 0.5, 1\}"),
        ({"label_1": [0.0, 0.0, 0.0]}, "row 1: labels do not sum to 1"),
        ({"caption": ["a", "b", None]}, "row 2: missing caption"),
    ],
)
def test_bad_rows_raise_naming_the_row_or_are_skipped_and_counted(tmp_path, override, message):
    png = encode_image(_images(1, 0)[0])
    override = {k: [png if v == b"x" else v for v in vals] for k, vals in override.items()}
    path = _raw_table(tmp_path / "rows.parquet", **override)
    with pytest.raises(ValueError, match=message):
        list(PickAPicReader(path))
    reader = PickAPicReader(path, skip_bad_rows=True)
    with pytest.warns(UserWarning, match="skipped"):
        pairs = list(reader)
    assert reader.n_bad_rows >= 1 and len(pairs) == 3 - reader.n_bad_rows


def test_undecodable_image_names_the_row(tmp_path):
    png = encode_image(_images(1, 0)[0])
    path = _raw_table(tmp_path / "u.parquet", jpg_0=[png, png, b"\x89PNG broken"])
    with pytest.raises(ValueError, match=r"u\.parquet: row 2: undecodable image in jpg_0"):
        list(PickAPicReader(path))


def test_empty_split_raises(tmp_path):
    _write(tmp_path / "ties.parquet", [0.5, 0.5])
    with pytest.raises(ValueError, match="no preference pairs.*2 ties dropped"):
        list(PickAPicReader(tmp_path / "ties.parquet"))
    with pytest.raises(ValueError, match="no parquet files"):
        PickAPicReader(str(tmp_path / "nothing*.parquet"))


def test_filter_sees_extra_columns(tmp_path):
    models = ["dreamlike", "sdxl", "dreamlike", "dreamlike"]
    _write(tmp_path / "f.parquet", [1.0, 1.0, 0.0, 1.0], extra_columns={"model_0": models, "model_1": models})
    reader = PickAPicReader(tmp_path / "f.parquet", filter=lambda row: row["model_0"] == "dreamlike")
    assert [c for c, _, _ in reader] == ["caption 0", "caption 2", "caption 3"]
    assert reader.n_filtered == 1


def test_dataset_batches_are_seeded_and_resumable(tmp_path):
    _write(tmp_path / "d.parquet", [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    dataset = PreferencePairDataset.from_parquet(tmp_path / "d.parquet")
    assert len(dataset) == 7 and dataset.reader_stats["pairs"] == 7
    a, b = dataset.batcher(seed=3), dataset.batcher(seed=3)
    batches_a = [a.next_batch(3) for _ in range(5)]  # crosses two epoch boundaries
    assert [x[0] for x in batches_a] == [b.next_batch(3)[0] for _ in range(5)]
    assert all(len(captions) == 3 and x_w.shape == (3, 3, 8, 8) for captions, x_w, _ in batches_a)
    first_epoch = [c for captions, _, _ in batches_a[:2] for c in captions] + [batches_a[2][0][0]]
    assert sorted(first_epoch) == sorted(dataset.captions)  # an epoch visits every pair once
    assert [x[0] for x in batches_a] != [x[0] for x in (dataset.batcher(seed=4).next_batch(3) for _ in range(5))]

    resumed = dataset.batcher(seed=0)
    reference = dataset.batcher(seed=0)
    reference.next_batch(5)
    resumed.load_state_dict(reference.state_dict())
    for _ in range(4):
        expected, got = reference.next_batch(4), resumed.next_batch(4)
        assert expected[0] == got[0] and torch.equal(expected[1], got[1])


def test_encoded_images_are_png_by_default():
    data = encode_image(_images(1, 0)[0])
    assert Image.open(io.BytesIO(data)).format == "PNG"


def test_label_agreement_and_temperature_calibration():
    gold_0, gold_1 = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 3.0, 1.0, 0.0])
    assert label_agreement(gold_0, gold_1, torch.tensor([1.0, 1.0, 1.0, 0.0])) == pytest.approx(2 / 3)
    diff = torch.linspace(-3, 3, 101)
    temperature = calibrate_temperature(diff, 0.7)
    assert expected_agreement(diff, temperature) == pytest.approx(0.7, abs=1e-4)


def test_shapes_pairs_split_and_labels(tmp_path):
    train_captions, val_captions = split_captions(300, 50, seed=0)
    assert len(set(val_captions)) == 50 and not set(train_captions) & set(val_captions)
    assert not any(is_heldout(c) for c in train_captions + val_captions)

    stats = make_shapes_pairs(tmp_path, n_train_pairs=300, n_val_captions=50, seed=0, temperature=2.0)
    again = make_shapes_pairs(tmp_path / "again", n_train_pairs=300, n_val_captions=50, seed=0, temperature=2.0)
    assert stats["train_agreement"] == again["train_agreement"]
    assert pq.read_table(stats["train_path"]).equals(pq.read_table(again["train_path"]))

    val = PreferencePairDataset.from_parquet(stats["val_path"])
    assert len(val) == 50 and len(set(val.captions)) == 50
    train = PreferencePairDataset.from_parquet(stats["train_path"])
    assert len(train) == stats["train_pairs"] and not set(train.captions) & set(val.captions)
    assert 0.55 < stats["train_agreement"] < 0.9
    # Labels were drawn on the stored (8-bit) images: the gold order of the decoded pairs matches the file.
    gold = GoldShapesReward()
    agree = (gold(train.x_w, train.captions) > gold(train.x_l, train.captions)).float().mean()
    assert float(agree) == pytest.approx(stats["train_agreement"], abs=1e-6)


def test_generate_pairs_uses_the_base_sampler():
    calls = []

    def base_sampler(captions):
        calls.append(len(captions))
        return torch.full((len(captions), 3, 16, 16), 0.5)

    pairs = generate_pairs(
        ["a red circle"] * 40, torch.Generator().manual_seed(0), temperature=1.0, base_sampler=base_sampler
    )
    assert isinstance(pairs, PairSet) and len(pairs) == 40
    assert sum(calls) == pairs.model_0.count("base_model") + pairs.model_1.count("base_model") > 0
    gray = [i for i, m in enumerate(pairs.model_0) if m == "base_model"]
    assert torch.all(pairs.images_0[gray] == 128 / 255)
