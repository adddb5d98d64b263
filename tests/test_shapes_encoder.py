"""The frozen text encoder of the shapes world: shapes, normalisation, cache, synonyms, truncation, empty prompt."""

import warnings

import pytest
import torch

from rlkit_diffusion.worlds.shapes.text_encoder import SentenceEncoder


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder(max_length=24)


def test_encoder_shapes_and_normalisation(encoder):
    out = encoder.encode(["a red circle", "on a navy background, a tiny crimson disc at the top"])
    assert out.hidden.shape == (2, 24, 384) and out.hidden.dtype == torch.float32
    assert out.mask.shape == (2, 24) and out.mask.dtype == torch.bool
    assert out.mask[0].sum() == 5  # [CLS] a red circle [SEP]
    assert torch.allclose(out.pooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not out.hidden.requires_grad
    cond = encoder(["a red circle"])
    assert set(cond) == {"encoder_hidden_states", "encoder_attention_mask"}


def test_encoder_is_deterministic_and_cached(encoder):
    first = encoder.encode(["a blue square at the top"])
    encoder.clear_cache()
    second = encoder.encode(["a blue square at the top"])
    assert torch.equal(first.hidden, second.hidden) and torch.equal(first.pooled, second.pooled)
    batch = encoder.encode(["a blue square at the top", "a green cross"])
    assert torch.allclose(batch.hidden[0], first.hidden[0], atol=1e-5)


def test_encoder_knows_synonyms(encoder):
    pooled = encoder.encode(["a crimson circle", "a red circle", "a blue square"]).pooled
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2]


def test_encoder_truncation_warns_and_empty_raises(encoder):
    long_caption = "a small red circle " + "with many more words " * 10
    with pytest.warns(UserWarning, match="truncated") as record:
        out = encoder.encode([long_caption])
    assert long_caption in str(record[0].message)
    assert out.mask.sum() == 24
    with pytest.raises(ValueError, match="caption 1 is empty"):
        encoder.encode(["a red circle", "   "])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode(["a red circle"])  # short captions never warn


def test_unconditional_embedding(encoder):
    uncond = encoder.encode_uncond(3)
    assert uncond.hidden.shape == (3, 24, 384)
    assert uncond.mask.sum(-1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    assert torch.equal(uncond.hidden[0], uncond.hidden[2])
    assert encoder.uncond(2)["encoder_hidden_states"].shape == (2, 24, 384)
