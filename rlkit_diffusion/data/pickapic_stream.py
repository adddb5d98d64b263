"""Streaming, shuffled, resumable Pick-a-Pic v2 pairs for real-scale training (851k pairs never sit in memory).

`StreamingPairs` reads the parquet shards one row group at a time and returns raw pairs ``(caption, winner bytes,
loser bytes, where)`` — images stay JPEG-encoded until the consumer decodes them (the SD world VAE-encodes them,
through a latent cache). Memory is bounded by ``buffer_size`` pairs plus one row group.

How the order is made (deterministic in ``seed``):

1. Epoch e visits every row group of every file once, in an order shuffled by ``Random(f"{seed}-{e}")``.
2. Rows pass the label checks of the Pick-a-Pic reader (labels in {0, ½, 1} summing to 1, caption present); ties
   (½, ½) are dropped as in the paper; an optional ``filter`` on the row's non-image columns
   (e.g. `dreamlike_only`) drops more.
3. A shuffle buffer of ``buffer_size`` pairs (the usual streaming shuffle): each incoming pair replaces a random
   buffered one, which is emitted; at the end of the epoch the buffer drains in random order.

Resume: the state is ``{seed, epoch, emitted}``. `load_state_dict` replays the epoch's order reading only the small
columns (captions, labels, model names — not the images) and then fetches the image bytes of the pairs still
buffered, so an interrupted run continues with exactly the pairs an uninterrupted one would have seen.

Multi-process: every rank holds the same stream and draws the GLOBAL batch; `take` returns one rank's slice, so the
union over ranks is exactly the single-process batch (see ``benchmarks/run.py``).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from rlkit_diffusion.data.pickapic import (
    IMAGE_COLUMNS,
    REQUIRED_COLUMNS,
    BadRowError,
    PathLike,
    _check_label,
    resolve_paths,
)


def dreamlike_only(row: dict[str, Any]) -> bool:
    """Keep pairs where both images come from Dreamlike (``"dream"`` in ``model_0`` and ``model_1``).

    This is the official Diffusion-DPO code's ``--dreamlike_pairs_only`` test on the Pick-a-Pic v2 columns
    ``model_0`` / ``model_1`` (e.g. ``dreamlike-art/dreamlike-photoreal-2.0``).
    """
    return "dream" in str(row.get("model_0") or "") and "dream" in str(row.get("model_1") or "")


@dataclass
class RawPair:
    """One preference pair, images still encoded. ``where`` = ``"<file>:row <i>"`` for error messages."""

    caption: str
    unit: int  # index of the (file, row group) unit
    row: int  # row inside the row group
    winner_first: bool  # label_0 == 1
    image_w: bytes | None = None  # None until read (and when missing in the file)
    image_l: bytes | None = None
    where: str = ""
    fetched: bool = False  # image columns read


class PairStream:
    """What the pair streams share: the project's row checks (`_checked_row`, `_winner_first`), ``take`` (this
    rank's slice of the next pairs) and ``_emit``, which counts a pair out (``emitted``, and the pairs of this
    epoch, by which an empty epoch is detected). A stream defines ``_next()``, the next pair, and sets the
    attributes below."""

    label: str  # the stream in messages
    filter: Callable[[dict[str, Any]], bool] | None
    scalar_columns: list[str]
    skip_bad_rows: bool
    n_bad_rows: int
    n_ties: int
    n_filtered: int
    emitted: int
    _pairs_this_epoch: int

    def _winner_first(self, column: Callable[[str], Any]) -> bool | None:
        """The row checks on a row read by ``column(name)``: True if image 0 wins (label_0 = 1); None for a tie
        (counted in ``n_ties``) or a row ``filter`` drops (``n_filtered``). Raises BadRowError on a missing caption
        or bad labels."""
        if not column("caption"):
            raise BadRowError("missing caption")
        label_0 = _check_label(column("label_0"), "label_0")
        label_1 = _check_label(column("label_1"), "label_1")
        if label_0 + label_1 != 1.0:
            raise BadRowError(f"labels do not sum to 1 (label_0={label_0}, label_1={label_1})")
        if label_0 == 0.5:
            self.n_ties += 1
            return None
        if self.filter is not None and not self.filter({c: column(c) for c in self.scalar_columns}):
            self.n_filtered += 1
            return None
        return label_0 == 1.0

    def _checked_row(self, check: Callable[[], RawPair | None], where: str) -> RawPair | None:
        """``check()``, the pair of one row or None; a bad row raises, naming ``where`` (or, with ``skip_bad_rows``,
        is counted in ``n_bad_rows`` and gives None)."""
        try:
            return check()
        except BadRowError as err:
            if not self.skip_bad_rows:
                raise BadRowError(f"{self.label}: {where}: {err}") from None
            self.n_bad_rows += 1
            return None

    def _emit(self, pair: RawPair) -> RawPair:
        self.emitted += 1
        self._pairs_this_epoch += 1
        return pair

    def take(self, n: int, *, rank: int = 0, num_shards: int = 1) -> list[RawPair]:
        """The next ``n · num_shards`` pairs of the stream, of which this rank's slice ``[rank·n, (rank+1)·n)``."""
        if n <= 0:
            raise ValueError(f"{type(self).__name__}.take: n must be positive, got {n}")
        pairs = [self._next() for _ in range(n * num_shards)]
        return pairs[rank * n : (rank + 1) * n]


