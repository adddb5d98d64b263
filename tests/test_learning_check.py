"""`benchmarks.learning_check`: the numbers issue #21's criterion reads (win rate under the optimised reward, the
collected-batch reward's slope), grouped by configuration so that budgets are never pooled."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import learning_check


def fake_run(root, name, seed, amount, slope, win):
    run = root / name
    run.mkdir()
    rng = np.random.default_rng(seed)
    rewards = 6.5 + slope * np.arange(40) + 0.01 * rng.standard_normal(40)
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "train/reward_mean": float(r)}) + "\n" for i, r in enumerate(rewards))
    )
    proxy = {"win_rate": win, "ci_low": win - 0.05, "ci_high": win + 0.05, "reward_base": 6.5, "reward_trained": 6.7}
    ev = {
        "world": "shapes",
        "algo": "ddpo",
        "seed": seed,
        "win_rate_vs_base": 0.6,
        "kl_to_ref": 10.0,
        "win_rate_vs_base_by_reward": {"proxy": proxy},
    }
    (run / "eval.json").write_text(json.dumps(ev))
    (run / "config.yaml").write_text(f"seed: {seed}\nout_dir: {root}\nbudget:\n  kind: nfe\n  amount: {amount}\n")
    return rewards


def test_slope_interval_and_budgets_kept_apart(tmp_path, capsys):
    curves = [fake_run(tmp_path, f"a{s}", s, 96000, 0.004, 0.7 + 0.01 * s) for s in range(3)]
    fake_run(tmp_path, "b0", 0, 19200, -0.002, 0.45)
    out = learning_check.main([str(tmp_path)])
    assert sorted(out) == ["shapes ddpo (budget.amount=19200)", "shapes ddpo (budget.amount=96000)"]
    big = out["shapes ddpo (budget.amount=96000)"]
    assert [r["seed"] for r in big] == [0, 1, 2]
    for r, c in zip(big, curves):
        assert r["slope"] == pytest.approx(np.polyfit(np.arange(40), c, 1)[0], rel=1e-9)
        assert r["first_quarter"] == pytest.approx(c[:10].mean()) and r["last_quarter"] == pytest.approx(
            c[-10:].mean()
        )
    text = capsys.readouterr().out
    assert "over 3 seeds: win by proxy 71.0% [" in text and "3/3 seeds with the caption interval above 50%" in text
    assert out["shapes ddpo (budget.amount=19200)"][0]["slope"] < 0


def test_missing_reward_is_named(tmp_path):
    fake_run(tmp_path, "a0", 0, 96000, 0.004, 0.7)
    with pytest.raises(ValueError, match="no win rate under 'gold'"):
        learning_check.main([str(tmp_path), "--reward", "gold"])
