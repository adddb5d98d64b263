"""Whole runs and precisions: ``python -m benchmarks.perf --run`` and ``--precision-check``.

``--run [override ...]``: one complete ``benchmarks.run`` (build, train, evaluate, report; default ``algo=dpo`` on
shapes) in this process, next to the UNet work it contains done bare. Every network forward of the run is tallied
by (phase, autograd on/off, input shape) through `DiffusionPolicy.model_output`; afterwards one forward of each
shape (forward+backward when it ran with autograd) is timed bare on the same network, and the bare work of a phase
is Σ count × time. Printed: a table of phases (wall and CPU seconds, UNet rows, bare CPU seconds, ratio) and the
whole run's ratio = CPU seconds of the run / CPU seconds of its bare UNet work. CPU time is the process's (all
threads), so a busy neighbour on the shared machine does not inflate it; wall seconds are shown too.

``--precision-check``: for each precision (fp32, bf16, fp16 autocast of the network forward; `set_precision`), on
the world's policy: (a) the on-policy importance ratio π_θ(a|s)/π_θ_old(a|s) of a freshly sampled trajectory
(inference mode, batch B) re-scored by the same weights as training does (`DenoisingCore.rescore` with autograd
on, minibatches of B/2) — exactly 1 in exact arithmetic; reported as max and mean |ratio − 1| and the last step's
mean ratio; (b) batch invariance: the same transitions re-scored as one batch and
row by row, max |Δ log π| in nats.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

PHASES = ("build", "train", "evaluate", "report")


# ----------------------------------------------------------------------------------------------------------------
# --run
# ----------------------------------------------------------------------------------------------------------------
class UNetTally:
    """Counts every `DiffusionPolicy.model_output` call by (phase, grad, shape) and keeps one input of each."""

    def __init__(self) -> None:
        self.phase = "build"
        self.calls: Counter = Counter()
        self.rows: Counter = Counter()
        self.examples: dict[tuple, tuple] = {}

    @contextlib.contextmanager
    def installed(self):
        import benchmarks.run as run_module
        from rlkit_diffusion.policy import DiffusionPolicy

        real_output = DiffusionPolicy.model_output
        real_train, real_eval = run_module.train_run, run_module.evaluate_run
        tally = self

        def model_output(policy, x_t, t, cond):
            key = (tally.phase, torch.is_grad_enabled(), tuple(x_t.shape))
            tally.calls[key] += 1
            tally.rows[tally.phase] += x_t.shape[0]
            if key not in tally.examples:
                tt = t if isinstance(t, torch.Tensor) else torch.full((x_t.shape[0],), int(t))
                tally.examples[key] = (policy, x_t.detach().clone(), tt.detach().clone(), cond)
            return real_output(policy, x_t, t, cond)

        def in_phase(name, fn):
            def wrapped(*args, **kwargs):
                tally.phase = name
                try:
                    return fn(*args, **kwargs)
                finally:
                    tally.phase = "report"

            return wrapped

        DiffusionPolicy.model_output = model_output
        run_module.train_run = in_phase("train", real_train)
        run_module.evaluate_run = in_phase("evaluate", real_eval)
        try:
            yield self
        finally:
            DiffusionPolicy.model_output = real_output
            run_module.train_run, run_module.evaluate_run = real_train, real_eval

    def bare_seconds(self, repeats: int = 3) -> dict[str, float]:
        """CPU seconds of each phase's UNet work done bare (median of ``repeats`` timed calls per shape)."""
        per_key = {}
        for key, (policy, x, t, cond) in self.examples.items():
            _, grad, _ = key
            net = policy._network()
            dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[policy.precision]

            def call(net=net, x=x, t=t, cond=cond, grad=grad, dtype=dtype):
                amp = contextlib.nullcontext() if dtype is None else torch.autocast(x.device.type, dtype=dtype)
                if grad:
                    with amp:
                        out = net(x, t, cond)
                    out.float().pow(2).mean().backward()
                    net.zero_grad(set_to_none=True)
                else:
                    with torch.inference_mode(), amp:
                        net(x, t, cond)

            call()  # warm-up
            times = []
            for _ in range(repeats):
                c0 = time.process_time()
                call()
                times.append(time.process_time() - c0)
            per_key[key] = statistics.median(times)
        out = dict.fromkeys(PHASES, 0.0)
        for key, n in self.calls.items():
            out[key[0]] += n * per_key[key]
        return out


