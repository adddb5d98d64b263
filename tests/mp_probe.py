"""A Hydra callback for the multi-process tests: instruments the real ``python -m benchmarks.run`` entry point.

Passed on the command line of a launcher (``accelerate launch`` / ``torchrun``) as::

    +hydra.callbacks.probe._target_=tests.mp_probe.MultiProcessProbe +hydra.callbacks.probe.out=<dir> ...

On job start it installs the requested patches; on job end every rank writes ``<out>/rank<r>.json`` with the world
size it ran in, how many checkpoints it wrote and the shapes it all-gathered.

* ``shared_noise``: DPO's (t, ε) are drawn for the GLOBAL batch from a generator seeded identically on every rank,
  and each rank keeps its slice — together with the runner's sharded pairs, the union over ranks of everything a
  step consumes is then exactly what one process with the global batch consumes (the DDP-equivalence test).
* ``crash_rank`` / ``crash_step``: that rank raises inside the loss at that optimizer step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback

RECORD: dict[str, Any] = {"checkpoint_writes": 0, "gathers": []}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def shared_noise_predictions(self, prompts: list[str], x_w, x_l) -> dict[str, Any]:
    """`algos.dpo.DPO.predictions` with (t, ε) drawn for the global batch and sliced per rank."""
    from algos import dpo

    ctx, cfg = self.ctx, self.config
    acc = ctx.accelerator
    world, r = (acc.num_processes, acc.process_index) if acc is not None else (1, 0)
    if not hasattr(self, "_shared_generator"):
        self._shared_generator = torch.Generator().manual_seed(12345)
    b = len(prompts)
    rows = slice(r * b, (r + 1) * b)
    t = dpo.sample_timesteps(b * world, cfg.t_min, self.t_max, self._shared_generator, ctx.device)[rows]
    noise = torch.randn((b * world, *x_w.shape[1:]), generator=self._shared_generator)[rows].to(ctx.device)
    cond = ctx.world.encoder(prompts)
    model, ref, target = dpo.paired_predictions(ctx.policy, self.reference.policy, x_w, x_l, cond, t, noise)
    weight = dpo.snr_weight(ctx.policy.alphas_cumprod[t], cfg.weighting)
    return {"model": model, "ref": ref, "target": target, "weight": weight, "t": t}


def install(shared_noise: bool = False, crash_rank: int = -1, crash_step: int = 0) -> list[tuple[Any, str, Any]]:
    """Apply the patches; returns ``(owner, name, original)`` triples for `uninstall`."""
    import rlkit_diffusion.algorithm
    import rlkit_diffusion.train
    from algos import dpo

    undo = []

    def patch(owner: Any, name: str, new: Any) -> None:
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    save = rlkit_diffusion.train.save_checkpoint

    def counting_save(*args, **kwargs):
        RECORD["checkpoint_writes"] += 1
        return save(*args, **kwargs)

    patch(rlkit_diffusion.train, "save_checkpoint", counting_save)
    gather = rlkit_diffusion.algorithm.AlgoContext.gather

    def recording_gather(self, x):
        out = gather(self, x)
        RECORD["gathers"].append([list(x.shape), list(out.shape)])
        return out

    patch(rlkit_diffusion.algorithm.AlgoContext, "gather", recording_gather)
    if shared_noise:
        patch(dpo.DPO, "predictions", shared_noise_predictions)
    if crash_rank >= 0:
        loss = dpo.DPO.loss

        def crashing_loss(self, batch):
            if rank() == crash_rank and self.ctx.counters.updates + 1 >= crash_step:
                raise RuntimeError(f"injected failure on rank {crash_rank}")
            return loss(self, batch)

        patch(dpo.DPO, "loss", crashing_loss)
    return undo


def uninstall(undo: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in reversed(undo):
        setattr(owner, name, original)


class MultiProcessProbe(Callback):
    def __init__(self, out: str, shared_noise: bool = False, crash_rank: int = -1, crash_step: int = 0) -> None:
        self.out = Path(out)
        self.options = {"shared_noise": shared_noise, "crash_rank": crash_rank, "crash_step": crash_step}

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        install(**self.options)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from accelerate import PartialState

        self.out.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank(), "world_size": PartialState().num_processes, **RECORD}
        record["status"] = getattr(job_return.status, "name", str(job_return.status))
        (self.out / f"rank{rank()}.json").write_text(json.dumps(record))
