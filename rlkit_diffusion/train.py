"""THE training loop, for every algorithm, single- and multi-process (accelerate) alike.

::

    while budget left:
        batch = algo.collect()                         # pairs (DPO), rollouts (DDPO), rollouts+reward (DRaFT)
        for mb in algo.minibatches(batch):
            with accelerator.accumulate(model):
                losses = algo.loss(mb)                 # dict; "loss*" keys are summed
                guard(losses)                          # non-finite → stop (or skip and count)
                accelerator.backward(sum of loss*)
                clip grad norm; optimizer.step(); lr_scheduler.step(); zero_grad
            if an optimizer step happened:
                algo.after_update(update)              # reference updates etc.
                log / eval on their schedules
        checkpoint if one fell due during this batch   # between batches only: a resume is exact
        (every checkpoint_every steps, every checkpoint_every_s wall seconds, or on SIGINT/SIGTERM/SIGHUP → then stop)
    an error (bad reward, caption, batch) names the optimizer step; the run directory gets STOPPED with the reason

The budget is one of: optimizer ``steps``, UNet function evaluations ``nfe``, ``reward_queries`` or wall seconds
``wall_s`` — so algorithms whose steps cost orders of magnitude apart can be compared at equal cost.

Several processes: DDP through accelerate, or FSDP2 with ``train.parallel=fsdp`` (`rlkit_diffusion.sharding`: the
network is sharded before the optimizer is built; checkpoints gather it to the one-process format; the final
evaluation runs on gathered weights). A checkpoint records its number of processes and global batch; it resumes on
another number of processes only for world-size-invariant algorithms at the same global batch (`check_resume_layout`).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlkit_diffusion.algorithm import AlgoContext, Algorithm, sum_losses
from rlkit_diffusion.checkpoint import load_checkpoint, load_trainable_state, save_checkpoint, set_rng_state
from rlkit_diffusion.logging import MetricLogger, to_float
from rlkit_diffusion.policy import PRECISIONS
from rlkit_diffusion.reference import unwrap
from rlkit_diffusion.sharding import (
    FSDP_BLOCKS,
    full,
    gathered_optimizer_state,
    gathered_trainable_state,
    shard_model,
    sharded_optimizer_state,
    unshard_for_evaluation,
)

PARALLEL = ("auto", "fsdp")


@dataclass
class BudgetConfig:
    """How long to train: ``kind`` ∈ steps | nfe | reward_queries | wall_s; ``amount`` None = ``train.steps``."""

    kind: str = "steps"
    amount: float | None = None


@dataclass
class TrainConfig:
    """Optimiser and loop settings shared by every algorithm."""

    steps: int = 300
    """Optimizer steps (the budget when budget.kind=steps and budget.amount is unset)."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW β₁ (first-moment decay)."""
    adam_beta2: float = 0.999
    """AdamW β₂ (second-moment decay)."""
    adam_eps: float = 1e-8
    """AdamW ε."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up (the paper uses 25% of training)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (≤ 0 disables)."""
    grad_accum: int = 1
    """Gradient accumulation: minibatches per optimizer step."""
    batch_size: int = 16
    """Per-process batch: pairs (DPO family) or trajectories (online algorithms)."""
    log_every: int = 10
    """Log training metrics every this many optimizer steps."""
    eval_every: int = 0
    """Run the quick learning-curve evaluation every this many optimizer steps (0 = never)."""
    eval_points: int = 0
    """Run it each time another 1/eval_points of the budget is spent, whatever its kind (0 = never): algorithms
    with very different step costs get learning-curve points at the same budget fractions."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many optimizer steps (0 = only at the end). It is written once the collected batch
    that reached the step is used up (algorithms with several optimizer steps per batch, e.g. DDPO's minibatches,
    checkpoint at the next batch boundary), so that a resume continues exactly."""
    checkpoint_every_s: float = 300.0
    """Also write a checkpoint once this many wall seconds have passed since the last one (0 = never), whatever
    ``checkpoint_every`` says; written at the next batch boundary, like every checkpoint, so a resume is exact."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient: ``stop`` the run (with a clear message) or ``skip`` the step and count it."""
    max_skipped: int = 10
    """With on_nonfinite=skip: stop anyway after this many skipped steps."""
    precision: str = "fp32"
    """Network forwards (training and evaluation sampling) in ``fp32``, ``bf16`` or ``fp16`` autocast; the step
    maths, log-probabilities, losses and path KL stay fp32 (`DiffusionPolicy.set_precision`, docs/perf.md)."""
    compile: bool = False
    """``torch.compile`` the ε-model (training and evaluation sampling)."""
    parallel: str = "auto"
    """With several processes: ``auto`` = what the launcher set up (DDP; or accelerate's own FSDP/DeepSpeed config
    on GPUs); ``fsdp`` = shard the policy network with FSDP2 ``fully_shard`` (`rlkit_diffusion.sharding`; CPU
    processes included, where accelerate's ``--use_fsdp`` silently gives DDP). One process: ignored."""
    fsdp_blocks: list[str] = field(default_factory=lambda: list(FSDP_BLOCKS))
    """With parallel=fsdp: class names of the modules that become their own FSDP units (then the root)."""
    collective_timeout_s: float = 1800.0
    """Several processes: a collective (gradient all-reduce, gather, checkpoint) that waits longer than this for a
    rank fails the run with a message naming this setting instead of hanging (the process group's timeout)."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not a valid choice; available: fp32, bf16, fp16")
        if self.parallel not in PARALLEL:
            raise ValueError(f"train.parallel={self.parallel!r} is not a valid choice; available: auto, fsdp")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"train.collective_timeout_s must be > 0, got {self.collective_timeout_s}")


class DivergenceError(RuntimeError):
    """A non-finite loss or gradient stopped training."""


class ResumeError(ValueError):
    """A checkpoint that cannot continue in this layout (number of processes, global batch): one line says why."""


class Budget:
    def __init__(self, budget: BudgetConfig, cfg: TrainConfig, ctx: AlgoContext, start_nfe: int):
        self.kind = budget.kind
        if self.kind not in ("steps", "nfe", "reward_queries", "wall_s"):
            raise ValueError(f"budget.kind must be steps|nfe|reward_queries|wall_s, got {self.kind!r}")
        self.amount = float(budget.amount if budget.amount is not None else cfg.steps)
        if self.amount <= 0:
            raise ValueError(f"budget.amount must be > 0, got {self.amount}")
        self.ctx, self.start_nfe, self.t0 = ctx, start_nfe, time.perf_counter()
        self.wall_offset = 0.0

    def used(self) -> float:
        c = self.ctx.counters
        return {
            "steps": c.updates,
            "nfe": self.ctx.policy.nfe - self.start_nfe,
            "reward_queries": c.reward_queries,
            "wall_s": self.wall_s(),
        }[self.kind]

    def wall_s(self) -> float:
        """Training seconds so far, including those before a resume."""
        return self.wall_offset + time.perf_counter() - self.t0

    def done(self) -> bool:
        return self.used() >= self.amount


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters")
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    warm = max(0, int(cfg.warmup_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    return opt, sched


def _grads_finite(params) -> bool:
    """Every gradient finite (of a sharded gradient: this rank's shard; `_Loop.agree` combines the ranks)."""
    return all(p.grad is None or bool(torch.isfinite(_local(p.grad)).all()) for p in params)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


NO_TRAINING = {
    "updates": 0,
    "train_wall_s": 0.0,
    "train_nfe": 0,
    "reward_queries": 0,
    "samples": 0,
    "skipped_steps": 0,
    "checkpoint": None,
    "interrupted": None,
}


class Interrupt:
    """SIGINT/SIGTERM/SIGHUP while training: the first one asks the loop to finish the collected batch's optimizer
    steps, write a checkpoint and stop (``signum`` is set); a second one exits at once (status 128 + signal number).
    Handlers are installed only in the main thread (SIGHUP not where it is ignored: ``nohup``) and the previous ones
    are put back on exit."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if sig == getattr(signal, "SIGHUP", None) and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            sys.stderr.write(f"\n{name} again: exiting at once (the last checkpoint is kept)\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        sys.stderr.write(f"\n{name}: finishing the current optimizer step, then a checkpoint (again: exit at once)\n")
        sys.stderr.flush()


def train(
    algo: Algorithm,
    ctx: AlgoContext,
    cfg: TrainConfig,
    *,
    budget: BudgetConfig | None = None,
    run_dir: Path | str | None = None,
    logger: MetricLogger | None = None,
    eval_fn: Any = None,
    resume_from: Path | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``algo`` on ``ctx`` until the budget is spent. Returns a summary dict.

    Args:
        algo: any object following `rlkit_diffusion.algorithm.Algorithm`.
        ctx: the algorithm context (world, policy, base reference, env, counters, accelerator).
        cfg: loop/optimiser settings.
        run_dir: where checkpoints go (``run_dir/checkpoints``); None = no checkpoints.
        logger: metric sink (main process only).
        eval_fn: ``eval_fn(update) -> dict`` for learning curves, run every ``cfg.eval_every`` updates.
        resume_from: a checkpoint directory to continue from (model, optimizer, RNG, algorithm and data state).
    """
    algo.setup(ctx)
    if not algo.trains:  # an inference-time method (best-of-N): nothing to optimise
        return dict(NO_TRAINING)
    loop = _Loop(algo, ctx, cfg, budget or BudgetConfig(), run_dir, logger or MetricLogger(None), eval_fn)
    if resume_from is not None:
        loop.restore(resume_from)
        if loop.run_dir is not None and loop.main:  # the run goes on: it is no longer stopped
            (loop.run_dir / "STOPPED").unlink(missing_ok=True)
    loop.schedule_evaluations()
    bar = tqdm(
        total=loop.budget.amount,
        desc=f"train {algo.name} [{loop.budget.kind}]",
        disable=not (progress and loop.main),
        dynamic_ncols=True,
    )
    bar.update(min(loop.budget.used(), loop.budget.amount))
    t_start = time.perf_counter()
    loop.model.train()
    interrupt = Interrupt()
    try:
        with interrupt:
            _train_batches(loop, algo, ctx, cfg, bar, interrupt)
            if loop.interrupted is not None:  # the stop checkpoint too: a second signal while writing it exits
                bar.close()
                return loop.stop(t_start)
    except (ValueError, TypeError, RuntimeError) as err:  # a bad reward, caption, batch, ...: name the step
        if loop.multi:
            _explain_timeout(err, cfg.collective_timeout_s)
        _name_the_step(err, loop.step_no)
        if loop.ckpt_root is not None and loop.main and not isinstance(err, DivergenceError):
            (Path(run_dir) / "STOPPED").write_text(f"{type(err).__name__}: {err}\n")
        raise
    bar.close()
    return loop.finish(t_start)


def _train_batches(loop: _Loop, algo: Algorithm, ctx: AlgoContext, cfg: TrainConfig, bar: Any, interrupt) -> None:
    """Collect batches and take their optimizer steps until the budget is spent or a signal asks to stop."""
    checkpoint_due = False
    while not loop.budget.done():
        loop.step_no = ctx.counters.updates + 1
        batch = algo.collect()
        for mb in algo.minibatches(batch):
            loop.step_no = ctx.counters.updates + 1
            if not loop.optimizer_step(mb):
                continue
            update = ctx.counters.updates
            bar.update(max(0.0, min(loop.budget.used(), loop.budget.amount) - bar.n))
            loop.log(update, bar)
            loop.maybe_evaluate(update)
            if cfg.checkpoint_every and update % cfg.checkpoint_every == 0:
                checkpoint_due = True
            if loop.budget.done():
                break
        # Checkpoints are written between collected batches only: the rest of a batch (DDPO's further
        # minibatches) is not in a checkpoint, so a mid-batch checkpoint could not resume exactly. When the
        # budget is spent, the final checkpoint below is written instead.
        # A signal (SIGINT/SIGTERM) or the wall-clock interval also makes a checkpoint due; every rank agrees.
        wall_due = bool(cfg.checkpoint_every_s) and time.perf_counter() - loop.last_ckpt_t >= cfg.checkpoint_every_s
        checkpoint_due, signalled = loop.agree(checkpoint_due or wall_due, interrupt.signum is not None)
        if signalled and not loop.budget.done():  # at the budget's end the final checkpoint is written anyway
            loop.interrupted = interrupt.signum or signal.SIGTERM
            return
        if checkpoint_due and not loop.budget.done():
            loop.last_ckpt = loop.checkpoint() or loop.last_ckpt
            checkpoint_due = False


class _Loop:
    """The state of one `train` call: the prepared model and optimiser, the budget, and the steps that touch them
    (restore, the guarded optimizer step, logging, learning-curve evaluations, checkpoints)."""

    def __init__(self, algo, ctx: AlgoContext, cfg: TrainConfig, budget: BudgetConfig, run_dir, logger, eval_fn):
        self.algo, self.ctx, self.cfg, self.logger, self.eval_fn = algo, ctx, cfg, logger, eval_fn
        self.acc = acc = ctx.accelerator
        self.main = acc is None or acc.is_main_process
        policy = ctx.policy
        self.multi = acc is not None and acc.num_processes > 1
        # train.parallel=fsdp: the network is sharded (fully_shard) BEFORE the optimizer is built, so that AdamW
        # holds the sharded parameters and its moments are sharded too; accelerate then prepares the optimizer only.
        shard_here = self.multi and cfg.parallel == "fsdp" and acc.distributed_type != "FSDP"
        if shard_here:
            shard_model(policy.eps_model, cfg.fsdp_blocks, acc.device, acc.num_processes)
        self.opt, self.sched = make_optimizer(policy.eps_model, cfg)
        if acc is not None:
            # The lr scheduler is deliberately NOT prepared: accelerate's wrapper steps it num_processes times per
            # optimizer step (for schedules counted in per-process batches), which would end a warm-up
            # num_processes times too early. It is stepped once per optimizer step, for any number of processes.
            if shard_here:
                self.opt = acc.prepare(self.opt)
            else:
                policy.eps_model, self.opt = acc.prepare(policy.eps_model, self.opt)
        self.model = policy.eps_model
        self.sharded = any(hasattr(p, "to_local") for p in self.model.parameters())  # FSDP: DTensor parameters
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.ckpt_root = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.budget = Budget(budget, cfg, ctx, start_nfe=policy.nfe)
        self.skipped = 0
        self.last_ckpt: Path | None = None
        self.last_ckpt_t = time.perf_counter()  # wall clock of the last checkpoint (checkpoint_every_s)
        self.interrupted: int | None = None  # the signal that stopped training, if one did
        self.step_no = ctx.counters.updates + 1  # the optimizer step in progress (named by errors)
        self.running: dict[str, list[float]] = {}
        # Learning-curve points at budget fractions k/eval_points (after a resume: the next one still ahead).
        self.eval_span = self.budget.amount / cfg.eval_points if cfg.eval_points else math.inf
        self.next_eval_at = math.inf

    def restore(self, path: Path | str) -> None:
        """Continue from a checkpoint: weights, optimizer and scheduler, counters, algorithm, data and RNG state."""
        ctx, algo, policy, budget = self.ctx, self.algo, self.ctx.policy, self.budget
        ck = load_checkpoint(path)
        st = ck["state"]
        self.check_world_size(path, st)
        load_trainable_state(unwrap(self.model), ck["model"])  # a sharded parameter keeps its own shard
        if ck["optimizer"]:
            self.opt.load_state_dict(sharded_optimizer_state(ck["optimizer"]["optimizer"], self.opt))
            self.sched.load_state_dict(ck["optimizer"]["lr_scheduler"])
        ctx.counters.updates = int(st["counters"]["updates"])
        ctx.counters.reward_queries = int(st["counters"]["reward_queries"])
        ctx.counters.samples = int(st["counters"]["samples"])
        policy.counter["nfe"] = budget.start_nfe + int(st["nfe_used"])
        budget.wall_offset = float(st.get("wall_s", 0.0))
        self.skipped = int(st.get("skipped", 0))
        algo.load_state_dict(st.get("algo", {}))
        if algo.reference is not None and ck["reference"]:
            algo.reference.load_state_dict(ck["reference"])
        if ctx.world.pairs is not None and "pairs" in st:
            ctx.world.pairs.load_state_dict(st["pairs"])
        # The shared stream (world-size-invariant draws) continues whatever the number of processes; the per-rank
        # streams continue when it is unchanged (check_world_size refuses a change for algorithms that use them).
        shared = st.get("shared_generator", st["generator"]).to(torch.uint8)
        if ctx.shared_generator is not None:
            ctx.shared_generator.set_state(shared)
        if len(st.get("generators") or [st["generator"]]) == self.world_size:
            ctx.generator.set_state(_rank_generator_state(st, self.acc).to(torch.uint8))
        elif ctx.shared_generator is None:  # one process: its generator IS the shared stream
            ctx.generator.set_state(shared)
        set_rng_state(st["rng"])

    @property
    def world_size(self) -> int:
        return self.acc.num_processes if self.acc is not None else 1

    def check_world_size(self, path: Path | str, st: dict[str, Any]) -> None:
        check_resume_layout(st, Path(path).name, self.algo, self.ctx.batch_size, self.world_size)

    def schedule_evaluations(self) -> None:
        """The next learning-curve point: the first budget fraction k/eval_points still ahead (after a resume too)."""
        if self.cfg.eval_points:
            self.next_eval_at = (math.floor(self.budget.used() / self.eval_span) + 1) * self.eval_span

    def agree(self, checkpoint_due: bool, signalled: bool) -> tuple[bool, bool]:
        """Every rank's flags combined (any rank due/signalled → all): a checkpoint is collective, and the ranks must
        stop at the same step. One process: the flags unchanged."""
        if not self.multi:
            return checkpoint_due, signalled
        flags = torch.tensor([[float(checkpoint_due), float(signalled)]], device=self.acc.device)  # (1, 2)
        gathered = self.acc.gather(flags)  # (num_processes, 2)
        return bool(gathered[:, 0].max() > 0), bool(gathered[:, 1].max() > 0)

    def checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0) with everything `restore` reads. Every rank must call it."""
        ctx, algo = self.ctx, self.algo
        self.last_ckpt_t = time.perf_counter()
        generators = _gather_generator_states(self.acc, ctx.generator)  # every rank takes part in the gather
        model_state = gathered_trainable_state(self.model)  # FSDP: the full parameters (collective), else None
        optimizer_state = gathered_optimizer_state(self.opt, self.sharded) if self.sharded else None
        if self.ckpt_root is None or not self.main:
            return None
        state = {
            "counters": vars(ctx.counters),
            "nfe_used": ctx.policy.nfe - self.budget.start_nfe,
            "wall_s": self.budget.wall_s(),
            "skipped": self.skipped,
            "algo": algo.state_dict(),
            "generator": ctx.generator.get_state(),
            "generators": generators,  # one per rank: ranks draw different (t, ε) and must resume their own
            "num_processes": self.world_size,
            "global_batch": ctx.batch_size * self.world_size,
        }
        if ctx.shared_generator is not None:  # several processes: the world-size-invariant stream (same on all)
            state["shared_generator"] = ctx.shared_generator.get_state()
        if ctx.world.pairs is not None:
            state["pairs"] = ctx.world.pairs.state_dict()
        return save_checkpoint(
            self.ckpt_root,
            ctx.counters.updates,
            model=unwrap(self.model),
            optimizer=self.opt,
            lr_scheduler=self.sched,
            reference_state=algo.reference.state_dict() if algo.reference is not None else None,
            state=state,
            model_state=model_state,
            optimizer_state=optimizer_state,
        )

    def optimizer_step(self, mb: Any) -> bool:
        """Loss, backward, clip, step on one minibatch; a non-finite loss or gradient stops the run (or is skipped
        and counted). Returns True when an optimizer step was taken (False: skipped, or accumulating)."""
        acc, cfg, opt, params = self.acc, self.cfg, self.opt, self.params
        with acc.accumulate(self.model) if acc is not None else nullcontext():
            losses = self.algo.loss(mb)
            total = sum_losses(losses)
            bad = not torch.isfinite(total.detach()).all()
            if not bad or self.multi:  # multi-process: never skip the gradient all-reduce on one rank only (hang);
                (acc.backward(total) if acc is not None else total.backward())  # NaN grads reach every rank
                bad = bad or not _grads_finite(params)
                if self.sharded:  # each rank checked its own shard of the gradients: agree, all skip or none
                    bad = self.agree(bad, False)[0]
            if bad:
                opt.zero_grad(set_to_none=True)
                self._diverged()
                return False
            synced = acc.sync_gradients if acc is not None else True
            if synced and cfg.max_grad_norm > 0:
                if acc is not None:
                    gn = acc.clip_grad_norm_(params, cfg.max_grad_norm)
                else:
                    gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if gn is not None:  # None under DeepSpeed, which clips inside its engine (gradient_clipping)
                    losses["grad_norm"] = full(gn)  # FSDP: the norm is a DTensor
            opt.step()
            if synced:
                self.sched.step()
            opt.zero_grad(set_to_none=True)
        for k, v in losses.items():
            self.running.setdefault(k, []).append(to_float(v))
        if not synced:
            return False
        self.ctx.counters.updates += 1
        for k, v in self.algo.after_update(self.ctx.counters.updates).items():
            self.running.setdefault(k, []).append(to_float(v))
        return True

    def _diverged(self) -> None:
        """Count a non-finite step; stop (STOPPED file + DivergenceError) unless skipping is allowed."""
        self.skipped += 1
        where = f"last good checkpoint: {self.last_ckpt}" if self.last_ckpt else "no checkpoint written yet"
        msg = f"non-finite loss or gradient at optimizer step {self.step_no} ({where})"
        if self.cfg.on_nonfinite == "stop" or self.skipped > self.cfg.max_skipped:
            if self.run_dir is not None and self.main:
                (self.run_dir / "STOPPED").write_text(msg + "\n")
            raise DivergenceError(msg)

    def log(self, update: int, bar: Any) -> None:
        """Training metrics averaged since the last log, every ``log_every`` optimizer steps (main process)."""
        if update % max(1, self.cfg.log_every) == 0 and self.main:
            row = {f"train/{k}": sum(v) / len(v) for k, v in self.running.items()}
            row.update(_budget_row(self.ctx, self.budget, self.sched, self.skipped))
            self.logger.log(update, row)
            bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in list(row.items())[:3]})
            self.running.clear()

    def maybe_evaluate(self, update: int) -> None:
        """A learning-curve evaluation when one falls due (every ``eval_every`` steps or budget fraction)."""
        cfg, budget, ctx = self.cfg, self.budget, self.ctx
        due = bool(cfg.eval_every) and update % cfg.eval_every == 0
        if cfg.eval_points and budget.used() >= self.next_eval_at:
            due = True
            while self.next_eval_at <= budget.used():
                self.next_eval_at += self.eval_span
        if self.eval_fn is None or not due:
            return
        nfe0, t_eval = ctx.policy.nfe, time.perf_counter()
        metrics = self.eval_fn(update)
        # A learning-curve evaluation is not training: its UNet calls and seconds are not charged to the budget
        # (nor to unet_nfe / train_wall_s), so curves do not shorten the run they measure.
        ctx.policy.counter["nfe"] = nfe0
        budget.wall_offset -= time.perf_counter() - t_eval
        if self.main:
            self.logger.log(update, {**{f"eval/{k}": v for k, v in metrics.items()}, **_budget_row(ctx, budget)})

    def stop(self, t_start: float) -> dict[str, Any]:
        """After a signal: write a checkpoint at this batch boundary and mark the run ``STOPPED (interrupted at step
        n)``; the summary's ``interrupted`` names the signal (the runner prints the resume command)."""
        self.model.eval()
        ckpt = self.checkpoint()
        step = self.ctx.counters.updates
        if self.run_dir is not None and self.main:
            (self.run_dir / "STOPPED").write_text(f"STOPPED (interrupted at step {step})\n")
        return {**self.summary(t_start, ckpt), "interrupted": signal.Signals(self.interrupted).name}

    def finish(self, t_start: float) -> dict[str, Any]:
        """Unwrap the model, write the final checkpoint and summarise the run."""
        ctx, acc = self.ctx, self.acc
        self.model.eval()
        if acc is not None:
            acc.wait_for_everyone()
            ctx.policy.eps_model = acc.unwrap_model(self.model)
            if self.sharded:  # gathered for good: rank 0 evaluates alone, with plain full parameters
                unshard_for_evaluation(ctx.policy.eps_model)
        final_ckpt = self.checkpoint()
        return self.summary(t_start, final_ckpt)

    def summary(self, t_start: float, ckpt: Path | None) -> dict[str, Any]:
        ctx = self.ctx
        return {
            "updates": ctx.counters.updates,
            "train_wall_s": time.perf_counter() - t_start,
            "train_nfe": ctx.policy.nfe - self.budget.start_nfe,
            "reward_queries": ctx.counters.reward_queries,
            "samples": ctx.counters.samples,
            "skipped_steps": self.skipped,
            "checkpoint": str(ckpt) if ckpt else None,
            "interrupted": None,
        }