class StreamingPairs(PairStream):
    """Shuffled stream of Pick-a-Pic pairs over parquet shards (module docstring).

    Args:
        paths: a parquet file, a directory, a glob pattern, or a list of these.
        buffer_size: pairs in the shuffle buffer (0 = no shuffling at all: file order, e.g. for validation).
        seed: seed of the epoch orders and of the buffer.
        filter: ``row -> bool`` on a dict of the row's non-image columns (e.g. `dreamlike_only`).
        skip_bad_rows: skip rows with bad labels or a missing caption (counted in ``n_bad_rows``) instead of
            raising. Image bytes are checked by the consumer when it decodes them.
        filter_columns: the extra non-image columns ``filter`` needs (``model_0``, ``model_1`` for Dreamlike).

    Raises:
        ValueError: a file lacks a required column (one line naming the file and the columns), a bad row when
            ``skip_bad_rows`` is False, or an epoch without a single pair.
    """

    def __init__(
        self,
        paths: PathLike | Sequence[PathLike],
        *,
        buffer_size: int = 1000,
        seed: int = 0,
        filter: Callable[[dict[str, Any]], bool] | None = None,
        filter_columns: Sequence[str] = (),
        skip_bad_rows: bool = False,
    ) -> None:
        self.label = "Pick-a-Pic stream"
        if buffer_size < 0:
            raise ValueError(f"StreamingPairs: buffer_size must be >= 0, got {buffer_size}")
        self.files = resolve_paths(paths)
        self.buffer_size = int(buffer_size)
        self.seed = int(seed)
        self.filter = filter
        self.skip_bad_rows = skip_bad_rows
        self.scalar_columns = [c for c in REQUIRED_COLUMNS if c not in IMAGE_COLUMNS] + list(filter_columns)
        self.units: list[tuple[int, int]] = []  # (file index, row group)
        for i, file in enumerate(self.files):
            meta = pq.ParquetFile(file)
            names = set(meta.schema_arrow.names)
            missing = [c for c in [*REQUIRED_COLUMNS, *filter_columns] if c not in names]
            if missing:
                raise ValueError(f"Pick-a-Pic stream: {file}: missing columns {missing} (has {sorted(names)})")
            self.units.extend((i, g) for g in range(meta.num_row_groups))
        self.n_bad_rows = 0
        self.n_ties = 0
        self.n_filtered = 0
        self._start_epoch(0)

    # ------------------------------------------------------------------------------------------------------------
    # Reading
    # ------------------------------------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.emitted = 0
        self._rng = random.Random(f"{self.seed}-{epoch}")
        self._order = list(range(len(self.units)))
        if self.buffer_size > 0:
            self._rng.shuffle(self._order)
        self._next_unit = 0
        self._pending: deque[RawPair] = deque()
        self._buffer: list[RawPair] = []
        self._pairs_this_epoch = 0

    def _read_unit(self, position: int, with_images: bool) -> list[RawPair]:
        """The checked, non-tie, filtered pairs of one row group (image bytes only if ``with_images``)."""
        unit = self._order[position]
        file_index, group = self.units[unit]
        file = self.files[file_index]
        columns = self.scalar_columns + (list(IMAGE_COLUMNS) if with_images else [])
        table = pq.ParquetFile(file).read_row_group(group, columns=columns)
        data = {name: table.column(name).to_pylist() for name in table.column_names}
        out = []
        for row in range(table.num_rows):
            where = f"{file}: row group {group} row {row}"
            pair = self._checked_row(partial(self._check_row, data, row, unit, where, with_images), where)
            if pair is not None:
                out.append(pair)
        return out

    def _check_row(self, data: dict[str, list], row: int, unit: int, where: str, with_images: bool) -> RawPair | None:
        winner_first = self._winner_first(lambda column: data[column][row])
        if winner_first is None:
            return None
        pair = RawPair(data["caption"][row], unit, row, winner_first=winner_first, where=where)
        if with_images:
            self._attach_images(pair, data["jpg_0"][row], data["jpg_1"][row])
        return pair

    @staticmethod
    def _attach_images(pair: RawPair, jpg_0: bytes | None, jpg_1: bytes | None) -> None:
        pair.image_w, pair.image_l = (jpg_0, jpg_1) if pair.winner_first else (jpg_1, jpg_0)
        pair.fetched = True

    def _next(self, with_images: bool = True) -> RawPair:
        """The next pair of the stream (steps 1-3 of the module docstring)."""
        while True:
            if self._pending:
                incoming = self._pending.popleft()
                if len(self._buffer) < self.buffer_size:
                    self._buffer.append(incoming)
                    continue
                if self.buffer_size == 0:
                    return self._emit(incoming)
                j = self._rng.randrange(len(self._buffer))
                out, self._buffer[j] = self._buffer[j], incoming
                return self._emit(out)
            if self._next_unit < len(self._order):
                self._pending.extend(self._read_unit(self._next_unit, with_images))
                self._next_unit += 1
                continue
            if self._buffer:
                j = self._rng.randrange(len(self._buffer))
                self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
                return self._emit(self._buffer.pop())
            if self._pairs_this_epoch == 0:
                raise ValueError(
                    f"Pick-a-Pic stream: no preference pairs in {[str(f) for f in self.files]} "
                    f"({self.n_ties} ties dropped, {self.n_filtered} filtered out, {self.n_bad_rows} bad rows skipped)"
                )
            self._start_epoch(self.epoch + 1)

    # ------------------------------------------------------------------------------------------------------------
    # Resume
    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "emitted": self.emitted, "files": [str(f) for f in self.files]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay to ``state`` without reading images, then fetch the images of the buffered/pending pairs."""
        if [str(f) for f in self.files] != list(state.get("files", [])):
            raise ValueError("StreamingPairs: the checkpoint's stream was over other parquet files")
        self.seed = int(state["seed"])
        self._start_epoch(int(state["epoch"]))
        for _ in range(int(state["emitted"])):
            self._next(with_images=False)
        self._fetch_images([*self._buffer, *self._pending])

    def _fetch_images(self, pairs: list[RawPair]) -> None:
        by_unit: dict[int, list[RawPair]] = {}
        for p in pairs:
            if not p.fetched:
                by_unit.setdefault(p.unit, []).append(p)
        for unit, items in by_unit.items():
            file_index, group = self.units[unit]
            table = pq.ParquetFile(self.files[file_index]).read_row_group(group, columns=list(IMAGE_COLUMNS))
            jpg_0, jpg_1 = table.column("jpg_0"), table.column("jpg_1")
            for p in items:
                self._attach_images(p, jpg_0[p.row].as_py(), jpg_1[p.row].as_py())


__all__ = ["RawPair", "StreamingPairs", "dreamlike_only"]
