"""``python -m benchmarks.run experiment=tune algo=<name> [world=shapes]`` — an equal, recorded tuning budget.

Every algorithm gets the same number of trials: the learning rate × ``tune.lr_factors`` crossed with its main knob
(`KNOBS`, declared per algorithm) × ``tune.knob_factors`` — 3 × 3 = 9 trials by default — around its current tuning
file (an integer knob's values stay valid: `KNOB_FLOORS`). Every trial trains for the same UNet NFEs,
``tune.budget_nfe`` — the leaderboard's top budget, spent as the leaderboard spends it (``budget.kind=nfe``) — so a
knob that changes the cost of a step (batch size, DRaFT's K, AlignProp's K_min) trades steps for cost at equal
compute, and an algorithm is tuned at the budget it is reported at (``tune.budget_nfe=null``: ``train.steps``
steps, a batch-size knob scaling them by the inverse factor). Each trial runs on every tuning seed
(`benchmarks.protocol.TUNING_SEEDS`, disjoint from the reporting seeds). The rule that picks the winner (`pick`):
**the highest mean proxy reward of the trained policy over the tuning seeds** — the reward a practitioner can see;
the gold reward (the evaluation's truth) is never looked at — ties within ``tune.tie_tol`` broken by the smaller KL
to the base. It writes ``conf/tuning/<world>_<algo>.yaml`` (only ``algo``/``train``/``reference``
keys, as `benchmarks.wiring.check_tuning` requires; with an NFE budget its ``train.steps`` is the chosen trial's
update count, so that the default run spends that budget too) and ``docs/tuning/<world>_<algo>.md`` with the sweep
table, each trial's training NFEs in it.
Finished trials are reused when the same directory is run again (``hydra.run.dir=<dir>``).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf

from benchmarks import protocol
from benchmarks.report import load_run
from benchmarks.wiring import hydra_output_dir, resume_if_started
from rlkit_diffusion.checkpoint import atomic_write_text

KNOBS: dict[str, str] = {
    "dpo": "algo.beta",
    "dpo_l2": "algo.beta",
    "rethink_dpo": "algo.beta",
    "sft": "train.batch_size",
    "ddpo": "train.batch_size",
    "dpok": "algo.kl_coef",
    "draft": "algo.k",
    "draft_lv": "algo.k",
    "alignprop": "algo.k_min",
}
"""The one main knob tuned beside the learning rate, per algorithm (others: ``train.batch_size``)."""
NOT_TUNED = {"best_of_n": "trains nothing: its only knob N is an inference cost, reported as such"}
INTEGER_KNOBS = ("train.batch_size", "algo.k", "algo.k_min")
KNOB_FLOORS: dict[str, int] = {"algo.k": 2, "algo.k_min": 2}
"""The smallest valid value of an integer knob. DRaFT's K = 1 alone is the identity last step of a DDIM schedule that
ends at t = 0 (ᾱ_prev = ᾱ_t: `algos.draft` refuses it), so a grid that would reach below the floor is scaled up
until its smallest value is the floor: K₀ = 2 with factors ½, 1, 2 gives {2, 4, 8}, not {1, 2, 4}."""


def knob_of(algo: str) -> str:
    return KNOBS.get(algo, "train.batch_size")


def knob_values(knob: str, k0: float, factors: list[float]) -> list[float | int]:
    """The knob's values, one per factor: ``k0 × factor``; integer knobs rounded, at least 1, and scaled up as a
    whole to `KNOB_FLOORS` when the smallest would fall below it."""
    if knob not in INTEGER_KNOBS:
        return [float(k0 * f) for f in factors]
    values = [max(1, int(round(k0 * f))) for f in factors]
    floor = KNOB_FLOORS.get(knob, 1)
    scale = floor / min(values) if min(values) < floor else 1.0
    return [int(round(v * scale)) for v in values]


def trial_grid(cfg: DictConfig) -> list[dict[str, Any]]:
    """The trials: ``{"train.lr": ..., <knob>: ...}`` around the composed (currently tuned) values."""
    t = cfg.tune
    knob = knob_of(cfg.algo.name)
    lr0, k0 = float(cfg.train.lr), OmegaConf.select(cfg, knob)
    knobs = knob_values(knob, k0, list(t.knob_factors))
    budget_nfe = t.get("budget_nfe")
    trials = []
    for fl, k in itertools.product(t.lr_factors, knobs):
        trial = {"train.lr": float(f"{lr0 * fl:.3g}"), knob: k}
        if budget_nfe is not None:  # the same NFEs in every trial, whatever a step costs
            trial["budget.amount"] = float(budget_nfe)
        elif knob == "train.batch_size":  # the same NFEs in every trial: twice the batch, half the steps
            trial["train.steps"] = max(1, int(round(int(cfg.train.steps) * k0 / k)))
        trials.append(trial)
    return trials


def trial_config(cfg: DictConfig, trial: dict[str, Any], seed: int) -> DictConfig:
    """One trial's run config: the tuning config at ``seed`` with the trial's values; an NFE budget is spent as the
    leaderboard spends it (``budget.kind=nfe``, steps unbounded)."""
    sub = OmegaConf.merge(cfg, {"seed": seed, "seeds": None, "report": False, "experiment": None})
    if "budget.amount" in trial:
        OmegaConf.update(sub, "budget.kind", "nfe")
        OmegaConf.update(sub, "train.steps", 1_000_000_000)
    for key, value in trial.items():
        OmegaConf.update(sub, key, value)
    return sub


def pick(rows: list[dict[str, Any]], tie_tol: float) -> int:
    """The stated rule: highest mean proxy reward over the tuning seeds; within ``tie_tol`` of it, the smallest KL."""
    best = max(r["proxy"] for r in rows if math.isfinite(r["proxy"]))
    near = [i for i, r in enumerate(rows) if math.isfinite(r["proxy"]) and r["proxy"] >= best - tie_tol]
    return min(near, key=lambda i: (rows[i]["kl"] if math.isfinite(rows[i]["kl"]) else math.inf, -rows[i]["proxy"]))


def run(cfg: DictConfig, run_one) -> dict[str, Any]:
    """Run the sweep (reusing finished trials), pick, write the tuning file and its table. Returns the record."""
    algo, world = cfg.algo.name, cfg.world.name
    if algo in NOT_TUNED:
        raise ValueError(f"experiment=tune algo={algo}: not tuned — {NOT_TUNED[algo]}")
    t = cfg.tune
    seeds = protocol.resolve_seeds(OmegaConf.to_container(t.seeds), protocol.TUNING_SEEDS)
    if set(seeds) & set(protocol.REPORTING_SEEDS):
        raise ValueError(f"tune.seeds={seeds} overlaps the reporting seeds {list(protocol.REPORTING_SEEDS)}")
    exp_dir = Path(hydra_output_dir() or Path(cfg.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-tune-{world}_{algo}")
    trials, knob = trial_grid(cfg), knob_of(algo)
    rows, t0 = [], time.perf_counter()
    for i, trial in enumerate(trials):
        runs = []
        for seed in seeds:
            run_dir = exp_dir / "trials" / f"{i:02d}" / f"s{seed}"
            print(f"[tune {world}_{algo}] trial {i + 1}/{len(trials)} {trial} seed {seed}", flush=True)
            if not (run_dir / "eval.json").exists():
                run_dir.mkdir(parents=True, exist_ok=True)
                run_one(resume_if_started(trial_config(cfg, trial, seed), run_dir), run_dir=run_dir)
            runs.append(check_trial(load_run(run_dir), trial, run_dir))
        keys = ("proxy_reward_trained", "kl_to_ref", "proxy_reward_base", "unet_nfe", "updates")
        vals = {k: [r["eval"].get(k, math.nan) for r in runs] for k in keys}
        rows.append(
            {
                **trial,
                "proxy": float(np.mean(vals["proxy_reward_trained"])),
                "proxy_base": float(np.mean(vals["proxy_reward_base"])),
                "run_wall_s": float(sum(r["eval"].get("wall_s", 0.0) for r in runs)),  # the trial's own runs
                "kl": float(np.mean(vals["kl_to_ref"])),
                "per_seed_proxy": vals["proxy_reward_trained"],
                "nfe": float(np.mean(vals["unet_nfe"])),
                "updates": float(np.mean(vals["updates"])),
            }
        )
    chosen = pick(rows, float(t.tie_tol))
    record = {
        "world": world,
        "algo": algo,
        "knob": knob,
        "seeds": seeds,
        "trials": rows,
        "chosen": chosen,
        "rule": RULE,
        "wall_s": time.perf_counter() - t0,
    }
    write_outputs(cfg, record, Path(t.conf_dir), Path(t.docs_dir))
    return record


def check_trial(run: dict[str, Any] | None, trial: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A reused trial directory must hold a run of exactly this trial's settings: a grid centred elsewhere (the
    tuning file changed since the directory was made) would otherwise relabel old runs with new values."""
    if run is None or run["config"] is None:
        raise ValueError(f"{run_dir}: not a finished run (eval.json or config.yaml unreadable); remove it to rerun")
    for key, value in trial.items():
        held = OmegaConf.select(run["config"], key)
        if held is None or not math.isclose(float(held), float(value), rel_tol=1e-6):
            raise ValueError(
                f"{run_dir} holds a run with {key}={held}, not this grid's {value}: the grid is centred on the "
                "current tuning file, which changed since this sweep ran; tune into a new directory"
            )
    return run


