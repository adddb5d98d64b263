"""Reliability: runs that survive SIGKILL, checkpoints that survive a kill mid-write, determinism, bad input.

The whole-run tests start real ``python -m benchmarks.run`` processes. Importing the stack costs ~8 s per process,
so one *launcher* process (module fixture) imports ``benchmarks.run`` once and then ``os.fork``s a child per run;
each child executes ``benchmarks.run`` as ``__main__`` with its own ``sys.argv`` (exactly what ``python -m`` does)
and is killed, when a test wants it, with a real SIGKILL sent by the test. See docs/reliability.md.
"""

from __future__ import annotations

import json
import math
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

from rlkit_diffusion.checkpoint import latest_checkpoint, load_checkpoint
from tests.helpers import TINY_SHAPES

ROOT = Path(__file__).resolve().parents[1]

# Tiny runs: a small batch, few denoising steps, a one-noise evaluation on two prompts.
TOY = [
    "world=toy2d",
    "world.num_inference_steps=10",
    "world.optimum_pool=256",
    "train.batch_size=16",
    "train.log_every=1",
    "eval.samples_per_prompt=1",
    "eval.max_prompts=2",
    "eval.heldout=false",
    "eval.bootstrap=10",
    "device=cpu",
]
N = 12  # optimizer steps; N/2 = 6 is two checkpoints in with checkpoint_every=3
EVERY = 3

# The launcher: reads one JSON command per line on stdin, answers one JSON line on stdout.
#   {"op": "start", "argv": [...], "log": path, "block_after": int|null, "marker": path|null} -> {"pid": pid}
#       fork a child running ``python -m benchmarks.run *argv`` (output to ``log``). With ``block_after``: once a
#       checkpoint of step >= block_after is written, the NEXT checkpoint write blocks forever (after touching
#       ``marker``), so that the test can SIGKILL a run that has trained past its last checkpoint.
#   {"op": "ckpt_write", "root": path, "marker": path} -> {"pid": pid}
#       fork a child that writes checkpoint 1, then starts checkpoint 2 and blocks half way through its
#       model.safetensors (after touching ``marker``).
#   {"op": "wait", "pid": pid} -> {"status": exit code, negative = killed by that signal}
LAUNCHER = r"""
import json, os, runpy, sys, time, traceback
from pathlib import Path

import benchmarks.run  # noqa: F401  (the expensive imports, once; every child is a fork of this process)
import rlkit_diffusion.checkpoint as checkpoint
import rlkit_diffusion.train as train_mod


def block(marker):
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(1)


def child_run(argv, log, block_after, marker):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if block_after is not None:
        real, seen = train_mod.save_checkpoint, []

        def save(root, step, **kw):
            if seen and seen[-1] >= block_after:
                block(marker)
            seen.append(step)
            return real(root, step, **kw)

        train_mod.save_checkpoint = save
    sys.argv = ["benchmarks.run", *argv]
    sys.modules.pop("benchmarks.run")  # executed afresh as __main__, as by python -m (and without runpy's warning)
    runpy.run_module("benchmarks.run", run_name="__main__", alter_sys=True)


def child_ckpt_write(root, marker):
    import torch

    model = torch.nn.Linear(4, 3)
    checkpoint.save_checkpoint(root, 1, model=model, state={"note": "first"})
    real = checkpoint.save_file

    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 37)  # a torn file: the first bytes only
            f.flush()
        block(marker)

    checkpoint.save_file = half_written
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpoint.save_checkpoint(root, 2, model=model, state={"note": "second"})
    checkpoint.save_file = real


def fork(fn, *args):
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        fn(*args)
    except SystemExit as e:  # as the interpreter does: sys.exit("message") prints it and exits 1
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "start":
        out = {"pid": fork(child_run, cmd["argv"], cmd["log"], cmd.get("block_after"), cmd.get("marker"))}
    elif cmd["op"] == "ckpt_write":
        out = {"pid": fork(child_ckpt_write, cmd["root"], cmd["marker"])}
    elif cmd["op"] == "wait":
        _, status = os.waitpid(cmd["pid"], 0)
        out = {"status": os.waitstatus_to_exitcode(status)}
    print(json.dumps(out), flush=True)
"""


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"})
    return env


