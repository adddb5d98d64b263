"""Pick-a-Pic through ``datasets`` (`rlkit_diffusion.data.hf_pairs`): on local parquet shards it gives the same pairs
as the project's parquet streamer and reader (the same first batch, in the SD world's latents too), resumes from
``datasets``' own state, and shards as slices of the global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlkit_diffusion.tiny import save_tiny_sd15, write_pickapic

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hf_pairs") / "pickapic"
    write_pickapic(d / "train-00000.parquet", n=12)  # every 4th row a tie
    write_pickapic(d / "train-00001.parquet", n=8, seed=3)
    return d


def raw(pairs) -> list[tuple[str, bytes, bytes]]:
    return [(p.caption, p.image_w, p.image_l) for p in pairs]


def test_same_first_batch_as_the_parquet_streamer_and_reader(pairs_dir):
    from rlkit_diffusion.data.hf_pairs import DatasetsPairs, open_pair_stream
    from rlkit_diffusion.data.pickapic import PickAPicReader, decode_image
    from rlkit_diffusion.data.pickapic_stream import StreamingPairs

    ours = DatasetsPairs(str(pairs_dir), buffer_size=0)
    theirs = StreamingPairs(pairs_dir, buffer_size=0)
    batch = ours.take(8)
    assert raw(batch) == raw(theirs.take(8))
    assert ours.n_ties == 2  # rows 3 and 7 of the first file (the streamer counts a whole row group ahead)
    reader = list(PickAPicReader(pairs_dir))[:8]  # decoded images, winner first
    for p, (caption, x_w, x_l) in zip(batch, reader):
        assert p.caption == caption
        assert torch.equal(decode_image(p.image_w), x_w) and torch.equal(decode_image(p.image_l), x_l)
    assert isinstance(open_pair_stream(f"datasets:{pairs_dir}", buffer_size=0), DatasetsPairs)
    assert isinstance(open_pair_stream(str(pairs_dir), buffer_size=0), StreamingPairs)
    assert raw(DatasetsPairs(str(pairs_dir), buffer_size=4, seed=1).take(12)) != raw(batch + ours.take(4))


def test_resume_from_the_datasets_state_and_epochs(pairs_dir):
    from rlkit_diffusion.data.hf_pairs import DatasetsPairs

    a = DatasetsPairs(str(pairs_dir), buffer_size=0)
    a.take(5)
    state = json.loads(json.dumps(a.state_dict()))  # as stored in a checkpoint's state.json
    rest = a.take(12)  # 14 pairs per epoch: crosses into epoch 1
    assert a.epoch == 1
    b = DatasetsPairs(str(pairs_dir), buffer_size=0)
    b.load_state_dict(state)
    assert raw(b.take(12)) == raw(rest)
    with pytest.raises(ValueError, match="checkpoint's stream"):
        DatasetsPairs(str(pairs_dir / "train-00000.parquet"), buffer_size=0).load_state_dict(state)


def test_shards_are_slices_of_the_global_batch(pairs_dir):
    from rlkit_diffusion.data.hf_pairs import DatasetsPairs

    single = raw(DatasetsPairs(str(pairs_dir), buffer_size=4, seed=2).take(6))
    shards = [raw(DatasetsPairs(str(pairs_dir), buffer_size=4, seed=2).take(3, rank=r, num_shards=2)) for r in (0, 1)]
    assert shards[0] + shards[1] == single


def test_sd_world_latents_match_through_datasets(pairs_dir, tmp_path):
    """``world.pairs=datasets:<dir>`` and ``world.pairs=<dir>`` give the same first batch of latents, bit for bit."""
    from rlkit_diffusion.worlds import build_world

    kw = {
        "pretrained": str(save_tiny_sd15(tmp_path / "sd15")),
        "resolution": 32,
        "pickscore_model": None,
        "proxy_reward": "jpeg",
        "eval_reward": "jpeg",
        "shuffle_buffer": 0,
        "hflip": True,
    }
    parquet = build_world("sd15", pairs=str(pairs_dir), **kw).pairs.next_batch(4)
    hf = build_world("sd15", pairs=f"datasets:{pairs_dir}", **kw).pairs.next_batch(4)
    assert hf[0] == parquet[0]
    torch.testing.assert_close(hf[1], parquet[1], atol=0, rtol=0)
    torch.testing.assert_close(hf[2], parquet[2], atol=0, rtol=0)
