"""``experiment=leaderboard`` and ``experiment=paper_claims``: the two report sections of the benchmark protocol.

Both run through `benchmarks.experiments.run` (seeds, resumability, progress); this module builds their run lists
(``sweep.grid``) and writes their tables.

Leaderboard (``sweep.grid``: algos × one training budget, ``train.eval_points`` learning-curve evaluations):

* **equal training NFEs** at each of ``params.budgets`` (the lower levels are read off the learning curve at that
  budget fraction — the same run, constant learning rate — the top level is the final evaluation);
* **matched KL**: gold reward and win rate interpolated along each seed's (KL, gold) path at ``params.kl_levels``
  (`benchmarks.protocol.matched_kl`; "not reached or not resolved" when a run never moves that far, or its curve
  has no evaluation near that level);
* **at convergence**: the final evaluation, with ``plateau`` = the last learning-curve step changed the gold reward
  by less than ``params.plateau_tol`` (relative to the base→final gain) on average over seeds;
* every number is a mean over seeds with a Student-t 95% interval over seeds; win rates are pooled over seeds and
  captions (two-way cluster bootstrap);
* off-policy rows (algorithms trained on a fixed pair set) carry their **data cost** — the UNet NFEs and reward /
  label queries that generated and labelled the pairs they consumed — in its own columns (`data_cost`);
* **beside another world** (``params.beside``: that world's leaderboard ``.json``, e.g. the ε-UNet shapes rows beside
  the flow ones): the gold win rate against each world's own base, side by side at the common top budget (`beside`).

Paper claims (`section_paper_claims`): each claim of ``params.claims`` names a rule of `CLAIM_RULES`; the table is
claim | section | the paper's number | measured (mean [95% CI over seeds]) | holds / does not hold / inconclusive,
with the decision rule stated under it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from benchmarks import protocol
from benchmarks.lifecycle import ConfigError
from benchmarks.tune import EDGE, NO_GAIN
from rlkit_diffusion.checkpoint import atomic_write_json
from rlkit_diffusion.intervals import t_interval

# --------------------------------------------------------------------------------------------------------------
# Run lists
# --------------------------------------------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs"
NO_TRAINING = ("best_of_n",)
"""Modules that train nothing (inference-time procedures): one run each, no budget."""


def expand_grid(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """``sweep.grid`` → ``sweep.runs``: for each algo of ``grid.algos`` (``all`` = every registered module) one run at
    the top budget of ``params.budgets`` (training NFEs) with ``grid.eval_points`` curve evaluations."""
    from algos import ALGOS

    grid = sweep["grid"]
    algos = sorted(ALGOS) if grid.get("algos", "all") == "all" else list(grid["algos"])
    budgets = sorted(float(b) for b in sweep.get("params", {}).get("budgets", [19200]))
    budget, points = budgets[-1], int(grid.get("eval_points", 4))
    off = [b for b in budgets[:-1] if points < 1 or abs(b * points / budget - round(b * points / budget)) > 1e-9]
    if off:
        raise ConfigError(
            f"sweep.params.budgets: {', '.join(f'{b:g}' for b in off)} is not on the learning curve of {points} "
            f"evaluation(s) up to {budget:g} NFEs (every {budget / max(points, 1):g}): the table at that level would "
            f"have no evaluation; choose sweep.grid.eval_points so that {budget:g}/eval_points divides each budget"
        )
    extra = list(grid.get("overrides", []))
    runs = []
    for algo in algos:
        if algo in NO_TRAINING:
            runs.append({"label": algo, "overrides": [f"algo={algo}", *extra]})
            continue
        over = [f"algo={algo}", "budget.kind=nfe", f"budget.amount={budget:g}", "train.steps=1000000000"]
        over += [f"train.eval_points={points}", *extra]
        runs.append({"label": algo, "overrides": over})
    return runs


# --------------------------------------------------------------------------------------------------------------
# Data cost of off-policy algorithms
# --------------------------------------------------------------------------------------------------------------
def is_pair_based(algo: str) -> bool:
    """Trained on a fixed set of labelled pairs (its config has ``labels``: DPO, DPO-L2, SFT, ...)."""
    import dataclasses

    from algos import algo_config_class

    try:
        return any(f.name == "labels" for f in dataclasses.fields(algo_config_class(algo)))
    except ValueError:
        return False


PAIRS_SAMPLING_STEPS = 20
"""Sampling steps of the base-model images in shapes' shipped pair set (`worlds/shapes/prepare.py`)."""


def pairs_cost_per_pair(world: str) -> tuple[float, float, float]:
    """(UNet NFEs, reward/label queries) spent to make one training pair of ``world``'s shipped pair set, and the
    number of pairs in it (inf where pairs are drawn afresh).

    shapes (``assets/shapes_pairs/pairs_stats.json``): a fraction ``generator_mix.base_model`` of the images was
    sampled by the base model (`PAIRS_SAMPLING_STEPS` NFEs each), the rest rendered (no UNet); both images of every
    drawn pair were scored by the gold reward to draw its label (ties redrawn: ``train_ties_dropped`` extra pairs).
    shapes_flow trains on the same pair set. toy2d: pairs are data draws (no UNet) labelled by the reward (2 queries a
    pair)."""
    if world not in ("shapes", "shapes_flow"):
        return 0.0, 2.0, math.inf
    import rlkit_diffusion.worlds

    assets = Path(rlkit_diffusion.worlds.__file__).parent / "assets"
    stats = json.loads((assets / "shapes_pairs" / "pairs_stats.json").read_text())
    drawn = stats["train_pairs"] + stats.get("train_ties_dropped", 0)
    per_pair_drawn = drawn / stats["train_pairs"]
    nfe = 2 * stats["generator_mix"].get("base_model", 0.0) * PAIRS_SAMPLING_STEPS * per_pair_drawn
    return float(nfe), float(2 * per_pair_drawn), float(stats["train_pairs"])


