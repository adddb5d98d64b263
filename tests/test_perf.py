"""``python -m benchmarks.perf --json`` runs at a tiny size and emits every documented field, finite.

No timed asserts: the ratios depend on the machine (and on its neighbours); docs/perf.md holds the measured table.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.perf import MEMORY_FIELDS, TIMING_FIELDS, TIMING_ITEMS

ROOT = Path(__file__).resolve().parents[1]

MEMORY_LISTS = ["draft_mb", "draft_ckpt_mb", "draft_lora_ckpt_mb"]  # one value per K of the DRaFT sweep


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
    assert list(r["timing"]) == list(TIMING_ITEMS)
    for name, t in r["timing"].items():
        for field in TIMING_FIELDS:
            assert finite(t[field]) and t[field] > 0, (name, field, t)
    assert r["timing"]["draft_k1"]["k"] == 1 and r["timing"]["draft_kT"]["k"] == steps
    assert r["timing"]["ddpo_train"]["transitions"] >= 1

    m = r["memory"]
    assert m["method"] == "torch.profiler"
    for field in MEMORY_FIELDS:
        assert finite(m[field]) and m[field] > 0, (field, m.get(field))
    assert m["draft_k"] == list(range(1, steps + 1))
    for field in MEMORY_LISTS:
        assert len(m[field]) == steps and all(finite(v) and v > 0 for v in m[field]), (field, m[field])
    assert len(m["draft_ckpt_bound_mb"]) == 2 and all(finite(v) for v in m["draft_ckpt_bound_mb"])
    assert set(r["targets"]) == {"ratio", "dpo_memory", "draft_ckpt_growth"}


def test_whole_run_json_fields_present_and_finite(capsys, tmp_path):
    """``benchmarks.perf --run ... --json``: every phase, the bare UNet work and the ratio (no timing asserted);
    with ``--out-dir`` the second run is the warm one: the base's evaluation comes from the cache, same numbers."""
    import json
    import math

    from benchmarks.perf import main

    args = ["world=toy2d", "algo=dpo", "train.steps=2", "eval.samples_per_prompt=2", "eval.bootstrap=10"]
    main(["--run", *args, "report=false", "--json", "--out-dir", str(tmp_path)])
    r = json.loads(capsys.readouterr().out)
    main(["--run", *args, "report=false", "--json", "--out-dir", str(tmp_path)])
    warm = json.loads(capsys.readouterr().out)
    assert warm["phases"]["evaluate"]["unet_rows"] < r["phases"]["evaluate"]["unet_rows"]  # the base's rows cached
    assert warm["phases"]["train"]["unet_rows"] == r["phases"]["train"]["unet_rows"]
    assert (warm["win_rate_vs_base"], warm["kl_to_ref"]) == (r["win_rate_vs_base"], r["kl_to_ref"])
    assert set(r["phases"]) == {"build", "train", "evaluate", "report"}
    assert r["phases"]["train"]["unet_rows"] > 0 and r["phases"]["evaluate"]["unet_rows"] > 0
    for name in ("train", "evaluate"):
        assert all(math.isfinite(r["phases"][name][k]) for k in ("wall_s", "cpu_s", "bare_cpu_s", "ratio"))
    assert all(math.isfinite(r[k]) for k in ("wall_s", "cpu_s", "bare_cpu_s", "ratio", "win_rate_vs_base"))
    assert r["bare_cpu_s"] > 0
