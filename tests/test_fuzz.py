"""Property-based fuzzing of the input edges: they fail only with the documented errors, never anything else."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.errors import ConfigCompositionException, HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from benchmarks.run import check_overrides
from envs.denoising import DenoisingEnv
from rlkit_diffusion.data.pickapic import PickAPicReader, encode_image
from rlkit_diffusion.mdp import DenoisingCore
from tests.helpers import compose_cfg

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int8, np.bool_])
specials = st.sampled_from([0.0, 1.0, -1e30, 1e30, np.nan, np.inf, -np.inf])


@FUZZ
@given(shape=shapes, dtype=dtypes, fill=specials)
def test_env_actions_fail_only_with_value_error(toy_world, shape, dtype, fill):
    env = DenoisingEnv(toy_world)
    env.reset(seed=0)
    with np.errstate(all="ignore"):
        action = np.full(shape, fill).astype(dtype)
    valid = shape == (2,) and np.isfinite(action.astype(np.float64)).all()
    if valid:
        env.step(action)
    else:
        with pytest.raises(ValueError, match=r"\(2,\)"):
            env.step(action)


@FUZZ
@given(shape=shapes, fill=specials, use_int=st.booleans())
def test_core_transition_rejects_malformed_tensors(toy_world, shape, fill, use_int):
    core = DenoisingCore(toy_world)
    state = core.initial_state(["angle 0", "angle 60"], x_T=torch.zeros(2, 2))
    use_int = use_int and fill in (0.0, 1.0)
    action = torch.full(shape, fill, dtype=torch.int64 if use_int else torch.float32)
    if shape == (2, 2) and not use_int and np.isfinite(fill):
        assert core.transition(state, action).index == 1
    else:
        with pytest.raises(ValueError, match=r"\(2, 2\)"):
            core.transition(state, action)


def _row(corruption: str, rng: np.random.Generator) -> dict:
    img = encode_image(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(int(rng.integers(1000)))))
    row = {"caption": "a red circle", "jpg_0": img, "jpg_1": img, "label_0": 1.0, "label_1": 0.0}
    if corruption == "no_bytes":
        row["jpg_0"] = b""
    elif corruption == "garbage":
        row["jpg_1"] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8))
    elif corruption == "label":
        row["label_0"], row["label_1"] = float(rng.choice([0.3, 2.0, -1.0, np.nan])), 0.0
    elif corruption == "caption":
        row["caption"] = None
    elif corruption == "tie":
        row["label_0"] = row["label_1"] = 0.5
    return row


@FUZZ
@given(
    kinds=st.lists(st.sampled_from(["ok", "no_bytes", "garbage", "label", "caption", "tie"]), min_size=1, max_size=8),
    skip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pair_loader_fails_only_with_named_value_errors(tmp_path_factory, kinds, skip, seed):
    rng = np.random.default_rng(seed)
    rows = [_row(k, rng) for k in kinds]
    path = tmp_path_factory.mktemp("fuzz") / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    reader = PickAPicReader(path, skip_bad_rows=skip)
    n_good = kinds.count("ok")
    bad = [i for i, k in enumerate(kinds) if k not in ("ok", "tie")]
    if bad and not skip:
        with pytest.raises(ValueError, match=rf"row {bad[0]}\b"):
            list(reader)
    elif n_good == 0:
        with pytest.raises(ValueError, match="no preference pairs"):
            with pytest.warns(UserWarning) if bad else _nullcontext():
                list(reader)
    else:
        with pytest.warns(UserWarning, match="skipped") if bad else _nullcontext():
            pairs = list(reader)
        assert len(pairs) == n_good and reader.n_bad_rows == len(bad)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


keys = st.sampled_from(
    [
        "algo",
        "world",
        "seed",
        "train.steps",
        "train.lr",
        "algo.beta",
        "eval.seed",
        "budget.kind",
        "train.stepz",
        "algo.nonexistent",
        "reward",
        "device",
        "train.batch_size",
    ]
)
values = st.one_of(
    st.integers(-5, 5).map(str), st.sampled_from(["dpo", "toy2d", "abc", "1e-3", "null", "[1,2]", "true", "''", "nfe"])
)


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(keys, values), min_size=1, max_size=3))
def test_config_loader_fails_only_with_hydra_errors(pairs):
    overrides = ["world=toy2d"] + [f"{k}={v}" for k, v in pairs]
    try:
        check_overrides(overrides)
        compose_cfg(overrides)
    except (ConfigCompositionException, HydraException, OmegaConfBaseException):
        pass  # the documented start-up errors
    except ValueError as err:  # benchmarks.run.check_overrides: a bad config-group choice
        assert "not a valid choice" in str(err)