def _name_the_step(err: BaseException, step: int) -> None:
    """Append "(at optimizer step N)" to a one-argument error message (same exception type and traceback)."""
    if len(err.args) == 1 and isinstance(err.args[0], str) and "optimizer step" not in err.args[0]:
        err.args = (f"{err.args[0]} (at optimizer step {step})",)


def check_resume_layout(state: dict[str, Any], name: str, algo: Any, batch_size: int, num_processes: int) -> None:
    """A checkpoint written by another number of processes resumes only when the algorithm's randomness is
    world-size-invariant (`AlgoContext.global_rows`) and the global batch is unchanged; else a one-line
    `ResumeError` says why and what to pass. ``state``: the checkpoint's state.json; ``name``: its directory name."""
    written = int(state.get("num_processes", len(state.get("generators") or [state.get("generator")])))
    if written == num_processes:
        return
    if not getattr(algo, "world_size_invariant", False):
        raise ResumeError(
            f"resume: {name} was written by {written} process(es) and algo {algo.name!r} draws per-rank random "
            f"streams (rollouts, timesteps), which cannot continue on {num_processes}; resume it on {written}"
        )
    global_then = int(state.get("global_batch", batch_size * written))
    if global_then != batch_size * num_processes:
        fix = (
            f"train.batch_size={global_then // num_processes} resume_override=[train.batch_size]"
            if global_then % num_processes == 0
            else f"a number of processes that divides {global_then}"
        )
        raise ResumeError(
            f"resume: {name} was written with a global batch of {global_then} ({written} process(es)); "
            f"train.batch_size={batch_size} on {num_processes} gives {batch_size * num_processes}: use {fix}"
        )


