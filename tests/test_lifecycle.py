"""The run lifecycle (issue #15): signals that end in a checkpoint, a resumed run held to its config, verified
checkpoints with a fallback, `resume=latest`, and every config value checked before any work. See
docs/reliability.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.lifecycle import ConfigError, config_errors, find_runs, resume_checkpoint
from rlkit_diffusion.checkpoint import latest_intact_checkpoint, save_checkpoint, verify_checkpoint
from tests.helpers import compose_cfg, run_toy
from tests.test_reliability import ROOT, TOY, child_env, finish, launcher  # noqa: F401  (the launcher fixture)


def metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------------------------
# Signals: SIGINT / SIGTERM → checkpoint, STOPPED, the resume command; the resumed run equals an uninterrupted one
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo,sig", [("dpo", signal.SIGINT), ("ddpo", signal.SIGTERM)])
def test_a_signal_checkpoints_and_the_resume_equals_an_uninterrupted_run(launcher, tmp_path, algo, sig):  # noqa: F811
    steps = 200 if algo == "dpo" else 100
    base = [f"algo={algo}", *TOY, f"train.steps={steps}", "seed=2", f"out_dir={tmp_path}"]
    straight = launcher.start([*base, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path / "straight.log")
    run_dir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    pid = launcher.start([*base, f"hydra.run.dir={run_dir}"], log)
    t0 = time.monotonic()
    while metrics_lines(run_dir) < 3 and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    os.kill(pid, sig)
    assert launcher.wait(pid) == 128 + sig, log.read_text()[-2000:]
    stopped = (run_dir / "STOPPED").read_text().splitlines()
    n = int(stopped[0].split("step ")[1].split()[0])
    assert 0 < n < steps and stopped[0] == f"STOPPED (interrupted at step {n} by {sig.name})"
    assert stopped[1] == f"resume with: python -m benchmarks.run resume={run_dir}"
    assert stopped[1].removeprefix("resume with: ") in log.read_text()
    assert (run_dir / "checkpoints" / f"step_{n:08d}" / "model.safetensors").is_file()
    assert not (run_dir / "eval.json").exists()
    resumed = launcher.start([f"resume={run_dir}", "device=cpu"], tmp_path / "resumed.log")
    finish(launcher, resumed, tmp_path / "resumed.log")
    finish(launcher, straight, tmp_path / "straight.log")
    assert not (run_dir / "STOPPED").exists()
    a = load_file(str(tmp_path / "straight" / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    b = load_file(str(run_dir / "checkpoints" / f"step_{steps:08d}" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (tmp_path / "straight", run_dir))
    for key in ("gold_reward_trained", "win_rate_vs_base", "kl_to_ref", "updates", "unet_nfe"):
        assert ea[key] == eb[key], key
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != ".eval_cache")  # the root's cache
    assert runs == ["stopped", "straight"]  # no stray folder


def test_a_second_signal_exits_at_once():
    script = (
        "import os, signal, time\n"
        "from rlkit_diffusion.train import Interrupt\n"
        "with Interrupt() as it:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    assert it.signum == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(5)\n"
        "print('not reached')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert out.returncode == 128 + signal.SIGINT and "not reached" not in out.stdout
    assert "SIGINT again: exiting at once (the last checkpoint is kept)" in out.stderr


def test_stop_signals_raise_interrupted_wait_around_process_starts_and_stay_ignored_under_nohup():
    """`terminate_as_interrupt`: SIGTERM/SIGHUP raise `Interrupted` (with the signal); `signals_deferred`: a signal
    inside only raises on leaving; a SIGHUP that is ignored (``nohup``) stays ignored; the handlers are put back."""
    from benchmarks.lifecycle import Interrupted, signals_deferred, terminate_as_interrupt

    hup, term = signal.signal(signal.SIGHUP, signal.SIG_DFL), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Interrupted, match="stopped by SIGHUP") as err, terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1.0)
        assert err.value.signum == signal.SIGHUP and signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        reached = False
        with pytest.raises(Interrupted, match="stopped by SIGTERM"), signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            reached = True  # not interrupted inside
        assert reached and signal.getsignal(signal.SIGTERM) is term
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGHUP, hup)


@pytest.mark.parametrize("kind,sig", [("experiment", signal.SIGTERM), ("seeds", signal.SIGINT)])
def test_a_signal_stops_a_command_of_several_runs_whole_and_the_command_continues(launcher, tmp_path, kind, sig):  # noqa: F811
    """SIGTERM (a scheduler's preemption) to an experiment with ``jobs=2`` while its two runs train, or SIGINT to a
    ``seeds=[0,1]`` command while its first run trains: every run in flight checkpoints and is STOPPED, no further
    run starts (the next seed used to start), an experiment records its invocation, and the command exits 128 +
    the signal. The same command then resumes the stopped runs from their checkpoints and finishes."""
    out = tmp_path / "cmd"
    if kind == "experiment":
        runs = "{label:a,overrides:['algo=ddpo','train.steps=400']},{label:b,overrides:['algo=dpo','train.steps=400']}"
        argv = ["experiment=table2", "sweep.section=head_to_head", f"sweep.runs=[{runs}]", "seeds=[0]", "jobs=2"]
        training, budgets = [out / "runs" / "a" / "s0", out / "runs" / "b" / "s0"], [400, 400]
    else:
        argv = ["algo=ddpo", "train.steps=150", "seeds=[0,1]"]
        training, budgets = [out / "s0"], [150]
    argv += [*TOY, f"out_dir={tmp_path}", f"hydra.run.dir={out}"]
    log = tmp_path / "first.log"
    pid = launcher.start(argv, log)
    t0 = time.monotonic()
    while min(metrics_lines(d) for d in training) < 3 and time.monotonic() - t0 < 180:
        time.sleep(0.05)
    assert all(3 <= metrics_lines(d) < n for d, n in zip(training, budgets)), "the runs were not training"
    os.kill(pid, sig)
    assert launcher.wait(pid) == 128 + sig, log.read_text()[-3000:]
    for run_dir in training:
        assert (run_dir / "STOPPED").read_text().startswith("STOPPED (interrupted at step "), run_dir
        assert list((run_dir / "checkpoints").glob("step_*/model.safetensors"))
        assert not (run_dir / "eval.json").exists()
    assert f"benchmarks.run: run {training[0]}: STOPPED (interrupted" in log.read_text() or kind == "experiment"
    if kind == "experiment":
        assert "SIGTERM: the 2 run(s) in flight checkpoint and stop" in log.read_text()
        record = json.loads((out / "experiment.json").read_text())
        assert record["experiment"] == "table2" and [v["trained"] for v in record["invocations"]] == [0]
    else:
        assert not (out / "s1").exists()  # the next seed was not started
    again = launcher.start(argv, tmp_path / "again.log")
    finish(launcher, again, tmp_path / "again.log")
    for run_dir in training:  # resumed from the checkpoint, not trained again from step 0
        assert (run_dir / "eval.json").exists() and not (run_dir / "STOPPED").exists()
        assert len((run_dir / "resumes.jsonl").read_text().splitlines()) == 1
    if kind == "experiment":
        record = json.loads((out / "experiment.json").read_text())
        assert [v["trained"] for v in record["invocations"]] == [0, 2] and (out / "section.md").exists()
    else:
        assert (out / "s1" / "eval.json").exists() and (out / "aggregate.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# A run is its config; a finished run is left alone; resume=latest
# ---------------------------------------------------------------------------------------------------------------
FAST = ["algo=dpo", "train.steps=4", "train.checkpoint_every=2", "train.batch_size=16", "eval.samples_per_prompt=2"]
FAST += ["eval.heldout=false", "eval.bootstrap=10", "report=false"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    _, run_dir = run_toy(tmp, FAST, "run")
    return run_dir


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "change,listed",
    [
        (["algo=ddpo"], "algo.name: 'dpo' -> 'ddpo'"),
        (["train.lr=0.05"], "train.lr: 0.001 -> 0.05"),
        (["seed=5"], "seed: 0 -> 5"),
        (["train.steps=8"], "train.steps: 4 -> 8 (to train longer: resume_override=[train.steps])"),
    ],
)
def test_resume_refuses_to_change_the_run(finished_run, change, listed):
    from benchmarks.run import run

    before = snapshot(finished_run)
    cfg = compose_cfg(["world=toy2d", *FAST, *change, f"resume={finished_run}"])
    with pytest.raises(ConfigError) as info:
        run(cfg, overrides=[*change, f"resume={finished_run}"])
    assert str(info.value) == f"resume: {finished_run} is its config.yaml; refusing to change {listed}"
    assert snapshot(finished_run) == before


def test_resuming_a_finished_run_changes_nothing(finished_run, capsys):
    from benchmarks.run import run

    before = snapshot(finished_run)
    cfg = compose_cfg([f"resume={finished_run}"])  # no world=, no algo=: the run's own config is used
    result = run(cfg, overrides=[f"resume={finished_run}"])
    assert result["updates"] == 4 and snapshot(finished_run) == before
    assert (
        f"resume: {finished_run} is finished (4 updates, eval.json written); nothing changed."
        in capsys.readouterr().out
    )


def test_resume_latest_picks_the_newest_checkpoint_of_the_world_inside_multirun_folders(finished_run, tmp_path):
    import shutil

    multirun = tmp_path / "multirun-1" / "0-dpo-toy2d-s0"
    shutil.copytree(finished_run, multirun)
    state = multirun / "checkpoints" / "step_00000004" / "state.json"
    record = json.loads(state.read_text())
    record["saved_at"] += 10.0  # written later than the original
    state.write_text(json.dumps(record))
    (finished_run / "checkpoints").touch()  # touching a folder does not make it newer
    shutil.copytree(finished_run, tmp_path / "old")
    runs = find_runs(tmp_path, world="toy2d", algo="dpo")
    assert runs[-1][1] == multirun and len(runs) == 2
    assert find_runs(tmp_path, world="shapes") == []


# ---------------------------------------------------------------------------------------------------------------
# Verified checkpoints
# ---------------------------------------------------------------------------------------------------------------
def test_a_corrupt_checkpoint_is_named_and_the_newest_intact_one_is_used(tmp_path, capsys):
    model = torch.nn.Linear(4, 3)
    for step in (1, 2):
        save_checkpoint(tmp_path / "checkpoints", step, model=model, state={"note": step})
    newest = tmp_path / "checkpoints" / "step_00000002"
    assert verify_checkpoint(newest) is None
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    problem = verify_checkpoint(newest)
    assert problem == f"{newest / 'model.safetensors'} is corrupt (its SHA-256 differs from the one in state.json)"
    ckpt, skipped = latest_intact_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step_00000001" and skipped == [problem]
    assert resume_checkpoint(tmp_path).name == "step_00000001"
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"resume: {problem}; falling back to an older checkpoint",
        "resume: continuing from step_00000001 (the newest intact checkpoint)",
    ]
    (tmp_path / "checkpoints" / "step_00000001" / "state.json").write_text("{")
    with pytest.raises(ConfigError, match="resume: no intact checkpoint under"):
        resume_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Validation before work
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,error",
    [
        ("train.lr=-1", "train.lr=-1.0: must be > 0"),
        ("train.batch_size=0", "train.batch_size=0: must be >= 1"),
        ("train.steps=-5", "train.steps=-5: must be >= 0"),
        ("budget.kind=banana", "budget.kind='banana': must be one of steps, nfe, reward_queries, wall_s"),
        ("eval.samples_per_prompt=0", "eval.samples_per_prompt=0: must be >= 1"),
        ("jobs=0", "jobs=0: must be >= 1"),
        ("eval.reward=banana", "eval.reward='banana': must be a reward of world toy2d: gold, proxy"),
        ("eval.rewards=[gold,banana]", "eval.rewards: 'banana' is not a reward of world toy2d: gold, proxy"),
        ("algo.beta=0", "algo.beta=0.0: must be > 0 for dpo (β = 0 removes the preference term: nothing trains)"),
        ("+algo.bta=5", "algo.bta: not a setting of dpo (did you mean algo.beta?)"),
        ("device=banana", "device='banana': must be one of auto, cpu, cuda, mps"),
        (
            "init_from=/nonexistent",
            "init_from='/nonexistent': not a run directory with a checkpoint (nor a checkpoint directory)",
        ),
    ],
)
def test_bad_values_are_refused_before_any_work(override, error):
    assert config_errors(compose_cfg(["world=toy2d", override])) == [error]


def test_device_and_init_from_world_are_checked(finished_run):
    if not torch.cuda.is_available():
        assert config_errors(compose_cfg(["world=toy2d", "device=cuda"])) == [
            "device='cuda': CUDA is not available on this machine (use device=cpu or device=auto)"
        ]
    errors = config_errors(compose_cfg(["world=shapes", f"init_from={finished_run}"]))
    assert errors == [f"init_from={str(finished_run)!r}: that run is world=toy2d, this one is world=shapes"]


def test_a_bad_value_on_the_command_line_is_one_line_and_makes_no_directory(launcher, tmp_path):  # noqa: F811
    log = tmp_path / "bad.log"
    pid = launcher.start(["world=toy2d", "train.lr=-1", "train.batch_size=0", f"out_dir={tmp_path / 'runs'}"], log)
    assert launcher.wait(pid) == 1
    assert log.read_text().strip().splitlines() == [
        "benchmarks.run: train.lr=-1.0: must be > 0",
        "train.batch_size=0: must be >= 1",
    ]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# Case 7: env and core input checks; benchmarks.prepare --help
# ---------------------------------------------------------------------------------------------------------------
def test_env_and_core_refuse_bad_input_with_one_clear_line(toy_world, capsys):
    from envs.denoising import DenoisingEnv
    from rlkit_diffusion.mdp import DenoisingCore

    env = DenoisingEnv(toy_world)
    prompt = env.core.prompts[3]
    _, info = env.reset(seed=0, options={"prompt": prompt})
    assert info["prompt"] == prompt  # honoured
    with pytest.raises(ValueError, match="options\\['prompt'\\] must be one of the split's"):
        env.reset(options={"prompt": "not a prompt of the split"})
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['colour'\\]"):
        env.reset(options={"colour": 1})
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"outside the float32 range \(max \|a\| = 1e\+39\)"):
        env.step(np.full(env.core.sample_shape, 1e39))
    with pytest.raises(ValueError, match="action has shape"):
        env.step(np.zeros(3))
    with pytest.raises(NotImplementedError, match="no render mode"):
        env.render()
    core = DenoisingCore(toy_world, reward="gold")
    policy = toy_world.policy
    with pytest.raises(ValueError, match="prompts is empty"):
        core.rollout(policy, [])
    with pytest.raises(ValueError, match="prompts must be a list of strings, got the string"):
        core.rollout(policy, prompt)
    with pytest.raises(ValueError, match=r"k must be in \[1, "):
        core.rollout(policy, [prompt], grad="last_k", k=0)
    from benchmarks.prepare import main as prepare_main

    prepare_main(["--help"])
    assert "python -m benchmarks.prepare world=" in capsys.readouterr().out


def test_an_action_that_overflows_the_reward_is_refused(toy_world):
    from envs.denoising import DenoisingEnv

    env = DenoisingEnv(toy_world)
    env.reset(seed=0)
    for _ in range(env.core.horizon - 1):
        env.step(np.zeros(env.core.sample_shape))
    with pytest.raises(ValueError, match="reward 'proxy' returned NaN or inf"):  # not a silent -inf
        env.step(np.full(env.core.sample_shape, 1e20))


# ---------------------------------------------------------------------------------------------------------------
# Lifecycle fuzz: random sequences of (start, kill at a random step, signal at a random step, corrupt the newest
# checkpoint, resume) on toy2d, in process (a "process" = a freshly built world, context and RNG seeding)
# ---------------------------------------------------------------------------------------------------------------
FUZZ_STEPS = 8


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the last checkpoint survives (not caught by the training loop)."""


def fuzz_session(run_dir: Path, resume_from: Path | None, fault: str | None, at: int) -> None:
    from algos import build_algo
    from benchmarks.wiring import seed_everything
    from rlkit_diffusion.algorithm import AlgoContext
    from rlkit_diffusion.mdp import DenoisingCore
    from rlkit_diffusion.reference import Reference
    from rlkit_diffusion.train import TrainConfig, train
    from rlkit_diffusion.worlds.toy2d import build_toy2d

    seed_everything(0)
    world = build_toy2d(optimum_pool=64, num_inference_steps=10)
    base = Reference(world.policy, "frozen")
    ctx = AlgoContext(world, world.policy, base, DenoisingCore(world), 8, torch.Generator().manual_seed(0))
    algo = build_algo("dpo")
    loss = algo.loss

    def faulty_loss(mb):
        if ctx.counters.updates + 1 == at:
            if fault == "kill":
                raise Killed()
            if fault == "signal":
                os.kill(os.getpid(), signal.SIGINT)
        return loss(mb)

    algo.loss = faulty_loss
    cfg = TrainConfig(steps=FUZZ_STEPS, checkpoint_every=2, batch_size=8, log_every=1)
    try:
        train(algo, ctx, cfg, run_dir=run_dir, resume_from=resume_from, progress=False)
    except Killed:
        pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz-straight")
    fuzz_session(run_dir, None, None, 0)
    return load_file(str(run_dir / "checkpoints" / f"step_{FUZZ_STEPS:08d}" / "model.safetensors"))


def test_lifecycle_fuzz(uninterrupted, tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from benchmarks.report import group

    op = st.tuples(st.sampled_from(["kill", "signal", "corrupt"]), st.integers(1, FUZZ_STEPS))

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(ops=st.lists(op, min_size=1, max_size=3))
    def check(ops):
        run_dir = tmp_path_factory.mktemp("fuzz")
        intact: set[str] = set()
        for fault, at in [*ops, (None, 0)]:  # the last session runs to the end
            if fault == "corrupt":
                ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
                if ckpts:
                    f = ckpts[-1] / "model.safetensors"
                    f.write_bytes(f.read_bytes()[:40])
                    intact.discard(ckpts[-1].name)
                continue
            has = (run_dir / "checkpoints").exists() and latest_intact_checkpoint(run_dir / "checkpoints")[0]
            fuzz_session(run_dir, resume_checkpoint(run_dir) if has else None, fault, at)
            for c in (run_dir / "checkpoints").glob("step_*"):
                if verify_checkpoint(c) is None:
                    intact.add(c.name)
            for name in intact:  # no checkpoint lost: every intact one written so far still verifies
                assert verify_checkpoint(run_dir / "checkpoints" / name) is None, (ops, name)
        final = load_file(str(run_dir / "checkpoints" / f"step_{FUZZ_STEPS:08d}" / "model.safetensors"))
        assert final.keys() == uninterrupted.keys()
        assert all(torch.equal(final[k], uninterrupted[k]) for k in final), ops

    check()
    # The report never mixes configs: runs that differ in anything but the seed are never one group.
    from omegaconf import OmegaConf

    runs = [
        {"dir": Path(f"r{i}"), "eval": {"world": "toy2d", "algo": "dpo"}, "metrics": [],
         "config": OmegaConf.create({"seed": i % 2, "train": {"steps": 4 + 4 * (i // 2)}})}
        for i in range(4)
    ]  # fmt: skip
    groups = group(runs)
    assert len(groups) == 2 and all(
        {r["config"].train.steps for r in rs} == {rs[0]["config"].train.steps} for rs in groups.values()
    )


def test_source_fingerprint_names_the_code_and_an_experiment_refuses_a_changed_one(tmp_path, monkeypatch):
    """Every eval.json records which sources made it; a run started by an experiment whose code changed since the
    experiment started is refused before any work (two versions of the code would mix in one experiment)."""
    import shutil

    from benchmarks.lifecycle import EXPERIMENT_SOURCE_ENV, source_fingerprint

    # The hash covers the packages' sources: a one-byte edit changes it, a file elsewhere (docs) does not.
    tree = tmp_path / "tree"
    for d in ("rlkit_diffusion", "algos", "envs", "benchmarks"):
        (tree / d).mkdir(parents=True)
        (tree / d / "m.py").write_text("x = 1\n")
    first = source_fingerprint(tree)
    (tree / "README.md").write_text("docs\n")
    assert source_fingerprint(tree)["source_sha256"] == first["source_sha256"]
    (tree / "algos" / "m.py").write_text("x = 2\n")
    assert source_fingerprint(tree)["source_sha256"] != first["source_sha256"]
    assert first["commit"] is None and first["dirty"] is None  # not a git checkout
    shutil.rmtree(tree)

    small = ["train.steps=2", "eval.samples_per_prompt=8", "eval.heldout=false", "eval.bootstrap=20"]
    result, _ = run_toy(tmp_path, small, name="ok")
    assert result["environment"]["code"]["source_sha256"] == source_fingerprint()["source_sha256"]
    monkeypatch.setenv(EXPERIMENT_SOURCE_ENV, "0" * 64)  # the experiment started with other code
    with pytest.raises(ConfigError, match="the code changed under the running experiment"):
        run_toy(tmp_path, small, name="refused")
    assert not (tmp_path / "refused" / "eval.json").exists()