def data_cost(run: dict[str, Any]) -> dict[str, float] | None:
    """The NFEs and label queries behind the pairs a pair-based run consumed — pairs drawn (updates × pairs per
    update over all processes), at most the pair set: a pair drawn again cost nothing more to make — or None for an
    on-policy run."""
    e, cfg = run["eval"], run.get("config")
    if not is_pair_based(e.get("algo", "")):
        return None
    procs = int(e.get("environment", {}).get("num_processes", 1) or 1)  # train.batch_size is per process
    batch = int(cfg.train.batch_size) * int(cfg.train.get("grad_accum", 1)) * procs if cfg is not None else 0
    nfe, queries, pair_set = pairs_cost_per_pair(e.get("world", ""))
    pairs = min(e.get("updates", 0) * batch, pair_set)
    return {"pairs": float(pairs), "data_nfe": nfe * pairs, "label_queries": queries * pairs}


# --------------------------------------------------------------------------------------------------------------
# Leaderboard
# --------------------------------------------------------------------------------------------------------------
def at_budget(run: dict[str, Any], key: str, level: float, top: bool = False) -> float:
    """``key`` at ``level`` training NFEs. The run's final evaluation when ``level`` is its own budget (``top``) or
    when it ended within one training step of ``level``; else the learning-curve evaluation logged within one step at
    or past ``level`` (a step's NFEs: ``unet_nfe / updates``); NaN when there is none — never a later point."""
    e = run["eval"]
    final = float(e.get("unet_nfe", 0))
    step = final / max(float(e.get("updates", 0) or 0), 1.0)  # NFEs of one training step
    if e.get("algo") in NO_TRAINING or (top and final >= level * 0.98) or level * 0.98 <= final < level + step:
        return float(e.get(key, math.nan))
    for m in run.get("metrics", []):
        if f"eval/{key}" in m and level * 0.98 <= m.get("budget/nfe", -1.0) < level + step:
            return float(m[f"eval/{key}"])
    return math.nan


def plateau(seeds: list[dict[str, Any]]) -> float:
    """The last learning-curve step's share of the total gain, on the row's seed-mean gold curve:
    |gold(last) − gold(previous)| / max(|gold(last) − gold(base)|, noise), where noise is the half-width of the
    final gold reward's 95% interval (caption bootstrap, mean over seeds): a run that never moved is flat, not
    "still moving" by a ratio of two small numbers. NaN with fewer than two curve points."""
    curves = [
        [m["eval/gold_reward_trained"] for m in s.get("metrics", []) if "eval/gold_reward_trained" in m] for s in seeds
    ]
    n = min((len(c) for c in curves), default=0)
    if n < 2:
        return math.nan
    mean = np.mean([c[:n] for c in curves], axis=0)  # (n,) seed-mean curve
    base = float(np.mean([s["eval"]["gold_reward_base"] for s in seeds]))
    halves = [
        (s["eval"]["gold_reward_trained_ci_high"] - s["eval"]["gold_reward_trained_ci_low"]) / 2
        for s in seeds
        if "gold_reward_trained_ci_high" in s["eval"]
    ]
    noise = float(np.mean(halves)) if halves else 0.0
    scale = max(abs(mean[-1] - base), noise)
    return float(abs(mean[-1] - mean[-2]) / scale) if scale > 0 else 0.0


def _cell(values: list[float], fmt: str = "{:.3f}", key: str | None = None) -> tuple[str, dict[str, float]]:
    m, lo, hi, n = _t(values, key)
    d = {"mean": m, "ci_low": lo, "ci_high": hi, "n": n}
    return protocol.fmt_ci(d, fmt), d


def code_versions(seed_runs: list[dict[str, Any]]) -> dict[str, int]:
    """How many runs each version of the code made: ``{"<commit[:7]> (sources <sha[:12]>)": runs}`` from each
    ``eval.json``'s ``environment.code`` (``"not recorded"`` for runs from before it was), in first-seen order. An
    experiment continued under newer code (another session, `benchmarks.records`) has more than one."""
    counts: dict[str, int] = {}
    for r in seed_runs:
        code = r["eval"].get("environment", {}).get("code") or {}
        if code.get("source_sha256"):
            commit = (code.get("commit") or "outside git")[:7] + ("+changes" if code.get("dirty") else "")
            key = f"{commit} (sources {code['source_sha256'][:12]})"
        else:
            key = "not recorded"
        counts[key] = counts.get(key, 0) + 1
    return counts


def code_sentence(versions: dict[str, int], runs: int) -> str:
    """The page's sentence naming the code behind its runs (`code_versions`)."""
    if len(versions) == 1:
        (key,) = versions
        return "The code of every run: not recorded." if key == "not recorded" else f"Every run's code: {key}."
    listed = "; ".join(f"{key}: {n}" for key, n in versions.items())
    return (
        f"Its {runs} runs were made by {len(versions)} versions of the code (runs per version: {listed}; each "
        "run's `eval.json` names its own, `environment.code`)."
    )