def whole_run(overrides: list[str], out_dir: str | None = None, repeats: int = 3) -> dict[str, Any]:
    """One complete run with its phases and the bare UNet work it contains (module docstring)."""
    from benchmarks.experiments import compose_run
    from benchmarks.run import run

    with tempfile.TemporaryDirectory(prefix="perf_run_") as tmp:
        root = Path(out_dir or tmp)
        cfg = compose_run([f"out_dir={root}", *overrides])
        run_dir = root / time.strftime("perf-%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True)
        tally = UNetTally()
        with tally.installed(), contextlib.redirect_stdout(sys.stderr):  # stdout: only this command's table/JSON
            result = run(cfg, run_dir=run_dir)
        bare = tally.bare_seconds(repeats)
    wall, cpu = result["phases_wall_s"], result["phases_cpu_s"]
    phases = {
        name: {
            "wall_s": wall[name],
            "cpu_s": cpu[name],
            "unet_rows": int(tally.rows[name]),
            "bare_cpu_s": bare[name],
            "ratio": cpu[name] / bare[name] if bare[name] > 0 else None,  # None: no UNet work in the phase
        }
        for name in PHASES
    }
    total_bare = sum(bare.values())
    return {
        "overrides": overrides,
        "threads": torch.get_num_threads(),
        "phases": phases,
        "wall_s": sum(wall.values()),
        "cpu_s": sum(cpu.values()),
        "bare_cpu_s": total_bare,
        "ratio": sum(cpu.values()) / total_bare,
        "win_rate_vs_base": result["win_rate_vs_base"],
        "gold_reward_trained": result["gold_reward_trained"],
        "kl_to_ref": result["kl_to_ref"],
    }


def format_run(r: dict[str, Any]) -> str:
    lines = [
        f"benchmarks.perf --run {' '.join(r['overrides'])} (threads={r['threads']}; ratio = CPU s / bare UNet CPU s)",
        "",
        f"{'phase':<10}{'wall s':>9}{'cpu s':>9}{'UNet rows':>11}{'bare s':>9}{'ratio':>8}",
    ]
    for name, p in r["phases"].items():
        lines.append(
            f"{name:<10}{p['wall_s']:>9.1f}{p['cpu_s']:>9.1f}{p['unet_rows']:>11d}{p['bare_cpu_s']:>9.1f}"
            + (f"{p['ratio']:>8.2f}" if p["ratio"] is not None else f"{'-':>8}")
        )
    lines.append(f"{'run':<10}{r['wall_s']:>9.1f}{r['cpu_s']:>9.1f}{'':>11}{r['bare_cpu_s']:>9.1f}{r['ratio']:>8.2f}")
    lines.append(f"win rate {r['win_rate_vs_base']:.3f}, gold {r['gold_reward_trained']:.3f}, KL {r['kl_to_ref']:.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# --precision-check
# ----------------------------------------------------------------------------------------------------------------
def precision_check(world, batch_size: int = 8, precisions=("fp32", "bf16", "fp16")) -> dict[str, Any]:
    """On-policy importance ratio and log-prob batch invariance of ``world.policy`` in each precision."""
    from rlkit_diffusion.mdp import DenoisingCore

    core = DenoisingCore(world, reward=None)
    prompts = [world.train_prompts[i % len(world.train_prompts)] for i in range(batch_size)]
    policy = world.policy
    out = {}
    for precision in precisions:
        policy.set_precision(precision)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            ro = core.rollout(policy, prompts, generator=gen, with_reward=False, return_trajectory=True)
            s = ro.sample
            ratios, batch_dev = [], 0.0
            half = max(1, batch_size // 2)
            for i in range(core.horizon):
                lp = core.rescore(policy, s.latents[i], i, ro.cond, prev_sample=s.latents[i + 1]).log_prob  # (B,)
                with torch.enable_grad():  # as training re-scores: autograd on, minibatches of B/2
                    lp_train = torch.cat(
                        [
                            core.rescore(
                                policy,
                                s.latents[i][j : j + half],
                                i,
                                _rows(ro.cond, slice(j, j + half)),
                                prev_sample=s.latents[i + 1][j : j + half],
                            ).log_prob.detach()
                            for j in range(0, batch_size, half)
                        ]
                    )
                ratios.append(torch.exp(lp_train - s.log_probs[:, i]))
                for r in range(batch_size):
                    cond_r = _rows(ro.cond, slice(r, r + 1))
                    one = core.rescore(
                        policy, s.latents[i][r : r + 1], i, cond_r, prev_sample=s.latents[i + 1][r : r + 1]
                    )
                    batch_dev = max(batch_dev, float((one.log_prob[0] - lp[r]).abs()))
        ratio = torch.stack(ratios, 1)  # (B, T)
        out[precision] = {
            "ratio_max_abs_dev": float((ratio - 1).abs().max()),
            "ratio_mean_abs_dev": float((ratio - 1).abs().mean()),
            "ratio_last_step_mean": float(ratio[:, -1].mean()),
            "log_prob_batch_max_abs_diff": batch_dev,
            "log_prob_dtype": str(s.log_probs.dtype),
        }
    policy.set_precision("fp32")
    return {"batch_size": batch_size, "steps": core.horizon, "precisions": out}


def _rows(cond: Any, rows: slice) -> Any:
    if isinstance(cond, torch.Tensor):
        return cond[rows]
    return {k: _rows(v, rows) for k, v in cond.items()}


def format_precision(r: dict[str, Any]) -> str:
    lines = [
        f"benchmarks.perf --precision-check: B={r['batch_size']} T={r['steps']} (on-policy ratio = 1 exactly in "
        "exact arithmetic)",
        "",
        f"{'precision':<10}{'max|ratio-1|':>14}{'mean|ratio-1|':>15}{'last-step ratio':>17}{'max|Δlogp| batch':>18}",
    ]
    for name, p in r["precisions"].items():
        lines.append(
            f"{name:<10}{p['ratio_max_abs_dev']:>14.2e}{p['ratio_mean_abs_dev']:>15.2e}"
            f"{p['ratio_last_step_mean']:>17.6f}{p['log_prob_batch_max_abs_diff']:>18.2e}"
        )
    return "\n".join(lines)
