"""The persistent caption-embedding cache: stored = computed bit for bit, read back instead of re-encoded, shards
written every FLUSH_EVERY captions and at collection, bad shards deleted and recomputed, a changed input is
another key."""

import gc

import pytest
import torch

from rlkit_diffusion.embedding_store import EmbeddingStore
from rlkit_diffusion.worlds.shapes.text_encoder import SentenceEncoder

CAPTIONS = ["a red circle", "a blue square at the top", "two green crosses on a beige background", "a pink diamond"]


@pytest.fixture
def count_encodes(monkeypatch):
    """Captions actually run through the model (not read from a cache)."""
    seen: list[str] = []
    real = SentenceEncoder._encode_one

    def counting(self, caption):
        seen.append(caption)
        return real(self, caption)

    monkeypatch.setattr(SentenceEncoder, "_encode_one", counting)
    return seen


def _shards(root):
    return sorted(root.rglob("*.safetensors"))


def test_store_round_trip_and_union_of_shards(tmp_path):
    store = EmbeddingStore(tmp_path / "k", ("a", "b"))
    assert store.load() == {} and store.write({}) is None
    first = {"x": (torch.arange(3.0), torch.tensor([True, False])), "y": (torch.ones(3), torch.tensor([False, True]))}
    store.write(first)
    store.write({"z": (torch.full((3,), 7.0), torch.tensor([True, True]))})
    loaded = EmbeddingStore(tmp_path / "k", ("a", "b")).load()
    assert sorted(loaded) == ["x", "y", "z"]
    for key, value in first.items():
        assert all(torch.equal(u, v) for u, v in zip(loaded[key], value))
    assert loaded["z"][1].dtype == torch.bool


def test_a_bad_shard_is_deleted_and_ignored(tmp_path):
    store = EmbeddingStore(tmp_path / "k", ("a",))
    good = store.write({"x": (torch.arange(4.0),)})
    bad = store.write({"y": (torch.arange(4.0),)})
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF  # flip a bit of the tensor data: the checksum no longer matches
    bad.write_bytes(bytes(raw))
    truncated = store.write({"z": (torch.arange(4.0),)})
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.warns(UserWarning, match="bad shard"):
        loaded = store.load()
    assert sorted(loaded) == ["x"]
    assert _shards(tmp_path) == [good]


def test_stored_embeddings_are_the_computed_ones_and_are_not_recomputed(tmp_path, count_encodes):
    plain = SentenceEncoder().encode(CAPTIONS)
    assert count_encodes == CAPTIONS
    count_encodes.clear()

    writer = SentenceEncoder(store=tmp_path)
    assert writer.encode(CAPTIONS[:2]).hidden.shape == (2, 24, 384)
    assert _shards(tmp_path) == []  # fewer than FLUSH_EVERY new captions: written at collection
    del writer
    gc.collect()
    assert len(_shards(tmp_path)) == 1
    count_encodes.clear()

    reader = SentenceEncoder(store=tmp_path)
    out = reader.encode(CAPTIONS)
    assert count_encodes == CAPTIONS[2:]  # the two stored captions are read, not encoded
    for field in ("hidden", "mask", "pooled"):
        assert torch.equal(getattr(out, field), getattr(plain, field))


def test_shards_every_flush_every_captions(tmp_path, monkeypatch, count_encodes):
    monkeypatch.setattr(SentenceEncoder, "FLUSH_EVERY", 2)
    encoder = SentenceEncoder(store=tmp_path)
    encoder.encode(CAPTIONS[:3])
    assert len(_shards(tmp_path)) == 1  # two captions flushed, one pending
    encoder.flush()
    assert len(_shards(tmp_path)) == 2
    encoder.flush()  # nothing new: no empty shard
    assert len(_shards(tmp_path)) == 2
    assert sorted(SentenceEncoder(store=tmp_path)._cache) == sorted(CAPTIONS[:3])


def test_a_changed_input_is_another_key(tmp_path):
    assert SentenceEncoder(store=tmp_path).store_key() == SentenceEncoder().store_key()
    assert SentenceEncoder(max_length=16).store_key() != SentenceEncoder().store_key()


def test_no_store_without_a_directory_and_nothing_written_after_its_root_is_gone(tmp_path):
    assert SentenceEncoder().store is None
    root = tmp_path / "cache"
    encoder = SentenceEncoder(store=root)
    encoder.encode(CAPTIONS[:1])
    import shutil

    shutil.rmtree(root)
    del encoder
    gc.collect()
    assert not root.exists()  # the collection-time write does not recreate a removed root
