"""``python -m benchmarks.report <dir> [<dir> ...] [--out <dir>]`` — run directories → one comparison.

Reads every run directory below the given paths (a directory with ``eval.json``; an unreadable one is skipped with
a warning naming the file), groups runs by their full config minus the seed (a group's name lists the settings that
tell it apart from the other groups of its algorithm), keeps worlds apart (one set of figures per world) and writes
into ``--out`` (default: a new folder ``reports/report-<time>``; never into a run directory):

* ``report.md``   — the comparison table (mean [95% t-interval over seeds], pooled win rate with a caption × seed
  cluster-bootstrap interval), figures and image grids, linked;
* ``report.html`` — the same, self-contained (images inlined);
* ``curves.png``  — gold and proxy reward against each budget axis (updates, UNet NFEs, reward queries, seconds);
* ``frontier.png`` — gold reward vs KL to the reference (the reward–divergence frontier), one point per run;
* ``overopt.png`` — proxy gain vs gold gain per run: points below the diagonal over-optimise the proxy;
* ``grid_<world>.png`` — the same captions and noises: base, then each algorithm, gold score under each image.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.protocol import fmt_ci, pooled_win_rate
from rlkit_diffusion.intervals import t_interval

TABLE_COLUMNS = [
    ("win_rate_vs_base", "win rate", "{:.1%}"),
    ("heldout_win_rate_vs_base", "held-out win", "{:.1%}"),
    ("gold_reward_trained", "gold", "{:.3f}"),
    ("proxy_reward_trained", "proxy", "{:.3f}"),
    ("kl_to_ref", "KL to ref", "{:.2f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("implicit_acc", "implicit acc", "{:.1%}"),
    ("unet_nfe", "train NFE", "{:.3g}"),
    ("reward_queries", "reward queries", "{:.3g}"),
    ("train_wall_s", "train s", "{:.0f}"),
]
BUDGET_AXES = [
    ("budget/updates", "optimizer steps"),
    ("budget/nfe", "UNet NFEs"),
    ("budget/reward_queries", "reward queries"),
    ("budget/wall_s", "wall seconds"),
]


def find_runs(paths: list[Path]) -> list[Path]:
    runs = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"report: {p} does not exist")
        runs += [e.parent for e in sorted(p.rglob("eval.json"))]
    if not runs:
        raise FileNotFoundError(f"report: no run directory (with eval.json) under {', '.join(map(str, paths))}")
    return runs


def load_run(run: Path) -> dict[str, Any] | None:
    """A finished run: its directory, ``eval.json``, ``metrics.jsonl`` rows and resolved ``config.yaml`` (or None).
    None (with a warning naming the file) when ``eval.json`` is unreadable or names no world/algo."""
    from omegaconf import OmegaConf

    try:
        ev = json.loads((run / "eval.json").read_text())
    except (OSError, ValueError) as err:
        print(
            f"report: warning: skipping {run / 'eval.json'}: unreadable ({type(err).__name__}: {err})", file=sys.stderr
        )
        return None
    if not isinstance(ev, dict) or not ev.get("world") or not ev.get("algo"):
        print(f"report: warning: skipping {run / 'eval.json'}: it names no world/algo", file=sys.stderr)
        return None
    metrics = []
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        metrics = last_logged(rows)
    config = OmegaConf.load(run / "config.yaml") if (run / "config.yaml").exists() else None
    return {"dir": run, "eval": ev, "metrics": metrics, "config": config}


def last_logged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metrics.jsonl rows with each (step, kind) logged once — the last time, in step order. A resumed run appends
    again the rows it logged after its last checkpoint (the log is append-only); the curves and the budget readers
    must see each training row and each learning-curve evaluation once, as the finished run computed them."""
    last: dict[tuple[Any, bool], dict[str, Any]] = {}
    for r in rows:
        last[(r.get("step"), any(k.startswith("eval/") for k in r))] = r
    return sorted(last.values(), key=lambda r: (r.get("step") is None, r.get("step") or 0))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal-approximation 95% interval over seeds (0 for a single seed)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(half)