NO_GAIN = "No trial raised the proxy reward above the base model's"
"""How a sweep page says that no trial beat the base (read back by `benchmarks.leaderboard.not_improved`)."""
EDGE = "The chosen trial is at the edge of the grid in"
"""How a sweep page says that a knob's chosen value is its grid's first or last (read back by
`benchmarks.leaderboard.tuning_summary`)."""
RULE = (
    "highest mean proxy reward of the trained policy over the tuning seeds (gold never consulted); trials within "
    "tune.tie_tol of it: the smallest KL to the base"
)


def write_outputs(cfg: DictConfig, record: dict[str, Any], conf_dir: Path, docs_dir: Path) -> tuple[Path, Path]:
    """``<conf_dir>/<world>_<algo>.yaml`` (the current algo/train/reference settings with the chosen trial's values)
    and ``<docs_dir>/<world>_<algo>.md`` (the sweep table)."""
    world, algo, knob = record["world"], record["algo"], record["knob"]
    chosen = record["trials"][record["chosen"]]
    tuned: dict[str, Any] = {}
    current = Path(__file__).parent / "conf" / "tuning" / f"{world}_{algo}.yaml"
    if current.exists():
        tuned = yaml.safe_load(current.read_text()) or {}
    tuned = {k: v for k, v in tuned.items() if k in ("algo", "train", "reference")}
    for key in [k for k in ("train.lr", knob, "train.steps") if k in chosen]:
        group, name = key.split(".")
        tuned.setdefault(group, {})[name] = chosen[key]
    if "budget.amount" in chosen and math.isfinite(chosen.get("updates", math.nan)):
        tuned.setdefault("train", {})["steps"] = int(round(chosen["updates"]))  # the default run: the same budget
    conf_dir.mkdir(parents=True, exist_ok=True)
    docs_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / f"{world}_{algo}.yaml"
    head = (
        f"# @package _global_\n# {algo} on {world}: written by `python -m benchmarks.run experiment=tune algo={algo} "
        f"world={world}` ({len(record['trials'])} trials × seeds {record['seeds']}; table: docs/tuning/{world}_{algo}"
        f".md).\n# Rule: {RULE}.\n"
    )
    atomic_write_text(conf, head + yaml.safe_dump(tuned, sort_keys=False))
    lrs = sorted({r["train.lr"] for r in record["trials"]})
    knobs = sorted({r[knob] for r in record["trials"]})
    edge = [
        name
        for name, values, value in (("learning rate", lrs, chosen["train.lr"]), (knob, knobs, chosen[knob]))
        if value in (values[0], values[-1])
    ]
    steps = "train.steps" in chosen  # a batch-size knob: each trial's steps keep its NFEs equal
    nfe_budget = chosen.get("budget.amount")
    base = [r["proxy_base"] for r in record["trials"] if math.isfinite(r.get("proxy_base", math.nan))]
    run_wall = sum(r.get("run_wall_s", 0.0) for r in record["trials"])
    lines = [
        f"# Tuning of {algo} on {world}",
        "",
        f"Command: `python -m benchmarks.run experiment=tune algo={algo} world={world}` ({len(record['trials'])} "
        f"trials: learning rate × {knob}"
        + (", train.steps scaled by 1/batch so that every trial costs the same NFEs" if steps else "")
        + (f", each trained for {nfe_budget:g} UNet NFEs (budget.kind=nfe)" if nfe_budget else "")
        + f") on tuning seeds {record['seeds']}; rule: {RULE}. Chosen: trial "
        f"{record['chosen'] + 1}. Run time of the trials {run_wall:.0f} s."
        + (f" The base model's proxy reward: {base[0]:.4f}." if base else ""),
        "",
        *(
            [
                f"{NO_GAIN} (best {chosen['proxy']:.4f} vs "
                f"{base[0]:.4f}): within this grid and budget {algo} did not improve its training reward on the "
                "tuning seeds; the chosen file is the least harmful trial.",
                "",
            ]
            if base and chosen["proxy"] <= base[0]
            else []
        ),
        *(
            [
                f"{EDGE} {' and '.join(edge)}: the optimum may lie outside "
                "it; the same command run again centres a new grid on the chosen values.",
                "",
            ]
            if edge
            else []
        ),
        f"| trial | lr | {knob} |{' train.steps |' * steps} updates | train NFEs | proxy reward (mean over seeds) "
        "| per seed | KL to base | chosen |",
        "|---|---|---|" + "---|" * steps + "---|---|---|---|---|---|",
    ]
    for i, r in enumerate(record["trials"]):
        per = ", ".join(f"{v:.3f}" for v in r["per_seed_proxy"])
        mark = "✓" if i == record["chosen"] else ""
        cells = [f"{i + 1}", f"{r['train.lr']:g}", f"{r[knob]:g}", *([f"{r['train.steps']}"] if steps else [])]
        cells += [f"{r.get('updates', math.nan):.0f}", f"{r.get('nfe', math.nan):.0f}"]
        lines.append(f"| {' | '.join(cells)} | {r['proxy']:.4f} | {per} | {r['kl']:.2f} | {mark} |")
    doc = docs_dir / f"{world}_{algo}.md"
    atomic_write_text(doc, "\n".join(lines) + "\n")
    print(f"[tune {world}_{algo}] chosen trial {record['chosen'] + 1}: {chosen}; wrote {conf} and {doc}", flush=True)
    return conf, doc
