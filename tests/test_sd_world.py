"""The ``sd15`` / ``sdxl`` / ``sd3`` worlds on tiny random pipelines saved with ``save_pretrained`` and loaded back
through ``world.pretrained=<dir>``: parity with the diffusers pipelines, the Pick-a-Pic stream and latent cache, bad
input, and ``benchmarks.run`` end to end (dpo, ddpo and draft on sd15/sdxl; dpo with LoRA and grpo on sd3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlkit_diffusion.tiny import (
    save_aesthetic_mlp,
    save_tiny_clip,
    save_tiny_open_clip,
    save_tiny_sd3,
    save_tiny_sd15,
    save_tiny_sdxl,
    write_hpsv2,
    write_partiprompts,
    write_pickapic,
)
from tests.helpers import compose_cfg

torch.set_num_threads(1)
RESOLUTION = 32  # tiny VAE: 2× downsampling → 4 × 16 × 16 latents (sd3: 16 × 16 × 16)
T5_LEN = 24  # the tiny sd3's T5 tokens per prompt (world.max_sequence_length)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sd_assets")
    config, weights = save_tiny_open_clip(d / "open_clip")
    return {
        "sd15": save_tiny_sd15(d / "sd15"),
        "sdxl": save_tiny_sdxl(d / "sdxl"),
        "sd3": save_tiny_sd3(d / "sd3"),
        "clip": save_tiny_clip(d / "clip"),
        "open_clip_config": config,
        "open_clip_weights": weights,
        "aesthetic": save_aesthetic_mlp(d / "aesthetic.pth", input_size=16),
        "pairs": write_pickapic(d / "pickapic" / "train-00000.parquet", n=12).parent,
        "val_pairs": write_pickapic(d / "validation.parquet", n=8, seed=1),
        "parti": write_partiprompts(d / "PartiPrompts.tsv"),
        "hpsv2": write_hpsv2(d / "hpsv2"),
        "dir": d,
    }


def world_kwargs(assets: dict[str, Path], name: str, **overrides) -> dict:
    kw = {
        "pretrained": str(assets[name]),
        "resolution": RESOLUTION,
        "num_inference_steps": 3,
        "pickscore_model": str(assets["clip"]),
        "pickscore_processor": str(assets["clip"]),
        **({"max_sequence_length": T5_LEN} if name == "sd3" else {}),
    }
    return {**kw, **overrides}


def build(name: str, **kwargs):
    from rlkit_diffusion.worlds import build_world

    return build_world(name, **kwargs)


def test_world_config_is_the_hydra_schema_and_sdxl_extends_sd15():
    """The YAML keys of world=sd15 / world=sdxl are the fields of `SDWorldConfig` / `SDXLWorldConfig` (a typo fails
    at composition); SDXL adds only the crop corner of its time ids; each builder takes its own config."""
    from dataclasses import fields

    from rlkit_diffusion.worlds.stable_diffusion import SDWorldConfig, SDXLWorldConfig, build_sdxl

    sd15 = {f.name for f in fields(SDWorldConfig)}
    assert {f.name for f in fields(SDXLWorldConfig)} - sd15 == {"crops_coords_top", "crops_coords_left"}
    assert SDXLWorldConfig(resolution=64, crops_coords_top=4, crops_coords_left=2).time_ids() == [64, 64, 4, 2, 64, 64]
    assert set(compose_cfg(["world=sd15"]).world) == sd15 | {"name"}
    world = compose_cfg(["world=sdxl", "world.crops_coords_left=2"]).world
    assert set(world) == sd15 | {"name", "crops_coords_top", "crops_coords_left"}
    assert (world.resolution, world.guidance_scale, world.crops_coords_left) == (1024, 5.0, 2)
    with pytest.raises(Exception, match="pretraind"):
        compose_cfg(["world=sd15", "world.pretraind=x"])
    with pytest.raises(TypeError, match="build_sdxl takes an SDXLWorldConfig, got SDWorldConfig"):
        build_sdxl(SDWorldConfig())


def test_sd3_config_has_the_flow_sampler_instead_of_ddim_eta():
    from dataclasses import fields

    from rlkit_diffusion.worlds.stable_diffusion import SD3WorldConfig, SDWorldConfig, build_sd3

    sd15, sd3 = {f.name for f in fields(SDWorldConfig)}, {f.name for f in fields(SD3WorldConfig)}
    assert sd3 - sd15 == {"sampler", "noise_level", "t5", "max_sequence_length"} and sd15 - sd3 == {"eta"}
    world = compose_cfg(["world=sd3"]).world
    assert set(world) == sd3 | {"name"}
    assert (world.resolution, world.num_inference_steps, world.guidance_scale, world.sampler) == (512, 40, 4.5, "sde")
    with pytest.raises(TypeError, match="build_sd3 takes an SD3WorldConfig, got SDWorldConfig"):
        build_sd3(SDWorldConfig())


# ----------------------------------------------------------------------------------------------------------------
# Parity with the diffusers pipelines (same components, same initial latents, DDIM η = 0)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_sampling_and_decoding_match_the_diffusers_pipeline(assets, name):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    world = build(name, **world_kwargs(assets, name, eta=0.0, guidance_scale=4.0))
    cls = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(assets[name])
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    prompts = ["a red cat", "an owl made of glass"]
    x_T = torch.randn((2, *world.sample_shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = pipe(
            prompts, num_inference_steps=3, guidance_scale=4.0, latents=x_T.clone(), eta=0.0, output_type="latent"
        ).images
        ours = world.policy.sample(x_T, world.encoder(prompts), uncond=world.uncond(2), guidance_scale=4.0).x0
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        images = pipe.image_processor.postprocess(pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample, "pt")
        torch.testing.assert_close(world.decode(ours), images, atol=1e-4, rtol=1e-4)


def test_sd3_ode_sampling_and_decoding_match_the_diffusers_pipeline(assets):
    """world=sd3 world.sampler=ode is StableDiffusion3Pipeline: the same conditioning, guided velocity, Euler steps
    of FlowMatchEulerDiscreteScheduler (shift 3) and decode through the VAE's shift and scaling factors."""
    from diffusers import StableDiffusion3Pipeline

    world = build("sd3", **world_kwargs(assets, "sd3", sampler="ode", guidance_scale=4.0))
    pipe = StableDiffusion3Pipeline.from_pretrained(assets["sd3"])
    prompts = ["a red cat", "an owl made of glass"]
    x_T = torch.randn((2, *world.sample_shape), generator=torch.Generator().manual_seed(0))
    assert world.sample_shape == (16, 16, 16)
    with torch.no_grad():
        ref = pipe(
            prompts,
            num_inference_steps=3,
            guidance_scale=4.0,
            latents=x_T.clone(),
            output_type="latent",
            max_sequence_length=T5_LEN,
            height=RESOLUTION,
            width=RESOLUTION,
        ).images
        ours = world.policy.sample(x_T, world.encoder(prompts), uncond=world.uncond(2), guidance_scale=4.0).x0
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        latents = ref / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, "pt")
        torch.testing.assert_close(world.decode(ours), images, atol=1e-4, rtol=1e-4)
        encoded = world.encode(images)  # (posterior mean − shift) · scaling
        mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean
        scaled = (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        torch.testing.assert_close(encoded, scaled)


@pytest.mark.parametrize("t5", [True, False])
def test_sd3_conditioning_matches_encode_prompt(assets, t5):
    """Both CLIP encoders' penultimate states padded to joint_attention_dim, then T5's states (zeros without T5);
    pooled = the two projections; uncond = the encoded empty prompt (not zeros)."""
    from diffusers import StableDiffusion3Pipeline

    world = build("sd3", **world_kwargs(assets, "sd3", t5=t5))
    pipe = StableDiffusion3Pipeline.from_pretrained(assets["sd3"], **({} if t5 else {"text_encoder_3": None}))
    prompts = ["a red cat", "y" * 40]  # the second is longer than the 24 T5 tokens
    with torch.no_grad():
        cond, uncond = world.encoder(prompts), world.uncond(2)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=True, max_sequence_length=T5_LEN
        )
    assert cond["encoder_hidden_states"].shape == (2, 32 + T5_LEN, 64) and cond["pooled_projections"].shape == (2, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    torch.testing.assert_close(uncond["encoder_hidden_states"], neg)
    torch.testing.assert_close(uncond["pooled_projections"], neg_pooled)
    t5_part = cond["encoder_hidden_states"][:, 32:]
    assert (t5_part.abs().sum() > 0) == t5 and uncond["pooled_projections"].abs().sum() > 0


def test_sd3_sde_policy_is_gaussian_and_lora_targets_the_joint_attention(assets):
    """The default sampler is the Flow-GRPO SDE: every step has std > 0 and a finite log-probability; the sd3 LoRA
    targets adapt both streams of the joint attention, and with the adapters at zero the policy is unchanged."""
    from benchmarks.wiring import DEFAULT_LORA_TARGETS
    from rlkit_diffusion.reference import add_lora

    world = build("sd3", **world_kwargs(assets, "sd3"))
    assert world.policy.stochastic and world.policy.noise_level == 0.7
    x_T = torch.randn((2, *world.sample_shape), generator=torch.Generator().manual_seed(1))
    cond = world.encoder(["a", "b"])
    with torch.no_grad():
        out = world.policy.sample(x_T, cond, generator=torch.Generator().manual_seed(2), return_trajectory=True)
        before = world.policy.model_output(x_T, 5, cond)
    assert out.log_probs.shape == (2, 3) and torch.isfinite(out.log_probs).all()
    assert (out.stds > 0).all() and torch.isfinite(out.x0).all()
    net = world.policy.eps_model
    add_lora(net, rank=2, target_modules=DEFAULT_LORA_TARGETS["sd3"])
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in net.named_parameters() if "lora_A" in n}
    assert adapted == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    with torch.no_grad():
        torch.testing.assert_close(world.policy.model_output(x_T, 5, cond), before)


