"""Readable sample grids (`benchmarks.report.draw_grid`): every caption whole (wrapped), the reward under each image,
the algorithm's name on each row."""

from __future__ import annotations

import torch


def test_grid_shows_whole_captions_rewards_and_names(tmp_path):
    from benchmarks.report import CAPTION_CHARS_PER_LINE, draw_grid, grid_figure

    captions = [
        "a small red circle on the left of a big blue square, on a white background",
        "an extraordinarily-long-hyphenated-word-that-must-still-show-in-full",
        "a cat",
    ]
    g = torch.Generator().manual_seed(0)
    rows = [
        ("base", torch.rand(3, 3, 16, 16, generator=g), torch.tensor([0.5, -1.25, 2.0])),
        ("dpo", torch.rand(3, 3, 16, 16, generator=g), torch.tensor([0.75, 0.0, 1.0])),
        ("input", torch.rand(3, 3, 16, 16, generator=g), None),
    ]
    fig = grid_figure(rows, captions, title="shapes", reward_name="gold")
    axes = fig.axes
    titles = [ax.get_title() for ax in axes[:3]]
    for shown, caption in zip(titles, captions):
        assert shown.replace("\n", " ").replace(" ", "") == caption.replace(" ", "")  # whole, only re-wrapped
        assert all(len(line) <= CAPTION_CHARS_PER_LINE for line in shown.split("\n"))
    assert "\n" in titles[0]
    assert [ax.get_xlabel() for ax in axes[:6]] == [
        "gold 0.50",
        "gold -1.25",
        "gold 2.00",
        "gold 0.75",
        "gold 0.00",
        "gold 1.00",
    ]
    assert [axes[3 * i].get_ylabel() for i in range(3)] == ["base", "dpo", "input"]
    assert axes[6].get_xlabel() == ""
    path = draw_grid(rows, captions, tmp_path / "grid.png", reward_name="proxy")  # the callers' signature
    assert path.stat().st_size > 1000


def test_report_links_config_and_export_and_keeps_worlds_apart(tmp_path):
    import json

    from benchmarks.report import main as report_main
    from tests.test_report import _fake_run

    _fake_run(tmp_path, "dpo", 0, 0.7, 4.6, 100.0)
    toy = tmp_path / "toy"
    _fake_run(toy, "dpo", 0, 0.9, -0.5, 1.0)
    ev = json.loads((toy / "dpo-s0" / "eval.json").read_text())
    (toy / "dpo-s0" / "eval.json").write_text(json.dumps({**ev, "world": "toy2d"}))
    run = tmp_path / "dpo-s0"
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "export").mkdir()
    (run / "export" / "README.md").write_text("# model card\n")
    report_main([str(tmp_path), "--out", str(tmp_path / "report")])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| shapes | dpo | 1 | 70.0%" in md and "| toy2d | dpo | 1 | 90.0%" in md  # one row per world
    assert "[config](../dpo-s0/config.yaml) · [exported model](../dpo-s0/export/README.md)" in md
    page = (tmp_path / "report" / "report.html").read_text()
    assert "href='../dpo-s0/export/README.md'" in page and "href='../dpo-s0/config.yaml'" in page
