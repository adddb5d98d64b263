"""``python -m benchmarks.peers`` — the project's DDPO and Diffusion-DPO steps against the peers', side by side.

On the same tiny random SD1.5 pipeline (``benchmarks.perf --world sd_tiny``: ``rlkit_diffusion/tiny.py``'s
components saved to a directory and loaded with ``from_pretrained``), the same settings, machine and run:

========  ========================================================  ==============================================
item      project step (real code path)                             peer step
========  ========================================================  ==============================================
``dpo``   ``DPO.loss`` + backward + clip + AdamW, through the       the diffusers Diffusion-DPO example's loop body
          training loop's step (``train._Loop.optimizer_step``)     (`example_dpo_step`, re-created, lines cited)
``ddpo``  one DDPO iteration: ``DDPO.collect`` (B trajectories of    TRL 0.23.1 ``DDPOTrainer.step`` (sampling,
          T steps, reward, advantages) + its optimizer steps        reward, ``_train_batched_samples``)
========  ========================================================  ==============================================

The DPO peer runs in this process: the example (``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
of huggingface/diffusers) is a script, not part of the diffusers wheel, so its per-step computation is re-created
here line by line (`example_dpo_loss`, `example_dpo_step`, with the lines cited). TRL runs in a separate virtual
environment that this script creates once (`ensure_peer_venv`, default ``~/.cache/rlkit_diffusion/peers-venv``):
``pip install --no-deps trl==0.23.1`` into a venv whose ``.pth`` file adds this interpreter's site-packages (torch,
diffusers, transformers, accelerate, peft, datasets: every dependency of TRL's DDPO, none downloaded). Nothing of
the peers becomes a dependency of the project. The TRL worker (``--worker``, the same file run by the venv's
python) loads the same saved pipeline, times each ``step`` by its own clock and reports it over a pipe.

Matched settings (both sides): LoRA rank 4, α 4, Gaussian init, on ``to_q, to_k, to_v, to_out.0`` (the peers'
LoRA); reference = the same network with its adapters off (DPO); fp32; AdamW (β 0.9/0.999, ε 1e-8) with the peer's
learning rate and weight decay; gradient clipping at 1.0. DPO: B pairs, β = 2500 in the diffusers convention
(``beta_convention=diffusers``: the example's ``-logsigmoid(beta_dpo * (ref_diff - model_diff))``, per-pixel mean
errors), t ~ U{0, …, 999}, latents given (the example's VAE encode of the pixels is outside both steps: the project
encodes pairs when it collects them). DDPO: B prompts, T DDIM steps with η = 1, guidance 7.5, per-prompt advantage
normalisation (buffer 32, min count 16), clip range 1e-4, advantages clipped at 5, one inner epoch, every timestep
trained, one optimizer step per iteration (project: ``num_minibatches=1``, all transitions in one batched forward;
TRL: gradients accumulated over its T per-timestep forwards of train_batch_size = B), the tiny PickScore reward.
Both train every stochastic transition, B·T here (the tiny scheduler's last DDIM step, to ᾱ_0 of the first training
timestep, keeps σ > 0); the table prints the counts.

Timing: as ``benchmarks.perf``: one warm-up call of each, then project and peer alternate ``--repeats`` times; on CPU
each process's own CPU time (``time.process_time``; one thread each), on accelerators the wall clock between
synchronisations. Reported: medians and ``ratio`` = the median over pairs of project / peer (< 1: the project is
faster). docs/perf.md, "The peers side by side", has the table measured on the development machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import site
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
TRL_VERSION = "0.23.1"
DEFAULT_VENV = Path.home() / ".cache" / "rlkit_diffusion" / "peers-venv"
DIFFUSERS_EXAMPLE = "huggingface/diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py"
DIFFUSERS_EXAMPLE_SHORT = "diffusers train_diffusion_dpo.py"
DIFFUSERS_EXAMPLE_COMMIT = "c9c82173068d628b0569ccb6d656adfa37a389e8"  # last commit touching the file, 2025-08-11
LORA = {
    "r": 4,
    "lora_alpha": 4,
    "init_lora_weights": "gaussian",
    "target_modules": ["to_k", "to_q", "to_v", "to_out.0"],
}
ITEMS = ("dpo", "ddpo")
FIELDS = ("project_ms", "peer_ms", "ratio")
PEER_TAG = "PEER "  # the worker's protocol lines on stdout start with this (anything else a library prints is ignored)


# ----------------------------------------------------------------------------------------------------------------
# The diffusers Diffusion-DPO example, re-created (train_diffusion_dpo.py at DIFFUSERS_EXAMPLE_COMMIT)
# ----------------------------------------------------------------------------------------------------------------
def example_encode_prompt(text_encoder: nn.Module, input_ids: Tensor) -> Tensor:
    """The example's ``encode_prompt`` (lines 460-467): the text encoder's last hidden states. (B, L, D)"""
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=None)[0]


def example_dpo_loss(
    unet: nn.Module,
    noise_scheduler: Any,
    latents: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    encoder_hidden_states: Tensor,
    beta_dpo: float,
) -> dict[str, Tensor]:
    """The example's loss, lines 828-890 (``loss_type="sigmoid"``), statement for statement.

    Args:
        unet: a diffusers UNet with a peft adapter added by ``unet.add_adapter`` (the reference = adapters off).
        latents: (2B, C, h, w), winners then losers (lines 809-817). noise: (2B, C, h, w), the same ε for a winner
            and its loser (line 820). timesteps: (2B,), the same t twice (lines 824-826).
        encoder_hidden_states: (2B, L, D) (line 833). beta_dpo: the example's ``--beta_dpo``.

    Returns ``loss`` and the logged ``implicit_acc``, ``raw_model_loss``, ``ref_loss``.
    """
    noisy_model_input = noise_scheduler.add_noise(latents, noise, timesteps)  # line 830
    model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample  # lines 836-840
    if noise_scheduler.config.prediction_type == "epsilon":  # lines 843-848
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")  # lines 851-853
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())  # line 856
    model_diff = model_losses_w - model_losses_l  # line 857
    unet.disable_adapters()  # lines 860-875: the reference is the base network
    with torch.no_grad():
        ref_preds = unet(noisy_model_input, timesteps, encoder_hidden_states).sample.detach()
        ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_loss.mean()
    unet.enable_adapters()
    logits = ref_diff - model_diff  # line 878
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()  # line 880
    implicit_acc = (logits > 0).sum().float() / logits.size(0)  # lines 889-890
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return {"loss": loss, "implicit_acc": implicit_acc, "raw_model_loss": raw_model_loss, "ref_loss": raw_ref_loss}


def example_dpo_step(
    unet: nn.Module,
    text_encoder: nn.Module,
    noise_scheduler: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    params: list[Tensor],
    latents: Tensor,
    input_ids: Tensor,
    *,
    beta_dpo: float,
    max_grad_norm: float,
) -> Tensor:
    """One iteration of the example's training loop from the latents on (lines 819-897), single process.

    The (ε, t) draws of lines 820 and 824-826, the prompt encoding of line 833, `example_dpo_loss`, then lines
    892-897: backward, gradient clipping, optimizer and lr-scheduler steps, ``zero_grad``. On one process without
    mixed precision ``accelerator.backward`` is ``loss.backward()`` and ``accelerator.clip_grad_norm_`` is
    ``torch.nn.utils.clip_grad_norm_`` (every step syncs: gradient accumulation 1, the example's default).

    Args:
        latents: (2B, C, h, w) winners then losers. input_ids: (B, L) the tokenized captions.
    """
    noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)  # line 820
    bsz = latents.shape[0] // 2  # lines 823-826
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device, dtype=torch.long
    ).repeat(2)
    encoder_hidden_states = example_encode_prompt(text_encoder, input_ids).repeat(2, 1, 1)  # line 833
    loss = example_dpo_loss(unet, noise_scheduler, latents, noise, timesteps, encoder_hidden_states, beta_dpo)["loss"]
    loss.backward()  # line 892
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # lines 893-894
    optimizer.step()  # lines 895-897
    lr_scheduler.step()
    optimizer.zero_grad()
    return loss.detach()


class ExampleDPO:
    """The example's set-up (lines 520-569, 650-665, 725-735) on a pipeline directory: its own UNet with the example's
    LoRA (``unet.add_adapter``), the frozen text encoder and tokenizer, ``DDPMScheduler``, AdamW and the constant lr
    schedule. ``step(latents, input_ids)`` is `example_dpo_step`."""

    def __init__(self, pipeline_dir: str, device: torch.device, *, beta_dpo: float, lr: float, weight_decay: float):
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import AutoTokenizer, CLIPTextModel

        self.tokenizer = AutoTokenizer.from_pretrained(pipeline_dir, subfolder="tokenizer", use_fast=False)
        self.noise_scheduler = DDPMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
        self.text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder").to(device)
        self.unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").to(device)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(**LORA))
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.unet.train()
        self.beta_dpo = beta_dpo

    def input_ids(self, prompts: list[str]) -> Tensor:
        """The example's caption tokenization (``tokenize_captions``: max length, padding, truncation). (B, L)"""
        return self.tokenizer(
            prompts,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def step(self, latents: Tensor, input_ids: Tensor) -> Tensor:
        return example_dpo_step(
            self.unet, self.text_encoder, self.noise_scheduler, self.optimizer, self.lr_scheduler, self.params,
            latents, input_ids, beta_dpo=self.beta_dpo, max_grad_norm=1.0,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# TRL in its own virtual environment
# ----------------------------------------------------------------------------------------------------------------
def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_peer_venv(venv: Path, log: Callable[[str], None] = print) -> Path:
    """The peers' virtual environment, created once: ``python -m venv``, a ``.pth`` file adding this interpreter's
    site-packages after the venv's own (so torch, diffusers, transformers, accelerate, peft and datasets are the
    project's, nothing is downloaded but TRL's own wheel), then ``pip install --no-deps trl==TRL_VERSION``.
    Returns the venv's python."""
    python = venv_python(venv)
    marker = venv / f"trl-{TRL_VERSION}.ok"
    if marker.exists() and python.exists():
        return python
    log(f"creating the peers' venv at {venv} (trl=={TRL_VERSION}, --no-deps; torch etc. from {sys.prefix})")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib) / "_rlkit_project_site.pth").write_text("".join(f"{p}\n" for p in ours))
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         f"trl=={TRL_VERSION}"],
        check=True,
    )  # fmt: skip
    subprocess.run(
        [str(python), "-c", f"import trl; assert trl.__version__ == {TRL_VERSION!r}, trl.__version__; "
         "from trl import DDPOTrainer, DefaultDDPOStableDiffusionPipeline"],
        check=True,
    )  # fmt: skip
    marker.write_text(f"trl=={TRL_VERSION}\n")
    return python