def _explain_timeout(err: BaseException, timeout_s: float) -> None:
    """A collective that timed out: say that a rank stopped answering and name the setting (same exception)."""
    text = str(err)
    if len(err.args) == 1 and isinstance(err.args[0], str) and "timed out" in text.lower():
        err.args = (
            f"a collective timed out after train.collective_timeout_s={timeout_s:g} s: another rank stopped answering "
            f"(killed, hung or far slower) — {text.splitlines()[0] if text else ''}",
        )


def _gather_generator_states(acc: Any, generator: torch.Generator) -> list[torch.Tensor]:
    """Every rank's training-generator state, in rank order (collective: all ranks must call it)."""
    if acc is None or acc.num_processes == 1:
        return [generator.get_state()]
    from accelerate.utils import gather_object

    return list(gather_object([generator.get_state()]))


def _rank_generator_state(state: dict[str, Any], acc: Any) -> torch.Tensor:
    """This rank's generator state from a checkpoint (rank 0's if the number of processes changed)."""
    states = state.get("generators") or [state["generator"]]
    rank, world = (0, 1) if acc is None else (acc.process_index, acc.num_processes)
    return states[rank] if len(states) == world else states[0]


def _budget_row(ctx: AlgoContext, budget: Budget, sched=None, skipped: int = 0) -> dict[str, float]:
    row = {
        "budget/updates": ctx.counters.updates,
        "budget/nfe": ctx.policy.nfe - budget.start_nfe,
        "budget/reward_queries": ctx.counters.reward_queries,
        "budget/wall_s": budget.wall_s(),
    }
    if sched is not None:
        row["train/lr"] = sched.get_last_lr()[0]
        row["train/skipped_steps"] = skipped
    return row


__all__ = ["BudgetConfig", "DivergenceError", "ResumeError", "TrainConfig", "check_resume_layout", "train"]
