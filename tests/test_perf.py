"""``python -m benchmarks.perf --json`` runs at a tiny size and emits every documented field, finite.

No timed asserts: the ratios depend on the machine (and on its neighbours); docs/perf.md holds the measured table.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TIMING_ITEMS = [
    "dpo_lora",
    "dpo_frozen",
    "dpo_l2_lora",
    "dpo_l2_frozen",
    "sft_lora",
    "sft_frozen",
    "rethink_dpo_lora",
    "rethink_dpo_frozen",
    "ddpo_sample",
    "ddpo_train",
    "draft_k1",
    "draft_kT",
    "alignprop_kT",
    "eval_sample",
    "eval_sample_kl",
]
MEMORY_SCALARS = [
    "unet_train_lora_mb",
    "unet_train_full_mb",
    "dpo_lora_mb",
    "dpo_frozen_mb",
    "dpo_lora_ratio",
    "dpo_frozen_ratio",
    "draft_growth",
    "draft_ckpt_growth",
    "draft_lora_ckpt_growth",
    "draft_ckpt_bound_growth",
]
MEMORY_LISTS = ["draft_mb", "draft_ckpt_mb", "draft_lora_ckpt_mb"]


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_perf_json_has_every_field_and_they_are_finite():
    steps = 2
    cmd = [sys.executable, "-m", "benchmarks.perf", "--json", "--repeats", "1", "--batch-size", "1"]
    proc = subprocess.run(
        [*cmd, "--steps", str(steps)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)

    assert r["world"] == "shapes" and r["batch_size"] == 1 and r["steps"] == steps and r["threads"] == 1
    assert finite(r["wall_s"]) and r["unet_params"] > 0
    assert list(r["timing"]) == TIMING_ITEMS
    for name, t in r["timing"].items():
        for field in ("step_ms", "bound_ms", "ratio"):
            assert finite(t[field]) and t[field] > 0, (name, field, t)
    assert r["timing"]["draft_k1"]["k"] == 1 and r["timing"]["draft_kT"]["k"] == steps
    assert r["timing"]["ddpo_train"]["transitions"] >= 1

    m = r["memory"]
    assert m["method"] == "torch.profiler"
    for field in MEMORY_SCALARS:
        assert finite(m[field]) and m[field] > 0, (field, m.get(field))
    assert m["draft_k"] == list(range(1, steps + 1))
    for field in MEMORY_LISTS:
        assert len(m[field]) == steps and all(finite(v) and v > 0 for v in m[field]), (field, m[field])
    assert len(m["draft_ckpt_bound_mb"]) == 2 and all(finite(v) for v in m["draft_ckpt_bound_mb"])
    assert set(r["targets"]) == {"ratio", "dpo_memory", "draft_ckpt_growth"}


def test_whole_run_json_fields_present_and_finite(capsys):
    """``benchmarks.perf --run ... --json``: every phase, the bare UNet work and the ratio (no timing asserted)."""
    import json
    import math

    from benchmarks.perf import main

    args = ["world=toy2d", "algo=dpo", "train.steps=2", "eval.samples_per_prompt=2", "eval.bootstrap=10"]
    main(["--run", *args, "report=false", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert set(r["phases"]) == {"build", "train", "evaluate", "report"}
    assert r["phases"]["train"]["unet_rows"] > 0 and r["phases"]["evaluate"]["unet_rows"] > 0
    for name in ("train", "evaluate"):
        assert all(math.isfinite(r["phases"][name][k]) for k in ("wall_s", "cpu_s", "bare_cpu_s", "ratio"))
    assert all(math.isfinite(r[k]) for k in ("wall_s", "cpu_s", "bare_cpu_s", "ratio", "win_rate_vs_base"))
    assert r["bare_cpu_s"] > 0
