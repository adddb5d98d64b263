"""The run lifecycle around `benchmarks.run`: validate a config before any work, find and verify the checkpoint to
resume, and hold a resumed run to its own config.

* `validate` checks every value that needs no world (ranges, choices, reward names, the device, ``init_from``,
  unknown ``algo.*`` keys) and raises one `ConfigError` listing one line per problem — before a run directory
  exists.
* `find_runs` / `resolve_run` / `resume_checkpoint`: ``resume=<run dir>`` or ``resume=latest`` (the run, inside
  multirun folders too, of the requested world/algo whose newest checkpoint was written last, by the time recorded
  in it); the checkpoint is the newest one whose checksums verify (a corrupt one is named and skipped).
* `resume_config`: a resumed run is its ``config.yaml``. A command-line value that differs from it is refused with
  one line listing the differences, except the budget (``train.steps``, ``budget.amount``) and the layout over
  processes (``train.batch_size``, ``train.parallel``) named in ``resume_override=[...]``, which is recorded in
  the run's ``resumes.jsonl`` and in its ``config.yaml``.
* `source_fingerprint`: which code made a run — the SHA-256 of the project's Python and YAML sources, with the git
  commit and whether the checkout had uncommitted changes — recorded in every ``eval.json``; an experiment passes
  its own to the runs it starts, and a run started after the code changed under the experiment is refused
  (`check_experiment_source`), so one experiment's runs never mix two versions of the code.
* `Interrupted` / `terminate_as_interrupt`: SIGINT, SIGTERM (a scheduler's preemption) or SIGHUP stops a run, a
  multi-seed run, a tuning sweep or an experiment as a whole: training checkpoints, an experiment records its
  invocation and has its runs in other processes checkpoint too, and the command exits with 128 + the signal's
  number; the same command continues (a stopped run resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from algos import ALGOS, algo_config_class
from rlkit_diffusion.checkpoint import atomic_write_text, latest_checkpoint, latest_intact_checkpoint
from rlkit_diffusion.train import Interrupt

# The reward names each world can hold (declared here so that they are checked without building the world; sd15
# and sdxl hold a reward only when its weights are configured, ``proxy``/``gold`` are aliases of one of them).
WORLD_REWARDS = {
    "toy2d": ("gold", "proxy"),
    "toy2d_flow": ("gold", "proxy"),
    "shapes": ("gold", "proxy", "clip", "aesthetic", "jpeg", "jpeg_incompressibility"),
    "shapes_flow": ("gold", "proxy", "clip", "aesthetic", "jpeg", "jpeg_incompressibility"),
    "sd15": ("gold", "proxy", "pickscore", "hpsv2", "clip", "aesthetic", "jpeg", "jpeg_incompressibility"),
    "sdxl": ("gold", "proxy", "pickscore", "hpsv2", "clip", "aesthetic", "jpeg", "jpeg_incompressibility"),
    "sd3": ("gold", "proxy", "pickscore", "hpsv2", "clip", "aesthetic", "jpeg", "jpeg_incompressibility"),
}
BUDGET_KEYS = ("train.steps", "budget.amount", "budget.kind")  # what resume_override=[...] may extend
# ... and how the same run is laid out over processes: the per-process batch (to keep the global batch on another
# number of processes) and the sharding (DDP ↔ FSDP compute the same steps); `rlkit_diffusion.train` checks the rest
LAYOUT_KEYS = ("train.batch_size", "train.parallel")
NOT_IDENTITY = ("resume", "resume_override", "out_dir", "report", "device")  # may differ on resume
BUDGET_KINDS = ("steps", "nfe", "reward_queries", "wall_s")
DEVICES = ("auto", "cpu", "cuda", "mps")


SOURCE_DIRS = ("rlkit_diffusion", "algos", "envs", "benchmarks")
"""The packages whose sources make a run (tests, docs and data do not)."""
EXPERIMENT_SOURCE_ENV = "RLKIT_EXPERIMENT_SOURCE"
"""Set by an experiment for the run processes it starts: the `source_fingerprint` SHA-256 at its start."""


def source_fingerprint(root: Path | None = None) -> dict[str, Any]:
    """``{"source_sha256", "commit", "dirty"}`` of the checkout at ``root`` (default: this one): the hash of every
    ``*.py`` and ``*.yaml`` below `SOURCE_DIRS` (relative path and bytes, in path order), the git commit and whether
    tracked files differ from it (None for both outside a git checkout)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    files = sorted(f for d in SOURCE_DIRS for ext in ("*.py", "*.yaml") for f in (root / d).rglob(ext))
    for f in files:
        if "__pycache__" not in f.parts:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"source_sha256": digest.hexdigest(), "commit": commit, "dirty": None if status is None else bool(status)}


