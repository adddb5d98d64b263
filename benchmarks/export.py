"""``python -m benchmarks.export <run dir> [--out DIR]`` — a finished run as files that other tools load.

A run's checkpoint (``checkpoints/step_<n>/model.safetensors``) holds only the trainable parameters in the project's
key names. The export turns it into the layout the rest of the ecosystem reads:

======================  ================================================  =============================================
run                     written to DIR                                    load it with
======================  ================================================  =============================================
sd15/sdxl/sd3, LoRA     ``pytorch_lora_weights.safetensors`` (peft keys   ``pipe = DiffusionPipeline.from_pretrained(
                        ``unet.<module>.lora_A.weight``; sd3:             base); pipe.load_lora_weights(DIR)``
                        ``transformer.<module>...``; LoRA config in the
                        file's metadata)
sd15/sdxl/sd3, full     the whole pipeline (``model_index.json``,         ``DiffusionPipeline.from_pretrained(DIR)``;
                        ``unet/`` ``vae/`` ``text_encoder/`` ...)         the UNet alone: ``UNet2DConditionModel
                                                                          .from_pretrained(DIR, subfolder="unet")``
shapes(_flow)           the UNet (``save_pretrained``: ``config.json`` +  ``world=shapes world.weights=DIR``
                        ``diffusion_pytorch_model.safetensors``)
toy2d(_flow)            the MLP (``model.safetensors``)                   ``world=toy2d world.weights=DIR``
======================  ================================================  =============================================

For shapes/toy2d a LoRA run is merged into the base weights (W + (α/r)·B·A, peft's own ``merge``), so the export is
a plain network that a new run starts from. Every export gets ``rlkit_export.json`` (world, algorithm, kind, the
checkpoint it came from) and a model card ``README.md``: base model, algorithm and its config, data, budget, the
run's evaluation with 95% intervals, and the command that reproduces the run.

The run directory is read through its ``config.yaml`` (resolved at start), ``eval.json`` (if the run finished) and
``checkpoints/latest``. The default output is ``<run dir>/export``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from torch import nn

from rlkit_diffusion.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    latest_checkpoint,
    load_checkpoint,
    load_trainable_state,
)

SD_WORLDS = ("sd15", "sdxl", "sd3")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Reading a run directory
# ----------------------------------------------------------------------------------------------------------------
class Run:
    """What the export needs from a run directory: its resolved config, evaluation and last checkpoint."""

    def __init__(self, run_dir: Path | str):
        self.dir = Path(run_dir)
        config = self.dir / "config.yaml"
        if not config.is_file():
            raise FileNotFoundError(f"{self.dir} is not a run directory (no config.yaml)")
        self.cfg: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        eval_json = self.dir / "eval.json"
        self.eval: dict[str, Any] = json.loads(eval_json.read_text()) if eval_json.is_file() else {}
        self.checkpoint = latest_checkpoint(self.dir / "checkpoints")
        if self.checkpoint is None:
            raise FileNotFoundError(f"{self.dir}: no complete checkpoint under checkpoints/ (nothing to export)")

    @property
    def world(self) -> str:
        return self.cfg["world"]["name"]

    @property
    def algo(self) -> str:
        return self.cfg["algo"]["name"]

    @property
    def lora_rank(self) -> int:
        return int(self.cfg["reference"]["lora_rank"])

    @property
    def lora_alpha(self) -> float:
        alpha = self.cfg["reference"]["lora_alpha"]
        return float(alpha if alpha is not None else self.lora_rank)

    def lora_targets(self) -> list[str]:
        from benchmarks.wiring import DEFAULT_LORA_TARGETS

        return list(self.cfg["reference"]["lora_targets"]) or DEFAULT_LORA_TARGETS[self.world]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's trainable parameters, keyed as in the policy's ε-model (``unet.<...>`` for UNets)."""
        return load_checkpoint(self.checkpoint)["model"]

    def reproduce_commands(self) -> list[str]:
        """Commands that rerun this run: the command line as typed (Hydra's recorded overrides, or the argv in
        eval.json) when it ran from the command line, and always the run from its own resolved ``config.yaml``."""
        args = None
        overrides = self.dir / ".hydra" / "overrides.yaml"
        argv = self.eval.get("environment", {}).get("argv", [])
        if overrides.is_file():
            args = yaml.safe_load(overrides.read_text()) or []
        elif argv and Path(argv[0]).name == "run.py":
            args = argv[1:]
        lines = [] if args is None else ["python -m benchmarks.run " + " ".join(_quote(a) for a in args)]
        config_dir = _quote(str(self.dir.resolve()))
        lines.append(
            f"python -m benchmarks.run --config-path {config_dir} --config-name config "
            f"hydra.run.dir=runs/rerun-{self.dir.name}"
        )
        return lines


def _quote(arg: str) -> str:
    return f"'{arg}'" if re.search(r"[\s\[\]{}*,'\"]", arg) else arg


