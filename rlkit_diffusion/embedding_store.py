"""Per-string tensors kept on disk and shared by every process: the persistent side of a per-caption embedding cache.

A frozen text encoder that encodes each caption on its own (so that a caption's embedding never depends on the
captions it arrived with) spends real time on the shapes world's 3,731 training captions: ~13 ms each on one CPU
core, about a third of a default DPO run's training phase. Its embeddings depend only on the encoder's files, its
settings and code, so they are computed once per machine and reused by every later run, experiment and leaderboard.

Layout: ``<directory>/<shard>.safetensors``, one shard per write, named uniquely (several processes — the runs of
``jobs=2``, the ranks of a multi-process run — may write at once; none rewrites another's file). A shard holds one
stacked tensor per field, (N, ...) for its N strings, and in its metadata the strings (JSON) and the SHA-256 of the
tensors' bytes. Reading takes the union of all shards. A shard that does not parse or whose checksum does not match
is reported, deleted and ignored — its strings are recomputed by the encoder and written again — never used. Writes go
through `rlkit_diffusion.checkpoint.atomic_write`, so a kill mid-write leaves no partial shard.

The directory is the store's key: the caller names it by a digest of everything the embeddings depend on
(`SentenceEncoder.store_key`), so a changed input reads an empty store.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor

from rlkit_diffusion.checkpoint import atomic_write, tensor_digest

STORE_FORMAT = "2"
"""Bump when the layout of a shard changes."""


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of named tensors, in name order (`rlkit_diffusion.checkpoint.tensor_digest` of each)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        tensor_digest(h, name, tensors[name])
    return h.hexdigest()


class EmbeddingStore:
    """``string → tuple of tensors`` on disk (module docstring).

    Args:
        directory: the store; its parent (the caches' root) is created now, the store itself on the first write.
        fields: names of the tuple's tensors, in order, e.g. ``("hidden", "mask", "pooled")``.
    """

    def __init__(self, directory: Path | str, fields: tuple[str, ...]):
        self.directory = Path(directory)
        self.fields = tuple(fields)
        self.directory.parent.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, tuple[Tensor, ...]]:
        """Every string of every valid shard (CPU tensors); bad shards are deleted with a warning."""
        from safetensors import safe_open

        entries: dict[str, tuple[Tensor, ...]] = {}
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
                    tensors = {name: f.get_tensor(name) for name in self.fields}
                strings = json.loads(meta["strings"])
                if meta.get("format") != STORE_FORMAT or meta.get("sha256") != tensors_sha256(tensors):
                    raise ValueError("checksum or format mismatch")
                if any(t.shape[0] != len(strings) for t in tensors.values()):
                    raise ValueError("row count mismatch")
            except Exception as err:  # unreadable, truncated, altered: recompute, never use
                warnings.warn(f"embedding store: ignoring and deleting the bad shard {path} ({err})", stacklevel=2)
                path.unlink(missing_ok=True)
                continue
            for i, s in enumerate(strings):
                entries[s] = tuple(tensors[name][i] for name in self.fields)
        return entries

    def write(self, entries: dict[str, tuple[Tensor, ...]]) -> Path | None:
        """Write ``entries`` as one new shard; returns its path. Nothing is written when ``entries`` is empty or the
        caches' root has been removed since (e.g. a temporary run directory, at the interpreter's exit)."""
        from safetensors.torch import save_file

        if not entries or not self.directory.parent.is_dir():
            return None
        strings = list(entries)
        tensors = {
            name: torch.stack([entries[s][k].detach().cpu() for s in strings]).contiguous()
            for k, name in enumerate(self.fields)
        }
        meta = {"format": STORE_FORMAT, "strings": json.dumps(strings), "sha256": tensors_sha256(tensors)}
        self.directory.mkdir(exist_ok=True)
        path = self.directory / f"{uuid.uuid4().hex}.safetensors"
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


__all__ = ["EmbeddingStore", "STORE_FORMAT", "tensors_sha256"]
