"""``python -m benchmarks.perf`` — every algorithm step against its bare-UNet lower bound, in one process.

The cost of an alignment step is dominated by UNet calls, so its physical floor is the time of exactly the UNet work
the step needs, run bare (the diffusers ``UNet2DConditionModel`` called directly, no policy, no algorithm). For each
item below the step runs through the project's real code path (``algos.*``, `DiffusionPolicy.sample`,
``evaluate.sample_split``) and its bound on the same network, the same batch shapes and the same conditioning:

=====================  ===========================================================  ==================================
item                   step (real code path)                                        bound (bare UNet work)
=====================  ===========================================================  ==================================
``<dpo>_lora``         ``algo.loss(batch)`` + backward, reference = adapters off    fwd+bwd on 2B + fwd on 2B under
``<dpo>_frozen``       the same with a frozen-copy reference (full fine-tuning)     ``inference_mode`` (reference)
``sft_*``              ``SFT.loss`` + backward (winners only, no reference)         fwd+bwd on B
``ddpo_sample``        ``env.rollout(return_trajectory=True)`` as ``DDPO.collect``  T fwd on 2B (CFG batched)
``ddpo_train``         ``DDPO.loss`` + backward on all M stochastic transitions     fwd+bwd on 2M (CFG batched)
``draft_k1/_kT``       ``DRaFT.loss`` (``sample(grad="last_k")``) + backward        (T−K) fwd + K fwd+bwd on 2B + the
``alignprop_kT``       the same with per-step checkpointing (K = T)                 reward's fwd+bwd (checkpointed)
``eval_sample``        ``evaluate.sample_split`` (plain sampling)                   T fwd on 2B
``eval_sample_kl``     ``sample_split`` with the path KL to the reference           2T fwd on 2B
=====================  ===========================================================  ==================================

(``<dpo>`` is each of ``dpo``, ``dpo_l2``, ``sft``, ``rethink_dpo``; B = ``--batch-size``, T = ``--steps``, 2B = the
classifier-free-guidance batch or the winner+loser batch; no item includes the optimizer update.)

Timing: after one warm-up call of each, step and bound alternate (step, bound, step, bound, ...) ``--repeats`` times.
The clock is the process's CPU time on CPU (a busy neighbour on a shared machine does not inflate it) and the wall
clock between synchronisations on accelerators. Reported: the median milliseconds of each and ``ratio`` = the median
over repeats of step / the bound measured right after it.

Memory (peak of one step, including the weights of every network it needs; one warm-up call first, whose gradients
are released as ``zero_grad(set_to_none=True)`` does):

* CUDA: ``torch.cuda.max_memory_allocated`` − the allocation before the step, plus the weights.
* CPU: the allocator is not observable, so the peak of the step's tensor allocations is read from
  ``torch.profiler`` (``profile_memory=True``): every allocation and free of the step is an event; the running sum's
  maximum is the peak extra memory. Added to it: the bytes of the parameters and buffers of the networks in play
  (the policy's UNet, and the frozen copy for a frozen reference).

"One UNet's training state" = one UNet's weights + the peak of a bare forward+backward on 2B (its activations and
gradients). DRaFT's peak is swept over K (``--memory-ks``) for full fine-tuning without and with per-step
checkpointing and for LoRA with checkpointing; the bare checkpointed chain gives the floor at the smallest and
largest K. Targets: every ratio ≤ 1.10; DPO with a LoRA reference ≤ 1.15× one UNet's training state; DRaFT with
checkpointing within 1.2× from K = 1 to K = T. ``--json`` prints one JSON object (fields: `TIMING_ITEMS` ×
`TIMING_FIELDS` under ``timing``, `MEMORY_FIELDS` and `MEMORY_LISTS` under ``memory``) instead of the table.
docs/perf.md has the table measured on the development machine and what each fix changed.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import gc
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

RATIO_TARGET = 1.10
DPO_MEMORY_TARGET = 1.15
DRAFT_GROWTH_TARGET = 1.2
DPO_FAMILY = ("dpo", "dpo_l2", "sft", "rethink_dpo")
TIMING_ITEMS = (
    *(f"{name}_{ref}" for name in DPO_FAMILY for ref in ("lora", "frozen")),
    "ddpo_sample",
    "ddpo_train",
    "draft_k1",
    "draft_kT",
    "alignprop_kT",
    "eval_sample",
    "eval_sample_kl",
)
TIMING_FIELDS = ("step_ms", "bound_ms", "ratio")
MEMORY_FIELDS = (
    "unet_train_lora_mb",
    "unet_train_full_mb",
    "dpo_lora_mb",
    "dpo_frozen_mb",
    "dpo_lora_ratio",
    "dpo_frozen_ratio",
    "draft_growth",
    "draft_ckpt_growth",
    "draft_lora_ckpt_growth",
    "draft_ckpt_bound_growth",
)
MEMORY_LISTS = ("draft_k", "draft_mb", "draft_ckpt_mb", "draft_lora_ckpt_mb", "draft_ckpt_bound_mb")
MB = 2**20


# ----------------------------------------------------------------------------------------------------------------
# Worlds
# ----------------------------------------------------------------------------------------------------------------
def build_sd_tiny(device: torch.device, steps: int, root: Path | None = None):
    """The ``sd15`` world on tiny random components (``rlkit_diffusion/tiny.py``) saved to ``root`` (default: a
    temporary directory) and loaded back through ``from_pretrained``: 4×16×16 latents, a 2-level UNet, a 2-layer CLIP
    text encoder, a tiny PickScore (CLIPModel) as the differentiable reward and a Pick-a-Pic-format parquet of pairs.
    ``root/sd15`` is the StableDiffusionPipeline directory and ``root/clip`` the reward's (``benchmarks.peers`` loads
    them into the peers)."""
    from rlkit_diffusion.tiny import save_tiny_clip, save_tiny_sd15, write_pickapic
    from rlkit_diffusion.worlds import build_world

    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="perf_sd_tiny_")
        atexit.register(tmp.cleanup)
        root = Path(tmp.name)
    clip = str(save_tiny_clip(root / "clip"))
    return build_world(
        "sd15",
        device=device,
        pretrained=str(save_tiny_sd15(root / "sd15")),
        resolution=32,
        num_inference_steps=steps,
        guidance_scale=7.5,
        pickscore_model=clip,
        pickscore_processor=clip,
        pairs=str(write_pickapic(root / "pairs.parquet", n=64)),
    )


def build(world_name: str, device: torch.device, steps: int):
    if world_name == "sd_tiny":
        return build_sd_tiny(device, steps)
    from rlkit_diffusion.worlds import build_world

    return build_world(world_name, device=device, num_inference_steps=steps)


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> Callable[[], float]:
    """The timer: on CPU the process's CPU time (all its threads; a busy neighbour on a shared machine does not
    inflate it, unlike wall time), on accelerators the wall clock around synchronisations."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def interleaved(step: Callable[[], Any], bound: Callable[[], Any], repeats: int, device: torch.device) -> dict:
    """Median milliseconds of ``step`` and ``bound``, measured alternately (A, B, A, B, ...) after one warm-up call
    of each, and the median over repeats of the ratio of each step to the bound measured right after it (a slow
    drift of the machine's speed cancels within a pair)."""
    times: dict[str, list[float]] = {"step": [], "bound": []}
    now = clock(device)
    for r in range(repeats + 1):
        for key, fn in (("step", step), ("bound", bound)):
            sync(device)
            t0 = now()
            fn()
            sync(device)
            if r > 0:  # r = 0 is the warm-up
                times[key].append(now() - t0)
    ratios = [a / b for a, b in zip(times["step"], times["bound"])]  # each step against its neighbouring bound
    return {
        "step_ms": 1e3 * statistics.median(times["step"]),
        "bound_ms": 1e3 * statistics.median(times["bound"]),
        "ratio": statistics.median(ratios),
    }


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of the distinct parameter and buffer storages of ``modules``."""
    seen: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` beyond what was allocated before it (module docstring, "Memory")."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):  # DeviceType.CPU
            current += e.nbytes()
            peak = max(peak, current)
    return peak


def peak_mb(fn: Callable[[], Any], device: torch.device, *modules: nn.Module) -> float:
    """Peak memory of one call of ``fn`` in MiB: the weights of ``modules`` + the peak of its allocations (gradients
    included: those of the warm-up call are released first, as ``zero_grad(set_to_none=True)`` does in training)."""
    fn()  # warm-up: lazily created state (e.g. caches) is not part of the step
    for m in modules:
        m.zero_grad(set_to_none=True)
    return (weight_bytes(*modules) + peak_extra_bytes(fn, device)) / MB


# ----------------------------------------------------------------------------------------------------------------
# The bare UNet work
# ----------------------------------------------------------------------------------------------------------------
def unet_of(eps_model: nn.Module) -> nn.Module:
    """The diffusers UNet inside a (wrapped) `UNetEpsModel`."""
    from rlkit_diffusion.reference import unwrap

    return unwrap(eps_model).unet


def bare(unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> Tensor:
    """One bare UNet call: ``unet(x_t, t, **cond)`` (B, C, H, W) → (B, C, H, W)."""
    if isinstance(cond, Tensor):
        cond = {"encoder_hidden_states": cond}
    return unet(x, t, **cond, return_dict=False)[0]


def lora_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def bare_reference_forward(unet: nn.Module, layers: list[nn.Module], x: Tensor, t: Tensor, cond: Any) -> None:
    """The reference's forward: inference mode, LoRA adapters (``layers``) switched off if any."""
    for m in layers:
        m.enable_adapters(False)
    with torch.inference_mode():
        bare(unet, x, t, cond)
    for m in layers:
        m.enable_adapters(True)


