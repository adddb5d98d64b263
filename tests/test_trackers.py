"""``logger=``: accelerate's trackers get the same metric names as ``metrics.jsonl``, the resolved config, sample grids
at each evaluation and the final eval.json; wandb offline leaves a run directory with all of it; trackers change no
number of the run; a missing package is one line naming the pip command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import run_toy

torch.set_num_threads(1)
OVERRIDES = [
    "algo=ddpo",
    "train.steps=4",
    "train.batch_size=8",
    "train.log_every=1",
    "train.eval_every=2",
    "eval.samples_per_prompt=2",
    "report=false",
]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def finite_names(run_dir: Path) -> set[str]:
    """The metric names of metrics.jsonl with a finite value (NaN, e.g. toy2d's diversity, is not sent to trackers)."""
    return {k for row in metric_rows(run_dir) for k, v in row.items() if k != "step" and isinstance(v, float | int)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    d = tmp_path_factory.mktemp("trackers")
    out = {
        "tracked": run_toy(d, [*OVERRIDES, "logger=[tensorboard,wandb]"], name="tracked"),
        "none": run_toy(d, [*OVERRIDES, "logger=none"], name="none"),
    }
    mp.undo()
    return out


def test_wandb_offline_run_has_metrics_config_images_and_eval_json(runs):
    result, run_dir = runs["tracked"]
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    records = next(offline.glob("run-*.wandb")).read_bytes()  # protobuf records: keys and JSON values as text
    names = finite_names(run_dir)
    assert {"train/loss", "budget/nfe", "eval/win_rate_vs_base"} <= names
    for name in [*names, "final/win_rate_vs_base", "final/gold_reward_trained"]:
        assert name.encode() in records, name
    assert b"train.lr" in records and b"algo.clip_range" in records  # the resolved config, flattened
    images = offline / "files" / "media" / "images" / "samples"
    assert len(list(images.glob("base_vs_trained_2_*.png"))) == 1  # one grid per evaluation (steps 2 and 4)
    assert len(list(images.glob("base_vs_trained_4_*.png"))) == 1
    assert len(list(images.glob("final_4_*.png"))) == 1
    saved = json.loads((offline / "files" / "eval.json").read_text())
    assert saved["win_rate_vs_base"] == result["win_rate_vs_base"]


def test_tensorboard_gets_the_same_names_and_the_grids(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = runs["tracked"]
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    names = finite_names(run_dir)
    assert names <= set(acc.Tags()["scalars"])
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx([row["train/loss"] for row in metric_rows(run_dir) if "train/loss" in row])
    assert {"samples/base_vs_trained", "samples/final"} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Images("samples/base_vs_trained")] == [2, 4]


def test_trackers_change_no_number(runs):
    tracked, tracked_dir = runs["tracked"]
    plain, plain_dir = runs["none"]
    for key in ("win_rate_vs_base", "gold_reward_trained", "kl_to_ref", "unet_nfe", "reward_queries"):
        assert tracked[key] == plain[key], key
    timing = ("budget/wall_s", "eval/eval_wall_s", "eval/peak_mem_mb")  # measured, not computed

    def strip(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k not in timing} for row in metric_rows(run_dir)]

    assert strip(tracked_dir) == strip(plain_dir)
    assert not (plain_dir / "tb").exists() and not (plain_dir / "wandb").exists()


def test_tracker_names(monkeypatch, capsys):
    import importlib.util

    from rlkit_diffusion.logging import tracker_names

    assert tracker_names("none") == [] and tracker_names(None) == []
    assert tracker_names(["tensorboard", "wandb", "tensorboard"]) == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="logger='comet' is not a valid choice"):
        tracker_names("comet")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else real(n, *a))
    assert tracker_names(["tensorboard", "mlflow"]) == ["tensorboard"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["logger=mlflow: skipped, mlflow is not installed (pip install mlflow)"]