class Launcher:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER],
            cwd=ROOT,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.live: set[int] = set()

    def _ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the launcher process died")
        return json.loads(line)

    def start(self, argv: list[str], log: Path, *, block_after: int | None = None, marker: Path | None = None):
        pid = self._ask(
            {"op": "start", "argv": argv, "log": str(log), "block_after": block_after, "marker": str(marker)}
        )["pid"]
        self.live.add(pid)
        return pid

    def ckpt_write(self, root: Path, marker: Path) -> int:
        pid = self._ask({"op": "ckpt_write", "root": str(root), "marker": str(marker)})["pid"]
        self.live.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        status = self._ask({"op": "wait", "pid": pid})["status"]
        self.live.discard(pid)
        return status

    def close(self) -> None:
        for pid in list(self.live):  # children of a failed test: never leave them running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait(pid)
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def launcher():
    la = Launcher()
    yield la
    la.close()


def wait_for(path: Path, pid: int, log: Path, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared; log:\n{log.read_text()[-3000:]}"


def finish(launcher: Launcher, pid: int, log: Path) -> None:
    status = launcher.wait(pid)
    assert status == 0, f"run failed with status {status}; log:\n{log.read_text()[-3000:]}"


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step_{N:08d}" / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# 1. SIGKILL, then resume: identical final parameters, optimizer, scheduler, RNG, data, algorithm and reference state
# ---------------------------------------------------------------------------------------------------------------
# rethink_dpo has an EMA reference (reference.safetensors) and a timestep scaler; warm-up makes the lr schedule matter.
ALGOS = ["dpo", "ddpo", "draft", "rethink_dpo"]


def test_sigkill_then_resume_gives_identical_parameters(launcher, tmp_path):
    """Per algorithm: N steps straight; separately, SIGKILL a run that has checkpointed at >= N/2 and trained on
    (it is blocked at its next checkpoint write), then ``resume=<run dir>`` to N: bitwise-identical final state."""
    base = [*TOY, f"train.steps={N}", f"train.checkpoint_every={EVERY}", "train.warmup_steps=8", "seed=3"]
    pids = {}
    for algo in ALGOS:
        for kind in ("straight", "killed"):
            argv = [f"algo={algo}", *base, f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / f'{algo}-{kind}'}"]
            block = N // 2 if kind == "killed" else None
            log, marker = tmp_path / f"{algo}-{kind}.log", tmp_path / f"{algo}-blocked"
            pids[algo, kind] = launcher.start(argv, log, block_after=block, marker=marker)
    resumed = {}
    for algo in ALGOS:
        pid, run_dir = pids[algo, "killed"], tmp_path / f"{algo}-killed"
        wait_for(tmp_path / f"{algo}-blocked", pid, tmp_path / f"{algo}-killed.log")
        os.kill(pid, signal.SIGKILL)
        assert launcher.wait(pid) == -signal.SIGKILL
        steps = sorted(int(d.name[5:]) for d in (run_dir / "checkpoints").glob("step_*"))
        assert len(steps) >= 2 and N // 2 <= steps[-1] < N, steps  # >= 2 checkpoints in, the last at >= N/2
        assert latest_checkpoint(run_dir / "checkpoints").name == f"step_{steps[-1]:08d}"
        argv = [f"algo={algo}", *base, f"out_dir={tmp_path}", f"resume={run_dir}"]
        argv.append(f"hydra.run.dir={tmp_path / f'{algo}-resume-invocation'}")
        resumed[algo] = launcher.start(argv, tmp_path / f"{algo}-resumed.log")
    for algo in ALGOS:
        finish(launcher, pids[algo, "straight"], tmp_path / f"{algo}-straight.log")
        finish(launcher, resumed[algo], tmp_path / f"{algo}-resumed.log")
    for algo in ALGOS:
        a = load_checkpoint(tmp_path / f"{algo}-straight" / "checkpoints" / f"step_{N:08d}")
        b = load_checkpoint(tmp_path / f"{algo}-killed" / "checkpoints" / f"step_{N:08d}")
        assert_same(a["model"], b["model"], f"{algo}: parameters")
        assert_same(a["reference"], b["reference"], f"{algo}: reference model")
        assert_same(a["optimizer"], b["optimizer"], f"{algo}: optimizer / lr scheduler")
        for key in ("counters", "nfe_used", "skipped", "algo", "generators", "pairs", "rng"):
            assert_same(a["state"].get(key), b["state"].get(key), f"{algo}: state.json {key}")
    assert load_checkpoint(tmp_path / "rethink_dpo-straight" / "checkpoints" / f"step_{N:08d}")["reference"]
    assert load_checkpoint(tmp_path / "ddpo-straight" / "checkpoints" / f"step_{N:08d}")["state"]["algo"]["tracker"]


def assert_same(a, b, what: str) -> None:
    """Nested dicts/lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape, what
        assert torch.equal(a, b), f"{what} differs (max |diff| {float((a.double() - b.double()).abs().max())})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{what}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b), what
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{what}: {a!r} != {b!r}"


def test_checkpoint_restores_every_global_rng(tmp_path):
    """torch, numpy and python ``random`` continue exactly as they would have (the training generator and the data
    position are per-run state and are compared by the SIGKILL test above)."""
    import random

    from rlkit_diffusion.checkpoint import save_checkpoint, set_rng_state

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(), random.gauss(0, 1)  # a cached gaussian in both states
    ckpt = save_checkpoint(tmp_path, 1, model=torch.nn.Linear(2, 2))
    expected = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(ckpt)["state"]["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), random.gauss(0, 1), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


# ---------------------------------------------------------------------------------------------------------------
# 2. A kill during a checkpoint write
# ---------------------------------------------------------------------------------------------------------------
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(launcher, tmp_path):
    root, marker = tmp_path / "checkpoints", tmp_path / "blocked"
    pid = launcher.ckpt_write(root, marker)
    wait_for(marker, pid, tmp_path / "none.log")  # checkpoint 2 is half written: a torn model.safetensors
    os.kill(pid, signal.SIGKILL)
    assert launcher.wait(pid) == -signal.SIGKILL
    torn = root / "step_00000002.tmp" / "model.safetensors"
    assert torn.exists() and torn.stat().st_size == 37  # the leftover of the killed write ...
    assert not (root / "step_00000002").exists()
    assert latest_checkpoint(root) == root / "step_00000001"  # ... is never taken for a checkpoint
    ck = load_checkpoint(root / "step_00000001")
    assert ck["state"]["note"] == "first" and ck["model"]["weight"].shape == (3, 4)
    # The next write cleans the leftover up; a .tmp that looks complete is never a checkpoint either.
    from rlkit_diffusion.checkpoint import save_checkpoint

    second = save_checkpoint(root, 2, model=torch.nn.Linear(4, 3))
    assert latest_checkpoint(root) == second and not list(root.glob("*.tmp"))


def test_a_json_record_write_that_fails_keeps_the_previous_record(tmp_path, monkeypatch):
    """Every record and metric file (eval.json, experiment/aggregate records, the prepare outputs) is written by
    `atomic_write_json`: a write that dies half-way leaves the previous file whole and no temporary file behind."""
    import rlkit_diffusion.checkpoint as ck

    path = ck.atomic_write_json(tmp_path / "eval.json", {"win_rate": 0.75})
    assert path.read_text() == '{\n  "win_rate": 0.75\n}\n'

    def torn_write(tmp, text):  # half the bytes reach the disk, then the process "dies"
        Path(tmp).write_text(text[: len(text) // 2])
        raise OSError("killed while writing")

    monkeypatch.setattr(ck, "atomic_write_text", lambda p, text: ck.atomic_write(p, lambda tmp: torn_write(tmp, text)))
    with pytest.raises(OSError, match="killed"):
        ck.atomic_write_json(tmp_path / "eval.json", {"win_rate": 0.5, "gold": 4.7})
    assert json.loads(path.read_text()) == {"win_rate": 0.75} and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("fail_at", ["model", "optimizer", "state", "rename", "after_old_moved"])
def test_a_write_failing_at_any_point_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    """The write dies at each stage (an exception standing in for the kill): the previous checkpoint still loads and
    ``latest_checkpoint`` names it; rewriting an existing step never deletes it before its replacement is in place."""
    import rlkit_diffusion.checkpoint as ck

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    first = ck.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, state={"note": "first"})
    w1 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    step = 1 if fail_at == "after_old_moved" else 2  # rewriting step 1 itself: the .old path

    def boom(*a, **k):
        raise OSError(f"killed while writing ({fail_at})")

    target = {"model": "save_file", "optimizer": "torch.save", "state": "json.dump", "rename": "os.replace"}
    if fail_at == "after_old_moved":
        real, calls = os.replace, []

        def replace(src, dst):  # the first rename (step_1 -> step_1.old) succeeds, the second dies
            calls.append(1)
            if len(calls) == 2:
                boom()
            real(src, dst)

        monkeypatch.setattr(ck.os, "replace", replace)
    elif target[fail_at] == "torch.save":
        monkeypatch.setattr(ck.torch, "save", boom)
    elif target[fail_at] == "json.dump":
        monkeypatch.setattr(ck.json, "dump", boom)
    elif target[fail_at] == "os.replace":
        monkeypatch.setattr(ck.os, "replace", boom)
    else:
        monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="killed while writing"):
        ck.save_checkpoint(tmp_path, step, model=model, optimizer=opt, state={"note": "second"})
    monkeypatch.undo()
    latest = ck.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name.startswith("step_00000001")
    loaded = ck.load_checkpoint(latest)
    assert torch.equal(loaded["model"]["weight"], w1) and loaded["state"]["note"] == "first"
    assert loaded["optimizer"]["optimizer"]["state"]  # the AdamW moments are there
    # The next save recovers: leftovers removed (a stranded .old renamed back), the new checkpoint is the latest.
    third = ck.save_checkpoint(tmp_path, 3, model=model)
    assert ck.latest_checkpoint(tmp_path) == third
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [first.name, third.name]


# ---------------------------------------------------------------------------------------------------------------
# 3. Determinism: same seed and config, same eval.json numbers
# ---------------------------------------------------------------------------------------------------------------
DETERMINISM = {
    "toy2d": ["algo=ddpo", *TOY, "train.steps=4", "eval.samples_per_prompt=4", "eval.max_prompts=4"],
    "shapes": ["algo=dpo", *TINY_SHAPES, "train.steps=2", "train.batch_size=4"],
}
NOT_REPRODUCIBLE = ("wall", "time", "mem", "checkpoint", "environment", "phases")  # clocks, memory, paths, argv


def numbers(obj, prefix: str = "") -> dict[str, float]:
    """Every numeric leaf of an eval.json, by dotted path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in numbers(val, f"{prefix}{i}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return {prefix.rstrip("."): float(obj)}
    return {}


@pytest.mark.parametrize("world", ["toy2d", "shapes"])
def test_same_seed_and_config_give_the_same_eval_numbers(launcher, tmp_path, world):
    pids = []
    for name in ("first", "second"):
        argv = [*DETERMINISM[world], "seed=5", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path / name}"]
        pids.append((launcher.start(argv, tmp_path / f"{name}.log"), tmp_path / f"{name}.log"))
    for pid, log in pids:
        finish(launcher, pid, log)
    a, b = (json.loads((tmp_path / name / "eval.json").read_text()) for name in ("first", "second"))
    a = {k: v for k, v in numbers(a).items() if not any(w in k for w in NOT_REPRODUCIBLE)}
    b = {k: v for k, v in numbers(b).items() if not any(w in k for w in NOT_REPRODUCIBLE)}
    assert a.keys() == b.keys() and len(a) > 20
    differ = {k: (a[k], b[k]) for k in a if not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))}
    assert not differ, differ