def bare_train(unet: nn.Module, x: Tensor, t: Tensor, cond: Any) -> None:
    """Forward + backward of a scalar of the output; gradients of the trainable weights are reset first."""
    unet.zero_grad(set_to_none=True)
    bare(unet, x, t, cond).float().pow(2).mean().backward()


@dataclass
class Inputs:
    """Batched inputs of the bare calls, built once: B prompts, their conditioning, CFG conditioning of 2B."""

    prompts: list[str]
    cond: Any  # batch B
    cond2: Any  # batch 2B: (cond, cond) for winner+loser, or (uncond, cond) for guidance
    x: Tensor  # (B, C, H, W)
    x2: Tensor  # (2B, C, H, W)
    t: Tensor  # (B,)
    t2: Tensor  # (2B,)


def make_inputs(world, prompts: list[str], guided: bool) -> Inputs:
    from rlkit_diffusion.policy import cond_cat

    b, dev = len(prompts), world.device
    cond = world.encoder(prompts)
    other = world.uncond(b) if guided and world.uncond(b) is not None else cond
    g = torch.Generator().manual_seed(0)
    x = torch.randn((b, *world.sample_shape), generator=g).to(dev)
    t = torch.randint(0, world.policy.num_train_timesteps, (b,), generator=g).to(dev)
    return Inputs(prompts, cond, cond_cat([other, cond]), x, torch.cat([x, x]), t, torch.cat([t, t]))


