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
    an error (bad reward, caption, batch) names the optimizer step; the run directory gets STOPPED with the reason

The budget is one of: optimizer ``steps``, UNet function evaluations ``nfe``, ``reward_queries`` or wall seconds
``wall_s`` — so algorithms whose steps cost orders of magnitude apart can be compared at equal cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlkit_diffusion.algorithm import AlgoContext, Algorithm, sum_losses
from rlkit_diffusion.checkpoint import load_checkpoint, load_trainable_state, save_checkpoint, set_rng_state
from rlkit_diffusion.logging import MetricLogger, to_float
from rlkit_diffusion.reference import unwrap


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
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
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
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient: ``stop`` the run (with a clear message) or ``skip`` the step and count it."""
    max_skipped: int = 10
    """With on_nonfinite=skip: stop anyway after this many skipped steps."""


class DivergenceError(RuntimeError):
    """A non-finite loss or gradient stopped training."""


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
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


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
    acc = ctx.accelerator
    main = acc is None or acc.is_main_process
    logger = logger or MetricLogger(None)
    policy = ctx.policy
    algo.setup(ctx)
    if not getattr(algo, "trains", True):  # an inference-time method (best-of-N): nothing to optimise
        return {
            "updates": 0,
            "train_wall_s": 0.0,
            "train_nfe": 0,
            "reward_queries": 0,
            "samples": 0,
            "skipped_steps": 0,
            "checkpoint": None,
        }
    opt, sched = make_optimizer(policy.eps_model, cfg)
    if acc is not None:
        # The lr scheduler is deliberately NOT prepared: accelerate's wrapper steps it num_processes times per
        # optimizer step (for schedules counted in per-process batches), which would end a warm-up num_processes
        # times too early. It is stepped once per optimizer step below, identically for any number of processes.
        policy.eps_model, opt = acc.prepare(policy.eps_model, opt)
    model = policy.eps_model
    params = [p for p in model.parameters() if p.requires_grad]
    multi = acc is not None and acc.num_processes > 1
    ckpt_root = Path(run_dir) / "checkpoints" if run_dir is not None else None

    budget = Budget(budget or BudgetConfig(), cfg, ctx, start_nfe=policy.nfe)
    skipped = 0
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        load_trainable_state(unwrap(model), ck["model"])
        if ck["optimizer"]:
            opt.load_state_dict(ck["optimizer"]["optimizer"])
            sched.load_state_dict(ck["optimizer"]["lr_scheduler"])
        st = ck["state"]
        ctx.counters.updates = int(st["counters"]["updates"])
        ctx.counters.reward_queries = int(st["counters"]["reward_queries"])
        ctx.counters.samples = int(st["counters"]["samples"])
        policy.counter["nfe"] = budget.start_nfe + int(st["nfe_used"])
        budget.wall_offset = float(st.get("wall_s", 0.0))
        skipped = int(st.get("skipped", 0))
        algo.load_state_dict(st.get("algo", {}))
        if hasattr(algo, "reference") and ck["reference"]:
            algo.reference.load_state_dict(ck["reference"])
        if ctx.world.pairs is not None and "pairs" in st:
            ctx.world.pairs.load_state_dict(st["pairs"])
        ctx.generator.set_state(_rank_generator_state(st, acc).to(torch.uint8))
        set_rng_state(st["rng"])

    def checkpoint() -> Path | None:
        generators = _gather_generator_states(acc, ctx.generator)  # every rank takes part in the gather
        if ckpt_root is None or not main:
            return None
        ref = getattr(algo, "reference", None)
        state = {
            "counters": vars(ctx.counters),
            "nfe_used": policy.nfe - budget.start_nfe,
            "wall_s": budget.wall_s(),
            "skipped": skipped,
            "algo": algo.state_dict(),
            "generator": ctx.generator.get_state(),
            "generators": generators,  # one per rank: ranks draw different (t, ε) and must resume their own
        }
        if ctx.world.pairs is not None:
            state["pairs"] = ctx.world.pairs.state_dict()
        return save_checkpoint(
            ckpt_root,
            ctx.counters.updates,
            model=unwrap(model),
            optimizer=opt,
            lr_scheduler=sched,
            reference_state=ref.state_dict() if ref is not None else None,
            state=state,
        )

    last_ckpt: Path | None = None
    # Learning-curve points at budget fractions k/eval_points (after a resume: the next one still ahead).
    eval_span = budget.amount / cfg.eval_points if cfg.eval_points else math.inf
    next_eval_at = (math.floor(budget.used() / eval_span) + 1) * eval_span if cfg.eval_points else math.inf
    bar = tqdm(
        total=budget.amount,
        desc=f"train {getattr(algo, 'name', 'algo')} [{budget.kind}]",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    bar.update(min(budget.used(), budget.amount))
    t_start = time.perf_counter()
    running: dict[str, list[float]] = {}
    model.train()
    checkpoint_due = False
    step_no = ctx.counters.updates + 1  # the optimizer step in progress (named by errors)
    try:
        while not budget.done():
            step_no = ctx.counters.updates + 1
            batch = algo.collect()
            for mb in algo.minibatches(batch):
                step_no = ctx.counters.updates + 1
                ctx_mgr = acc.accumulate(model) if acc is not None else _null()
                with ctx_mgr:
                    losses = algo.loss(mb)
                    total = sum_losses(losses)
                    bad = not torch.isfinite(total.detach()).all()
                    if not bad or multi:  # multi-process: never skip the gradient all-reduce on one rank only (hang);
                        (acc.backward(total) if acc is not None else total.backward())  # NaN grads reach every rank
                        bad = bad or not _grads_finite(params)
                    if bad:
                        opt.zero_grad(set_to_none=True)
                        skipped += 1
                        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint written yet"
                        msg = f"non-finite loss or gradient at optimizer step {step_no} ({where})"
                        if cfg.on_nonfinite == "stop" or skipped > cfg.max_skipped:
                            if run_dir is not None and main:
                                (Path(run_dir) / "STOPPED").write_text(msg + "\n")
                            raise DivergenceError(msg)
                        continue
                    synced = acc.sync_gradients if acc is not None else True
                    if synced and cfg.max_grad_norm > 0:
                        if acc is not None:
                            gn = acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        else:
                            gn = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                        if gn is not None:  # None under DeepSpeed, which clips inside its engine (gradient_clipping)
                            losses["grad_norm"] = gn
                    opt.step()
                    if synced:
                        sched.step()
                    opt.zero_grad(set_to_none=True)
                for k, v in losses.items():
                    running.setdefault(k, []).append(to_float(v))
                if not synced:
                    continue
                ctx.counters.updates += 1
                update = ctx.counters.updates
                for k, v in algo.after_update(update).items():
                    running.setdefault(k, []).append(to_float(v))
                bar.update(max(0.0, min(budget.used(), budget.amount) - bar.n))
                if update % max(1, cfg.log_every) == 0 and main:
                    row = {f"train/{k}": sum(v) / len(v) for k, v in running.items()}
                    row.update(_budget_row(ctx, budget, sched, skipped))
                    logger.log(update, row)
                    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in list(row.items())[:3]})
                    running.clear()
                due = bool(cfg.eval_every) and update % cfg.eval_every == 0
                if cfg.eval_points and budget.used() >= next_eval_at:
                    due = True
                    while next_eval_at <= budget.used():
                        next_eval_at += eval_span
                if eval_fn is not None and due:
                    nfe0, t_eval = ctx.policy.nfe, time.perf_counter()
                    metrics = eval_fn(update)
                    # A learning-curve evaluation is not training: its UNet calls and seconds are not charged to
                    # the budget (nor to unet_nfe / train_wall_s), so curves do not shorten the run they measure.
                    ctx.policy.counter["nfe"] = nfe0
                    budget.wall_offset -= time.perf_counter() - t_eval
                    if main:
                        logger.log(
                            update, {**{f"eval/{k}": v for k, v in metrics.items()}, **_budget_row(ctx, budget)}
                        )
                if cfg.checkpoint_every and update % cfg.checkpoint_every == 0:
                    checkpoint_due = True
                if budget.done():
                    break
            # Checkpoints are written between collected batches only: the rest of a batch (DDPO's further
            # minibatches) is not in a checkpoint, so a mid-batch checkpoint could not resume exactly. When the
            # budget is spent, the final checkpoint below is written instead.
            if checkpoint_due and not budget.done():
                last_ckpt = checkpoint() or last_ckpt
                checkpoint_due = False
    except (ValueError, TypeError, RuntimeError) as err:  # a bad reward, caption, batch, ...: name the step
        _name_the_step(err, step_no)
        if run_dir is not None and main and not isinstance(err, DivergenceError):
            (Path(run_dir) / "STOPPED").write_text(f"{type(err).__name__}: {err}\n")
        raise
    bar.close()
    model.eval()
    if acc is not None:
        acc.wait_for_everyone()
        policy.eps_model = acc.unwrap_model(model)
    final_ckpt = checkpoint()
    return {
        "updates": ctx.counters.updates,
        "train_wall_s": time.perf_counter() - t_start,
        "train_nfe": policy.nfe - budget.start_nfe,
        "reward_queries": ctx.counters.reward_queries,
        "samples": ctx.counters.samples,
        "skipped_steps": skipped,
        "checkpoint": str(final_ckpt) if final_ckpt else None,
    }


def _name_the_step(err: BaseException, step: int) -> None:
    """Append "(at optimizer step N)" to a one-argument error message (same exception type and traceback)."""
    if len(err.args) == 1 and isinstance(err.args[0], str) and "optimizer step" not in err.args[0]:
        err.args = (f"{err.args[0]} (at optimizer step {step})",)


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


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


__all__ = ["BudgetConfig", "DivergenceError", "TrainConfig", "train"]
