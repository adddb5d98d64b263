"""benchmarks.report on fake run directories, and eval.json schema validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.eval_schema import validate
from benchmarks.report import main as report_main

BASE = {
    "schema_version": 1,
    "world": "shapes",
    "win_rate_vs_base_ci_low": 0.4,
    "win_rate_vs_base_ci_high": 0.9,
    "gold_reward_base": 4.0,
    "proxy_reward_base": 6.0,
    "diversity": 0.8,
    "unet_nfe": 1000,
    "reward_queries": 0,
    "wall_s": 10.0,
    "peak_mem_mb": 100.0,
    "heldout_win_rate_vs_base": 0.6,
}


def _fake_run(root, algo: str, seed: int, win: float, gold: float, kl: float):
    d = root / f"{algo}-s{seed}"
    d.mkdir(parents=True)
    ev = {
        **BASE,
        "algo": algo,
        "seed": seed,
        "win_rate_vs_base": win,
        "gold_reward_trained": gold,
        "proxy_reward_trained": gold + 2.5,
        "kl_to_ref": kl,
        "train_wall_s": 5.0,
    }
    (d / "eval.json").write_text(json.dumps(ev))
    rows = [
        {
            "step": s,
            "eval/gold_reward_trained": gold * s / 10,
            "eval/proxy_reward_trained": gold,
            "budget/updates": s,
            "budget/nfe": 100 * s,
            "budget/reward_queries": 0,
            "budget/wall_s": s / 2,
        }
        for s in (5, 10)
    ]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    g = torch.Generator().manual_seed(seed)
    save_file(
        {
            "base": torch.rand(3, 3, 16, 16, generator=g),
            "trained": torch.rand(3, 3, 16, 16, generator=g),
            "base_gold": torch.rand(3, generator=g),
            "trained_gold": torch.rand(3, generator=g),
        },
        str(d / "samples.safetensors"),
    )
    (d / "samples.json").write_text(json.dumps({"prompts": ["a red circle", "a blue square", "a cross"]}))
    return ev


def test_report_on_two_algorithms_with_two_seeds(tmp_path):
    for seed in (0, 1):
        validate(_fake_run(tmp_path, "dpo", seed, 0.70 + 0.1 * seed, 4.6, 100.0))
        validate(_fake_run(tmp_path, "ddpo", seed, 0.50, 4.1 + seed * 0.2, 900.0))
    report_main([str(tmp_path), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| shapes | dpo | 2 | 75.0% [11.5%, 100.0%]" in md  # 0.75 ± t_{0.975,1}·std/√2 = 12.706·0.0707/√2, cut at 1
    assert "| shapes | ddpo | 2 |" in md
    for png in ("curves.png", "frontier.png", "overopt.png", "grid_shapes.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000, png
    assert "data:image/png;base64" in (tmp_path / "report" / "report.html").read_text()


def test_schema_rejects_missing_and_mistyped_fields():
    ev = {**BASE, "algo": "dpo", "seed": 0, "win_rate_vs_base": 0.7, "gold_reward_trained": 4.5, "kl_to_ref": 1.0}
    validate(ev)
    with pytest.raises(ValueError, match="missing field 'kl_to_ref'"):
        validate({k: v for k, v in ev.items() if k != "kl_to_ref"})
    with pytest.raises(ValueError, match="'seed' must be int"):
        validate({**ev, "seed": "zero"})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        validate({**ev, "win_rate_vs_base": 1.5})


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory"):
        report_main([str(tmp_path)])


def _with_config(d, **settings):
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create({"seed": 0, "out_dir": "runs", **settings}), d / "config.yaml")


def test_report_groups_by_config_minus_seed_and_never_writes_into_a_run(tmp_path, monkeypatch, capsys):
    from benchmarks.report import find_runs, group, load_run

    runs = tmp_path / "runs"
    for seed in (0, 1):
        for steps in (10, 20):
            d = runs / f"dpo-{steps}-s{seed}"
            d.mkdir(parents=True)
            (d / "eval.json").write_text(json.dumps({**BASE, "algo": "dpo", "seed": seed, "win_rate_vs_base": 0.6}))
            _with_config(d, seed=seed, algo={"name": "dpo", "beta": 5.0}, train={"steps": steps})
    (runs / "broken").mkdir()
    (runs / "broken" / "eval.json").write_text('{"algo": "dp')  # truncated
    (runs / "empty").mkdir()
    (runs / "empty" / "eval.json").write_text("{}")
    toy = runs / "toy-s0"
    toy.mkdir()
    (toy / "eval.json").write_text(json.dumps({**BASE, "world": "toy2d", "algo": "dpo", "seed": 0, "kl_to_ref": 1.0}))
    loaded = [r for r in (load_run(d) for d in find_runs([runs])) if r is not None]
    err = capsys.readouterr().err
    assert f"report: warning: skipping {runs / 'broken' / 'eval.json'}: unreadable (JSONDecodeError" in err
    assert f"report: warning: skipping {runs / 'empty' / 'eval.json'}: it names no world/algo" in err
    groups = group(loaded)
    assert sorted(groups) == [("shapes", "dpo (train.steps=10)"), ("shapes", "dpo (train.steps=20)"), ("toy2d", "dpo")]
    assert all(len(rs) == 2 for k, rs in groups.items() if k[0] == "shapes")  # two seeds each, never mixed
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (runs / "dpo-10-s0").iterdir())
    report_main([str(runs / "dpo-10-s0"), str(runs / "dpo-20-s0")])  # default --out: a new folder
    assert sorted(p.name for p in (runs / "dpo-10-s0").iterdir()) == before
    (out,) = (tmp_path / "reports").iterdir()
    assert (out / "report.md").exists()
    with pytest.raises(SystemExit, match="is a run directory; refusing to write into it"):
        report_main([str(runs), "--out", str(runs / "dpo-10-s0")])


def test_every_group_of_a_large_comparison_gets_its_own_colour():
    from benchmarks.report import group_colours

    for n in (3, 10, 16, 20):
        colours = group_colours({("shapes", f"algo{i}"): [] for i in range(n)})
        assert len({str(c) for c in colours.values()}) == n
