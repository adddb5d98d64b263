"""A Hydra callback for the multi-process tests: instruments the real ``python -m benchmarks.run`` entry point.

Passed on the command line of a launcher (``accelerate launch`` / ``torchrun``) as::

    +hydra.callbacks.probe._target_=tests.mp_probe.MultiProcessProbe +hydra.callbacks.probe.out=<dir> ...

On job start it installs the requested patches; on job end every rank writes ``<out>/rank<r>.json`` with the world
size it ran in, how many checkpoints it wrote (and how many of them gathered a sharded optimizer: FSDP), and the
shapes it all-gathered.

* ``crash_rank`` / ``crash_step``: that rank raises inside the loss at that optimizer step.
* ``kill_rank`` / ``kill_step`` / ``marker``: that rank SIGKILLs itself inside the loss at that optimizer step, once:
  it first writes the file ``marker``, and a restarted job (torchrun ``--max-restarts``) that finds it goes on.
* ``stall_rank`` / ``stall_step``: that rank stops answering (sleeps) inside the loss at that optimizer step.

DPO needs no patch for the equivalence tests: its (t, ε) are slices of one global draw (`AlgoContext.global_rows`).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

RECORD: dict[str, Any] = {"checkpoint_writes": 0, "sharded_writes": 0, "gathers": []}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def install(
    crash_rank: int = -1,
    crash_step: int = 0,
    kill_rank: int = -1,
    kill_step: int = 0,
    marker: str = "",
    stall_rank: int = -1,
    stall_step: int = 0,
) -> list[tuple[Any, str, Any]]:
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
        RECORD["sharded_writes"] += kwargs.get("optimizer_state") is not None
        return save(*args, **kwargs)

    patch(rlkit_diffusion.train, "save_checkpoint", counting_save)
    gather = rlkit_diffusion.algorithm.AlgoContext.gather

    def recording_gather(self, x):
        out = gather(self, x)
        RECORD["gathers"].append([list(x.shape), list(out.shape)])
        return out

    patch(rlkit_diffusion.algorithm.AlgoContext, "gather", recording_gather)
    if crash_rank >= 0 or kill_rank >= 0 or stall_rank >= 0:
        loss = dpo.DPO.loss

        def failing_loss(self, batch):
            step = self.ctx.counters.updates + 1
            if rank() == crash_rank and step >= crash_step:
                raise RuntimeError(f"injected failure on rank {crash_rank}")
            if rank() == kill_rank and step == kill_step and not Path(marker).exists():
                Path(marker).write_text(f"rank {kill_rank} killed itself at step {step}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            if rank() == stall_rank and step == stall_step:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # hung, but the launcher's SIGTERM still ends it
                time.sleep(3600)
            return loss(self, batch)

        patch(dpo.DPO, "loss", failing_loss)
    return undo


def uninstall(undo: list[tuple[Any, str, Any]]) -> None:
    for owner, name, original in reversed(undo):
        setattr(owner, name, original)


class MultiProcessProbe(Callback):
    def __init__(self, out: str, **options: Any) -> None:
        self.out = Path(out)
        self.options = options

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        install(**self.options)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from accelerate import PartialState

        self.out.mkdir(parents=True, exist_ok=True)
        record = {"rank": rank(), "world_size": PartialState().num_processes, **RECORD}
        record["status"] = getattr(job_return.status, "name", str(job_return.status))
        (self.out / f"rank{rank()}.json").write_text(json.dumps(record))
