"""``benchmarks.run`` under accelerate/torchrun with 2 CPU processes (gloo).

* `test_two_processes_equal_one_with_the_global_batch`: ``accelerate launch --multi_gpu --num_processes 2
  --num_machines 1 -m benchmarks.run`` (the documented command; without GPUs it starts 2 CPU processes on gloo)
  trains Diffusion-DPO on toy2d; both ranks report world size 2; only rank 0 writes checkpoints and eval.json; and
  the final parameters equal those of ONE process with twice the per-process batch, run in this test's process.
  Equivalence holds because every rank draws the global batch of pairs and keeps its slice (the runner's sharded
  pairs) and DPO's (t, ε) are the same slices of one global draw (`AlgoContext.global_rows`); DDP averages the
  per-rank gradients of per-rank means, which is the gradient of the global mean. Tolerance: atol 1e-5 (float32
  all-reduce order; measured max |Δθ| ≈ 1e-7); a warm-up is included to cover the lr-scheduler fix (accelerate's
  prepared scheduler would step twice per optimizer step with 2 processes).
* `test_ddpo_gathers_rewards_across_ranks`: ``torchrun --standalone --nproc_per_node 2 -m benchmarks.run algo=ddpo``;
  rewards are all-gathered (2B rows from B per rank) before the advantages are normalised.
* `test_crash_on_one_rank_fails_the_job_quickly`: rank 1 raises at step 2; the job exits non-zero within a bounded
  time (the launcher tears the other rank down; no hang on a collective) and no eval.json is written.
* `test_accelerate_cpu_flag_runs_one_process` (slow): the pitfall — ``accelerate launch --cpu --num_processes 2``
  silently runs ONE process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import compose_cfg

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PARAM_ATOL = 1e-5
CRASH_BOUND_S = 120.0  # launch (~20 s here) + 2 steps + teardown; a hang would hit the 30-min gloo timeout

TOY_DPO = [
    "world=toy2d",
    "algo=dpo",
    "device=cpu",
    "seed=3",
    "train.steps=6",
    "train.lr=1e-3",
    "train.warmup_steps=3",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "eval.samples_per_prompt=8",
    "eval.bootstrap=20",
    "eval.heldout=false",
    "eval.implicit_pairs=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(out: Path, **options) -> list[str]:
    args = ["+hydra.callbacks.probe._target_=tests.mp_probe.MultiProcessProbe", f"+hydra.callbacks.probe.out={out}"]
    return args + [f"+hydra.callbacks.probe.{k}={v}" for k, v in options.items()]


def launch(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def accelerate_cmd(*flags: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", *flags, "-m", "benchmarks.run"]


def torchrun_cmd() -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "benchmarks.run"]


def ranks(out: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def moved_from_base(params: dict[str, torch.Tensor]) -> float:
    """Largest change of a parameter from the shipped toy2d base weights."""
    from rlkit_diffusion.worlds.toy2d import build_toy2d

    base = dict(build_toy2d(optimum_pool=16).policy.eps_model.named_parameters())
    return max(float((params[k] - base[k].detach()).abs().max()) for k in params)


def test_two_processes_equal_one_with_the_global_batch(tmp_path):
    from benchmarks.run import run

    two = tmp_path / "two"
    flags = ("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()))
    overrides = [*TOY_DPO, "train.batch_size=8", f"hydra.run.dir={two}", *probe(tmp_path / "probe")]
    proc = launch(accelerate_cmd(*flags) + overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = ranks(tmp_path / "probe")
    assert sorted(seen) == [0, 1] and all(r["world_size"] == 2 for r in seen.values())
    assert seen[0]["checkpoint_writes"] > 0 and seen[1]["checkpoint_writes"] == 0
    result = json.loads((two / "eval.json").read_text())
    assert result["environment"]["num_processes"] == 2 and result["updates"] == 6
    assert proc.stdout.count("run directory:") == 1  # one summary, from rank 0

    one = tmp_path / "one"
    run(compose_cfg([*TOY_DPO, "train.batch_size=16", f"out_dir={tmp_path}"]), run_dir=one)
    p2, p1 = final_params(two), final_params(one)
    assert p2.keys() == p1.keys()
    max_diff = max(float((p2[k] - p1[k]).abs().max()) for k in p1)
    assert max_diff <= PARAM_ATOL, max_diff
    assert moved_from_base(p1) > 100 * PARAM_ATOL  # the parameters did move: the comparison is not vacuous


def test_ddpo_gathers_rewards_across_ranks(tmp_path):
    overrides = [
        "world=toy2d",
        "algo=ddpo",
        "device=cpu",
        "train.steps=2",
        "train.batch_size=8",
        "eval.samples_per_prompt=4",
        "eval.bootstrap=20",
        "eval.heldout=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        *probe(tmp_path / "probe"),
    ]
    proc = launch(torchrun_cmd() + overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = ranks(tmp_path / "probe")
    assert sorted(seen) == [0, 1] and all(r["world_size"] == 2 for r in seen.values())
    for r in seen.values():
        assert r["gathers"] and all(out[0] == 2 * x[0] for x, out in r["gathers"])  # B rows in, 2B out
    assert (tmp_path / "run" / "eval.json").exists()


def test_crash_on_one_rank_fails_the_job_quickly(tmp_path):
    overrides = [
        *TOY_DPO,
        "train.batch_size=8",
        "train.steps=50",
        f"hydra.run.dir={tmp_path / 'run'}",
        *probe(tmp_path / "probe", crash_rank=1, crash_step=2),
    ]
    t0 = time.perf_counter()
    proc = launch(torchrun_cmd() + overrides, timeout=CRASH_BOUND_S + 60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert elapsed < CRASH_BOUND_S, elapsed
    assert "injected failure on rank 1" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "eval.json").exists()


@pytest.mark.slow
def test_accelerate_cpu_flag_runs_one_process(tmp_path):
    overrides = [*TOY_DPO, "train.steps=1", f"hydra.run.dir={tmp_path / 'run'}", *probe(tmp_path / "probe")]
    proc = launch(accelerate_cmd("--cpu", "--num_processes", "2") + overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = ranks(tmp_path / "probe")
    assert sorted(seen) == [0] and seen[0]["world_size"] == 1