def test_sdxl_conditioning_matches_encode_prompt_and_time_ids(assets):
    from diffusers import StableDiffusionXLPipeline

    world = build("sdxl", **world_kwargs(assets, "sdxl", crops_coords_top=4, crops_coords_left=2))
    pipe = StableDiffusionXLPipeline.from_pretrained(assets["sdxl"])
    prompts = ["a red cat", "x" * 100]  # the second is truncated (with a warning)
    with pytest.warns(UserWarning, match="truncated"):
        cond = world.encoder(prompts)
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"], pooled)
    proj = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids((32, 32), (4, 2), (32, 32), torch.float32, text_encoder_projection_dim=proj)
    torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], time_ids.expand(2, -1))
    uncond = world.uncond(2)  # force_zeros_for_empty_prompt: zeros, but the same time ids
    torch.testing.assert_close(uncond["encoder_hidden_states"], neg)
    torch.testing.assert_close(uncond["added_cond_kwargs"]["text_embeds"], neg_pooled)
    torch.testing.assert_close(uncond["added_cond_kwargs"]["time_ids"], time_ids.expand(2, -1))


def test_decode_is_differentiable_and_encode_inverts_shapes(assets):
    world = build("sd15", **world_kwargs(assets, "sd15"))
    z = torch.randn((2, *world.sample_shape), requires_grad=True)
    images = world.decode(z)
    assert images.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= images.min() and images.max() <= 1
    world.reward("pickscore")(images, ["a", "b"]).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert world.encode(images.detach()).shape == z.shape
    vae = world.decode.__self__.vae  # the LatentCodec's
    assert not any(p.requires_grad for p in vae.parameters())


