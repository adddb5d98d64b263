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


# ----------------------------------------------------------------------------------------------------------------
# --flops: FLOPs per UNet call, achieved FLOP/s, growth with batch and resolution, and the cost model
# ----------------------------------------------------------------------------------------------------------------
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
"""Dense bf16 tensor-core peaks (vendor datasheets, SXM parts), TFLOP/s."""
SD15_UNET = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
}
"""Stable Diffusion 1.5's UNet (diffusers' UNet2DConditionModel config), built on the meta device to count FLOPs."""
PAPER_RUNS = {
    # name: (UNet forwards per unit, units, GPUs, reported hours)
    # Diffusion-DPO SD1.5: 2,000 steps × 2,048 pairs; per pair the policy's fwd+bwd on x^w and x^l (≈ 3 forwards
    # each) and the reference's forward on both: 8 forward-equivalents.
    "diffusion_dpo_sd15": (8 * 2048, 2000, 16, 24.0),
    # DDPO aesthetic (SD1.5): per epoch 256 samples × 50 steps, sampled with CFG (2 forwards) and trained on every
    # transition with CFG (fwd+bwd of 2: 6 forward-equivalents): 8 × 50 × 256 per epoch; 100 epochs.
    "ddpo_aesthetic_sd15": (8 * 50 * 256, 100, 8, 4.0),
}


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def sd15_forward_flops() -> float:
    """FLOPs of one SD1.5 UNet forward on one 64×64 latent with 77 text tokens (meta device: no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        x, t, c = torch.empty(1, 4, 64, 64), torch.zeros(1, dtype=torch.long), torch.empty(1, 77, 768)
    return count_flops(lambda: unet(x, t, encoder_hidden_states=c))


def _cpu_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def growth_row(name: str, net, x, t, cond, repeats: int, peak_mb) -> dict[str, Any]:
    """One UNet shape: FLOPs, CPU ms and achieved GFLOP/s of a forward and of a forward+backward, and the peak
    memory of the forward+backward (weights included; ``peak_mb`` = `benchmarks.perf.peak_mb`)."""

    def fwd():
        with torch.inference_mode():
            net(x, t, cond)

    def fwd_bwd():
        net.zero_grad(set_to_none=True)
        net(x, t, cond).float().pow(2).mean().backward()

    f_fwd, f_train = count_flops(fwd), count_flops(fwd_bwd)
    s_fwd, s_train = _cpu_seconds(fwd, repeats), _cpu_seconds(fwd_bwd, repeats)
    return {
        "item": name,
        "batch": int(x.shape[0]),
        "resolution": int(x.shape[-1]),
        "fwd_gflop": f_fwd / 1e9,
        "fwd_ms": 1e3 * s_fwd,
        "fwd_gflops": f_fwd / s_fwd / 1e9,
        "train_gflop": f_train / 1e9,
        "train_ms": 1e3 * s_train,
        "train_gflops": f_train / s_train / 1e9,
        "train_peak_mb": peak_mb(fwd_bwd, x.device, net),
    }


def growth(build, peak_mb, repeats: int = 3, batches=(4, 16, 32), sd_batches=(4, 16)) -> list[dict[str, Any]]:
    """Step time, FLOPs and peak memory vs batch size and resolution: shapes at 16 and 32 px, sd_tiny (32×32 px,
    4×16×16 latents). Sampling T steps costs T forwards of the sampling batch (×2 with guidance). ``build`` and
    ``peak_mb``: `benchmarks.perf`'s world builder and memory probe."""
    rows = []
    for world_name, sizes, bs in (("shapes", (16, 32), batches), ("sd_tiny", (None,), sd_batches)):
        world = build(world_name, torch.device("cpu"), 20)
        net = world.policy.eps_model
        prompts = [world.train_prompts[i % len(world.train_prompts)] for i in range(max(bs))]
        for size in sizes:
            for b in bs:
                shape = world.sample_shape if size is None else (world.sample_shape[0], size, size)
                x = torch.randn((b, *shape), generator=torch.Generator().manual_seed(0))
                t = torch.full((b,), 500)
                cond = world.encoder(prompts[:b])
                rows.append(growth_row(world_name, net, x, t, cond, repeats, peak_mb))
    return rows


def cost_model(efficiency: float, sd15_fwd_flops: float) -> dict[str, Any]:
    """Predicted hours of the papers' runs: hours = units × forwards per unit × F_fwd / (GPUs × peak × efficiency)."""
    out = {}
    for run, (fwd_per_unit, units, gpus, reported) in PAPER_RUNS.items():
        flops = fwd_per_unit * units * sd15_fwd_flops
        pred = {dev: flops / (gpus * peak * 1e12 * efficiency) / 3600 for dev, peak in PEAK_TFLOPS.items()}
        out[run] = {
            "total_pflop": flops / 1e15,
            "gpus": gpus,
            "reported_h_a100": reported,
            "predicted_h": pred,
            "predicted_gpu_h": {dev: h * gpus for dev, h in pred.items()},
            "implied_a100_efficiency": flops / (gpus * PEAK_TFLOPS["A100"] * 1e12 * reported * 3600),
        }
    return out


def flops_report(build, peak_mb, repeats: int = 3, efficiency: float = 0.4) -> dict[str, Any]:
    rows = growth(build, peak_mb, repeats)
    f_sd = sd15_forward_flops()
    return {
        "growth": rows,
        "sd15_fwd_gflop": f_sd / 1e9,
        "efficiency": efficiency,
        "cost": cost_model(efficiency, f_sd),
    }


def format_flops(r: dict[str, Any]) -> str:
    lines = [
        "benchmarks.perf --flops (CPU time, medians; GFLOP counted by torch.utils.flop_counter)",
        "",
        f"{'item':<9}{'B':>4}{'px':>5}{'fwd GFLOP':>11}{'fwd ms':>9}{'GFLOP/s':>9}{'train GFLOP':>13}{'train ms':>10}"
        f"{'GFLOP/s':>9}{'peak MB':>9}",
    ]
    for g in r["growth"]:
        lines.append(
            f"{g['item']:<9}{g['batch']:>4}{g['resolution']:>5}{g['fwd_gflop']:>11.2f}{g['fwd_ms']:>9.1f}"
            f"{g['fwd_gflops']:>9.1f}{g['train_gflop']:>13.2f}{g['train_ms']:>10.1f}{g['train_gflops']:>9.1f}"
            f"{g['train_peak_mb']:>9.0f}"
        )
    lines += [
        "",
        f"SD1.5 UNet forward, one 64x64 latent: {r['sd15_fwd_gflop']:.0f} GFLOP. Cost model at efficiency "
        f"{r['efficiency']:.2f} of the bf16 peak (A100 312, H100/H200 989 TFLOP/s):",
    ]
    for run, c in r["cost"].items():
        pred = ", ".join(f"{d} {h:.1f} h ({c['predicted_gpu_h'][d]:.0f} GPU-h)" for d, h in c["predicted_h"].items())
        lines.append(
            f"  {run}: {c['total_pflop']:.0f} PFLOP on {c['gpus']} GPUs -> {pred}; reported {c['reported_h_a100']} h "
            f"on A100 (implied efficiency {c['implied_a100_efficiency']:.3f})"
        )
    return "\n".join(lines)