# ---------------------------------------------------------------------------------------------------------------
# 4. Bad input: a one-line error naming the thing (and the step), nothing lost
# ---------------------------------------------------------------------------------------------------------------
class FlakyReward:
    """A reward model that goes wrong at its ``bad_call``-th call: NaN, a wrong shape, or not a tensor."""

    name = "flaky"
    differentiable = True

    def __init__(self, inner, bad_call: int, fault: str):
        self.inner, self.bad_call, self.fault, self.calls = inner, bad_call, fault, 0

    def __call__(self, images, prompts):
        self.calls += 1
        r = self.inner(images, prompts)
        if self.calls != self.bad_call:
            return r
        return {"nan": r * float("nan"), "shape": r[:, None], "type": r.tolist()}[self.fault]


@pytest.mark.parametrize(
    "algo_name, fault, message",
    [
        ("ddpo", "nan", r"reward 'flaky' returned NaN or inf \(at optimizer step 3\)"),
        ("ddpo", "shape", r"reward 'flaky' returned shape \(8, 1\), expected \(8,\) \(at optimizer step 3\)"),
        ("draft", "nan", r"reward 'flaky' returned NaN or inf \(at optimizer step 3\)"),
        ("draft", "shape", r"reward 'flaky' returned shape \(8, 1\), expected \(8,\) \(at optimizer step 3\)"),
        ("draft", "type", r"reward 'flaky' returned list, expected a tensor of shape \(8,\) \(at optimizer step 3\)"),
    ],
)
def test_bad_reward_names_the_reward_and_the_step(toy_world, tmp_path, algo_name, fault, message):
    from algos import algo_config_class, build_algo
    from rlkit_diffusion.algorithm import AlgoContext
    from rlkit_diffusion.mdp import DenoisingCore
    from rlkit_diffusion.reference import Reference
    from rlkit_diffusion.train import TrainConfig, train

    extra = {"k": 2} if algo_name == "draft" else {}  # toy2d's last step is the identity: DRaFT-1 is refused
    env = DenoisingCore(toy_world)
    env.reward_model = FlakyReward(env.reward_model, bad_call=3, fault=fault)
    env.reward_name = "flaky"  # as if configured with reward=flaky
    policy = toy_world.policy
    snapshot = {k: v.detach().clone() for k, v in policy.eps_model.state_dict().items()}
    ctx = AlgoContext(toy_world, policy, Reference(policy, "frozen"), env, 8, torch.Generator().manual_seed(0))
    try:
        with pytest.raises((ValueError, TypeError), match=message) as info:
            train(
                build_algo(algo_name, algo_config_class(algo_name)(**extra)),
                ctx,
                TrainConfig(steps=5, checkpoint_every=1),
                run_dir=tmp_path,
                progress=False,
            )
    finally:
        policy.eps_model.load_state_dict(snapshot)  # the session's shared world
    assert "\n" not in str(info.value)
    assert info.value.args[0] in (tmp_path / "STOPPED").read_text()  # the run directory records why it stopped
    assert load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))["state"]["step"] == 2  # kept, loadable