def test_rewards_prompts_and_categories(assets):
    world = build(
        "sd15",
        **world_kwargs(
            assets,
            "sd15",
            prompts=f"parti:{assets['parti']}",
            eval_prompts=str(assets["hpsv2"]),
            max_eval_prompts=4,
            hpsv2_checkpoint=str(assets["open_clip_weights"]),
            hpsv2_arch=str(assets["open_clip_config"]),
            clip_checkpoint=str(assets["open_clip_weights"]),
            clip_arch=str(assets["open_clip_config"]),
            aesthetic_weights=str(assets["aesthetic"]),
            aesthetic_clip=str(assets["clip"]),
            proxy_reward="aesthetic",
            eval_reward="hpsv2",
        ),
    )
    assert set(world.rewards) == {
        "pickscore",
        "hpsv2",
        "clip",
        "aesthetic",
        "jpeg",
        "jpeg_incompressibility",
        "proxy",
        "gold",
    }
    assert world.rewards["proxy"] is world.rewards["aesthetic"] and world.rewards["gold"] is world.rewards["hpsv2"]
    assert len(world.train_prompts) == 5 and len(world.heldout_prompts) == 4
    cats = world.extras["prompt_categories"]
    assert cats["a portrait of a woman"] == "People"
    assert sorted(cats[p] for p in world.heldout_prompts) == ["anime", "concept-art", "paintings", "photo"]
    images = world.decode(torch.randn((2, *world.sample_shape)))
    for name in ("pickscore", "hpsv2", "clip", "aesthetic", "jpeg"):
        assert world.reward(name)(images, world.train_prompts[:2]).shape == (2,)


