"""Metric logging: one jsonl line per logged step (``metrics.jsonl``), and the trackers people log to.

Metric names are ``<group>/<name>``: ``train/loss``, ``train/implicit_acc``, ``budget/nfe``, ``eval/...``.
Only the main process writes.

``logger=tensorboard|wandb|trackio|mlflow|none`` (or a list, ``logger=[tensorboard,wandb]``; default tensorboard)
goes through accelerate's tracker interface (`make_logger`, `TrackerLogger`): ``Accelerator(log_with=...)``,
``accelerator.init_trackers`` with the resolved config, ``accelerator.log`` with the same metric names as
``metrics.jsonl``, sample grids at each evaluation and the final eval.json through the tracker objects. Offline
wandb: ``WANDB_MODE=offline`` (the run lands in ``<run dir>/wandb/``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def to_float(v: Any) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().float().mean().item())
    return float(v)


class MetricLogger:
    """Writes ``metrics.jsonl`` and tensorboard event files under ``run_dir`` (main process only)."""

    def __init__(self, run_dir: Path | str | None, *, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = {k: to_float(v) for k, v in metrics.items()}
        if self.enabled:
            clean = {k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}
            self._file.write(json.dumps({"step": step, **clean}) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if math.isfinite(v):
                        self._tb.add_scalar(k, v, step)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # Hooks of the tracker logger (`TrackerLogger`); the plain logger has no trackers, so they do nothing.
    def wrap_eval(self, eval_fn: Callable[[int], dict[str, float]] | None) -> Callable[[int], dict[str, float]] | None:
        """``eval_fn`` for the training loop (the tracker logger adds a sample grid to each evaluation)."""
        return eval_fn

    def log_final(self, result: dict[str, Any], run_dir: Path | str) -> None:
        """Send the final evaluation to the trackers (nothing to do without trackers)."""


# ----------------------------------------------------------------------------------------------------------------
# Trackers through accelerate's tracker interface (logger=tensorboard|wandb|trackio|mlflow|none, or a list)
# ----------------------------------------------------------------------------------------------------------------
TRACKERS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""``logger=`` choices → the PyPI package each needs."""
PROJECT = "rlkit-diffusion"


def tracker_names(logger: Any) -> list[str]:
    """The trackers of ``logger=`` (a name, ``none``, or a list of names) whose package is installed, for
    ``Accelerator(log_with=...)``. A missing package is skipped with one line naming the pip command."""
    if logger is None:
        return []
    items = [logger] if isinstance(logger, str) else list(logger)
    names: list[str] = []
    for item in items:
        for name in str(item).replace(",", " ").split():
            if name == "none":
                continue
            if name not in TRACKERS:
                raise ValueError(f"logger={name!r} is not a valid choice; available: none, {', '.join(TRACKERS)}")
            if importlib.util.find_spec(name) is None:
                pip = TRACKERS[name]
                print(f"logger={name}: skipped, {pip} is not installed (pip install {pip})", file=sys.stderr)
                continue
            if name not in names:
                names.append(name)
    return names