class EmptyCaptionAt:
    """A pair source whose ``bad_batch``-th batch carries an empty caption."""

    def __init__(self, inner, bad_batch: int):
        self.inner, self.bad_batch, self.batches = inner, bad_batch, 0

    def next_batch(self, n):
        self.batches += 1
        prompts, x_w, x_l = self.inner.next_batch(n)
        return (["", *prompts[1:]] if self.batches == self.bad_batch else prompts), x_w, x_l

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_empty_caption_in_the_data_names_the_caption_and_the_step(tmp_path):
    """(The text encoders' own checks — empty caption → error, too long → truncated with a warning — are tested in
    tests/test_shapes_encoder.py::test_encoder_truncation_warns_and_empty_raises and tests/test_sd_world.py.)"""
    from algos import build_algo
    from rlkit_diffusion.algorithm import AlgoContext
    from rlkit_diffusion.mdp import DenoisingCore
    from rlkit_diffusion.reference import Reference
    from rlkit_diffusion.train import TrainConfig, train
    from rlkit_diffusion.worlds.toy2d import build_toy2d

    world = build_toy2d(optimum_pool=8)
    world.pairs = EmptyCaptionAt(world.pairs, bad_batch=2)
    ctx = AlgoContext(
        world, world.policy, Reference(world.policy, "frozen"), DenoisingCore(world), 8, torch.Generator()
    )
    with pytest.raises(ValueError, match=r"prompt must look like 'angle 30', got '' \(at optimizer step 2\)"):
        train(build_algo("dpo"), ctx, TrainConfig(steps=4, checkpoint_every=1), run_dir=tmp_path, progress=False)
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000001"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_new_run_never_overwrites_an_existing_run_dir(launcher, tmp_path):
    old = tmp_path / "old"
    argv = ["algo=dpo", *TOY, "train.steps=2", f"out_dir={tmp_path}", f"hydra.run.dir={old}"]
    finish(launcher, launcher.start(argv, tmp_path / "old.log"), tmp_path / "old.log")
    before = snapshot(old)
    assert {"eval.json", "config.yaml", ".hydra/config.yaml"} <= before.keys()
    argv = ["algo=ddpo", *TOY, "train.steps=3", f"out_dir={tmp_path}", f"hydra.run.dir={old}"]
    pid = launcher.start(argv, tmp_path / "new.log")
    assert launcher.wait(pid) == 1
    err = (tmp_path / "new.log").read_text().strip().splitlines()[-1]
    assert err == f"benchmarks.run: run directory {old} already holds a run; refusing to overwrite it", err
    assert snapshot(old) == before  # not one byte changed, .hydra/ included