def write_page(
    path: Path, docs_out: str | None, title: str, lines: list[str], record: Any, runs: list[dict], params: dict
) -> None:
    """A section's Markdown page ``# title``, the line naming the command that wrote it (``params["command"]``, set
    by `benchmarks.experiments.run`) with its runs' count and run time, then ``lines``; its record (``.json`` next
    to it, with the same provenance) at ``path`` and, if given, at ``docs_out`` too."""
    seeds = [s for r in runs for s in r.get("seed_runs", [r])]
    wall = sum(float(s["eval"].get("wall_s", 0.0)) for s in seeds)
    command_wall, k = params.get("command_wall_s"), int(params.get("invocations") or 1)
    head = (
        f"Written by `{params.get('command', 'python -m benchmarks.run experiment=<name>')}`: {len(seeds)} runs, "
        f"{wall / 3600:.2f} h of run time (the sum of each run's build + train + evaluate wall seconds; the command "
        "trains `jobs` runs at once); "
        + (
            f"the command's wall time {command_wall / 3600:.2f} h over {k} invocation{'s' if k > 1 else ''}."
            if command_wall is not None
            else "the command's wall time is not recorded for every run (runs made before invocations were kept)."
        )
    )
    versions = code_versions(seeds)
    record = {
        **record,
        "command": params.get("command"),
        "runs": len(seeds),
        "runs_wall_s": wall,
        "command_wall_s": command_wall,
        "code": versions,
    }
    head += " " + code_sentence(versions, len(seeds))
    for page in [path, *([Path(docs_out)] if docs_out else [])]:
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"# {title}\n\n{head}\n\n" + "\n".join(lines) + "\n")
        atomic_write_json(page.with_suffix(".json"), record, default=float)