def _tracker(name: str, run_dir: Path) -> Any:
    """The accelerate tracker object of ``name``, writing inside the run directory (tensorboard: ``tb/``)."""
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker("tb", run_dir)
    if name == "wandb":
        return tracking.WandBTracker(PROJECT, dir=str(run_dir), name=run_dir.name)
    if name == "mlflow":
        return tracking.MLflowTracker(PROJECT, logging_dir=str(run_dir / "mlruns"), run_name=run_dir.name)
    return tracking.TrackioTracker(PROJECT, name=run_dir.name)


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{"train.lr": 1e-4, ...}`` with scalar values (lists as strings), what every tracker takes."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def grid_image(base: Tensor, trained: Tensor) -> np.ndarray:
    """Base samples over trained samples (same prompt and noise per column) as one (H, W, 3) uint8 image.

    Images (B, 3, H, W) in [0, 1] become a two-row grid; 2-D points (toy2d) a scatter plot of both clouds."""
    if base.dim() == 4:
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat([base, trained]).float().clamp(0, 1), nrow=len(base), padding=1, pad_value=1.0)
        return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3), dpi=100)
    ax.scatter(*base.float().T.numpy(), s=4, alpha=0.5, label="base")
    ax.scatter(*trained.float().T.numpy(), s=4, alpha=0.5, label="trained")
    ax.set_aspect("equal")
    ax.legend(fontsize=6)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class TrackerLogger(MetricLogger):
    """`MetricLogger` (``metrics.jsonl``) plus accelerate trackers: ``accelerator.init_trackers`` with the resolved
    config, ``accelerator.log`` of every metric row (same names), a sample grid (base over trained) at each
    evaluation, and the final eval.json (its numbers as ``final/<key>``, the file itself where the tracker keeps
    files). Main process only.

    Args:
        run_dir: the run directory (trackers write inside it: ``tb/``, ``wandb/``, ``mlruns/``).
        accelerator: an ``Accelerator(log_with=tracker_names(...))``; its tracker names become tracker objects that
            write into ``run_dir``.
        config: the resolved run config (flattened for the trackers).
        grid: ``() -> (H, W, 3) uint8`` sample grid, drawn after each evaluation (None = no images during training).
    """

    def __init__(self, run_dir: Path | str, accelerator: Any, config: dict[str, Any], grid: Callable | None = None):
        super().__init__(run_dir, tensorboard=False, enabled=True)
        self.run_dir = Path(run_dir)
        self.accelerator, self.grid = accelerator, grid
        accelerator.log_with = [_tracker(str(t), self.run_dir) for t in accelerator.log_with]
        accelerator.init_trackers(PROJECT, config=flatten_config(config))

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        row = super().log(step, metrics)
        self.accelerator.log({k: v for k, v in row.items() if math.isfinite(v)}, step=step)
        return row

    def log_image(self, step: int, name: str, image: np.ndarray) -> None:
        """One (H, W, 3) uint8 image to every tracker, through its own image call."""
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({name: [image]}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_image(image, key=name.replace("/", "_"), step=step)
            elif tracker.name == "trackio":
                import trackio

                tracker.log({name: trackio.Image(image)}, step=step)

    def wrap_eval(self, eval_fn: Callable[[int], dict[str, float]] | None) -> Callable[[int], dict[str, float]] | None:
        if eval_fn is None or self.grid is None:
            return eval_fn

        def eval_and_grid(update: int) -> dict[str, float]:
            metrics = eval_fn(update)
            rng = torch.get_rng_state()  # the grid's sampling has its own generators; training's RNG is untouched
            self.log_image(update, "samples/base_vs_trained", self.grid())
            torch.set_rng_state(rng)
            return metrics

        return eval_and_grid

    def log_final(self, result: dict[str, Any], run_dir: Path | str) -> None:
        """eval.json's numbers as ``final/<key>`` at the last step, its file, and the final sample grid."""
        run_dir = Path(run_dir)
        step = int(result.get("updates", 0))
        numbers = {f"final/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}
        self.accelerator.log({k: v for k, v in numbers.items() if math.isfinite(v)}, step=step)
        samples = run_dir / "samples.safetensors"
        if samples.exists():
            from safetensors.torch import load_file

            s = load_file(str(samples))
            self.log_image(step, "samples/final", grid_image(s["base"], s["trained"]))
        eval_json = run_dir / "eval.json"
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_text("eval.json", "```\n" + eval_json.read_text() + "\n```", global_step=step)
            elif tracker.name == "wandb":
                tracker.run.save(str(eval_json), base_path=str(run_dir), policy="now")
            elif tracker.name == "mlflow":
                tracker.log_artifact(str(eval_json))

    def close(self) -> None:
        super().close()
        if self.accelerator is not None:
            self.accelerator.end_training()
            self.accelerator = None


def make_logger(
    run_dir: Path | str | None,
    accelerator: Any,
    *,
    config: dict[str, Any],
    enabled: bool = True,
    world: Any = None,
    policy: Any = None,
    base_policy: Any = None,
    eval_cfg: Any = None,
    sampler: Any = None,
    n_grid: int = 8,
) -> MetricLogger:
    """The run's logger: `TrackerLogger` over the accelerator's trackers (``Accelerator(log_with=tracker_names(...))``)
    or, with none (``logger=none``) or off the main process, the plain `MetricLogger` (``metrics.jsonl`` only).

    With ``world``, ``policy``, ``base_policy`` and ``eval_cfg`` the trackers get a sample grid at each evaluation:
    the first ``n_grid`` training prompts, one sample each with the evaluation's noises, base over trained."""
    if not enabled or run_dir is None or accelerator is None or not accelerator.log_with:
        return MetricLogger(run_dir, tensorboard=False, enabled=enabled)
    grid = None
    if world is not None and eval_cfg is not None:
        from rlkit_diffusion.evaluate import EvalConfig, sample_split

        prompts = world.train_prompts[:n_grid]
        cfg = EvalConfig(**{**vars(eval_cfg), "samples_per_prompt": 1})
        cache: dict[str, Tensor] = {}

        def grid() -> np.ndarray:
            if "base" not in cache:  # the base model does not change
                x0 = sample_split(world, base_policy, prompts, cfg, desc="grid base", progress=False)["x0"]
                cache["base"] = world.decode(x0).float().cpu()
            x0 = sample_split(world, policy, prompts, cfg, desc="grid policy", sampler=sampler, progress=False)["x0"]
            return grid_image(cache["base"], world.decode(x0).float().cpu())

    return TrackerLogger(run_dir, accelerator, config, grid)