@pytest.mark.parametrize("dtype", ["bf16"])
def test_low_precision_weights(assets, dtype):
    """bf16 weights: the ε-model casts its inputs and returns float32; fp32 LoRA adapters on top train."""
    from benchmarks.wiring import DEFAULT_LORA_TARGETS
    from rlkit_diffusion.reference import Reference, add_lora

    kw = world_kwargs(assets, "sd15", dtype=dtype, pickscore_model=None, proxy_reward="jpeg", eval_reward="jpeg")
    world = build("sd15", **kw)
    assert world.policy.eps_model.unet.dtype == torch.bfloat16
    add_lora(world.policy.eps_model, rank=2, target_modules=DEFAULT_LORA_TARGETS["sd15"])
    lora = [p for n, p in world.policy.eps_model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)  # fp32 adapters, bf16 base
    ref = Reference(world.policy, "lora")
    x = torch.randn((1, *world.sample_shape))
    cond = world.encoder(["a cat"])
    out = world.policy.model_output(x, torch.tensor([500]), cond)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref.policy.model_output(x, torch.tensor([500]), cond))  # B = 0 at init
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)


# ----------------------------------------------------------------------------------------------------------------
# Pick-a-Pic streaming pairs and the latent cache
# ----------------------------------------------------------------------------------------------------------------
def keys(pairs) -> list[tuple[int, int]]:
    return [(p.unit, p.row) for p in pairs]


def test_stream_drops_ties_orders_winner_first_and_filters_dreamlike(assets):
    from rlkit_diffusion.data.pickapic import PickAPicReader
    from rlkit_diffusion.data.pickapic_stream import StreamingPairs, dreamlike_only

    stream = StreamingPairs(assets["pairs"], buffer_size=0)
    pairs = stream.take(9)
    reference = list(PickAPicReader(assets["pairs"]))  # ties dropped, winner first, file order
    assert [p.caption for p in pairs] == [c for c, _, _ in reference] and stream.n_ties == 3
    table = pq.read_table(next(assets["pairs"].glob("*.parquet")))
    first = pairs[0]
    row = 4 * first.unit + first.row
    winner = "jpg_0" if table["label_0"][row].as_py() == 1.0 else "jpg_1"
    assert first.image_w == table[winner][row].as_py()
    dream = StreamingPairs(
        assets["pairs"], buffer_size=0, filter=dreamlike_only, filter_columns=("model_0", "model_1")
    )
    expected = [i for i in range(12) if i % 4 != 3 and i % 3 and i % 2]  # make-up of write_pickapic
    assert [4 * p.unit + p.row for p in dream.take(len(expected))] == expected