NOT_CONFIG = ("seed", "out_dir", "resume", "resume_override", "report", "device", "label")  # not a configuration


def config_items(r: dict) -> tuple:
    """A run's configuration minus the seed (and where/how it ran), as sorted (dotted key, value) pairs.

    ``train.*`` keys that a run's config.yaml lacks (settings added to `TrainConfig` after the run was made) take
    their current defaults: a setting is added with the default that names the behaviour runs had before it, so an
    older run and a new one with the same settings stay one configuration."""
    import dataclasses

    from omegaconf import OmegaConf

    from rlkit_diffusion.train import TrainConfig

    if r.get("config") is None:
        return ()

    def flat(d: Any, prefix: str = "") -> list[tuple[str, str]]:
        out = []
        for k, v in d.items():
            if isinstance(v, dict):
                out += flat(v, f"{prefix}{k}.")
            elif f"{prefix}{k}".split(".")[0] not in NOT_CONFIG:
                out.append((f"{prefix}{k}", json.dumps(v, sort_keys=True)))
        return out

    cfg = OmegaConf.to_container(r["config"], resolve=True)
    if isinstance(cfg.get("train"), dict):
        cfg["train"] = {**dataclasses.asdict(TrainConfig()), **cfg["train"]}
    return tuple(sorted(flat(cfg)))