def check_experiment_source(current: str) -> None:
    """Refuse a run started by an experiment (`EXPERIMENT_SOURCE_ENV` set) whose code is no longer the code the
    experiment started with: its runs would mix two versions without saying so."""
    expected = os.environ.get(EXPERIMENT_SOURCE_ENV)
    if expected and expected != current:
        raise ConfigError(
            f"the code changed under the running experiment (sources {expected[:12]} at its start, {current[:12]} "
            "now): this run would mix two versions of the code in one experiment. Restore the checkout, or run the "
            "experiment command again to continue with this code (finished runs keep the code recorded in their "
            "eval.json, environment.code)"
        )


class ConfigError(ValueError):
    """A user error in the config or the command line: printed as one line (no traceback) by `benchmarks.run`."""


class ExperimentStopped(RuntimeError):
    """An experiment stopped on request (its ``STOP`` file) after the runs in flight finished: printed as one line by
    `benchmarks.run`, which exits non-zero (the experiment is not done; its command continues it)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped the command after it kept what continuing needs (a run's checkpoint, an
    experiment's record of its invocation). A KeyboardInterrupt, so that it ends every loop over runs (experiments,
    ``seeds=``, tuning) and no ``except Exception`` on its way swallows it; `benchmarks.run` prints it as one line
    and exits with 128 + ``signum``."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


STOP_SIGNALS = Interrupt.SIGNALS
"""The signals that stop a command cleanly (the ones training checkpoints on): Ctrl-C, a scheduler's preemption or
``kill``, a closed terminal."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum, f"stopped by {signal.Signals(signum).name}")