def test_stream_shuffles_per_epoch_and_resumes_exactly(assets):
    from rlkit_diffusion.data.pickapic_stream import StreamingPairs

    a = StreamingPairs(assets["pairs"], buffer_size=4, seed=1)
    epoch0 = keys(a.take(9))
    assert sorted(epoch0) == sorted(keys(StreamingPairs(assets["pairs"], buffer_size=0).take(9)))
    assert epoch0 != sorted(epoch0)
    b = StreamingPairs(assets["pairs"], buffer_size=4, seed=1)
    b.take(5)
    state = json.loads(json.dumps(b.state_dict()))
    rest = b.take(10)  # crosses into epoch 1
    c = StreamingPairs(assets["pairs"], buffer_size=4, seed=1)
    c.load_state_dict(state)
    resumed = c.take(10)
    assert keys(resumed) == keys(rest) and [p.image_w for p in resumed] == [p.image_w for p in rest]
    assert keys(a.take(9)) != epoch0  # epoch 1 has its own order


def test_stream_shards_are_slices_of_the_global_batch(assets):
    from rlkit_diffusion.data.pickapic_stream import StreamingPairs

    single = keys(StreamingPairs(assets["pairs"], buffer_size=4).take(6))
    shards = [keys(StreamingPairs(assets["pairs"], buffer_size=4).take(3, rank=r, num_shards=2)) for r in (0, 1)]
    assert shards[0] + shards[1] == single


def test_latent_pairs_cache_resume_and_shards(assets, tmp_path):
    kw = world_kwargs(assets, "sd15", pairs=str(assets["pairs"]), latent_cache=str(tmp_path / "cache"), hflip=True)
    world = build("sd15", **kw)
    captions, z_w, z_l = world.pairs.next_batch(4)
    assert z_w.shape == z_l.shape == (4, *world.sample_shape) and len(captions) == 4
    assert world.pairs.cache.misses == 8 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == 8
    state = json.loads(json.dumps(world.pairs.state_dict(), default=lambda t: t.tolist()))  # as in state.json
    after = world.pairs.next_batch(4)
    again = build("sd15", **kw)  # same seed: the same pairs, now served from the cache, bit for bit
    torch.testing.assert_close(again.pairs.next_batch(4)[1], z_w, atol=0, rtol=0)
    assert again.pairs.cache.hits == 8
    again.pairs.load_state_dict(state)
    resumed = again.pairs.next_batch(4)
    assert resumed[0] == after[0]
    torch.testing.assert_close(resumed[1], after[1], atol=0, rtol=0)
    halves = [build("sd15", **kw).pairs.shard(r, 2).next_batch(2) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), z_w, atol=0, rtol=0)


