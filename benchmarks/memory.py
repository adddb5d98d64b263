"""``python -m benchmarks.memory`` — GPU memory per process of a full SD1.5 / SDXL fine-tune, from parameter counts.

The UNets, text encoders and VAEs are built from their published configs on the meta device (no weights, no
download), so the counts are exact. The loop trains in fp32 with AdamW (``accelerate`` bf16 autocast computes in bf16
but keeps fp32 weights), so per process, with P the UNet's parameters, N the number of GPUs, E the frozen text
encoders and VAE, U the largest FSDP unit (`rlkit_diffusion.sharding.FSDP_BLOCKS`, then the root's own parameters):

=========  ======  =====  ========  =================  ===============  ==================
scheme     θ       ∇θ     Adam m,v  frozen reference   encoders + VAE   gathered FSDP units
=========  ======  =====  ========  =================  ===============  ==================
DDP        4P      4P     8P        4P (whole)         4E               —
ZeRO-2     4P      4P/N   8P/N      4P (whole)         4E               —
FSDP       4P/N    4P/N   8P/N      4P (whole)         4E               2 × 4U (in use + prefetched)
=========  ======  =====  ========  =================  ===============  ==================

The frozen reference is a whole fp32 copy on every rank (the loop's ``reference.kind=frozen`` deep-copies the policy
before it is sharded); LoRA needs none (adapters off). Activations are NOT included: they depend on the batch, the
resolution and gradient checkpointing, and ``benchmarks.perf --flops`` measures peak memory for the tiny CPU worlds
only — add the activations measured on the target GPU (``benchmarks.perf --device cuda``) to these totals.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from benchmarks.perf import emit
from benchmarks.perf_run import SD15_UNET
from rlkit_diffusion.sharding import FSDP_BLOCKS

SDXL_UNET = {
    "sample_size": 128,
    "cross_attention_dim": 2048,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "layers_per_block": 2,
}
"""SDXL base 1.0's UNet (diffusers' UNet2DConditionModel config of stabilityai/stable-diffusion-xl-base-1.0)."""
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
"""CLIP ViT-L/14's text tower (SD1.5's text encoder, SDXL's first)."""
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20}
"""OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second text encoder)."""
GIB = 2**30
SCHEMES = ("DDP", "ZeRO-2", "FSDP")


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_unit(unet: nn.Module, blocks=FSDP_BLOCKS) -> int:
    """Parameters of the largest FSDP unit: each parameter belongs to its innermost module named in ``blocks``, or
    to the root unit."""
    units = [name for name, m in unet.named_modules() if name and type(m).__name__ in set(blocks)]
    sizes: dict[str, int] = {}
    for name, p in unet.named_parameters():
        owner = max((u for u in units if name.startswith(u + ".")), key=len, default="")
        sizes[owner] = sizes.get(owner, 0) + p.numel()
    return max(sizes.values())


def build_counts() -> dict[str, dict[str, int]]:
    """{model: {"unet", "frozen", "largest_unit"}} parameter counts, built on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out = {}
    with torch.device("meta"):
        vae = count(
            AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                layers_per_block=2,
            )
        )
        clip_l = count(CLIPTextModel(CLIPTextConfig(**CLIP_L, projection_dim=768)))
        clip_g = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG, projection_dim=1280)))
        for name, config, frozen in (("SD1.5", SD15_UNET, vae + clip_l), ("SDXL", SDXL_UNET, vae + clip_l + clip_g)):
            unet = UNet2DConditionModel(**config)
            out[name] = {"unet": count(unet), "frozen": frozen, "largest_unit": largest_unit(unet)}
    return out


def per_process(p: int, frozen: int, unit: int, scheme: str, n: int) -> dict[str, float]:
    """GiB per process of one scheme on ``n`` GPUs (fp32 bytes; the table of the module docstring)."""
    shard = {"DDP": (1, 1, 1), "ZeRO-2": (1, n, n), "FSDP": (n, n, n)}[scheme]
    row = {
        "weights": 4 * p / shard[0],
        "grads": 4 * p / shard[1],
        "adam": 8 * p / shard[2],
        "reference": 4 * p,
        "encoders_vae": 4 * frozen,
        "gathered_units": 2 * 4 * unit if scheme == "FSDP" else 0,
    }
    row = {k: v / GIB for k, v in row.items()}
    row["total"] = sum(row.values())
    return row


def table(gpus: tuple[int, ...] = (8, 16)) -> dict[str, Any]:
    counts = build_counts()
    rows = []
    for model, c in counts.items():
        for scheme in SCHEMES:
            for n in gpus if scheme != "DDP" else gpus[:1]:
                rows.append(
                    {
                        "model": model,
                        "scheme": scheme,
                        "gpus": n,
                        **per_process(c["unet"], c["frozen"], c["largest_unit"], scheme, n),
                    }
                )
    return {"counts": counts, "rows": rows}


def format_table(r: dict[str, Any]) -> str:
    lines = ["benchmarks.memory: GiB per GPU, full fine-tune, fp32 weights/grads/AdamW, activations excluded", ""]
    for model, c in r["counts"].items():
        lines.append(
            f"{model}: UNet {c['unet']:,} parameters; frozen text encoder(s) + VAE {c['frozen']:,}; "
            f"largest FSDP unit {c['largest_unit']:,}"
        )
    lines += [
        "",
        f"{'model':<7}{'scheme':<8}{'GPUs':>5}{'θ':>8}{'∇θ':>8}{'Adam':>8}{'ref':>8}{'enc+VAE':>9}"
        f"{'units':>8}{'total':>8}",
    ]
    for row in r["rows"]:
        gpus = "any" if row["scheme"] == "DDP" else str(row["gpus"])
        lines.append(
            f"{row['model']:<7}{row['scheme']:<8}{gpus:>5}{row['weights']:>8.1f}{row['grads']:>8.1f}"
            f"{row['adam']:>8.1f}{row['reference']:>8.1f}{row['encoders_vae']:>9.1f}{row['gathered_units']:>8.1f}"
            f"{row['total']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="8,16", help="numbers of GPUs (processes) to tabulate, e.g. 8,16")
    p.add_argument("--json", action="store_true", help="print the counts and rows as JSON")
    args = p.parse_args(argv)
    return emit(table(tuple(int(n) for n in args.gpus.split(","))), args.json, format_table)


if __name__ == "__main__":
    main()