# ----------------------------------------------------------------------------------------------------------------
# Algorithm set-up (as benchmarks/run.py wires it)
# ----------------------------------------------------------------------------------------------------------------
def make_ctx(world, policy, reference_kind: str, batch_size: int, reward: str = "proxy"):
    from benchmarks.wiring import build_context
    from rlkit_diffusion.reference import Reference

    return build_context(
        world, policy, Reference(policy, reference_kind), reward=reward, batch_size=batch_size, seed=0
    )


def lora_policy(world):
    """A copy of the world's policy with LoRA adapters (`add_lora`'s rank 8 on the run's default target modules)."""
    from benchmarks.wiring import DEFAULT_LORA_TARGETS
    from rlkit_diffusion.reference import add_lora

    policy = copy.deepcopy(world.policy)
    add_lora(policy.eps_model, rank=8, target_modules=DEFAULT_LORA_TARGETS[world.name])
    return policy


def train_step(algo, ctx, batch) -> Callable[[], None]:
    """One optimisation step's UNet work through the algorithm: loss, backward (no optimizer update)."""
    from rlkit_diffusion.algorithm import sum_losses

    def step() -> None:
        ctx.policy.eps_model.zero_grad(set_to_none=True)
        sum_losses(algo.loss(batch)).backward()

    return step