# ----------------------------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------------------------
def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix + k: v}`` → ``{k: v}``; every key must carry the prefix."""
    bad = [k for k in state if not k.startswith(prefix)]
    if bad:
        raise ValueError(f"checkpoint keys without the prefix {prefix!r}, e.g. {bad[:3]}")
    return {k[len(prefix) :]: v for k, v in state.items()}


def peft_to_diffusers_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's in-model names ``<module>.lora_A.default.weight`` → the saved-adapter names ``<module>.lora_A.weight``
    (what ``get_peft_model_state_dict`` returns and diffusers' ``save_lora_weights`` packs under ``unet.``)."""
    out = {}
    for k, v in state.items():
        new = re.sub(r"\.(lora_[AB])\.default\.", r".\1.", k)
        if new == k:
            raise ValueError(f"not a LoRA adapter weight: {k}")
        out[new] = v
    return out


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every peft LoRA layer of ``module`` into its base layer (W ← W + (α/r)·B·A, peft's ``merge``) and put the
    base layer back in its place: a plain network with the adapted weights."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def export_sd(run: Run, out: Path) -> str:
    """sd15/sdxl/sd3: LoRA → ``pytorch_lora_weights.safetensors``; full fine-tune → a whole pipeline directory. The
    trained network is the pipeline's ``unet`` (sd15, sdxl) or ``transformer`` (sd3)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe_cls = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}.get(
        run.world, StableDiffusionPipeline
    )
    network = "transformer" if run.world == "sd3" else "unet"
    w = run.cfg["world"]
    state = strip_prefix(run.trained_state(), f"{network}.")
    if run.lora_rank > 0:
        from peft import LoraConfig

        config = LoraConfig(r=run.lora_rank, lora_alpha=run.lora_alpha, target_modules=run.lora_targets())
        metadata = config.to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])  # a set in peft: JSON needs a list
        pipe_cls.save_lora_weights(
            out,
            **{f"{network}_lora_layers": peft_to_diffusers_lora(state), f"{network}_lora_adapter_metadata": metadata},
            weight_name=LORA_WEIGHT_NAME,
        )
        return "lora"
    kw: dict[str, Any] = {k: w[k] for k in ("revision", "variant") if w.get(k)}
    if w.get("vae"):
        from diffusers import AutoencoderKL

        kw["vae"] = AutoencoderKL.from_pretrained(w["vae"])
    pipe = pipe_cls.from_pretrained(w["pretrained"], torch_dtype=DTYPES[w.get("dtype", "fp32")], **kw)
    missing, unexpected = getattr(pipe, network).load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(state):
        raise ValueError(f"{run.checkpoint}: the weights do not match the {network} of {w['pretrained']}")
    pipe.save_pretrained(out)
    return "pipeline"


def export_small(run: Run, out: Path) -> str:
    """shapes/toy2d: the base network of the run's world with the trained weights (LoRA merged), saved in the
    format its world's ``weights`` option reads."""
    from rlkit_diffusion.reference import add_lora
    from rlkit_diffusion.worlds import build_world

    kwargs = dict(run.cfg["world"])
    model = build_world(kwargs.pop("name"), device="cpu", **kwargs).policy.eps_model
    if run.lora_rank > 0:
        add_lora(model, rank=run.lora_rank, alpha=run.lora_alpha, target_modules=run.lora_targets())
    load_trainable_state(model, run.trained_state())
    merge_lora(model)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "unet"):  # shapes: a diffusers UNet2DConditionModel
        model.unet.save_pretrained(out)
        return "unet"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return "model"


