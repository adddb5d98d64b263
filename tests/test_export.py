"""``python -m benchmarks.export``: a tiny-SD LoRA run and a full fine-tune loaded back through diffusers' own loaders
(``load_lora_weights``, ``DiffusionPipeline.from_pretrained``) sample exactly the run's own samples from the same
noise; a toy2d export starts a new run through ``world.weights=DIR``; the model card carries the run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlkit_diffusion.tiny import save_tiny_clip, save_tiny_sd3, save_tiny_sd15, write_pickapic
from tests.helpers import compose_cfg

torch.set_num_threads(1)
RESOLUTION = 32


def tiny_sd_run(world: str, pretrained: Path, clip: Path, pairs: Path, out: Path) -> list[str]:
    """Overrides of a 2-step run on a tiny pipeline of ``world`` (the export tests' runs)."""
    return [
        f"world={world}",
        "device=cpu",
        f"out_dir={out}",
        "report=false",
        "train.steps=2",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.warmup_steps=0",
        "train.checkpoint_every=0",
        "train.lr=1e-2",  # large enough that the exported weights differ visibly from the base
        "eval.samples_per_prompt=1",
        "eval.max_prompts=2",
        "eval.bootstrap=20",
        "eval.heldout=false",
        f"world.pretrained={pretrained}",
        f"world.resolution={RESOLUTION}",
        "world.num_inference_steps=2",
        f"world.pickscore_model={clip}",
        f"world.pickscore_processor={clip}",
        f"world.pairs={pairs}",
    ]


@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory) -> dict[str, Path]:
    """Two 2-step runs on a tiny SD1.5 pipeline: DPO with LoRA adapters and DRaFT fine-tuning the whole UNet."""
    from benchmarks.run import run

    d = tmp_path_factory.mktemp("export")
    pretrained, clip = save_tiny_sd15(d / "sd15"), save_tiny_clip(d / "clip")
    pairs = write_pickapic(d / "pickapic" / "train-00000.parquet", n=12).parent
    common = tiny_sd_run("sd15", pretrained, clip, pairs, d)
    common.append("world.eta=0.0")  # deterministic DDIM: the pipeline reproduces a sample from its initial noise alone
    runs = {"pretrained": pretrained}
    for name, extra in {
        "lora": ["algo=dpo", "reference.lora_rank=4", "reference.lora_alpha=8", "eval.implicit_pairs=0"],
        "full": ["algo=draft", "algo.k=1"],
    }.items():
        run(compose_cfg(common + extra), run_dir=d / name)
        runs[name] = d / name
    return runs