def setup_algo(name: str, ctx, **config: Any):
    from algos import algo_config_class, build_algo

    algo = build_algo(name, algo_config_class(name)(**config))
    algo.setup(ctx)
    return algo


# ----------------------------------------------------------------------------------------------------------------
# The benchmark items
# ----------------------------------------------------------------------------------------------------------------
def dpo_items(world, policies: dict[str, Any], b: int, repeats: int) -> tuple[dict, dict]:
    """DPO family × (LoRA reference, frozen reference): timings, and the step closures for the memory probes."""
    timing, steps = {}, {}
    for kind, policy in policies.items():
        ctx = make_ctx(world, policy, kind, b)
        unet = unet_of(policy.eps_model)
        for name in DPO_FAMILY:
            algo = setup_algo(name, ctx)
            batch = algo.collect()
            inp = make_inputs(world, batch[0], guided=False)
            step = train_step(algo, ctx, batch)
            if name == "sft":
                bound = lambda u=unet, i=inp: bare_train(u, i.x, i.t, i.cond)  # noqa: E731
            else:
                ref = algo.reference if name == "rethink_dpo" else ctx.base
                ref_unet = unet if ref.kind == "lora" else unet_of(ref.network)
                layers = lora_layers(unet) if ref.kind == "lora" else []

                def bound(u=unet, r=ref_unet, lay=layers, i=inp):
                    bare_train(u, i.x2, i.t2, i.cond2)  # policy: winners and losers in one batch
                    bare_reference_forward(r, lay, i.x2, i.t2, i.cond2)

            timing[f"{name}_{kind}"] = interleaved(step, bound, repeats, world.device)
            if name == "dpo":
                steps[kind] = (step, bound, ctx)
    return timing, steps


def ddpo_items(world, policy, b: int, repeats: int) -> dict:
    ctx = make_ctx(world, policy, "none", b)
    algo = setup_algo("ddpo", ctx)
    unet = unet_of(policy.eps_model)
    n = len(ctx.env.schedule)
    prompts = ctx.env.sample_prompts(b, torch.Generator().manual_seed(1))
    inp = make_inputs(world, prompts, guided=True)

    @torch.no_grad()
    def sample() -> None:  # exactly DDPO.collect's rollout
        ctx.env.rollout(ctx.policy, prompts, generator=ctx.generator, return_trajectory=True, with_reward=False)

    def sample_bound() -> None:
        with torch.inference_mode():
            for _ in range(n):
                bare(unet, inp.x2, inp.t2, inp.cond2)

    out = {"ddpo_sample": interleaved(sample, sample_bound, repeats, world.device)}
    batch = algo.collect()
    mb = next(iter(algo.minibatches(batch)))  # num_minibatches = 1: every stochastic transition, one forward
    m = len(mb.sample)
    g = torch.Generator().manual_seed(2)
    x_m = torch.randn((2 * m, *world.sample_shape), generator=g).to(world.device)  # (2M, C, H, W): CFG batch
    t_m = inp.t2[torch.arange(2 * m) % (2 * b)]  # (2M,)
    rows = torch.arange(m) % b
    cond_m = take(inp.cond2, torch.cat([rows, b + rows]).to(world.device))  # (uncond, cond) rows of each transition
    out["ddpo_train"] = interleaved(
        train_step(algo, ctx, mb), lambda: bare_train(unet, x_m, t_m, cond_m), repeats, world.device
    )
    out["ddpo_train"]["transitions"] = m
    return out


def take(cond: Any, idx: Tensor) -> Any:
    """Rows ``idx`` of a conditioning structure."""
    from rlkit_diffusion.policy import cond_map

    return cond_map(lambda v: v[idx], cond)