def export(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Export the run in ``run_dir`` (module docstring) into ``out`` (default ``<run dir>/export``); returns it."""
    run = Run(run_dir)
    out = Path(out) if out is not None else run.dir / "export"
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"export directory {out} is not empty; refusing to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    kind = export_sd(run, out) if run.world in SD_WORLDS else export_small(run, out)
    info = {"world": run.world, "algo": run.algo, "kind": kind, "checkpoint": str(run.checkpoint.resolve())}
    atomic_write_json(out / "rlkit_export.json", info)
    atomic_write_text(out / "README.md", model_card(run, kind, out))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------------------------
EVAL_ROWS = [
    ("win_rate_vs_base", "win rate vs base (gold reward, same caption and noise)"),
    ("heldout_win_rate_vs_base", "win rate vs base, held-out captions"),
    ("gold_reward_base", "gold reward, base"),
    ("gold_reward_trained", "gold reward, trained"),
    ("proxy_reward_base", "proxy reward, base"),
    ("proxy_reward_trained", "proxy reward, trained"),
    ("distance_to_optimum_base", "distance to the KL-optimal policy, base"),
    ("distance_to_optimum_trained", "distance to the KL-optimal policy, trained"),
    ("kl_to_ref", "path KL to the reference (nats)"),
    ("diversity", "diversity"),
    ("implicit_acc", "implicit-reward accuracy on validation pairs"),
    ("best_of_n_equivalent", "best-of-N of the base it matches (N)"),
]


def base_model(run: Run) -> str:
    w = run.cfg["world"]
    if run.world in SD_WORLDS:
        return str(w["pretrained"])
    return str(w.get("weights") or f"the shipped {run.world} base model")


def data_line(run: Run) -> str:
    w = run.cfg["world"]
    if run.world in SD_WORLDS:
        pairs = w.get("pairs") or "none"
        prompts = w.get("prompts") or "the world's default prompt set"
        return f"preference pairs: `{pairs}`; prompts for online sampling: `{prompts}`"
    if run.world in ("shapes", "shapes_flow"):
        return (
            f"preference pairs: `{w.get('pairs_dir') or 'the shipped shapes pairs'}`; {w['n_train_prompts']} captions"
        )
    return "pairs drawn from the toy2d mixture, labelled by a Bradley–Terry draw on the analytic reward"


def eval_lines(ev: dict[str, Any]) -> list[str]:
    if not ev:
        return ["The run has no eval.json (it did not finish its evaluation)."]
    lines = ["| metric | value | 95% interval |", "|---|---|---|"]
    for key, label in EVAL_ROWS:
        if not isinstance(ev.get(key), (int, float)):
            continue
        lo = ev.get(f"{key}_ci_low")
        hi = ev.get(f"{key}_ci_high")
        interval = f"[{lo:.4g}, {hi:.4g}]" if lo is not None and hi is not None else ""
        lines.append(f"| {label} | {ev[key]:.4g} | {interval} |")
    return lines


def model_card(run: Run, kind: str, out: Path) -> str:
    ev, c = run.eval, run.cfg
    sd = run.world in SD_WORLDS
    front = {
        "base_model": base_model(run) if sd else None,
        "library_name": "diffusers" if sd else None,
        "tags": ["rlkit-diffusion", run.algo, run.world, *(["lora"] if run.lora_rank else [])],
    }
    front = {k: v for k, v in front.items() if v is not None}
    how = {
        "lora": [
            "```python",
            "from diffusers import DiffusionPipeline",
            f'pipe = DiffusionPipeline.from_pretrained("{base_model(run)}")',
            f'pipe.load_lora_weights("{out}")',
            "```",
        ],
        "pipeline": [
            "```python",
            "from diffusers import DiffusionPipeline",
            f'pipe = DiffusionPipeline.from_pretrained("{out}")',
            "```",
        ],
        "unet": [f"```\npython -m benchmarks.run world={run.world} world.weights={out}\n```"],
        "model": [f"```\npython -m benchmarks.run world={run.world} world.weights={out}\n```"],
    }[kind]
    budget = c["budget"]
    amount = budget["amount"] if budget["amount"] is not None else c["train"]["steps"]
    spent = [f"{k}={ev[k]}" for k in ("updates", "unet_nfe", "reward_queries") if k in ev]
    if "train_wall_s" in ev:
        spent.append(f"train_wall_s={ev['train_wall_s']:.1f}")
    lora = f"LoRA rank {run.lora_rank}, α = {run.lora_alpha:g} on {run.lora_targets()}" if run.lora_rank else "full"
    algo_cfg = yaml.safe_dump(c["algo"], sort_keys=False).strip()
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {run.algo} on {run.world} (seed {c['seed']})",
        "",
        f"Trained with rlkit-diffusion's `{run.algo}`; exported by `python -m benchmarks.export`.",
        "",
        "## Use",
        "",
        *how,
        "",
        "## Training",
        "",
        f"- base model: `{base_model(run)}`",
        f"- algorithm: `{run.algo}`, fine-tuning: {lora}",
        f"- data: {data_line(run)}",
        f"- reward optimised by online algorithms: `{c['reward']}`",
        f"- budget: {budget['kind']} = {amount:g}; spent: {', '.join(spent) or 'n/a'}",
        f"- optimiser: AdamW lr={c['train']['lr']:g}, batch {c['train']['batch_size']} per process",
        f"- checkpoint: `{run.checkpoint}`",
        "",
        "Algorithm config:",
        "",
        "```yaml",
        algo_cfg,
        "```",
        "",
        "## Evaluation",
        "",
        f"{c['eval']['samples_per_prompt']} samples per caption, evaluation seed {c['eval']['seed']}, "
        f"scored by `{c['eval']['reward']}`; intervals are bootstrap 95% intervals.",
        "",
        *eval_lines(ev),
        "",
        "## Reproduce",
        "",
        "The second command reruns the exact resolved config (same seeds: the same numbers on the same hardware).",
        "",
        "```",
        *run.reproduce_commands(),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run directory (config.yaml, eval.json, checkpoints/)")
    parser.add_argument("--out", default=None, help="output directory (default: <run dir>/export)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"benchmarks.export: {err}")
    print(f"exported {args.run_dir} -> {out}  (model card: {out / 'README.md'})")


if __name__ == "__main__":
    main()