def test_corrupt_image_fails_or_is_replaced(assets, tmp_path):
    table = pq.read_table(next(assets["pairs"].glob("*.parquet")))
    jpg = table["jpg_0"].to_pylist()
    jpg[0] = b"not a jpeg"
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("jpg_0"), "jpg_0", pa.array(jpg)), bad / "x.parquet")
    world = build("sd15", **world_kwargs(assets, "sd15", pairs=str(bad), shuffle_buffer=0))
    with pytest.raises(ValueError, match=r"x.parquet: row group 0 row 0: bad (winner|loser) image"):
        world.pairs.next_batch(2)
    world = build("sd15", **world_kwargs(assets, "sd15", pairs=str(bad), shuffle_buffer=0, skip_bad_rows=True))
    captions, _, _ = world.pairs.next_batch(2)
    assert captions[0] == captions[1] and world.pairs.n_bad_images == 1


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the setting, before any training
# ----------------------------------------------------------------------------------------------------------------
def error_of(exc: type[Exception], name: str, **kwargs) -> str:
    with pytest.raises(exc) as err:
        build(name, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_pretrained_paths(assets, tmp_path):
    base = world_kwargs(assets, "sd15")
    msg = error_of(FileNotFoundError, "sd15", **{**base, "pretrained": str(tmp_path / "nope" / "sd")})
    assert "world.pretrained=" in msg and "no such directory" in msg
    msg = error_of(OSError, "sd15", **{**base, "pretrained": "nobody/no-such-model"})  # offline hub id
    assert msg.startswith("world.pretrained: cannot load UNet2DConditionModel from hub id")
    msg = error_of(NotADirectoryError, "sd15", **{**base, "pretrained": str(assets["aesthetic"])})
    assert "expected a directory" in msg
    partial = tmp_path / "partial"
    shutil.copytree(assets["sd15"], partial)
    shutil.rmtree(partial / "text_encoder")
    msg = error_of(FileNotFoundError, "sd15", **{**base, "pretrained": str(partial)})
    assert "missing subfolder(s) ['text_encoder']" in msg
    shutil.rmtree(partial / "unet")
    (partial / "unet").mkdir()
    shutil.copytree(assets["sd15"] / "text_encoder", partial / "text_encoder")
    msg = error_of(OSError, "sd15", **{**base, "pretrained": str(partial)})
    assert msg.startswith("world.pretrained: cannot load UNet2DConditionModel") and "subfolder 'unet'" in msg


def test_checkpoint_of_the_wrong_architecture(assets, tmp_path):
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", pretrained=str(assets["sdxl"])))
    assert "SDXL UNet" in msg and "use world=sdxl" in msg
    msg = error_of(ValueError, "sdxl", **world_kwargs(assets, "sdxl", pretrained=str(assets["sd15"])))
    assert "use world=sd15" in msg
    mismatched = save_tiny_sd15(tmp_path / "sd15_48", cross_attention_dim=48)
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", pretrained=str(mismatched)))
    assert "cross_attention_dim=48 does not match the text encoder hidden size 32" in msg
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", resolution=33))
    assert "world.resolution=33" in msg


def test_sd3_checkpoints_that_do_not_fit(assets, tmp_path):
    msg = error_of(ValueError, "sd3", **world_kwargs(assets, "sd3", pretrained=str(assets["sdxl"])))
    assert "not an SD3 transformer/" in msg and "use world=sdxl instead of world=sd3" in msg
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", pretrained=str(assets["sd3"])))
    assert "transformer/ (SD3 / flow matching)" in msg and "use world=sd3" in msg
    no_t5 = tmp_path / "no_t5"
    shutil.copytree(assets["sd3"], no_t5)
    shutil.rmtree(no_t5 / "text_encoder_3")
    msg = error_of(FileNotFoundError, "sd3", **world_kwargs(assets, "sd3", pretrained=str(no_t5)))
    assert "missing subfolder(s) ['text_encoder_3']" in msg
    assert build("sd3", **world_kwargs(assets, "sd3", pretrained=str(no_t5), t5=False)).encoder.t5 is None
    msg = error_of(ValueError, "sd3", **world_kwargs(assets, "sd3", resolution=34))
    assert "world.resolution=34 must be a multiple of the VAE downsampling factor × patch size 2 × 2" in msg
    msg = error_of(ValueError, "sd3", **world_kwargs(assets, "sd3", resolution=96))
    assert "24 patches per side, more than the transformer's pos_embed_max_size=16" in msg
    assert "world.sampler must be 'sde' or 'ode'" in error_of(
        ValueError, "sd3", **world_kwargs(assets, "sd3", sampler="ddim")
    )
    wrong = save_tiny_sd3(tmp_path / "pooled", clip_projection_dim=24)
    msg = error_of(ValueError, "sd3", **world_kwargs(assets, "sd3", pretrained=str(wrong)))
    assert "pooled_projection_dim=32 does not match the CLIP encoders' projection_dim 24 + 24 = 48" in msg


def test_parquet_without_the_pickapic_columns(assets, tmp_path):
    table = pq.read_table(next(assets["pairs"].glob("*.parquet"))).drop(["label_1"])
    pq.write_table(table, tmp_path / "nolabel.parquet")
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", pairs=str(tmp_path / "nolabel.parquet")))
    assert "nolabel.parquet: missing columns ['label_1']" in msg
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", pairs=str(assets["pairs"] / "*.nothing")))
    assert "no parquet files match" in msg


def test_reward_weights_that_do_not_match_and_rewards_not_loaded(assets, tmp_path):
    wrong = save_aesthetic_mlp(tmp_path / "aesthetic_768.pth", input_size=768)
    kw = world_kwargs(assets, "sd15", aesthetic_weights=str(wrong), aesthetic_clip=str(assets["clip"]))
    assert "aesthetic_768.pth does not match" in error_of(ValueError, "sd15", **kw)
    msg = error_of(ValueError, "sd15", **world_kwargs(assets, "sd15", proxy_reward="hpsv2"))
    assert msg.startswith("world.proxy_reward='hpsv2' is not loaded") and "world.hpsv2_checkpoint" in msg


# ----------------------------------------------------------------------------------------------------------------
# benchmarks.run end to end: dpo, ddpo and draft on each world
# ----------------------------------------------------------------------------------------------------------------
def run_overrides(assets: dict[str, Path], world: str, algo: str, out: Path) -> list[str]:
    return [
        f"world={world}",
        f"algo={algo}",
        "device=cpu",
        f"out_dir={out}",
        "train.steps=2",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "eval.samples_per_prompt=1",
        "eval.max_prompts=2",
        "eval.bootstrap=20",
        "eval.implicit_pairs=2",  # Table 2 is evaluated for every algorithm: at a tiny size here
        "eval.implicit_draws=1",
        f"world.pretrained={assets[world]}",
        f"world.resolution={RESOLUTION}",
        "world.num_inference_steps=2",
        f"world.pickscore_model={assets['clip']}",
        f"world.pickscore_processor={assets['clip']}",
        f"world.aesthetic_weights={assets['aesthetic']}",
        f"world.aesthetic_clip={assets['clip']}",
        f"world.prompts=parti:{assets['parti']}",
        f"world.eval_prompts=hpsv2:{assets['hpsv2']}",
        "world.max_eval_prompts=4",
        f"world.pairs={assets['pairs']}",
        f"world.val_pairs={assets['val_pairs']}",
        f"world.latent_cache={out / 'latents'}",
        *([f"world.max_sequence_length={T5_LEN}"] if world == "sd3" else []),
        *{
            "dpo": [],
            "ddpo": ["algo.num_minibatches=1"],  # the sd15 tuning's 400 minibatches are for 32 × 50 transitions
            "draft": ["algo.k=1"],
            # sd3's tuning (Flow-GRPO's 24 × 10-step groups, 9 trained steps) at a tiny size
            "grpo": [
                "algo.group_size=2",
                "algo.num_minibatches=1",
                "algo.sampling_steps=2",
                "algo.train_timesteps=[0,1]",
            ],
        }[algo],
    ]


@pytest.mark.parametrize("world", ["sd15", "sdxl"])
@pytest.mark.parametrize("algo", ["dpo", "ddpo", "draft"])
def test_benchmark_run_end_to_end(assets, tmp_path, world, algo):
    from benchmarks.eval_schema import validate
    from benchmarks.run import run

    extra = ["reference.lora_rank=4"] if (world, algo) == ("sd15", "dpo") else []  # LoRA and full fine-tuning
    cfg = compose_cfg(run_overrides(assets, world, algo, tmp_path) + extra)
    result = run(cfg, run_dir=tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "eval.json").read_text())
    validate(on_disk)
    assert on_disk["world"] == world and on_disk["algo"] == algo and result["updates"] == 2
    assert set(on_disk["win_rate_by_category"]) <= {"People", "Outdoor Scenes", "Animals"}
    assert set(on_disk["heldout_win_rate_by_category"]) <= {"anime", "concept-art", "paintings", "photo"}
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    if algo == "dpo":
        assert 0.0 <= on_disk["implicit_acc"] <= 1.0
        assert any((tmp_path / "latents").rglob("*.safetensors"))


@pytest.mark.parametrize("algo", ["dpo", "grpo"])
def test_sd3_benchmark_run_end_to_end(assets, tmp_path, algo):
    """world=sd3 trains two steps: DPO on the Pick-a-Pic latents (velocity regression, LoRA on the joint attention,
    the reference = adapters off) and GRPO on the SDE sampler (groups of 2, the KL to the reference)."""
    from benchmarks.eval_schema import validate
    from benchmarks.run import run

    extra = ["reference.lora_rank=4"] if algo == "dpo" else []
    cfg = compose_cfg(run_overrides(assets, "sd3", algo, tmp_path) + extra)
    result = run(cfg, run_dir=tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "eval.json").read_text())
    validate(on_disk)
    assert on_disk["world"] == "sd3" and on_disk["algo"] == algo and result["updates"] == 2
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    if algo == "dpo":
        assert 0.0 <= on_disk["implicit_acc"] <= 1.0
