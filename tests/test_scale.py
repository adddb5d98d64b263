"""Scale on 2 CPU processes (gloo): FSDP computes what one process computes, checkpoints move between world sizes,
a job that loses a rank continues under torchrun, and a rank that stops answering fails the job instead of a hang.

The sharded path is ``train.parallel=fsdp`` (`rlkit_diffusion.sharding`): the loop calls PyTorch's FSDP2
``fully_shard`` itself — the call accelerate's FSDP2 plugin makes — because accelerate enables its plugin only for
GPU distributed types (``accelerate launch --use_fsdp`` on CPU processes silently runs DDP). ``train.fsdp_blocks=
[Linear]`` makes each of toy2d's four linear layers its own FSDP unit inside the root unit (nested sharding, as
diffusers' UNet blocks are on GPUs). The probe (`tests.mp_probe`) checks that rank 0's checkpoints gathered a
sharded optimizer, and injects the failures (SIGKILL of rank 1 once; a rank that sleeps).

Why one process and two agree: every rank draws the global batch of pairs and keeps its slice (`ShardedPairs`), and
DPO's (t, ε) are slices of one global draw from a stream shared by the ranks (`AlgoContext.global_rows`); FSDP's
reduce-scatter averages the per-rank gradients of per-rank means (the gradient of the global mean), as DDP's
all-reduce does. DDPO and its family (DPOK, GRPO, D3PO) draw prompts, x_T and every step's noise for the global batch
from the shared stream and keep their rows, permute the global batch's transitions into minibatches, and weight each
rank's share M_r of a minibatch of M by M_r·W/M (algos/ddpo.py, detail 6). Tolerance: ``PARAM_ATOL`` = 1e-5 on the
final parameters (float32 reduction order; measured max |Δθ| 6e-8 for DPO, with a LoRA reference 3e-8; DDPO 2.7e-7,
DPOK 1.9e-7, GRPO 6.8e-7, D3PO 2.8e-6); shapes: ``SHAPES_ATOL``. A resume across world sizes continues the global
stream and the pairs' position, so it ends where an uninterrupted run at the new size ends (measured max |Δθ| 6e-8);
the elastic restart ends at the uninterrupted run's parameters exactly (measured Δθ = 0).

Times here (2 shared cores): the whole file ≈ 5 min (311 s); each test 20–50 s, mostly launch start-up. The default
suite runs one test per property (FSDP DPO and FSDP DDPO = one process, a 2 → 1 resume, the elastic restart, the
one-line refusal); the LoRA, shapes, DPOK/GRPO/D3PO, DDPO 2 → 1, 1 → 2 and stalled-rank tests are opt-in (-m slow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import TINY_SHAPES, compose_cfg
from tests.test_multiprocess import BIN, PARAM_ATOL, final_params, launch, moved_from_base, probe, ranks

torch.set_num_threads(1)
TIMEOUT_BOUND_S = 150.0  # launch (~20 s here) + the 10 s collective timeout + teardown; a hang would not end

TOY = [
    "world=toy2d",
    "algo=dpo",
    "device=cpu",
    "seed=3",
    "train.lr=1e-3",
    "train.warmup_steps=3",
    "train.checkpoint_every=3",
    "train.log_every=1",
    "train.parallel=fsdp",  # ignored by one process
    "train.fsdp_blocks=[Linear]",
    "eval.samples_per_prompt=8",
    "eval.bootstrap=20",
    "eval.heldout=false",
    "eval.implicit_pairs=0",
    "report=false",
    "logger=none",
]


def torchrun(*flags: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *flags, "-m", "benchmarks.run"]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def one_process(run_dir: Path, overrides: list[str], base: list[str] = TOY) -> None:
    from benchmarks.run import run

    run(compose_cfg([*base, *overrides, f"out_dir={run_dir.parent}"]), run_dir=run_dir)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six DPO steps on toy2d with the global batch of 16: one process, and two FSDP processes of 8."""
    root = tmp_path_factory.mktemp("uninterrupted")
    one_process(root / "one", ["train.steps=6", "train.batch_size=16"])
    two = [*TOY, "train.steps=6", "train.batch_size=8", f"hydra.run.dir={root / 'two'}", *probe(root / "probe")]
    proc = launch(torchrun() + two, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(one=root / "one", two=root / "two", probe=ranks(root / "probe"))


def test_fsdp_dpo_equals_one_process_with_the_global_batch(uninterrupted):
    seen = uninterrupted.probe
    assert sorted(seen) == [0, 1] and all(r["world_size"] == 2 for r in seen.values())
    assert seen[0]["checkpoint_writes"] == 2 and seen[0]["sharded_writes"] == 2  # steps 3 and 6, gathered
    p1, p2 = final_params(uninterrupted.one), final_params(uninterrupted.two)
    assert max_diff(p1, p2) <= PARAM_ATOL
    assert moved_from_base(p1) > 100 * PARAM_ATOL
    # One format: the sharded run's optimizer file has the one-process layout (integer ids, full moments).
    opt1, opt2 = (
        torch.load(d / "checkpoints" / "step_00000006" / "optimizer.pt", weights_only=True)
        for d in (uninterrupted.one, uninterrupted.two)
    )
    s1, s2 = opt1["optimizer"]["state"], opt2["optimizer"]["state"]
    assert s1.keys() == s2.keys() and opt1["optimizer"]["param_groups"] == opt2["optimizer"]["param_groups"]
    for i in s1:
        assert s1[i]["exp_avg"].shape == s2[i]["exp_avg"].shape and type(s2[i]["exp_avg"]) is torch.Tensor
        assert float((s1[i]["exp_avg"] - s2[i]["exp_avg"]).abs().max()) <= PARAM_ATOL


@pytest.mark.slow  # opt-in (-m slow): the default suite keeps one test per property
def test_fsdp_lora_dpo_equals_one_process(tmp_path):
    """LoRA under FSDP: the adapters train sharded, and the reference is the same sharded network, adapters off."""
    lora = [*TOY, "reference.lora_rank=4", "train.steps=4"]
    one_process(tmp_path / "one", [*lora, "train.batch_size=16"])
    proc = launch(torchrun() + [*lora, "train.batch_size=8", f"hydra.run.dir={tmp_path / 'two'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p1, p2 = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert p1 and all("lora" in k for k in p1)  # the checkpoint holds the adapters only
    assert max_diff(p1, p2) <= PARAM_ATOL


SHAPES_ATOL = {"dpo": 5e-5, "ddpo": 1e-4}
"""Shapes' tolerance: AdamW's first step moves each weight by lr·g/(|g|+ε), so the float32 reduction-order noise of a
near-zero gradient moves it by up to ~lr; DPO measured max |Δθ| against one process 1.4e-5 for DDP and FSDP alike
(FSDP against DDP 3.4e-6), with lr 1e-3. DDPO measured 3.1e-5: its 4-step rollouts run the UNet on 2 rows per
process instead of 4, so the trained states and rewards carry that float noise too (a wrong noise row or minibatch
share moves the weights by O(lr) = 1e-3)."""


@pytest.mark.slow  # opt-in (-m slow): the default suite keeps one test per property
@pytest.mark.parametrize("algo", ["dpo", "ddpo"])
def test_fsdp_on_shapes_equals_one_process(algo, tmp_path):
    """The tiny shapes UNet (diffusers' UNet2DConditionModel): its ResnetBlock2D / Transformer2DModel /
    BasicTransformerBlock modules are nested FSDP units under the default ``train.fsdp_blocks``. DPO 46 s here
    (110 s under a heavier load), DDPO (the shapes tuning: per-dim-mean log-probs, clip 1e-4, σ_t > 0.05) 42 s."""
    shapes = [f"algo={algo}", *TINY_SHAPES, "train.steps=2", "train.lr=1e-3", "train.parallel=fsdp", "report=false"]
    shapes.append("logger=none")
    from benchmarks.run import run

    run(compose_cfg([*shapes, "train.batch_size=4", f"out_dir={tmp_path}"]), run_dir=tmp_path / "one")
    proc = launch(torchrun() + [*shapes, "train.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p1, p2 = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert max_diff(p1, p2) <= SHAPES_ATOL[algo]


TOY_DDPO = [
    *(o for o in TOY if not o.startswith(("algo=", "seed=", "train.lr=", "train.warmup", "train.checkpoint_every"))),
    "algo=ddpo",  # toy2d's tuning: 4 minibatches per collected batch, σ_t > 0.05 trained, PPO clip 0.2
    "seed=1",
    "train.checkpoint_every=4",  # after the first collected batch (checkpoints fall between batches)
]


@pytest.fixture(scope="module")
def ddpo_uninterrupted(tmp_path_factory):
    """Eight DDPO steps (two collected batches of four minibatches) on toy2d with the global batch of 16: one
    process, and two FSDP processes of 8."""
    root = tmp_path_factory.mktemp("ddpo")
    one_process(root / "one", ["train.steps=8", "train.batch_size=16"], base=TOY_DDPO)
    two = [*TOY_DDPO, "train.steps=8", "train.batch_size=8", f"hydra.run.dir={root / 'two'}"]
    proc = launch(torchrun() + two, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(one=root / "one", two=root / "two")


def test_fsdp_ddpo_equals_one_process_with_the_global_batch(ddpo_uninterrupted):
    """Rollouts (prompts, x_T, every step's noise) and minibatches are drawn for the global batch from the shared
    stream; each process trains its share of each minibatch, weighted M_r·W/M (algos/ddpo.py, detail 6)."""
    p1, p2 = final_params(ddpo_uninterrupted.one), final_params(ddpo_uninterrupted.two)
    assert max_diff(p1, p2) <= PARAM_ATOL
    assert moved_from_base(p1) > 100 * PARAM_ATOL
    e1, e2 = (json.loads((d / "eval.json").read_text()) for d in (ddpo_uninterrupted.one, ddpo_uninterrupted.two))
    assert e2["environment"]["num_processes"] == 2 and e1["updates"] == e2["updates"] == 8


@pytest.mark.slow  # opt-in (-m slow): the default suite keeps one test per property
@pytest.mark.parametrize("algo", ["dpok", "grpo", "d3po"])
def test_fsdp_trajectory_algorithms_equal_one_process(algo, tmp_path):
    """DPOK (the KL to the reference), GRPO (group advantages, denoising reduction, 8 samples per caption: one group
    per process) and D3PO (pairs, the same x_T per pair) share DDPO's collection and minibatches. Eight steps on
    toy2d, global batch 16; measured max |Δθ| 1.9e-7, 6.8e-7, 2.8e-6 (D3PO's β = 10 amplifies float noise)."""
    base = [*(o for o in TOY_DDPO if not o.startswith("algo=")), f"algo={algo}", "train.steps=8"]
    one_process(tmp_path / "one", ["train.batch_size=16"], base=base)
    proc = launch(torchrun() + [*base, "train.batch_size=8", f"hydra.run.dir={tmp_path / 'two'}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p1, p2 = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    assert max_diff(p1, p2) <= PARAM_ATOL
    assert moved_from_base(p1) > 100 * PARAM_ATOL


@pytest.mark.slow  # opt-in (-m slow): the default suite keeps one test per property
def test_two_process_ddpo_checkpoint_resumes_on_one(ddpo_uninterrupted, tmp_path):
    from benchmarks.run import run

    run_dir = tmp_path / "run"
    proc = launch(torchrun() + [*TOY_DDPO, "train.steps=4", "train.batch_size=8", f"hydra.run.dir={run_dir}"], 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    change = ["train.steps=8", "train.batch_size=16", "resume_override=[train.steps,train.batch_size]"]
    run(compose_cfg([*change, f"resume={run_dir}"]), overrides=[*change, f"resume={run_dir}"])
    assert json.loads((run_dir / "eval.json").read_text())["environment"]["num_processes"] == 1
    assert max_diff(final_params(run_dir), final_params(ddpo_uninterrupted.one)) <= PARAM_ATOL


def test_two_process_checkpoint_resumes_on_one(uninterrupted, tmp_path):
    from benchmarks.run import run
    from rlkit_diffusion.train import ResumeError

    run_dir = tmp_path / "run"
    proc = launch(torchrun() + [*TOY, "train.steps=3", "train.batch_size=8", f"hydra.run.dir={run_dir}"], 600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text()
    longer = ["train.steps=6", "resume_override=[train.steps]"]  # the per-process batch kept: refused, no trace
    with pytest.raises(ResumeError, match="global batch of 16"):
        run(compose_cfg([*longer, f"resume={run_dir}"]), overrides=[*longer, f"resume={run_dir}"])
    assert (run_dir / "config.yaml").read_text() == config and not (run_dir / "resumes.jsonl").exists()
    change = ["train.steps=6", "train.batch_size=16", "resume_override=[train.steps,train.batch_size]"]
    run(compose_cfg([*change, f"resume={run_dir}"]), overrides=[*change, f"resume={run_dir}"])
    assert json.loads((run_dir / "eval.json").read_text())["environment"]["num_processes"] == 1
    assert max_diff(final_params(run_dir), final_params(uninterrupted.one)) <= PARAM_ATOL


@pytest.mark.slow  # opt-in (-m slow): the default suite keeps one test per property
def test_one_process_checkpoint_resumes_on_two(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    one_process(run_dir, ["train.steps=3", "train.batch_size=16"])
    change = ["train.steps=6", "train.batch_size=8", "resume_override=[train.steps,train.batch_size]"]
    proc = launch(torchrun() + [*change, f"resume={run_dir}"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "eval.json").read_text())["environment"]["num_processes"] == 2
    assert max_diff(final_params(run_dir), final_params(uninterrupted.two)) <= PARAM_ATOL


def test_world_size_change_refused_with_one_line():
    from rlkit_diffusion.train import ResumeError, check_resume_layout

    by_two = {"num_processes": 2, "global_batch": 16, "generators": [0, 0], "generator": 0}
    other, dpo = (SimpleNamespace(name=n, world_size_invariant=n == "dpo") for n in ("rethink_dpo", "dpo"))
    with pytest.raises(ResumeError, match=r"algo 'rethink_dpo' draws per-rank random streams .* resume it on 2$"):
        check_resume_layout(by_two, "step_00000003", other, 16, 1)
    with pytest.raises(ResumeError, match=r"global batch of 16 .* use train.batch_size=16 resume_override"):
        check_resume_layout(by_two, "step_00000003", dpo, 8, 1)
    with pytest.raises(ResumeError, match=r"use a number of processes that divides 16$"):
        check_resume_layout(by_two, "step_00000003", dpo, 8, 3)
    check_resume_layout(by_two, "step_00000003", dpo, 16, 1)  # the same global batch: fine
    check_resume_layout({**by_two, "num_processes": 1}, "step_00000003", other, 8, 1)  # the same world size


def test_elastic_restart_continues_from_the_last_checkpoint(uninterrupted, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "killed"
    kill = probe(tmp_path / "probe", kill_rank=1, kill_step=5, marker=marker)  # after the checkpoint at step 3
    overrides = [*TOY, "train.steps=6", "train.batch_size=8", f"hydra.run.dir={run_dir}", *kill]
    proc = launch(torchrun("--max-restarts=1") + overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text().startswith("rank 1 killed itself at step 5")
    assert "elastic restart: continuing" in proc.stderr
    resumes = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert [r["from"] for r in resumes] == ["step_00000003"]
    assert max_diff(final_params(run_dir), final_params(uninterrupted.two)) <= PARAM_ATOL


@pytest.mark.slow  # opt-in (-m slow): the default suite keeps one test per property
def test_a_rank_that_stops_answering_fails_the_job(tmp_path):
    run_dir = tmp_path / "run"
    stall = probe(tmp_path / "probe", stall_rank=1, stall_step=2)
    overrides = [*TOY, "train.steps=6", "train.batch_size=8", "train.collective_timeout_s=10", *stall]
    t0 = time.perf_counter()
    proc = launch(torchrun() + [*overrides, f"hydra.run.dir={run_dir}"], timeout=TIMEOUT_BOUND_S + 60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0 and elapsed < TIMEOUT_BOUND_S, elapsed
    message = "a collective timed out after train.collective_timeout_s=10 s: another rank stopped answering"
    assert message in proc.stdout + proc.stderr
    assert message in (run_dir / "STOPPED").read_text()
    assert not (run_dir / "eval.json").exists()


def test_memory_model_counts_and_ordering():
    """`python -m benchmarks.memory`: the meta-device UNets have the published parameter counts, and per GPU
    FSDP < ZeRO-2 < DDP, with more GPUs helping only the sharded schemes."""
    from benchmarks.memory import table

    r = table((8, 16))
    assert r["counts"]["SD1.5"]["unet"] == 859_520_964 and r["counts"]["SDXL"]["unet"] == 2_567_463_684
    total = {(x["model"], x["scheme"], x["gpus"]): x["total"] for x in r["rows"]}
    for model in ("SD1.5", "SDXL"):
        assert total[model, "FSDP", 8] < total[model, "ZeRO-2", 8] < total[model, "DDP", 8]
        assert (
            total[model, "FSDP", 16] < total[model, "FSDP", 8]
            and total[model, "ZeRO-2", 16] < total[model, "ZeRO-2", 8]
        )


def test_rollout_rows_are_the_rows_of_the_global_rollout():
    """``DenoisingCore.rollout(..., rows=(n, slice))``: x_T and every step's noise are the rows of one n-row draw,
    so each half of a batch rolled out alone starts from the same x_T and takes the same noise as in the whole
    batch; without ``rows`` (None) the numbers are those of ``rows=(B, slice(0, B))``."""
    from rlkit_diffusion.mdp import DenoisingCore
    from rlkit_diffusion.worlds.toy2d import build_toy2d

    world = build_toy2d(optimum_pool=16)
    env = DenoisingCore(world, reward=None)
    prompts = env.sample_prompts(8, torch.Generator().manual_seed(0))

    def roll(ps, rows=None):
        g = torch.Generator().manual_seed(7)
        return env.rollout(world.policy, ps, generator=g, rows=rows, with_reward=False, return_trajectory=True)

    whole = roll(prompts)
    assert torch.equal(roll(prompts, (8, slice(0, 8))).x0, whole.x0)
    halves = [roll(prompts[r], (8, r)) for r in (slice(0, 4), slice(4, 8))]
    assert torch.equal(torch.cat([h.sample.latents[0] for h in halves]), whole.sample.latents[0])  # x_T
    noise = lambda ro: [ro.sample.latents[i + 1] - ro.sample.means[i] for i in range(env.horizon)]  # noqa: E731
    for i, z in enumerate(noise(whole)):
        assert torch.allclose(torch.cat([noise(h)[i] for h in halves]), z, atol=1e-6)
    with pytest.raises(ValueError, match="selects 4 of 8 rows, but the batch has 8"):
        roll(prompts, (8, slice(0, 4)))