def pipeline_samples(pipe, run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's own grid samples (``samples.safetensors``, decoded images in [0, 1]) and the diffusers pipeline's
    samples of the same prompts from the same initial noises (the evaluation's: ``eval.seed``)."""
    from diffusers import DDIMScheduler
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    prompts = json.loads((run_dir / "samples.json").read_text())["prompts"]
    ours = load_file(str(run_dir / "samples.safetensors"))["trained"]
    side = RESOLUTION // 2
    x_T = torch.randn((len(prompts), 4, side, side), generator=torch.Generator().manual_seed(cfg.eval.seed))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        images = pipe(
            prompts,
            num_inference_steps=cfg.world.num_inference_steps,
            guidance_scale=cfg.world.guidance_scale,
            latents=x_T,
            eta=0.0,
            output_type="pt",
        ).images
    return ours, images


def test_lora_export_loads_with_load_lora_weights_and_samples_the_run(sd_runs, tmp_path):
    from diffusers import DiffusionPipeline

    from benchmarks.export import LORA_WEIGHT_NAME, export

    out = export(sd_runs["lora"], tmp_path / "lora")
    assert (out / LORA_WEIGHT_NAME).is_file() and not (out / "model_index.json").exists()
    keys = list(load_file(str(out / LORA_WEIGHT_NAME)))
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    pipe = DiffusionPipeline.from_pretrained(sd_runs["pretrained"])
    base_ours, base_images = pipeline_samples(pipe, sd_runs["lora"])  # before loading: the base model
    pipe.load_lora_weights(out)
    ours, images = pipeline_samples(pipe, sd_runs["lora"])
    print(f"export round trip: max |diffusers - run| = {(images - ours).abs().max():.3g}")
    assert (images - ours).abs().max() <= 1e-5
    assert (images - base_images).abs().max() > 1e-3  # the adapters matter (α/r = 2 applied, not 1)
    card = (out / "README.md").read_text()
    assert f"base_model: {sd_runs['pretrained']}" in card and "LoRA rank 4, α = 8" in card
    assert "pipe.load_lora_weights" in card
    assert f"python -m benchmarks.run --config-path {sd_runs['lora'].resolve()} --config-name config" in card
    ev = json.loads((sd_runs["lora"] / "eval.json").read_text())
    low, high = ev["win_rate_vs_base_ci_low"], ev["win_rate_vs_base_ci_high"]
    assert f"| {ev['win_rate_vs_base']:.4g} | [{low:.4g}, {high:.4g}] |" in card


def test_full_export_is_a_pipeline_that_samples_the_run(sd_runs, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from benchmarks.export import main

    out = tmp_path / "full"
    main([str(sd_runs["full"]), "--out", str(out)])
    pipe = DiffusionPipeline.from_pretrained(out)
    ours, images = pipeline_samples(pipe, sd_runs["full"])
    print(f"export round trip: max |diffusers - run| = {(images - ours).abs().max():.3g}")
    assert (images - ours).abs().max() <= 1e-5
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(sd_runs["pretrained"], subfolder="unet")
    assert any(not torch.equal(a, b) for a, b in zip(unet.parameters(), base.parameters()))  # trained weights
    info = json.loads((out / "rlkit_export.json").read_text())
    assert info["kind"] == "pipeline" and info["algo"] == "draft" and info["world"] == "sd15"
    with pytest.raises(SystemExit, match="is not empty"):
        main([str(sd_runs["full"]), "--out", str(out)])


def test_sd3_lora_export_loads_into_the_sd3_pipeline_and_samples_the_run(tmp_path):
    """sd3 (ODE sampler, so that the pipeline reproduces a sample from its noise): a 2-step LoRA DPO run's export is
    ``transformer.``-keyed adapters that ``StableDiffusion3Pipeline.load_lora_weights`` loads; the pipeline then
    samples the run's own trained samples."""
    from diffusers import StableDiffusion3Pipeline
    from omegaconf import OmegaConf

    from benchmarks.export import LORA_WEIGHT_NAME, export
    from benchmarks.run import run

    pretrained, clip = save_tiny_sd3(tmp_path / "sd3"), save_tiny_clip(tmp_path / "clip")
    pairs = write_pickapic(tmp_path / "pickapic" / "train-00000.parquet", n=12).parent
    overrides = tiny_sd_run("sd3", pretrained, clip, pairs, tmp_path)
    overrides += ["algo=dpo", "reference.lora_rank=4", "eval.implicit_pairs=0"]
    overrides += ["world.sampler=ode", "world.max_sequence_length=24"]  # ODE: the pipeline's sampler
    run_dir = tmp_path / "run"
    run(compose_cfg(overrides), run_dir=run_dir)
    out = export(run_dir, tmp_path / "export")
    keys = list(load_file(str(out / LORA_WEIGHT_NAME)))
    assert keys and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    prompts = json.loads((run_dir / "samples.json").read_text())["prompts"]
    side = RESOLUTION // 2
    x_T = torch.randn((len(prompts), 16, side, side), generator=torch.Generator().manual_seed(cfg.eval.seed))
    pipe = StableDiffusion3Pipeline.from_pretrained(pretrained)
    pipe.load_lora_weights(out)
    with torch.no_grad():
        images = pipe(
            prompts,
            num_inference_steps=2,
            guidance_scale=cfg.world.guidance_scale,
            latents=x_T,
            height=RESOLUTION,
            width=RESOLUTION,
            max_sequence_length=24,
            output_type="pt",
        ).images
    ours = load_file(str(run_dir / "samples.safetensors"))
    print(f"sd3 export round trip: max |diffusers - run| = {(images - ours['trained']).abs().max():.3g}")
    assert (images - ours["trained"]).abs().max() <= 1e-5
    assert (ours["trained"] - ours["base"]).abs().max() > 1e-4  # the adapters changed the samples


@pytest.mark.parametrize(("world_name", "lora"), [("toy2d", False), ("toy2d", True), ("toy2d_flow", False)])
def test_toy2d_export_starts_a_new_run(tmp_path, world_name, lora):
    """toy2d / toy2d_flow: the exported MLP (LoRA merged) is the trained policy; ``world=<its world>
    world.weights=DIR`` builds a world whose base policy samples exactly what the trained run's policy samples."""
    from benchmarks.export import export
    from rlkit_diffusion.worlds import build_world
    from tests.helpers import run_toy

    extra = ["reference.lora_rank=2"] if lora else []
    _, run_dir = run_toy(
        tmp_path,
        [
            f"world={world_name}",
            "algo=ddpo",
            "train.steps=2",
            "train.batch_size=8",
            "eval.samples_per_prompt=2",
            "report=false",
            *extra,
        ],
    )
    out = export(run_dir, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert (out / "model.safetensors").is_file() and f"world={world_name} world.weights=" in card
    world = build_world(world_name, weights=str(out), optimum_pool=16)
    base = build_world(world_name, optimum_pool=16)
    ours = load_file(str(run_dir / "samples.safetensors"))
    prompts = json.loads((run_dir / "samples.json").read_text())["prompts"]
    from rlkit_diffusion.evaluate import EvalConfig, sample_split

    cfg = EvalConfig(samples_per_prompt=1)
    x0 = sample_split(world, world.policy, prompts, cfg, progress=False)["x0"]
    assert (x0 - ours["trained"]).abs().max() <= 1e-5
    assert (sample_split(base, base.policy, prompts, cfg, progress=False)["x0"] - ours["base"]).abs().max() <= 1e-5
    assert (x0 - ours["base"]).abs().max() > 1e-4  # the export is not the base model
