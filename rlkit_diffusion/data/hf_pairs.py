"""Pick-a-Pic pairs through Hugging Face ``datasets`` (``load_dataset(..., streaming=True)``): the hub or local files.

`DatasetsPairs` is a drop-in for `rlkit_diffusion.data.pickapic_stream.StreamingPairs` (same ``take``,
``state_dict``/``load_state_dict``, the same `RawPair` out, so the SD worlds' `LatentPairs` VAE-encodes either):

* source: a hub id (``yuvalkirstain/pickapic_v2``, optionally ``@<split>``, default ``train``) or local parquet files
  (a file, directory or glob, as the project's reader resolves them), read by ``datasets``' parquet builder;
* rows pass the project's Pick-a-Pic checks (`rlkit_diffusion.data.pickapic`: required columns, labels in
  {0, ½, 1} summing to 1, a caption); ties are dropped; an optional ``filter`` sees the non-image columns;
  image columns stay encoded bytes (a hub ``Image`` feature is read with ``decode=False``);
* order: ``IterableDataset.shuffle(seed, buffer_size)`` (``datasets`` shuffles the shard order and keeps a buffer),
  reshuffled each epoch with ``set_epoch``; ``buffer_size=0`` keeps file order;
* ranks: as the project's streamer, every rank reads the stream and keeps its slice of the GLOBAL batch
  (``take(n, rank, num_shards)``), so the union over ranks is the single-process batch and rank 0's checkpoint
  resumes every rank;
* resume: the state is ``datasets``' own ``IterableDataset.state_dict()`` plus the epoch.

Which to use when (also docs/README.md "Data"):

=========================  ==========================================================================================
``world.pairs=<local dir>``  the project's parquet streamer (`StreamingPairs`): exact resume, also with a shuffle
                             buffer (the buffer is replayed from the small columns), Dreamlike filter pushed down to
                             the columns it reads. Use for training runs that must resume bit for bit.
``world.pairs=<hub id>``     ``datasets`` streaming (this module): no download step, the hub's shards streamed as
``world.pairs=datasets:<p>`` they are read. Resume restores the stream position, but with ``shuffle_buffer > 0`` the
                             buffer's content is not part of ``datasets``' state: a resumed run sees the same data
                             in a different order. Exact with ``shuffle_buffer=0``.
=========================  ==========================================================================================
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from rlkit_diffusion.data.pickapic import IMAGE_COLUMNS, REQUIRED_COLUMNS, resolve_paths
from rlkit_diffusion.data.pickapic_stream import PairStream, RawPair, StreamingPairs

DATASETS_PREFIX = "datasets:"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?")
"""``owner/name`` or ``owner/name@split`` (a relative path of this shape that exists locally stays local)."""


def is_local(source: str) -> bool:
    """A path, directory or glob pattern that exists on this machine (else: a hub id)."""
    return Path(source).expanduser().exists() or bool(glob.glob(str(Path(source).expanduser())))


def open_pair_stream(source: str, **kwargs: Any) -> StreamingPairs | DatasetsPairs:
    """The pair stream of ``world.pairs``: local parquet → the project's `StreamingPairs` (exact resume);
    ``datasets:<hub id or local path>`` or a hub id → `DatasetsPairs`. ``kwargs`` are the streamers' common ones
    (``buffer_size``, ``seed``, ``filter``, ``filter_columns``, ``skip_bad_rows``)."""
    source = str(source)
    if source.startswith(DATASETS_PREFIX):
        return DatasetsPairs(source[len(DATASETS_PREFIX) :], **kwargs)
    if is_local(source) or not HUB_ID.fullmatch(source):
        return StreamingPairs(source, **kwargs)  # its own one-line error for a missing local path
    return DatasetsPairs(source, **kwargs)


def _image_bytes(value: Any) -> bytes | None:
    """A binary column's bytes, or an undecoded ``datasets.Image`` value ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict):
        return value.get("bytes")
    return value