def group(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs grouped by (world, algo, label, full config minus the seed); each group's name is the algo (and label),
    plus, when the same algo has several configurations, the settings that differ between them."""
    by_config: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        ev = r["eval"]
        by_config[(ev["world"], ev["algo"], ev.get("label") or "", config_items(r))].append(r)
    siblings: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for world, algo, label, items in by_config:
        siblings[(world, algo, label)].append(dict(items))
    out: dict[tuple[str, str], list[dict]] = {}
    for (world, algo, label, items), rs in by_config.items():
        name = f"{algo} [{label}]" if label and label != algo else algo
        others = siblings[(world, algo, label)]
        if len(others) > 1:
            mine = dict(items)
            keys = sorted({k for o in others for k in {*o, *mine} if o.get(k) != mine.get(k)})
            name += " (" + ", ".join(f"{k}={mine.get(k, '-')}" for k in keys) + ")"
        out[(world, name)] = rs
    return dict(sorted(out.items()))


def table(groups: dict[tuple[str, str], list[dict]]) -> str:
    """Mean [Student-t 95% interval over seeds] of each column (the mean alone for one seed), and the win rate
    pooled over seeds and captions with its two-way cluster bootstrap interval (`benchmarks.protocol`)."""
    cols = [c for c in TABLE_COLUMNS if any(c[0] in r["eval"] for rs in groups.values() for r in rs)]
    head = "| world | algo | seeds | " + " | ".join(c[1] for c in cols) + " | pooled win rate (caption × seed CI) |"
    lines = [head, "|---|---|---|" + "---|" * (len(cols) + 1)]
    for (world, algo), rs in groups.items():
        cells = []
        for key, _, fmt in cols:
            m, lo, hi = t_interval([r["eval"].get(key) for r in rs], key)
            cells.append(fmt_ci({"mean": m, "ci_low": lo, "ci_high": hi}, fmt))
        pooled = pooled_win_rate(rs)
        cells.append("–" if pooled is None else fmt_ci(dict(zip(("mean", "ci_low", "ci_high"), pooled)), "{:.1%}"))
        lines.append(f"| {world} | {algo} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_table(groups: dict[tuple[str, str], list[dict]]) -> str | None:
    """Win rate vs base per caption category (``win_rate_by_category`` of both splits; mean over seeds), or None."""
    keys = ("win_rate_by_category", "heldout_win_rate_by_category")
    cats = sorted({c for rs in groups.values() for r in rs for k in keys for c in r["eval"].get(k, {})})
    if not cats:
        return None
    lines = ["| world | algo | " + " | ".join(cats) + " |", "|---|---|" + "---|" * len(cats)]
    for (world, algo), rs in groups.items():
        cells = []
        for c in cats:
            vals = [r["eval"][k][c]["win_rate"] for r in rs for k in keys if c in r["eval"].get(k, {})]
            cells.append(f"{np.mean(vals):.1%}" if vals else "–")
        lines.append(f"| {world} | {algo} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def group_colours(groups) -> dict:
    """One distinct colour per group: matplotlib's 10-colour cycle, or tab20's 20 colours for more groups (the
    cycle would give two of the leaderboard's 16 modules the same colour)."""
    if len(groups) <= 10:
        return {k: f"C{i}" for i, k in enumerate(groups)}
    cmap = _plt().get_cmap("tab20")
    return {k: cmap(i % 20) for i, k in enumerate(groups)}


def plot_curves(groups, out: Path) -> Path | None:
    """Gold and proxy reward (the periodic evaluations in metrics.jsonl) against each budget axis."""
    series = [
        (k, r) for k, rs in groups.items() for r in rs if any("eval/gold_reward_trained" in m for m in r["metrics"])
    ]
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(BUDGET_AXES), figsize=(4 * len(BUDGET_AXES), 6.5), squeeze=False)
    colours = group_colours(groups)
    for row, (metric, label) in enumerate(
        [("eval/gold_reward_trained", "gold reward"), ("eval/proxy_reward_trained", "proxy reward")]
    ):
        for col, (axis, axis_label) in enumerate(BUDGET_AXES):
            ax = axes[row][col]
            seen = set()
            for key, r in series:
                pts = [(m[axis], m[metric]) for m in r["metrics"] if metric in m and axis in m]
                if not pts:
                    continue
                base = r["eval"].get(metric.removeprefix("eval/").replace("_trained", "_base"))
                if base is not None:  # every curve starts at the base model, budget 0
                    pts = [(0.0, base), *pts]
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=colours[key], alpha=0.8, label=None if key in seen else f"{key[1]} ({key[0]})")
                seen.add(key)
            ax.set_xlabel(axis_label)
            ax.set_ylabel(label)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_scatter(
    groups,
    out: Path,
    x_key: str,
    y_key: str,
    name: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool = False,
    base_x: str | None = None,
    base_y: str | None = None,
) -> Path | None:
    pts = []
    colours = group_colours(groups)
    for key, rs in groups.items():
        for r in rs:
            e = r["eval"]
            if x_key in e and y_key in e:
                x = e[x_key] - (e.get(base_x, 0.0) if base_x else 0.0)
                y = e[y_key] - (e.get(base_y, 0.0) if base_y else 0.0)
                pts.append((key, x, y, colours[key]))
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    seen = set()
    for key, x, y, c in pts:
        ax.scatter(x, y, color=c, label=None if key in seen else key[1], s=30)
        seen.add(key)
    if diagonal:
        lo = min(min(p[1] for p in pts), min(p[2] for p in pts))
        hi = max(max(p[1] for p in pts), max(p[2] for p in pts))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, alpha=0.5)
        ax.axhline(0, color="k", lw=0.5, alpha=0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


CAPTION_CHARS_PER_LINE = 24
"""Wrap width of the captions over the grid's columns (each caption is shown whole)."""


def wrap_caption(caption: str, width: int = CAPTION_CHARS_PER_LINE) -> str:
    """The whole caption on lines of at most ``width`` characters (words longer than that are split)."""
    return textwrap.fill(caption, width=width, break_long_words=True, break_on_hyphens=False) or " "


def grid_figure(
    rows: list[tuple[str, Any, Any]], captions: list[str], title: str | None = None, reward_name: str = "gold"
):
    """The figure of `draw_grid` (returned open, for the caller to save and close)."""
    plt = _plt()
    n = len(captions)
    wrapped = [wrap_caption(c) for c in captions]
    caption_lines = max(w.count("\n") + 1 for w in wrapped)
    name_width = 0.35 + 0.07 * max(len(name) for name, _, _ in rows)  # inches for the row names on the left
    fig_w = name_width + n * 1.25
    fig_h = 0.4 + len(rows) * 1.45 + caption_lines * 0.11 + (0.3 if title else 0.0)
    fig, axes = plt.subplots(len(rows), n, figsize=(fig_w, fig_h), squeeze=False)
    for i, (name, imgs, reward) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.imshow(imgs[j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if reward is not None:
                ax.set_xlabel(f"{reward_name} {float(reward[j]):.2f}", fontsize=6)
            if j == 0:
                ax.set_ylabel(name, fontsize=8, fontweight="bold", rotation=0, ha="right", va="center")
            if i == 0:
                ax.set_title(wrapped[j], fontsize=5.5, linespacing=1.1)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def draw_grid(
    rows: list[tuple[str, Any, Any]],
    captions: list[str],
    path: Path,
    title: str | None = None,
    reward_name: str = "gold",
) -> Path:
    """One row of images per ``(name, images (n, 3, H, W) in [0, 1], reward (n,) or None)``, one column per caption:
    the row's name (the algorithm, or "base") on its left in bold, each caption whole (wrapped) over its column,
    and ``"<reward_name> <value>"`` under each image."""
    fig = grid_figure(rows, captions, title, reward_name)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def image_grid(groups, out: Path) -> list[Path]:
    """Per world: base samples, then one row per algorithm (first seed), same captions/noises, gold under each."""
    from safetensors.torch import load_file

    paths = []
    by_world: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    for (world, algo), rs in groups.items():
        f = rs[0]["dir"] / "samples.safetensors"
        if f.exists():
            by_world[world].append(
                (algo, load_file(str(f)) | {"_meta": json.loads((rs[0]["dir"] / "samples.json").read_text())})
            )
    for world, items in by_world.items():
        first = items[0][1]
        if first["base"].ndim != 4:  # toy2d points have no picture
            continue
        rows = [("base", first["base"], first["base_gold"])] + [(a, d["trained"], d["trained_gold"]) for a, d in items]
        title = f"{world}: same captions and noises (gold reward under each image)"
        path = draw_grid(rows, first["_meta"]["prompts"], out / f"grid_{world}.png", title)
        paths.append(path)
    return paths


def figures(groups, out: Path) -> list[tuple[str, Path]]:
    """Every figure of a comparison (written into ``out``): ``[(title, path)]``, those with data only. Worlds are
    kept apart (their rewards are on different scales): with several worlds, each gets its own figures in
    ``out/<world>/``."""
    worlds = sorted({w for w, _ in groups})
    if len(worlds) > 1:
        figs = []
        for world in worlds:
            sub = out / world
            sub.mkdir(exist_ok=True)
            part = {k: v for k, v in groups.items() if k[0] == world}
            figs += [(f"{world}: {t}", p) for t, p in _world_figures(part, sub)]
        return figs
    return _world_figures(groups, out)


def _world_figures(groups, out: Path) -> list[tuple[str, Path]]:
    figs: list[tuple[str, Path | None]] = [
        ("Learning curves against each budget axis", plot_curves(groups, out)),
        (
            "Reward–KL frontier",
            plot_scatter(
                groups,
                out,
                "kl_to_ref",
                "gold_reward_trained",
                "frontier.png",
                "KL to reference (path, nats)",
                "gold reward",
            ),
        ),
        (
            "Over-optimisation: proxy gain vs gold gain (below the diagonal = the proxy is gamed)",
            plot_scatter(
                groups,
                out,
                "proxy_reward_trained",
                "gold_reward_trained",
                "overopt.png",
                "proxy reward gain over base",
                "gold reward gain over base",
                diagonal=True,
                base_x="proxy_reward_base",
                base_y="gold_reward_base",
            ),
        ),
    ]
    figs += [("Samples: base vs each algorithm", p) for p in image_grid(groups, out)]
    return [(t, p) for t, p in figs if p is not None]


def find_sections(paths: list[Path]) -> list[Path]:
    """Experiment directories (``experiment.json`` + ``section.md``, `benchmarks.experiments`) below ``paths``."""
    return [e.parent for p in paths for e in sorted(p.rglob("experiment.json")) if (e.parent / "section.md").exists()]


def is_run_dir(path: Path) -> bool:
    return (path / "eval.json").exists() or (path / "checkpoints").exists() or (path / "config.yaml").exists()


def new_report_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        out = Path("reports") / (f"report-{stamp}" + (f"-{n}" if n else ""))
        if not out.exists():
            return out
    raise FileExistsError("report: no free folder name under reports/")


def run_links(r: dict, out: Path) -> list[tuple[str, str]]:
    """Links of a run for the report (relative to the report's folder): its config and, once exported
    (``python -m benchmarks.export``), its model card."""
    links = []
    for title, f in (("config", r["dir"] / "config.yaml"), ("exported model", r["dir"] / "export" / "README.md")):
        if f.exists():
            links.append((title, os.path.relpath(f.resolve(), out.resolve())))
    return links


def write_report(paths: list[Path], out: Path | None = None) -> Path:
    """Write the comparison of the runs below ``paths`` into ``out`` (default: the first path if it is not a run
    directory, else a new folder ``reports/report-<time>``). `benchmarks.run` passes its own run directory."""
    runs = [r for r in (load_run(d) for d in find_runs(paths)) if r is not None]
    if not runs:
        raise FileNotFoundError(f"report: no readable eval.json under {', '.join(map(str, paths))}")
    out = out or (paths[0] if not is_run_dir(paths[0]) else new_report_dir())
    out.mkdir(parents=True, exist_ok=True)
    groups = group(runs)
    figs = figures(groups, out)
    md = [
        "# rlkit-diffusion report",
        "",
        f"{len(runs)} runs, {len(groups)} groups (world, algo, config minus the seed).",
        "",
        table(groups),
        "",
    ]
    by_category = category_table(groups)
    if by_category:
        md += ["## Win rate vs base by caption category", "", by_category, ""]
    for title, p in figs:
        md += [f"## {title}", "", f"![{title}]({os.path.relpath(p, out)})", ""]
    sections = find_sections(paths)
    for d in sections:  # paper-style experiments: their own sections, image links made relative to the report
        text = (d / "section.md").read_text()
        for img in sorted(d.glob("*.png")):
            rel = os.path.relpath(img, out.resolve()) if out.resolve() != d.resolve() else img.name
            text = text.replace(f"]({img.name})", f"]({rel})")
        md += [text, ""]
    md += ["## Runs", ""] + [
        f"- `{r['dir']}` " + " · ".join(f"[{t}]({u})" for t, u in run_links(r, out)) for r in runs
    ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    body = [f"<h1>rlkit-diffusion report</h1><p>{len(runs)} runs.</p>", _md_table_to_html(table(groups))]
    seen = {p.resolve() for _, p in figs}
    extra = [(f"{d.name}: {i.stem}", i) for d in sections for i in sorted(d.glob("*.png")) if i.resolve() not in seen]
    for title, p in figs + extra:
        b64 = base64.b64encode(p.read_bytes()).decode()
        body.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{b64}'/>")
    for d in sections:
        body.append(f"<pre>{html.escape((d / 'section.md').read_text())}</pre>")
    items = []
    for r in runs:
        links = " · ".join(f"<a href='{html.escape(u)}'>{t}</a>" for t, u in run_links(r, out))
        items.append(f"<li><code>{html.escape(str(r['dir']))}</code> {links}</li>")
    body.append("<h2>Runs</h2><ul>" + "".join(items) + "</ul>")
    (out / "report.html").write_text(
        "<html><head><meta charset='utf-8'><style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style>"
        "</head><body>" + "\n".join(body) + "</body></html>"
    )
    return out / "report.md"


def _md_table_to_html(md: str) -> str:
    rows = [r.strip("|").split("|") for r in md.splitlines() if not r.startswith("|---")]
    head = "".join(f"<th>{html.escape(c.strip())}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="run directories or folders containing them")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a new reports/report-<time>)")
    args = ap.parse_args(argv)
    if args.out is not None and is_run_dir(args.out):
        sys.exit(f"report: --out {args.out} is a run directory; refusing to write into it")
    path = write_report(args.paths, args.out or new_report_dir())
    print(f"report: {path}")


if __name__ == "__main__":
    main()