@contextmanager
def _handlers(signals: tuple[int, ...], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for each of ``signals`` while inside, in the main thread only; a signal that is ignored (SIGHUP
    under ``nohup``, SIGINT in a background job) stays ignored; the previous handlers are put back on exit."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in signals:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise `Interrupted` in the main thread, as SIGINT raises KeyboardInterrupt,
    so that a preempted command cleans up as an interrupted one does instead of dying where it stands. (Training
    installs its own handler while it runs: the first signal finishes the optimizer step and checkpoints.)"""
    with _handlers(STOP_SIGNALS[1:], _raise_interrupted):
        yield


@contextmanager
def signals_deferred() -> Iterator[None]:
    """While inside, a stop signal (`STOP_SIGNALS`) is only noted; on leaving, the first one noted raises
    `Interrupted`. For the few lines that start a process and keep its handle, or pass a signal on to processes: a
    signal between the two would leave a process that nothing stops."""
    noted: list[int] = []
    with _handlers(STOP_SIGNALS, lambda signum, frame: noted.append(signum)):
        yield
    if noted:
        _raise_interrupted(noted[0], None)


# ----------------------------------------------------------------------------------------------------------------
# Validation before any work
# ----------------------------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    """Raise `ConfigError` with one line per problem found without building the world."""
    errors = config_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors) if len(errors) == 1 else "\n".join(errors))


POSITIVE = ("train.lr", "budget.amount")
AT_LEAST_ONE = ("train.batch_size", "train.grad_accum", "train.log_every", "jobs")
AT_LEAST_ONE += ("eval.samples_per_prompt", "eval.max_prompts", "eval.bootstrap")
NON_NEGATIVE = ("train.steps", "train.warmup_steps", "train.eval_every", "train.eval_points", "train.checkpoint_every")
NON_NEGATIVE += ("train.weight_decay", "seed")
BOUNDS: list[tuple[str, Callable[[Any], bool], str]] = [
    *((key, lambda v: v > 0, "> 0") for key in POSITIVE),
    *((key, lambda v: v >= 1, ">= 1") for key in AT_LEAST_ONE),
    *((key, lambda v: v >= 0, ">= 0") for key in NON_NEGATIVE),
    ("train.checkpoint_every_s", lambda v: v >= 0, ">= 0 (0 = no wall-clock checkpoints)"),
    ("train.on_nonfinite", lambda v: v in ("stop", "skip"), "one of stop, skip"),
    ("budget.kind", lambda v: v in BUDGET_KINDS, f"one of {', '.join(BUDGET_KINDS)}"),
]
"""The value rules checked before any work: (config key, test, the rule in words)."""


def config_errors(cfg: DictConfig) -> list[str]:
    errors: list[str] = []
    g = OmegaConf.select

    def need(key: str, ok, rule: str) -> None:
        value = g(cfg, key)
        if value is not None and not ok(value):
            errors.append(f"{key}={value!r}: must be {rule}")

    for key, ok, rule in BOUNDS:
        need(key, ok, rule)
    algo = g(cfg, "algo.name")
    if algo in ALGOS:
        fields = {f.name for f in dataclasses.fields(algo_config_class(algo))}
        for key in cfg.algo:
            if key != "name" and key not in fields:
                hint = difflib.get_close_matches(str(key), sorted(fields), n=1)
                errors.append(
                    f"algo.{key}: not a setting of {algo}" + (f" (did you mean algo.{hint[0]}?)" if hint else "")
                )
        if "beta" in fields:
            need("algo.beta", lambda v: v > 0, f"> 0 for {algo} (β = 0 removes the preference term: nothing trains)")
    world = g(cfg, "world.name")
    names = WORLD_REWARDS.get(world)
    if names is not None:
        for key in ("reward", "eval.reward"):
            need(key, lambda v: v in names, f"a reward of world {world}: {', '.join(names)}")
        for name in g(cfg, "eval.rewards") or []:
            if name not in names:
                errors.append(f"eval.rewards: {name!r} is not a reward of world {world}: {', '.join(names)}")
    errors += device_errors(g(cfg, "device"))
    if g(cfg, "init_from"):
        errors += init_from_errors(Path(cfg.init_from), world)
    return errors


def device_errors(device: str | None) -> list[str]:
    if device is None or device in ("auto", "cpu"):
        return []
    if device not in DEVICES:
        return [f"device={device!r}: must be one of {', '.join(DEVICES)}"]
    if device == "cuda" and not torch.cuda.is_available():
        return ["device='cuda': CUDA is not available on this machine (use device=cpu or device=auto)"]
    if device == "mps" and not torch.backends.mps.is_available():
        return ["device='mps': MPS is not available on this machine (use device=cpu or device=auto)"]
    return []


def init_from_errors(path: Path, world: str | None) -> list[str]:
    """``init_from`` must be a run directory with a checkpoint (or a checkpoint directory) of the same world."""
    run_dir = path.parent.parent if (path / "state.json").is_file() else path
    if not (path / "state.json").is_file() and latest_checkpoint(path / "checkpoints") is None:
        return [f"init_from={str(path)!r}: not a run directory with a checkpoint (nor a checkpoint directory)"]
    saved = run_dir / "config.yaml"
    if saved.is_file():
        other = OmegaConf.select(OmegaConf.load(saved), "world.name")
        if world is not None and other is not None and other != world:
            return [f"init_from={str(path)!r}: that run is world={other}, this one is world={world}"]
    return []


# ----------------------------------------------------------------------------------------------------------------
# Finding the run and the checkpoint to resume
# ----------------------------------------------------------------------------------------------------------------
def find_runs(out_dir: Path | str, world: str | None = None, algo: str | None = None) -> list[tuple[float, Path]]:
    """Runs under ``out_dir`` (any depth: multirun folders included) with a checkpoint, of ``world``/``algo`` if
    given, as (time their newest checkpoint was written, run dir), oldest first."""
    runs = []
    for config in Path(out_dir).rglob("config.yaml"):
        run_dir = config.parent
        if run_dir.name == ".hydra":
            continue
        ckpt = latest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            continue
        saved = OmegaConf.load(config)
        if world is not None and OmegaConf.select(saved, "world.name") != world:
            continue
        if algo is not None and OmegaConf.select(saved, "algo.name") != algo:
            continue
        try:
            written = float(json.loads((ckpt / "state.json").read_text()).get("saved_at", 0.0))
        except (OSError, ValueError):
            written = 0.0
        runs.append((written or (ckpt / "state.json").stat().st_mtime, run_dir))
    return sorted(runs)


def resolve_run(resume: str, out_dir: str, world: str | None = None, algo: str | None = None) -> Path:
    """``resume=<run dir>`` or ``resume=latest`` (filtered by the world/algo given on the command line)."""
    if resume != "latest":
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"resume={resume}: not a run directory (no config.yaml)")
        return run_dir
    runs = find_runs(out_dir, world, algo)
    if not runs:
        which = " ".join(f"{k}={v}" for k, v in (("world", world), ("algo", algo)) if v)
        raise ConfigError(f"resume=latest: no run{' of ' + which if which else ''} with a checkpoint under {out_dir}")
    return runs[-1][1]


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of ``run_dir`` whose checksums verify; a corrupt newer one is named on stdout."""
    ckpt, skipped = latest_intact_checkpoint(run_dir / "checkpoints")
    for problem in skipped:
        print(f"resume: {problem}; falling back to an older checkpoint", flush=True)
    if ckpt is None:
        raise ConfigError(f"resume: no intact checkpoint under {run_dir / 'checkpoints'}")
    if skipped:
        print(f"resume: continuing from {ckpt.name} (the newest intact checkpoint)", flush=True)
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# A resumed run is its config
# ----------------------------------------------------------------------------------------------------------------
def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config as {dotted key: leaf value}."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys a list of Hydra overrides touches (``algo=ddpo`` → ``algo``, ``+algo.bta=5`` → ``algo.bta``)."""
    keys = []
    for o in overrides:
        if "=" in o and not o.startswith("hydra"):
            keys.append(o.partition("=")[0].lstrip("+~"))
    return keys


def config_differences(saved: DictConfig, cfg: DictConfig, overrides: list[str] | None) -> dict[str, tuple]:
    """{key: (saved value, requested value)} for the identity keys the command line changes. ``overrides`` None
    (in-process, no Hydra): every key of ``cfg`` counts as requested."""
    a, b = flat(saved), flat(cfg)
    touched = None if overrides is None else override_keys(overrides)
    diffs: dict[str, tuple] = {}
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in NOT_IDENTITY or key in ("hydra",):
            continue
        explicit = touched is not None and any(key == t or key.startswith(t + ".") for t in touched)
        if (touched is not None and not explicit) or (key not in a and not explicit):
            continue  # not on the command line; or a setting newer than the run (its default applies)
        if a.get(key) != b.get(key):
            diffs[key] = (a.get(key), b.get(key))
    for group in ("algo", "world"):  # a changed algo/world is one difference, not one per setting
        if f"{group}.name" in diffs:
            diffs = {k: v for k, v in diffs.items() if not k.startswith(group + ".") or k == f"{group}.name"}
    return diffs


def resume_config(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> tuple[DictConfig, dict]:
    """The config a resume runs with: the run's own ``config.yaml``, plus the budget extensions named in
    ``resume_override`` (returned as {key: (old, new)}). Anything else the command line changes is refused."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    allowed = list(cfg.get("resume_override") or [])
    for key in allowed:
        if key not in BUDGET_KEYS + LAYOUT_KEYS:
            raise ConfigError(
                f"resume_override: {key!r} cannot be overridden; only {', '.join(BUDGET_KEYS + LAYOUT_KEYS)}"
            )
    diffs = config_differences(saved, cfg, overrides)
    extend = {k: v for k, v in diffs.items() if k in allowed}
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        hint = " (to train longer: resume_override=[train.steps])" if set(refused) & set(BUDGET_KEYS) else ""
        raise ConfigError(f"resume: {run_dir} is its config.yaml; refusing to change {listed}{hint}")
    effective = saved.copy()
    OmegaConf.set_struct(effective, False)
    for key, (_, new) in extend.items():
        OmegaConf.update(effective, key, new, merge=False)
    for key in ("resume", "resume_override", "out_dir", "report", "device"):
        if key in cfg:
            effective[key] = cfg[key]
    return effective, extend


def record_resume(run_dir: Path, effective: DictConfig, ckpt: Path, extend: dict) -> None:
    """``resumes.jsonl`` gets one line per resume; a budget extension also updates ``config.yaml``."""
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from": ckpt.name, "override": extend}
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
    if extend:
        keep = OmegaConf.masked_copy(effective, [k for k in effective if k not in ("resume", "resume_override")])
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(keep, resolve=True))


def is_finished(run_dir: Path) -> bool:
    """A run whose final evaluation was written and which is not stopped."""
    return (run_dir / "eval.json").is_file() and not (run_dir / "STOPPED").exists()