def test_a_failed_resume_leaves_the_run_intact(tmp_path):
    """Resuming with a config that differs from the run's (here one that would not even fit the checkpoint) fails
    with one line listing the differences; the run's files (config.yaml, checkpoints, eval.json, metrics) are
    unchanged."""
    from benchmarks.run import run
    from tests.helpers import compose_cfg, run_toy

    fast = ["algo=dpo", "train.steps=2", "train.batch_size=16", "eval.samples_per_prompt=2", "eval.heldout=false"]
    _, run_dir = run_toy(tmp_path, fast, "old")
    before = snapshot(run_dir)
    cfg = compose_cfg(["world=toy2d", *fast, "train.steps=4", "reference.lora_rank=2", f"resume={run_dir}"])
    with pytest.raises(ValueError, match=r"^resume: .* is its config.yaml; refusing to change reference.lora_rank: 0"):
        run(cfg)
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing overwritten or lost
    assert load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))["state"]["step"] == 2


def test_no_pickle_and_no_remote_code_in_the_library():
    """Every ``torch.load`` passes ``weights_only=True``; nothing imports pickle; ``trust_remote_code`` is never
    set to True (checked on the syntax trees of the library, the algorithms, the env and the runner)."""
    import ast

    bad = []
    for folder in ("rlkit_diffusion", "algos", "envs", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                    bad += [
                        f"{where}: imports {n}" for n in names if n.split(".")[0] in ("pickle", "dill", "cloudpickle")
                    ]
                if not isinstance(node, ast.Call):
                    continue
                kwargs = {k.arg: k.value for k in node.keywords}
                func = ast.unparse(node.func)
                if func.endswith("torch.load"):
                    value = kwargs.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        bad.append(f"{where}: {func} without weights_only=True")
                remote = kwargs.get("trust_remote_code")
                if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
                    bad.append(f"{where}: trust_remote_code={ast.unparse(remote)}")
    assert not bad, bad
