"""The schema of ``eval.json`` (version 1): one typed record per run, the same for every algorithm.

Fields are the evaluation of `rlkit_diffusion.evaluate` (formulas in its module docstring) plus the run's cost.
Metrics of the held-out split carry the prefix ``heldout_``; every mean has ``_median``, ``_ci_low`` and
``_ci_high`` companions where stated. Extra keys are allowed (world- or algorithm-specific metrics);
``python -m benchmarks.eval_schema <eval.json>`` validates a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class EvalRecord:
    """Required content of eval.json."""

    schema_version: int
    """Always 1 for this layout."""
    algo: str
    world: str
    seed: int
    win_rate_vs_base: float
    """Fraction of (caption, noise) pairs where the trained sample beats the base's under the gold reward (ties ½)."""
    win_rate_vs_base_ci_low: float
    """Bootstrap 95% interval of the win rate (lower end)."""
    win_rate_vs_base_ci_high: float
    gold_reward_base: float
    """Mean gold reward of the base model's samples (training captions)."""
    gold_reward_trained: float
    kl_to_ref: float
    """Path KL Σ_t KL(π_θ ‖ π_base) along policy samples (nats); NaN for inference-time procedures."""
    diversity: float
    """World diversity (shapes: entropy of caption-unspecified attributes, nats)."""
    unet_nfe: int
    """UNet function evaluations spent in training (samples × forwards; reference forwards included)."""
    reward_queries: int
    """Images scored by a reward model during training."""
    wall_s: float
    """Wall seconds of the whole run (build, train, evaluate)."""
    peak_mem_mb: float
    """Peak resident memory (CPU) or peak allocated CUDA memory, MiB."""


OPTIONAL_FLOAT_KEYS = [
    "heldout_win_rate_vs_base",
    "heldout_win_rate_vs_base_ci_low",
    "heldout_win_rate_vs_base_ci_high",
    "proxy_reward_base",
    "proxy_reward_trained",
    "implicit_acc",
    "best_of_n_equivalent",
    "best_of_n_equivalent_by_proxy",
    "inference_nfe_per_sample",
    "inference_nfe_per_sample_base",
    "distance_to_optimum_base",
    "distance_to_optimum_trained",
]


def validate(record: dict[str, Any]) -> None:
    """Raise ValueError naming the first missing or mistyped field of an eval.json record."""
    if record.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"eval.json: schema_version must be {SCHEMA_VERSION}, got {record.get('schema_version')!r}")
    for f in dataclasses.fields(EvalRecord):
        if f.name not in record:
            raise ValueError(f"eval.json: missing field {f.name!r}")
        v = record[f.name]
        want = {"int": int, "float": (int, float), "str": str}[f.type]
        if isinstance(v, bool) or not isinstance(v, want):
            raise ValueError(f"eval.json: field {f.name!r} must be {f.type}, got {type(v).__name__}")
    for key in OPTIONAL_FLOAT_KEYS:
        if key in record and not isinstance(record[key], (int, float)):
            raise ValueError(f"eval.json: field {key!r} must be a number, got {type(record[key]).__name__}")
    for key in ("win_rate_vs_base", "heldout_win_rate_vs_base"):
        v = record.get(key)
        if v is not None and not (math.isnan(v) or 0.0 <= v <= 1.0):
            raise ValueError(f"eval.json: {key} must be in [0, 1], got {v}")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of eval.json (required fields and their types)."""
    types = {"int": "integer", "float": "number", "str": "string"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rlkit-diffusion eval.json",
        "type": "object",
        "required": [f.name for f in dataclasses.fields(EvalRecord)],
        "properties": {f.name: {"type": types[f.type]} for f in dataclasses.fields(EvalRecord)}
        | {k: {"type": "number"} for k in OPTIONAL_FLOAT_KEYS},
        "additionalProperties": True,
    }


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(json.dumps(json_schema(), indent=2))
        return
    for path in args:
        validate(json.loads(Path(path).read_text()))
        print(f"{path}: valid (schema v{SCHEMA_VERSION})")


if __name__ == "__main__":
    main()