class DatasetsPairs(PairStream):
    """Pick-a-Pic pairs streamed by ``datasets`` (module docstring).

    Args:
        source: hub id (``owner/name[@split]``) or local parquet file / directory / glob.
        buffer_size: ``datasets``' shuffle buffer (0 = file order).
        seed: shuffle seed (epoch e uses ``seed + e``, ``datasets``' ``set_epoch``).
        filter: ``row -> bool`` on the row's non-image columns (e.g. `dreamlike_only`).
        filter_columns: the non-image columns ``filter`` needs (checked to exist).
        skip_bad_rows: skip rows with bad labels or a missing caption (``n_bad_rows``) instead of raising.
        split: the split when ``source`` does not name one.
    """

    def __init__(
        self,
        source: str,
        *,
        buffer_size: int = 1000,
        seed: int = 0,
        filter: Callable[[dict[str, Any]], bool] | None = None,
        filter_columns: Sequence[str] = (),
        skip_bad_rows: bool = False,
        split: str = "train",
    ) -> None:
        import datasets

        self.label = "Pick-a-Pic via datasets"
        if buffer_size < 0:
            raise ValueError(f"DatasetsPairs: buffer_size must be >= 0, got {buffer_size}")
        self.source = str(source)
        if is_local(self.source):
            files = [str(f) for f in resolve_paths(self.source)]
            ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
        else:
            name, _, named_split = self.source.partition("@")
            ds = datasets.load_dataset(name, split=named_split or split, streaming=True)
        names = set(ds.features or {}) if ds.features is not None else None
        if names is not None:
            missing = [c for c in [*REQUIRED_COLUMNS, *filter_columns] if c not in names]
            if missing:
                raise ValueError(f"Pick-a-Pic via datasets: {self.source}: missing columns {missing}")
            for col in IMAGE_COLUMNS:
                if isinstance(ds.features[col], datasets.Image):
                    ds = ds.cast_column(col, datasets.Image(decode=False))
        self.buffer_size, self.seed = int(buffer_size), int(seed)
        self.dataset = ds.shuffle(seed=self.seed, buffer_size=self.buffer_size) if self.buffer_size > 0 else ds
        self.filter, self.skip_bad_rows = filter, skip_bad_rows
        self.scalar_columns = [c for c in REQUIRED_COLUMNS if c not in IMAGE_COLUMNS] + list(filter_columns)
        self.n_bad_rows = self.n_ties = self.n_filtered = 0
        self.epoch, self.emitted = 0, 0
        self._pairs_this_epoch = 0
        self._iter = None

    def _check_row(self, ex: dict[str, Any], where: str) -> RawPair | None:
        """The project's Pick-a-Pic row checks (`PairStream._winner_first`): None for a tie or a filtered row."""
        winner_first = self._winner_first(ex.get)
        if winner_first is None:
            return None
        jpg_0, jpg_1 = _image_bytes(ex["jpg_0"]), _image_bytes(ex["jpg_1"])
        image_w, image_l = (jpg_0, jpg_1) if winner_first else (jpg_1, jpg_0)
        return RawPair(ex["caption"], 0, self.emitted, winner_first, image_w, image_l, where=where, fetched=True)

    def _next(self) -> RawPair:
        while True:
            if self._iter is None:
                self.dataset.set_epoch(self.epoch)
                self._iter = iter(self.dataset)
            try:
                ex = next(self._iter)
            except StopIteration:
                if self._pairs_this_epoch == 0:
                    raise ValueError(
                        f"Pick-a-Pic via datasets: no preference pairs in {self.source} ({self.n_ties} ties dropped, "
                        f"{self.n_filtered} filtered out, {self.n_bad_rows} bad rows skipped)"
                    ) from None
                self.epoch, self._pairs_this_epoch, self._iter = self.epoch + 1, 0, None
                continue
            where = f"{self.source}: epoch {self.epoch} example after pair {self.emitted}"
            pair = self._checked_row(partial(self._check_row, ex, where), where)
            if pair is not None:
                return self._emit(pair)

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "epoch": self.epoch,
            "emitted": self.emitted,
            "pairs_this_epoch": self._pairs_this_epoch,
            "datasets": self.dataset.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("source") != self.source:
            raise ValueError(f"DatasetsPairs: the checkpoint's stream was over {state.get('source')!r}")
        self.epoch, self.emitted = int(state["epoch"]), int(state["emitted"])
        self._pairs_this_epoch = int(state["pairs_this_epoch"])
        self.dataset.set_epoch(self.epoch)
        self.dataset.load_state_dict(state["datasets"])
        self._iter = iter(self.dataset)


__all__ = ["DATASETS_PREFIX", "DatasetsPairs", "open_pair_stream"]