def draft_bound(world, ctx, inp: Inputs, k: int, checkpoint: bool) -> Callable[[], None]:
    """(T − K) bare forwards, K bare forward+backwards chained through x, and the reward's forward+backward."""
    unet = unet_of(ctx.policy.eps_model)
    n, w = len(ctx.env.schedule), world.guidance_scale
    reward = ctx.env.reward_model

    def guided(x: Tensor) -> Tensor:
        eps = bare(unet, torch.cat([x, x]), inp.t2, inp.cond2)
        eps_u, eps_c = eps.chunk(2)
        return x - 0.1 * (eps_u + w * (eps_c - eps_u))  # a stand-in for the (elementwise) step maths

    def bound() -> None:
        unet.zero_grad(set_to_none=True)
        x = inp.x
        with torch.inference_mode():
            for _ in range(n - k):
                bare(unet, inp.x2, inp.t2, inp.cond2)
        for _ in range(k):
            x = torch_checkpoint(guided, x, use_reentrant=False) if checkpoint else guided(x)
        (-reward(world.decode(x), inp.prompts).mean()).backward()

    return bound


def draft_items(world, policy, b: int, repeats: int) -> dict:
    ctx = make_ctx(world, policy, "none", b)
    n = len(ctx.env.schedule)
    out = {}
    for item, name, k, ckpt in (
        ("draft_k1", "draft", 1, False),
        ("draft_kT", "draft", n, False),
        ("alignprop_kT", "alignprop", n, True),
    ):
        extra = {"truncation": "fixed"} if name == "alignprop" else {}
        # K = 1 is an identity step on shapes (no gradient): its cost is still what is measured here.
        algo = setup_algo(name, ctx, k=k, checkpoint=ckpt, allow_gradient_free=True, **extra)
        prompts = algo.collect()
        inp = make_inputs(world, prompts, guided=True)
        out[item] = interleaved(
            train_step(algo, ctx, prompts), draft_bound(world, ctx, inp, k, ckpt), repeats, world.device
        )
        out[item]["k"] = k
    return out