def section_leaderboard(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    budgets = sorted(float(b) for b in params.get("budgets", [19200]))
    levels = tuple(float(k) for k in params.get("kl_levels", protocol.KL_LEVELS))
    tol = float(params.get("plateau_tol", 0.1))
    world = runs[0]["eval"].get("world") if runs else None
    record: dict[str, Any] = {"world": world, "budgets": budgets, "kl_levels": levels, "rows": []}
    pool_own = own_rows_everywhere(runs)
    lines = []
    for level in budgets:
        lines += [
            f"### At {level:,.0f} training UNet NFEs",
            "",
            "| algo | seeds | gold reward | win rate vs base (gold) | win rate by its own reward | KL to base | "
            "data cost: NFEs | data cost: label queries |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            seeds = r.get("seed_runs", [r])
            e = r["eval"]
            top = level == budgets[-1]
            gold, gold_d = _cell([at_budget(s, "gold_reward_trained", level, top) for s in seeds])
            win, win_d = _cell([at_budget(s, "win_rate_vs_base", level, top) for s in seeds], "{:.1%}", "win_rate")
            if level == budgets[-1] or e.get("algo") in NO_TRAINING:  # the final evaluation: pooled win rate
                pooled = protocol.pooled_win_rate(seeds)
                if pooled is not None:
                    win_d = dict(zip(("mean", "ci_low", "ci_high"), pooled))
                    win = protocol.fmt_ci(win_d, "{:.1%}") + " (pooled)"
            kl, kl_d = _cell([at_budget(s, "kl_to_ref", level, top) for s in seeds], "{:.1f}", "kl_to_ref")
            trains = e.get("algo") not in NO_TRAINING  # an inference-time row optimises no weights
            own = _own_reward_win(seeds, pool_own) if level == budgets[-1] and trains else ("–", None)
            costs = [data_cost(s) for s in seeds]
            nfe_c = "–" if costs[0] is None else f"{np.mean([c['data_nfe'] for c in costs]):,.0f}"
            q_c = "–" if costs[0] is None else f"{np.mean([c['label_queries'] for c in costs]):,.0f}"
            lines.append(
                f"| {e.get('label') or e['algo']} | {len(seeds)} | {gold} | {win} | {own[0]} | {kl} | "
                f"{nfe_c} | {q_c} |"
            )
            record["rows"].append(
                {
                    "algo": e.get("label") or e["algo"],
                    "budget_nfe": level,
                    "seeds": [s["eval"].get("seed") for s in seeds],
                    "gold": gold_d,
                    "win_rate": win_d,
                    "win_rate_own_reward": own[1],
                    "kl": kl_d,
                    "data_cost": costs[0] and {k: float(np.mean([c[k] for c in costs])) for k in costs[0]},
                }
            )
        lines.append("")
    lines += [
        "### At matched KL to the base",
        "",
        "| algo | " + " | ".join(f"{k:g} nats: gold / win" for k in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    record["matched_kl"] = {}
    for r in runs:
        mk = protocol.matched_kl(r.get("seed_runs", [r]), levels)
        name = r["eval"].get("label") or r["eval"]["algo"]
        record["matched_kl"][name] = mk
        cells = []
        for k in levels:
            c = mk.get(f"{k:g}")
            if not c or not c["reached"]:
                cells.append("not reached or not resolved" if c else "no KL (inference-time)")
            else:
                seeds_text = f"{c['reached']} seed" + ("s" if c["reached"] > 1 else "")
                cells.append(
                    f"{protocol.fmt_ci(c['gold'])} / {protocol.fmt_ci(c['win_rate'], '{:.1%}')} ({seeds_text})"
                )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### At convergence (the final evaluation)",
        "",
        "| algo | gold reward | KL to base | last curve step / total gain | plateaued |",
        "|---|---|---|---|---|",
    ]
    record["convergence"] = {}
    for r in runs:
        seeds = r.get("seed_runs", [r])
        name = r["eval"].get("label") or r["eval"]["algo"]
        gold, gold_d = _cell([s["eval"].get("gold_reward_trained", math.nan) for s in seeds])
        kl, _ = _cell([s["eval"].get("kl_to_ref", math.nan) for s in seeds], "{:.1f}", "kl_to_ref")
        share = plateau(seeds)
        flat = "–" if not math.isfinite(share) else ("yes" if share <= tol else "no: still moving")
        record["convergence"][name] = {"gold": gold_d, "last_step_share": share, "plateaued": flat}
        lines.append(f"| {name} | {gold} | {kl} | {'–' if not math.isfinite(share) else f'{share:.2f}'} | {flat} |")
    lines += not_improved(runs, budgets[-1], pool_own)
    lines += tuning_summary(runs)
    if params.get("beside"):
        lines += beside(record, Path(params["beside"]), params.get("docs_out"))
    lines += [
        "",
        "Means over seeds with Student-t 95% intervals over seeds, cut to the metric's range (a win rate in [0, 1], "
        "a KL ≥ 0: with three seeds the t-interval can pass those bounds, the true value cannot); the final win "
        "rates are pooled over seeds and captions (two-way cluster bootstrap). Lower budget levels are the "
        "learning-curve evaluation of the same runs at that budget fraction (fewer draws per caption). Plateaued = "
        f"on the seed-mean curve, the last step moved gold by ≤ {tol:.0%} of the total gain (or of the final gold's "
        "interval half-width, if the gain is "
        "smaller). The reward a row optimises is its pairs' labels for pair-based rows (the data's labels: gold on "
        "shapes) and the training reward for the others. Data cost = the UNet NFEs and label queries that generated "
        "and labelled the pairs a pair-based run drew, at most the pair set (`benchmarks.leaderboard.data_cost`); "
        "on-policy runs pay inside their training NFEs / reward queries. "
        + (
            "The win rates by the own reward are pooled over seeds and captions too."
            if pool_own
            else "The win rates by the own reward have t-intervals over seeds (some runs keep no per-sample rows "
            "of that reward to pool)."
        ),
    ]
    write_page(out / "leaderboard.md", params.get("docs_out"), "Leaderboard", lines, record, runs, params)
    return lines


def _top_rows(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A leaderboard record's rows at its top budget, by algorithm."""
    top = max(record["budgets"])
    return {r["algo"]: r for r in record["rows"] if r["budget_nfe"] == top}


def record_world(record: dict[str, Any]) -> str:
    """The world of a leaderboard record: its ``world`` key, or for a record from before that key was written, the
    ``world=`` of its command, or without one the default world of ``benchmarks/conf/config.yaml``."""
    if record.get("world"):
        return record["world"]
    for token in (record.get("command") or "").split():
        if token.startswith("world="):
            return token.split("=", 1)[1]
    defaults = OmegaConf.to_container(OmegaConf.load(Path(__file__).parent / "conf" / "config.yaml").defaults)
    return next(d["world"] for d in defaults if isinstance(d, dict) and "world" in d)


def _side(a: dict | None, b: dict | None) -> str:
    """Which of two intervals lies wholly above the other: ``"this"``, ``"that"``, or ``"overlap"``."""
    if not a or not b or not all(math.isfinite(c.get(k, math.nan)) for c in (a, b) for k in ("ci_low", "ci_high")):
        return "–"
    return "this" if a["ci_low"] > b["ci_high"] else "that" if b["ci_low"] > a["ci_high"] else "overlap"


def beside(record: dict[str, Any], other_path: Path, docs_out: str | None) -> list[str]:
    """The rows of this leaderboard beside another world's (``sweep.params.beside``: its ``.json`` record, e.g. the
    ε-UNet shapes leaderboard beside the flow one): per algorithm, the gold win rate against each world's own base
    and the gold reward, at the common top budget. Only the win rate against the own base compares improvements
    across worlds: the two bases differ (their gold levels differ), and the path KL depends on the sampler's noise.
    A row says which world's interval lies wholly above the other's, or that they overlap (not the same thing as no
    difference). Refuses another record at a different top budget."""
    if not other_path.is_file():
        raise ConfigError(f"sweep.params.beside: {other_path} is not a leaderboard record (a leaderboard .json)")
    other = json.loads(other_path.read_text())
    if not {"budgets", "rows"} <= other.keys():
        raise ConfigError(f"sweep.params.beside: {other_path} is not a leaderboard record (no budgets and rows)")
    if max(other["budgets"]) != max(record["budgets"]):
        raise ConfigError(
            f"sweep.params.beside: {other_path} stops at {max(other['budgets']):,.0f} training NFEs, this "
            f"leaderboard at {max(record['budgets']):,.0f}: rows side by side must share their budget"
        )
    here, there = _top_rows(record), _top_rows(other)
    page = other_path.with_suffix(".md")
    link = page.as_posix() if not docs_out else Path(os.path.relpath(page, Path(docs_out).parent)).as_posix()
    this_name, that_name = record.get("world") or "this world", record_world(other)
    lines = [
        "",
        f"### Beside [{that_name}]({link}) at {max(record['budgets']):,.0f} training UNet NFEs",
        "",
        f"This world ({this_name}) and [that one]({link}): the same algorithms at the same tuned settings, budget "
        "and evaluation. The gold win rate against each world's own base measures each one's improvement; the "
        "bases differ, so the gold rewards are shown but do not compare improvements, and the path KL is left out "
        "(it depends on the sampler's noise).",
        "",
        f"| algo | win rate vs base (gold): {this_name} | {that_name} | higher interval | "
        f"gold reward: {this_name} | {that_name} |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for algo in [*here, *(a for a in there if a not in here)]:
        a, b = here.get(algo), there.get(algo)
        win_a, win_b = (r and r["win_rate"] for r in (a, b))
        higher = _side(win_a, win_b)
        side = {"this": this_name, "that": that_name}.get(higher, higher)
        cells = [protocol.fmt_ci(win_a, "{:.1%}"), protocol.fmt_ci(win_b, "{:.1%}"), side]
        cells += [protocol.fmt_ci(a and a["gold"]), protocol.fmt_ci(b and b["gold"])]
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
        rows.append({"algo": algo, "higher": side})
    record["beside"] = {"record": other_path.as_posix(), "world": that_name, "rows": rows}
    return lines


def not_improved(runs: list[dict], budget: float, pool: bool = True) -> list[str]:
    """One line per trained row whose win rate by its own reward does not clear ½ (its interval's lower end ≤ 50%):
    what was measured, and the evidence of its tuning sweep (`tuning_page`) — did any trial of the sweep raise the
    proxy reward above the base on the tuning seed?"""
    lines = []
    for r in runs:
        e = r["eval"]
        if e.get("algo") in NO_TRAINING:
            continue
        text, d = _own_reward_win(r.get("seed_runs", [r]), pool)
        if d is None or not math.isfinite(d["ci_low"]) or d["ci_low"] > 0.5:
            continue
        name, page = e.get("label") or e["algo"], tuning_page(str(e.get("world", "")), str(e["algo"]))
        if page is None:
            why = "it has no tuning sweep on this world"
        elif NO_GAIN in page.read_text():
            why = f"no trial of [its tuning sweep](tuning/{page.name}) raised the proxy reward above the base either"
        else:
            why = (
                f"[its tuning sweep](tuning/{page.name}) raised the proxy reward on the tuning seed, which the "
                "reporting seeds do not confirm"
            )
        lines.append(
            f"- **{name}** is not shown to improve the reward it optimises at {budget:,.0f} NFEs (win rate by it "
            f"{text}, the interval's lower end at or below 50%): "
            f"{why}."
        )
    if not lines:
        return []
    return ["", "### Rows not shown to improve their own reward", "", *lines]


def tuning_summary(runs: list[dict]) -> list[str]:
    """A section naming, for each trained row, the sweep behind its settings and the knobs whose chosen value lies at
    the edge of that sweep's grid (where the optimum may lie outside it): how far each row's tuning can be trusted."""
    lines = [
        "",
        "### The tuning behind each row",
        "",
        "| algo | tuning sweep | chosen value at the edge of its grid in |",
    ]
    lines.append("|---|---|---|")
    for r in runs:
        e = r["eval"]
        name = e.get("label") or e["algo"]
        if e.get("algo") in NO_TRAINING:
            lines.append(f"| {name} | – (trains nothing) | – |")
            continue
        page = tuning_page(str(e.get("world", "")), str(e["algo"]))
        if page is None:
            lines.append(f"| {name} | none on this world | – |")
            continue
        text = page.read_text()
        at = text.index(EDGE) + len(EDGE) if EDGE in text else -1
        edge = text[at:].split(":", 1)[0].strip() if at >= 0 else "neither knob"
        lines.append(f"| {name} | [{page.stem}](tuning/{page.name}) | {edge} |")
    return lines


def tuning_page(world: str, algo: str) -> Path | None:
    """``docs/tuning/<w>_<algo>.md`` of the sweep behind ``conf/tuning/<world>_<algo>.yaml``: its own, or that of
    the tuning file it takes whole (shapes_flow → shapes); None when there is none."""
    from benchmarks.wiring import CONF_DIR, taken_whole

    conf = CONF_DIR / "tuning" / f"{world}_{algo}.yaml"
    stem = f"{world}_{algo}"
    if conf.exists():
        stem = next(iter(taken_whole(conf)), stem)
    page = DOCS / "tuning" / f"{stem}.md"
    return page if page.exists() else None


DATA_LABELS = ("data", "pairs")
"""``labels`` values that mean the world's own preference data (DPO family: ``data``; KTO: ``pairs``, the same pairs
taken apart), as opposed to a reward model's name (AI feedback)."""


def eval_and_train_rewards(run: dict) -> tuple[str, str]:
    """(the evaluation's reward ``eval.reward``, the training reward ``reward``) of a run's config (gold, proxy
    without one)."""
    cfg = run.get("config")
    if cfg is None:
        return "gold", "proxy"
    return str(cfg.get("eval", {}).get("reward", "gold")), str(cfg.get("reward", "proxy"))


def optimised_reward(run: dict) -> str:
    """The reward a run optimises: for a pair-based run the reward behind its pairs' labels (``labels=<reward>``;
    `DATA_LABELS`: the world's preference data, whose stand-in in the evaluation is its own reward, ``eval.reward``),
    for the others the training reward (``reward``)."""
    cfg = run.get("config")
    if cfg is None:
        return "gold"
    eval_reward = eval_and_train_rewards(run)[0]
    labels = cfg.get("algo", {}).get("labels")
    if labels is not None:
        return eval_reward if labels in DATA_LABELS else str(labels)
    return str(cfg.get("reward", eval_reward))


def _own_rows_key(seeds: list[dict]) -> str | None:
    """The ``per_sample.npz`` rows of the reward the runs optimised: ``wins`` (the evaluation's reward) or
    ``proxy_wins`` (the training reward); None for another reward."""
    name, (eval_reward, train_reward) = optimised_reward(seeds[0]), eval_and_train_rewards(seeds[0])
    return "wins" if name == eval_reward else ("proxy_wins" if name == train_reward else None)


def own_rows_everywhere(runs: list[dict]) -> bool:
    """Whether every seed of every trained row keeps the per-sample rows of the reward it optimises (runs evaluated
    before ``proxy_wins`` was kept do not): the own-reward win rates are pooled for all rows or for none, so that one
    column holds one kind of interval."""
    for r in runs:
        seeds = r.get("seed_runs", [r])
        if r["eval"].get("algo") in NO_TRAINING:
            continue
        key = _own_rows_key(seeds)
        for x in seeds:
            rows = protocol.load_per_sample(x["dir"]) if "dir" in x else None
            if key is None or rows is None or f"train/{key}" not in rows:
                return False
    return True


def _own_reward_win(seeds: list[dict], pool: bool = True) -> tuple[str, dict | None]:
    """Win rate vs base under the reward the runs optimised (`optimised_reward`): pooled over seeds and captions
    (two-way cluster bootstrap) when ``pool`` and ``per_sample.npz`` holds its rows, else a t-interval over seeds,
    and for a single seed its own caption interval."""
    name = optimised_reward(seeds[0])
    key = _own_rows_key(seeds)
    pooled = protocol.pooled_win_rate(seeds, key=key) if pool and key and all("dir" in x for x in seeds) else None
    if pooled is not None:
        d = dict(zip(("mean", "ci_low", "ci_high"), pooled)) | {"n": len(seeds), "reward": name}
        return protocol.fmt_ci(d, "{:.1%}") + f" ({name})", d
    held = [(x, v) for x in seeds if (v := _win_under(x, name)) is not None]  # the seeds that report it
    vals = [v for _, v in held]
    if not vals:
        return "–", None
    if len(vals) == 1:  # one seed: its caption-bootstrap interval
        s = held[0][0]["eval"]
        by = s.get("win_rate_vs_base_by_reward", {}).get(name)
        lo, hi = (
            (by["ci_low"], by["ci_high"])
            if by
            else (s.get("win_rate_vs_base_ci_low"), s.get("win_rate_vs_base_ci_high"))
        )
        d = {"mean": vals[0], "ci_low": float(lo), "ci_high": float(hi), "n": 1, "reward": name}
        return protocol.fmt_ci(d, "{:.1%}") + f" ({name})", d
    text, d = _cell(vals, "{:.1%}", "win_rate")
    return text + f" ({name})", d | {"reward": name}


# --------------------------------------------------------------------------------------------------------------
# Paper claims
# --------------------------------------------------------------------------------------------------------------
def verdict(lo: float, hi: float, threshold: float) -> str:
    """holds: the whole 95% interval above ``threshold``; does not hold: the whole interval below; else
    inconclusive (a single seed — no interval — is always inconclusive)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if lo > threshold:
        return "holds"
    if hi < threshold:
        return "does not hold"
    return "inconclusive"


def _by_label(runs: list[dict]) -> dict[str, dict]:
    return {r["eval"].get("label") or r["eval"]["algo"]: r for r in runs}


def _seed_values(run: dict, key: str) -> dict[int, float]:
    return {s["eval"]["seed"]: float(s["eval"].get(key, math.nan)) for s in run.get("seed_runs", [run])}


def _t(values: list[float], key: str | None = None) -> tuple[float, float, float, int]:
    """(mean, low, high, n): the t-interval over the finite values and how many there were (a claim states its n,
    so that an interval over two seeds is not read as one over three)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return (*t_interval(finite, key), len(finite))


def _paired_diff(a: dict, b: dict, key: str, key_b: str | None = None) -> tuple[float, float, float, int]:
    va, vb = _seed_values(a, key), _seed_values(b, key_b or key)
    return _t([va[s] - vb[s] for s in sorted(set(va) & set(vb))])


def _claim_win(runs, c):
    r = _by_label(runs)[c["run"]]
    key = c.get("key", "win_rate_vs_base")
    seeds = r.get("seed_runs", [r])
    pooled = protocol.pooled_win_rate(seeds, "heldout" if key.startswith("heldout_") else "train")
    if pooled is not None and len(seeds) > 1:
        return (*pooled, len(seeds)), 0.5, "pooled win rate vs base (caption × seed bootstrap) > 50%"
    return _t(list(_seed_values(r, key).values()), key), 0.5, f"{key} > 50% (t over seeds)"


def _claim_diff(runs, c):
    by = _by_label(runs)
    key = c.get("key", "gold_reward_trained")
    return (
        _paired_diff(by[c["run"]], by[c["other"]], key),
        0.0,
        f"{c['run']} − {c['other']} in {key}, paired by seed, > 0",
    )


def _betas_in_order(runs, c) -> list[str]:
    """The claim's labels (``c["runs"]``) sorted by their ``algo.beta``."""
    by = _by_label(runs)
    return [lab for _, lab in sorted((float(_cfg_value(by[lab], "algo.beta")), lab) for lab in c["runs"])]


def _claim_beta_kl(runs, c):
    """β controls the KL: it falls at every step of β — the smallest of the adjacent drops KL(β_i) − KL(β_{i+1}),
    paired by seed (the adjacent pair whose mean drop is smallest), > 0."""
    by, order = _by_label(runs), _betas_in_order(runs, c)
    drops = [_paired_diff(by[a], by[b], "kl_to_ref") for a, b in zip(order, order[1:])]
    rule = "KL falls at every step of β: the smallest adjacent drop KL(β_i) − KL(β_i+1), paired by seed, > 0"
    return min(drops, key=lambda d: d[0]), 0.0, rule


def _claim_beta_interior(runs, c):
    """Reward has an interior optimum in β: per seed, the best ``key`` (default gold) of the interior βs − the best
    of the two end βs, > 0 (t over seeds)."""
    by, order = _by_label(runs), _betas_in_order(runs, c)
    if len(order) < 3:
        raise ValueError(f"an interior optimum needs at least 3 values of β, got {len(order)}")
    key = c.get("key", "gold_reward_trained")
    vals = {lab: _seed_values(by[lab], key) for lab in order}
    seeds = sorted(set.intersection(*(set(v) for v in vals.values())))
    diffs = [max(vals[lab][s] for lab in order[1:-1]) - max(vals[order[0]][s], vals[order[-1]][s]) for s in seeds]
    rule = f"per seed, best {key} at an interior β − best at the smallest or largest β, > 0 (t over seeds)"
    return _t(diffs), 0.0, rule


def _claim_diff_at_kl(runs, c):
    """``run`` − ``other`` in gold reward where each seed's learning curve reaches ``level`` nats of KL to the base
    (`protocol.value_at_kl`), paired by seed, > 0; a seed whose curve does not reach or resolve it is left out."""
    by, level = _by_label(runs), float(c.get("level", 25.0))

    def at_level(r: dict) -> dict[int, float]:
        out = {}
        for s in r.get("seed_runs", [r]):
            path = protocol.kl_path(s)
            out[s["eval"]["seed"]] = protocol.value_at_kl(path["kl"], path["gold"], level)
        return out

    va, vb = at_level(by[c["run"]]), at_level(by[c["other"]])
    rule = (
        f"{c['run']} − {c['other']} in gold reward at {level:g} nats of KL to the base (each seed's curve, evaluated "
        f"within a factor {protocol.RESOLVE_RATIO:g} of the level), > 0"
    )
    return _t([va[s] - vb[s] for s in sorted(set(va) & set(vb))]), 0.0, rule


def _gold_at_step(seed_run: dict, step: int) -> float:
    """Gold reward after ``step`` optimizer steps: the final evaluation if the run made exactly that many, else its
    learning-curve evaluation logged at that step (training captions, fewer draws); NaN when it has neither."""
    if int(seed_run["eval"].get("updates", -1)) == step:
        return float(seed_run["eval"]["gold_reward_trained"])
    for m in seed_run.get("metrics", []):
        if m.get("step") == step and "eval/gold_reward_trained" in m:
            return float(m["eval/gold_reward_trained"])
    return math.nan


def _claim_diff_at_updates(runs, c):
    """``run`` − ``other`` in gold reward after the same number of optimizer steps — ``run``'s own count (the
    paper's matching: SFT trained "for the same length schedule as DPO"), paired by seed, > 0."""
    by = _by_label(runs)
    a, b = by[c["run"]].get("seed_runs", [by[c["run"]]]), by[c["other"]].get("seed_runs", [by[c["other"]]])
    other = {s["eval"]["seed"]: s for s in b}
    diffs = []
    for s in a:
        step = int(s["eval"]["updates"])
        if s["eval"]["seed"] in other:
            diffs.append(_gold_at_step(s, step) - _gold_at_step(other[s["eval"]["seed"]], step))
    rule = (
        f"{c['run']} − {c['other']} in gold reward after {c['run']}'s number of optimizer steps (for {c['other']} its "
        "learning-curve evaluation at that step when it trained longer), paired by seed, > 0"
    )
    return _t(diffs), 0.0, rule


def _claim_table2(runs, c):
    r = _by_label(runs)[c["run"]]
    diff = _paired_diff(r, r, "implicit_acc", c.get("versus", "reward_acc_proxy"))
    return (
        diff,
        -float(c.get("margin", 0.05)),
        f"implicit_acc − {c.get('versus', 'reward_acc_proxy')} > −{c.get('margin', 0.05)}",
    )


def _claim_diagonal(runs, c):
    """Fig. 6: the run trained on labels of reward R wins more often under R than under the other reward."""
    by = _by_label(runs)
    diffs = []
    for lab, own, other in c["pairs"]:
        r = by[lab]
        vals = {}
        for s in r.get("seed_runs", [r]):
            own_w, other_w = _win_under(s, own), _win_under(s, other)
            if own_w is not None and other_w is not None:
                vals[s["eval"]["seed"]] = own_w - other_w
        diffs.append(vals)
    seeds = sorted(set.intersection(*[set(d) for d in diffs])) if diffs else []
    return (
        _t([np.mean([d[s] for d in diffs]) for s in seeds]),
        0.0,
        "mean over rows of (win under own − under other) > 0",
    )


def _win_under(run: dict, reward: str) -> float | None:
    """Win rate vs base under ``reward``: ``win_rate_vs_base_by_reward`` (``eval.rewards``), or the headline win rate
    when ``reward`` is the evaluation's own reward (``eval.reward``, gold by default)."""
    by = run["eval"].get("win_rate_vs_base_by_reward", {})
    if reward in by:
        return float(by[reward]["win_rate"])
    return float(run["eval"]["win_rate_vs_base"]) if reward == eval_and_train_rewards(run)[0] else None


def _claim_s8(runs, c):
    """S8: the base draws n at which P(best of n base draws beats one trained draw) = ½, > ``threshold``. A seed
    whose evaluation never reaches ½ within its draws per caption m is censored (the value is m, a lower bound):
    with a threshold at or above a censored seed's m the claim cannot be decided (no interval, inconclusive)."""
    r = _by_label(runs)[c["run"]]
    vals = _seed_values(r, "s8_base_draws_for_half")
    censored = _seed_values(r, "s8_base_draws_for_half_censored")
    need = float(c.get("threshold", 1))
    rule = f"base draws for P(best-of-n base beats DPO) = ½ (S8), > {need:g}"
    capped = [vals[s] for s in vals if censored.get(s, 0.0) == 1.0]
    m, lo, hi, n = _t(list(vals.values()), "draws")
    if capped and need >= min(capped):
        return (m, math.nan, math.nan, n), need, rule + f" — censored at {min(capped):g} draws: not decidable"
    return (m, lo, hi, n), need, rule


def _claim_overopt(runs, c):
    """Reward backprop over-optimises the proxy relative to DPO: gold gain per unit of proxy gain, ``run`` (DPO on
    the proxy's labels: every row optimises the proxy) − the mean of ``others`` (DRaFT, AlignProp), paired by seed,
    > 0. A seed whose proxy did not rise has no ratio and is left out (n says how many remain)."""
    by = _by_label(runs)

    def ratio(r: dict) -> dict[int, float]:
        g, p = _seed_values(r, "gold_reward_trained"), _seed_values(r, "proxy_reward_trained")
        gb, pb = _seed_values(r, "gold_reward_base"), _seed_values(r, "proxy_reward_base")
        return {s: (g[s] - gb[s]) / (p[s] - pb[s]) if p[s] > pb[s] else math.nan for s in g}

    base = ratio(by[c["run"]])
    diffs = []
    for other in c["others"]:
        ro = ratio(by[other])
        diffs.append({s: base[s] - ro[s] for s in base if s in ro})
    seeds = sorted(set.intersection(*[set(d) for d in diffs])) if diffs else []
    return (
        _t([np.mean([d[s] for d in diffs]) for s in seeds]),
        0.0,
        (f"gold gain per unit proxy gain: {c['run']} − mean of {', '.join(c['others'])} > 0 (paired by seed)"),
    )


def _cfg_value(run: dict, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(run["config"], key)


CLAIM_RULES = {
    "win": _claim_win,
    "diff": _claim_diff,
    "diff_at_kl": _claim_diff_at_kl,
    "diff_at_updates": _claim_diff_at_updates,
    "beta_kl": _claim_beta_kl,
    "beta_interior": _claim_beta_interior,
    "table2": _claim_table2,
    "diagonal": _claim_diagonal,
    "s8": _claim_s8,
    "overopt": _claim_overopt,
}


def section_paper_claims(runs: list[dict], params: dict[str, Any], out: Path) -> list[str]:
    lines = [
        "| claim | section | the paper's number | measured: mean [95% CI over seeds] (n) | verdict |",
        "|---|---|---|---|---|",
    ]
    rules, record = [], []
    for c in params["claims"]:
        try:
            (m, lo, hi, n), threshold, rule = CLAIM_RULES[c["rule"]](runs, c)
        except KeyError as err:  # a run (or a metric) the claim reads is not in this experiment
            m = lo = hi = math.nan
            n, threshold, rule = 0, math.nan, f"not measured: {err.args[0]!r} missing from this experiment's runs"
        except (ValueError, TypeError, ZeroDivisionError) as err:  # a claim that cannot be computed stays a row
            m = lo = hi = math.nan
            n, threshold, rule = 0, math.nan, f"not measured: {err}"
        v = verdict(lo, hi, threshold)
        cell = protocol.fmt_ci({"mean": m, "ci_low": lo, "ci_high": hi}, c.get("fmt", "{:.3f}"))
        if math.isfinite(m):
            cell = f"{cell} ({n})"
        else:
            cell = f"– ({rule})" if rule.startswith("not measured") else "– (no seed measured)"
        lines.append(f"| {c['claim']} | {c['section']} | {c['paper']} | {cell} | {v} |")
        rules.append(f"* {c['claim']}: {rule}.")
        measured = {"mean": m, "ci_low": lo, "ci_high": hi, "n": n}
        record.append({**c, "measured": measured, "verdict": v, "rule_text": rule})
    lines += [
        "",
        "Decision rule: **holds** when the whole 95% interval is on the claim's side of its threshold, **does not "
        "hold** when the whole interval is on the other side, **inconclusive** otherwise (and always with one seed). "
        "(n) is the number of seeds (or seed pairs) behind the interval. Per claim:",
        "",
        *rules,
    ]
    title = "The paper's claims, measured"
    write_page(out / "paper_claims.md", params.get("docs_out"), title, lines, {"claims": record}, runs, params)
    return lines