class TRLWorker:
    """A ``benchmarks.peers --worker`` process in the peers' venv: builds TRL's DDPOTrainer once, then runs one
    ``DDPOTrainer.step`` per request and answers with the CPU (or wall) seconds it measured itself."""

    def __init__(self, python: Path, spec: dict[str, Any], workdir: Path):
        spec_file = workdir / "trl_spec.json"
        spec_file.write_text(json.dumps(spec))
        self.stderr = (workdir / "trl_worker.log").open("w")
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(spec["threads"]), "TQDM_DISABLE": "1"}
        self.proc = subprocess.Popen(
            [str(python), "-m", "benchmarks.peers", "--worker", str(spec_file)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        )  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(PEER_TAG):
                return json.loads(line[len(PEER_TAG) :])
        self.stderr.flush()
        tail = Path(self.stderr.name).read_text()[-3000:]
        raise RuntimeError(f"the TRL worker exited (code {self.proc.wait()}); its log ends with:\n{tail}")

    def step(self) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.stderr.close()


def trl_worker(spec_file: str) -> None:
    """The worker's side (runs in the peers' venv): TRL's ``DefaultDDPOStableDiffusionPipeline`` on the saved tiny
    pipeline, its ``DDPOTrainer`` with the matched settings, the same tiny PickScore as reward, the world's prompts."""
    import warnings

    import trl
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from benchmarks.perf import clock, sync
    from rlkit_diffusion.rewards.pickscore import PickScoreReward

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    reward = PickScoreReward(spec["clip"], spec["clip"], device=device)
    prompts, rng = spec["prompts"], random.Random(0)

    def reward_fn(images: Tensor, batch_prompts: tuple[str, ...], metadata: Any) -> tuple[Tensor, dict]:
        with torch.no_grad():
            return reward(images.float(), list(batch_prompts)), {}

    b, t = spec["batch_size"], spec["steps"]
    config = DDPOConfig(
        num_epochs=1, save_freq=10**9, mixed_precision="no", log_with=None, seed=0,
        sample_num_steps=t, sample_eta=spec["eta"], sample_guidance_scale=spec["guidance_scale"],
        sample_batch_size=b, sample_num_batches_per_epoch=1,
        train_batch_size=b, train_use_8bit_adam=False, train_learning_rate=spec["lr"],
        train_adam_beta1=0.9, train_adam_beta2=0.999, train_adam_weight_decay=spec["weight_decay"],
        train_adam_epsilon=1e-8, train_gradient_accumulation_steps=1, train_max_grad_norm=1.0,
        train_num_inner_epochs=1, train_cfg=True, train_adv_clip_max=spec["adv_clip_max"],
        train_clip_range=spec["clip_range"], train_timestep_fraction=1.0,
        per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=spec["buffer_size"],
        per_prompt_stat_tracking_min_count=spec["min_count"], async_reward_computation=False,
        accelerator_kwargs={"cpu": device.type == "cpu"},
    )  # fmt: skip
    # TRL 0.23.1's pipeline warns through accelerate's logger, which (accelerate >= 1.x) refuses to log before an
    # accelerate state exists: the DDPOTrainer's own Accelerator is created only later, so create the state first.
    PartialState(cpu=device.type == "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pipeline = DefaultDDPOStableDiffusionPipeline(spec["pipeline"], use_lora=True)
        trainer = DDPOTrainer(config, reward_fn, lambda: (rng.choice(prompts), {}), pipeline)
    pipeline.set_progress_bar_config(disable=True)  # display, not sampling (the project's rollout has no bar)
    now = clock(device)
    print(PEER_TAG + json.dumps({"trl": trl.__version__, "threads": torch.get_num_threads()}), flush=True)
    global_step = 0
    for epoch, line in enumerate(sys.stdin):
        if line.strip() != "step":
            break
        sync(device)
        t0 = now()
        global_step = trainer.step(epoch, global_step)
        sync(device)
        print(PEER_TAG + json.dumps({"seconds": now() - t0, "global_step": global_step}), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The project's steps
# ----------------------------------------------------------------------------------------------------------------
def project_lora_policy(world):
    """A copy of the world's policy with the peers' LoRA (rank 4, α 4, Gaussian init, the same target modules)."""
    import copy

    from rlkit_diffusion.reference import add_lora

    policy = copy.deepcopy(world.policy)
    add_lora(policy.eps_model, rank=LORA["r"], alpha=LORA["lora_alpha"], target_modules=LORA["target_modules"])
    return policy


def project_loop(world, algo_name: str, reference: str, batch_size: int, algo_config: dict, train_config: dict):
    """The algorithm set up as ``benchmarks.run`` wires it and the training loop's optimiser step on it: returns
    ``(algo, loop)``; ``loop.optimizer_step(minibatch)`` is THE step of `rlkit_diffusion.train.train` (loss,
    backward, finite checks, clipping, AdamW, lr schedule, zero_grad)."""
    from benchmarks.perf import make_ctx, setup_algo
    from rlkit_diffusion.logging import MetricLogger
    from rlkit_diffusion.train import BudgetConfig, TrainConfig, _Loop

    ctx = make_ctx(world, project_lora_policy(world), reference, batch_size)
    algo = setup_algo(algo_name, ctx, **algo_config)
    cfg = TrainConfig(batch_size=batch_size, **train_config)
    loop = _Loop(algo, ctx, cfg, BudgetConfig(), None, MetricLogger(None), None)
    loop.model.train()
    return algo, loop


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    """``fn`` as a callable returning the seconds it took by `benchmarks.perf.clock` (this process's CPU time on
    CPU)."""
    from benchmarks.perf import clock, sync

    now = clock(device)

    def run() -> float:
        sync(device)
        t0 = now()
        fn()
        sync(device)
        return now() - t0

    return run


def alternate(project: Callable[[], float], peer: Callable[[], float], repeats: int) -> dict[str, float]:
    """Project and peer alternately after one warm-up call of each; each callable returns its own seconds. Medians
    in ms and ``ratio`` = the median over pairs of project / the peer measured right after it."""
    times: dict[str, list[float]] = {"project": [], "peer": []}
    for r in range(repeats + 1):
        for key, fn in (("project", project), ("peer", peer)):
            seconds = fn()
            if r > 0:  # r = 0 is the warm-up
                times[key].append(seconds)
    ratios = [a / b for a, b in zip(times["project"], times["peer"])]
    return {
        "project_ms": 1e3 * statistics.median(times["project"]),
        "peer_ms": 1e3 * statistics.median(times["peer"]),
        "ratio": statistics.median(ratios),
    }


DPO_SETTINGS = {"beta": 2500.0, "lr": 5e-4, "weight_decay": 1e-2}  # the example's --beta_dpo, learning rate, decay
DDPO_SETTINGS = {"lr": 3e-4, "weight_decay": 1e-4, "clip_range": 1e-4, "adv_clip_max": 5.0, "buffer_size": 32,
                 "min_count": 16}  # fmt: skip  # TRL's DDPOConfig defaults (= ddpo-pytorch's)


def dpo_item(world, pipeline_dir: Path, b: int, repeats: int) -> dict[str, Any]:
    """The project's DPO step and the diffusers example's on the same batch of B pairs (LoRA, adapters-off
    reference)."""
    s = DPO_SETTINGS
    algo, loop = project_loop(
        world, "dpo", "lora", b, {"beta": s["beta"], "beta_convention": "diffusers"},
        {"lr": s["lr"], "weight_decay": s["weight_decay"], "max_grad_norm": 1.0},
    )  # fmt: skip
    batch = algo.collect()
    prompts, x_w, x_l = batch
    peer = ExampleDPO(str(pipeline_dir), world.device, beta_dpo=s["beta"], lr=s["lr"], weight_decay=s["weight_decay"])
    latents = torch.cat([x_w, x_l])  # (2B, C, h, w): the example's feed order, winners then losers
    input_ids = peer.input_ids(prompts)
    out = alternate(
        timed(lambda: loop.optimizer_step(batch), world.device),
        timed(lambda: peer.step(latents, input_ids), world.device),
        repeats,
    )
    return {**out, "pairs": b, "peer": f"{DIFFUSERS_EXAMPLE_SHORT}@{DIFFUSERS_EXAMPLE_COMMIT[:7]}"}


def ddpo_item(world, pipeline_dir: Path, clip_dir: Path, b: int, t: int, repeats: int, args) -> dict[str, Any]:
    """One project DDPO iteration and one TRL ``DDPOTrainer.step`` (in the peers' venv) with matched settings."""
    s = DDPO_SETTINGS
    algo_config = {
        "clip_range": s["clip_range"], "adv_clip_max": s["adv_clip_max"], "advantage_norm": "per_prompt",
        "buffer_size": s["buffer_size"], "min_count": s["min_count"], "num_inner_epochs": 1, "num_minibatches": 1,
        "timestep_fraction": 1.0,
    }  # fmt: skip
    algo, loop = project_loop(
        world, "ddpo", "none", b, algo_config, {"lr": s["lr"], "weight_decay": s["weight_decay"], "max_grad_norm": 1.0}
    )
    transitions = []

    def project_step() -> None:
        batch = algo.collect()
        for mb in algo.minibatches(batch):
            transitions.append(len(mb.sample))
            loop.optimizer_step(mb)

    spec = {
        "pipeline": str(pipeline_dir), "clip": str(clip_dir), "prompts": list(world.train_prompts),
        "batch_size": b, "steps": t, "eta": world.policy.eta, "guidance_scale": world.guidance_scale,
        "device": str(world.device), "threads": torch.get_num_threads(), **s,
    }  # fmt: skip
    python = ensure_peer_venv(Path(args.venv))
    worker = TRLWorker(python, spec, Path(args.workdir))
    try:
        out = alternate(timed(project_step, world.device), worker.step, repeats)
    finally:
        worker.close()
    return {
        **out,
        "project_transitions": transitions[-1],
        "peer_transitions": b * t,  # TRL: every timestep of every trajectory (train_timestep_fraction = 1)
        "peer": f"trl=={worker.info['trl']}",
        "peer_threads": worker.info["threads"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=4, help="B: pairs (DPO) and prompts/trajectories (DDPO) per step")
    p.add_argument("--steps", type=int, default=20, help="T: DDIM sampling steps of DDPO")
    p.add_argument("--repeats", type=int, default=7, help="timed calls of each step (medians reported)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU), in both processes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--items", default="dpo,ddpo", help="comma-separated subset of: " + ", ".join(ITEMS))
    p.add_argument("--venv", default=str(DEFAULT_VENV), help="the peers' virtual environment (created if missing)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)  # internal: the TRL side, in the peers' venv
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.perf import build_sd_tiny

    items = [i.strip() for i in args.items.split(",") if i.strip()]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise SystemExit(f"--items: unknown {unknown}; choose from {list(ITEMS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        root = Path(tmp)
        args.workdir = tmp
        world = build_sd_tiny(device, args.steps, root=root)
        result: dict[str, Any] = {}
        if "dpo" in items:
            result["dpo"] = dpo_item(world, root / "sd15", args.batch_size, args.repeats)
        if "ddpo" in items:
            result["ddpo"] = ddpo_item(
                world, root / "sd15", root / "clip", args.batch_size, args.steps, args.repeats, args
            )
    return {
        "world": "sd_tiny",
        "device": str(device),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "items": result,
        "wall_s": time.perf_counter() - t0,
    }


def format_table(r: dict[str, Any]) -> str:
    from benchmarks.perf import timing_header

    lines = timing_header(
        "benchmarks.peers",
        r,
        "ratio = project / peer, < 1: project faster",
        f"{'item':<6}{'project ms':>12}{'peer ms':>12}{'ratio':>8}  peer",
    )
    for name, t in r["items"].items():
        lines.append(f"{name:<6}{t['project_ms']:>12.1f}{t['peer_ms']:>12.1f}{t['ratio']:>8.3f}  {t['peer']}")
    if "ddpo" in r["items"]:
        d = r["items"]["ddpo"]
        lines.append(
            f"ddpo transitions trained per step: project {d['project_transitions']} (one batched forward), "
            f"peer {d['peer_transitions']} (one forward per timestep)"
        )
    lines.append(f"wall {r['wall_s']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.worker:
        trl_worker(args.worker)
        return None
    from benchmarks.perf import emit

    return emit(run(args), args.json, format_table)


if __name__ == "__main__":
    main(sys.argv[1:])