def eval_items(world, policy, reference, b: int, repeats: int) -> dict:
    from rlkit_diffusion.evaluate import EvalConfig, sample_split

    unet, ref_unet = unet_of(policy.eps_model), unet_of(reference.network)
    n = len(policy.schedule())
    prompts = world.train_prompts[:b]
    inp = make_inputs(world, prompts, guided=True)
    cfg = EvalConfig(batch_size=b)
    # The evaluation's progress bar (a per-step forward hook, where present) is display, not sampling: off.
    quiet = {"progress": False} if "progress" in inspect.signature(sample_split).parameters else {}

    def bound(networks: tuple[nn.Module, ...]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for _ in range(n):
                    for net in networks:
                        bare(net, inp.x2, inp.t2, inp.cond2)

        return run

    plain = lambda: sample_split(world, policy, prompts, cfg, **quiet)  # noqa: E731
    with_kl = lambda: sample_split(world, policy, prompts, cfg, ref_policy=reference.policy, **quiet)  # noqa: E731
    return {
        "eval_sample": interleaved(plain, bound((unet,)), repeats, world.device),
        "eval_sample_kl": interleaved(with_kl, bound((unet, ref_unet)), repeats, world.device),
    }


def memory_items(world, dpo_steps: dict, policies: dict[str, Any], b: int, ks: list[int]) -> dict:
    """Peak memory of DPO (LoRA / frozen reference) vs one UNet's training state; DRaFT's as K grows, for full
    fine-tuning (the run's default) without and with checkpointing, for LoRA with checkpointing, and the bare
    checkpointed chain (the floor) at the smallest and largest K."""
    dev = world.device
    out: dict[str, Any] = {"method": "cuda.max_memory_allocated" if dev.type == "cuda" else "torch.profiler"}
    for kind in ("lora", "frozen"):
        step, _, ctx = dpo_steps[kind]
        unet = unet_of(ctx.policy.eps_model)
        inp = make_inputs(world, ctx.env.sample_prompts(b, torch.Generator().manual_seed(3)), guided=False)
        state = peak_mb(lambda u=unet, i=inp: bare_train(u, i.x2, i.t2, i.cond2), dev, unet)
        networks = (unet,) if kind == "lora" else (unet, ctx.base.network)
        name = "lora" if kind == "lora" else "full"
        out[f"unet_train_{name}_mb"] = state
        out[f"dpo_{kind}_mb"] = peak_mb(step, dev, *networks)
        out[f"dpo_{kind}_ratio"] = out[f"dpo_{kind}_mb"] / state
        unet.zero_grad(set_to_none=True)
    out["draft_k"] = ks
    for key, kind, ckpt in (
        ("draft", "frozen", False),
        ("draft_ckpt", "frozen", True),
        ("draft_lora_ckpt", "lora", True),
    ):
        ctx = make_ctx(world, policies[kind], "none", b)
        unet = unet_of(ctx.policy.eps_model)
        out[f"{key}_mb"] = []
        for k in ks:
            algo = setup_algo("draft", ctx, k=k, checkpoint=ckpt, allow_gradient_free=True)
            out[f"{key}_mb"].append(peak_mb(train_step(algo, ctx, algo.collect()), dev, unet))
        out[f"{key}_growth"] = out[f"{key}_mb"][-1] / out[f"{key}_mb"][0]
        if key == "draft_ckpt":  # the floor: the bare checkpointed chain at the smallest and the largest K
            inp = make_inputs(world, algo.collect(), guided=True)
            ends = [peak_mb(draft_bound(world, ctx, inp, k, True), dev, unet) for k in (ks[0], ks[-1])]
            out["draft_ckpt_bound_mb"] = ends
            out["draft_ckpt_bound_growth"] = ends[1] / ends[0]
        unet.zero_grad(set_to_none=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf", description=__doc__.split("\n")[0])
    p.add_argument("--world", choices=("shapes", "sd_tiny"), default="shapes")
    p.add_argument("--batch-size", type=int, default=4, help="B: prompts (pairs, trajectories) per step")
    p.add_argument("--steps", type=int, default=20, help="T: sampling steps of DDPO, DRaFT and the evaluation")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each step and bound (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--memory-ks", default="all", help="DRaFT K values of the memory sweep: 'all' (1..T) or '1,5,T'")
    p.add_argument("--json", action="store_true", help="print one JSON object with every field instead of a table")
    p.add_argument(
        "--run",
        nargs="*",
        metavar="OVERRIDE",
        help="time one complete benchmarks.run (its Hydra overrides follow) against its bare UNet work "
        "(benchmarks/perf_run.py)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="with --run: the run's out_dir (default: a temporary one). Its evaluation cache is kept, so the same "
        "command run twice times the cold and then the warm run",
    )
    p.add_argument(
        "--precision-check",
        action="store_true",
        help="on-policy importance ratio and log-prob batch invariance in fp32/bf16/fp16 (benchmarks/perf_run.py)",
    )
    p.add_argument(
        "--flops",
        action="store_true",
        help="FLOPs, achieved FLOP/s and peak memory vs batch and resolution, and the cost model (perf_run.py)",
    )
    return p.parse_args(argv)


def memory_ks(spec: str, n: int) -> list[int]:
    if spec == "all":
        return list(range(1, n + 1))
    ks = sorted({n if s.strip() == "T" else int(s) for s in spec.split(",")})
    if ks[0] < 1 or ks[-1] > n:
        raise SystemExit(f"--memory-ks must be within 1..{n}, got {spec!r}")
    return ks


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    world = build(args.world, device, args.steps)
    b = args.batch_size
    policies = {"lora": lora_policy(world), "frozen": world.policy}
    timing, dpo_steps = dpo_items(world, policies, b, args.repeats)
    timing.update(ddpo_items(world, world.policy, b, args.repeats))
    timing.update(draft_items(world, world.policy, b, args.repeats))
    timing.update(eval_items(world, world.policy, dpo_steps["frozen"][2].base, b, args.repeats))
    memory = memory_items(world, dpo_steps, policies, b, memory_ks(args.memory_ks, args.steps))
    return {
        "world": args.world,
        "device": str(device),
        "batch_size": b,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "unet_params": sum(p.numel() for p in world.policy.eps_model.parameters()),
        "timing": {k: timing[k] for k in TIMING_ITEMS},
        "memory": memory,
        "targets": {"ratio": RATIO_TARGET, "dpo_memory": DPO_MEMORY_TARGET, "draft_ckpt_growth": DRAFT_GROWTH_TARGET},
        "wall_s": time.perf_counter() - t0,
    }


def timing_header(tool: str, r: dict[str, Any], legend: str, columns: str) -> list[str]:
    """The first lines of a timing printout (`format_table` here and in `benchmarks.peers`): the setting measured,
    the legend of the ratio, a blank line and the column titles."""
    return [
        f"{tool}: world={r['world']} device={r['device']} B={r['batch_size']} T={r['steps']} "
        f"threads={r['threads']} repeats={r['repeats']} (medians; {legend})",
        "",
        columns,
    ]


def format_table(r: dict[str, Any]) -> str:
    def flag(ok: bool) -> str:
        return "" if ok else "  above target"

    def row(values: list, fmt: str = ".1f") -> str:
        return " ".join(f"{v:>6{fmt}}" for v in values)

    columns = f"{'item':<20}{'step ms':>10}{'bound ms':>10}{'ratio':>8}"
    lines = timing_header("benchmarks.perf", r, "ratio = step / bare-UNet bound", columns)
    for name, t in r["timing"].items():
        ok = t["ratio"] <= RATIO_TARGET
        lines.append(f"{name:<20}{t['step_ms']:>10.1f}{t['bound_ms']:>10.1f}{t['ratio']:>8.3f}{flag(ok)}")
    m = r["memory"]
    lines += [
        "",
        f"memory ({m['method']}), MiB",
        f"  one UNet's training state: LoRA {m['unet_train_lora_mb']:.1f}, full {m['unet_train_full_mb']:.1f}",
        f"  dpo, LoRA reference:   {m['dpo_lora_mb']:.1f}  = {m['dpo_lora_ratio']:.3f}x"
        + flag(m["dpo_lora_ratio"] <= DPO_MEMORY_TARGET),
        f"  dpo, frozen reference: {m['dpo_frozen_mb']:.1f}  = {m['dpo_frozen_ratio']:.3f}x",
        f"  draft K:                 {row(m['draft_k'], 'd')}",
        f"  full, no checkpointing:  {row(m['draft_mb'])}  K=T / K=1: {m['draft_growth']:.2f}",
        f"  full, checkpointing:     {row(m['draft_ckpt_mb'])}  K=T / K=1: {m['draft_ckpt_growth']:.2f}"
        + flag(m["draft_ckpt_growth"] <= DRAFT_GROWTH_TARGET),
        f"  LoRA, checkpointing:     {row(m['draft_lora_ckpt_mb'])}  K=T / K=1: {m['draft_lora_ckpt_growth']:.2f}"
        + flag(m["draft_lora_ckpt_growth"] <= DRAFT_GROWTH_TARGET),
        f"  bare checkpointed chain (full), K={m['draft_k'][0]} and K={m['draft_k'][-1]}: "
        f"{row(m['draft_ckpt_bound_mb'])}  K=T / K=1: {m['draft_ckpt_bound_growth']:.2f}",
        f"wall {r['wall_s']:.0f}s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.run is not None or args.precision_check or args.flops:
        from benchmarks import perf_run

        if args.run is not None:  # a whole run keeps the run's own thread count
            return emit(perf_run.whole_run(args.run, args.out_dir), args.json, perf_run.format_run)
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        if args.flops:
            return emit(perf_run.flops_report(build, peak_mb, args.repeats), args.json, perf_run.format_flops)
        world = build(args.world, torch.device(args.device), args.steps)
        return emit(perf_run.precision_check(world, args.batch_size), args.json, perf_run.format_precision)
    return emit(run(args), args.json, format_table)


def emit(result: dict[str, Any], as_json: bool, format_text: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """Print a benchmark's result as JSON or as its text table (the benchmarks' ``--json`` flag); return it."""
    print(json.dumps(result, indent=2) if as_json else format_text(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
