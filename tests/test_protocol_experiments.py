"""The protocol's commands end to end at a tiny size on toy2d: seeds on a run, the leaderboard (resumable), the
paper-claims table."""

from __future__ import annotations

import json
import math
import time

import pytest
from omegaconf import OmegaConf

from benchmarks import experiments, leaderboard, protocol
from benchmarks.run import run as run_one
from benchmarks.run import run_seeds
from tests.helpers import compose_cfg
from tests.zoo_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "world=toy2d",
    "eval.samples_per_prompt=8",
    "eval.bootstrap=100",
    "eval.heldout=false",
    "eval.implicit_pairs=16",
    "eval.implicit_draws=2",
    "eval.max_prompts=6",
    "train.batch_size=32",
    "report=false",
]


def test_seeds_on_a_run_write_each_seed_and_the_aggregate(tmp_path):
    cfg = compose_cfg([*TINY, "algo=dpo", "train.steps=3", "seeds=[0,1,2]", f"out_dir={tmp_path}"])
    rows = run_seeds(cfg, tmp_path / "multi")
    assert [p.name for p in sorted((tmp_path / "multi").glob("s*"))] == ["s0", "s1", "s2"]
    (row,) = rows
    assert row["seeds"] == [0, 1, 2] and row["algo"] == "dpo"
    gold = row["metrics"]["gold_reward_trained"]
    assert gold["ci_low"] < gold["mean"] < gold["ci_high"] and gold["n"] == 3
    pooled = row["pooled_win_rate"]["train"]
    assert pooled["ci_low"] <= pooled["mean"] <= pooled["ci_high"]
    assert json.loads((tmp_path / "multi" / "aggregate.json").read_text()) == json.loads(json.dumps(rows))
    mtime = (tmp_path / "multi" / "s1" / "eval.json").stat().st_mtime
    run_seeds(cfg, tmp_path / "multi")  # everything finished: reused
    assert (tmp_path / "multi" / "s1" / "eval.json").stat().st_mtime == mtime
    with pytest.raises(ValueError, match="tuning seeds"):
        run_seeds(OmegaConf.merge(cfg, {"seeds": [0, 100]}), tmp_path / "bad")


def _leaderboard_cfg(tmp_path, algos):
    cfg = compose_cfg(["experiment=leaderboard", *TINY, f"out_dir={tmp_path}", "jobs=1"])  # run_one injected
    sweep = OmegaConf.to_container(cfg.sweep)
    sweep["grid"]["algos"] = algos
    sweep["grid"]["eval_points"] = 2
    sweep["grid"]["overrides"] = ["eval.rewards=[proxy]"]
    sweep["params"].update(
        budgets=[1500, 3000], kl_levels=[15.0, 30.0, 1e6], docs_out=str(tmp_path / "docs" / "lb.md")
    )
    return OmegaConf.merge(cfg, {"sweep": sweep, "seeds": 3})


def test_leaderboard_end_to_end_and_resumable(tmp_path):
    algos = ["dpo", "sft", "ddpo", "best_of_n"]
    cfg = _leaderboard_cfg(tmp_path, algos)
    exp = tmp_path / "lb"
    overrides = [*TINY, f"out_dir={tmp_path}"]

    calls = []

    def interrupted(sub, run_dir):  # the 5th run is "killed": the leaderboard stops there
        calls.append(run_dir)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return run_one(sub, run_dir=run_dir)

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        experiments.run(cfg, interrupted, exp_dir=exp, overrides=overrides)
    done = sorted(p.parent for p in exp.rglob("eval.json"))
    assert len(done) == 4
    again = []

    def counting(sub, run_dir):
        again.append(run_dir)
        return run_one(sub, run_dir=run_dir)

    experiments.run(cfg, counting, exp_dir=exp, overrides=overrides)  # continues: the 4 finished runs are reused
    wall = time.perf_counter() - t0
    assert len(again) == 3 * len(algos) - 4 and not set(again) & set(done)
    md = (tmp_path / "docs" / "lb.md").read_text()
    record = json.loads((tmp_path / "docs" / "lb.json").read_text())
    assert "At 1,500 training UNet NFEs" in md and "At 3,000 training UNet NFEs" in md
    assert "At matched KL" in md and "At convergence" in md and "not reached" in md
    assert "The win rates by the own reward are pooled over seeds and captions too." in md  # per_sample keeps them
    # The page names the command that wrote it (without locations) and its runs' run time.
    shown = " ".join(o for o in TINY if o != "report=false")  # where/how a run is carried out is not shown
    assert f"Written by `python -m benchmarks.run experiment=leaderboard {shown}`: 12 runs, " in md
    assert str(tmp_path) not in md and record["runs"] == 12 and record["runs_wall_s"] > 0
    assert "Every run's code: " in md and sum(record["code"].values()) == 12  # one version made all 12 runs
    # The command's wall time spans its invocations, the interrupted one included (it recorded itself: 4 runs).
    invocations = json.loads((exp / "experiment.json").read_text())["invocations"]
    assert [v["trained"] for v in invocations] == [4, 8] and all(v["copied"] == 0 for v in invocations)
    assert 0 < record["command_wall_s"] <= wall and "wall time" in md and "over 2 invocations." in md
    # A record from before invocations were kept (its wall_s, the runs it trained) counts as one invocation; when
    # its runs do not add up to the experiment's, the page says the wall time is not recorded for every run.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "experiment.json").write_text(json.dumps({"wall_s": 9.0, "run_wall_s": {"dpo/s0": 5.0}}))
    assert experiments.previous_invocations(legacy) == [{"started": None, "wall_s": 9.0, "trained": 1}]
    rows = {(r["algo"], r["budget_nfe"]): r for r in record["rows"]}
    assert rows[("dpo", 3000.0)]["seeds"] == [0, 1, 2]
    assert rows[("ddpo", 3000.0)]["win_rate_own_reward"]["reward"] == "proxy"  # on-policy: the training reward
    assert rows[("dpo", 3000.0)]["win_rate_own_reward"]["reward"] == "gold"  # pairs labelled by toy2d's data
    assert rows[("dpo", 3000.0)]["data_cost"]["label_queries"] > 0  # off-policy: pairs were labelled
    assert rows[("ddpo", 3000.0)]["data_cost"] is None
    win = rows[("dpo", 3000.0)]["win_rate"]
    assert win["ci_low"] <= win["mean"] <= win["ci_high"]
    assert record["matched_kl"]["dpo"]["1e+06"]["reached"] == 0  # never extrapolated: "not reached"
    assert record["matched_kl"]["dpo"]["15"]["reached"] == 3  # every seed's curve has an evaluation near 15 nats
    section = (exp / "section.md").read_text()  # the head-to-head view of the same runs, each module's 3 seeds grouped
    assert "Head to head at 3,000 training UNet NFEs" in section and "### Table 1" in section
    assert "| toy2d | dpo | 3 |" in section and "| toy2d | best_of_n | 3 |" in section
    print(f"\nleaderboard tiny ({len(algos)} modules x 3 seeds): {wall:.1f} s")
    from benchmarks.lifecycle import ConfigError

    with pytest.raises(ConfigError, match=r"train\.lr: 0\.001 -> 0\.123"):  # other settings: finished runs not reused
        experiments.run(cfg, counting, exp_dir=exp, overrides=[*overrides, "train.lr=0.123"])
    assert len(again) == 3 * len(algos) - 4  # nothing ran


def test_an_experiment_copies_the_finished_runs_of_another_with_the_same_settings(tmp_path):
    """``reuse_from=[<dir>]``: a run there with this run's label, seed and settings is copied, not trained again; one
    with other settings is never taken; a directory that is not an experiment's is refused."""
    cfg = compose_cfg(["experiment=table2", *TINY, f"out_dir={tmp_path}", "jobs=1", "seeds=[0]"])
    runs = [{"label": "dpo", "overrides": ["algo=dpo", "train.steps=3"]}]
    cfg = OmegaConf.merge(cfg, {"sweep": {"runs": runs, "section": "head_to_head"}})
    overrides = [*TINY, f"out_dir={tmp_path}"]
    trained = []

    def counting(sub, run_dir):
        trained.append(run_dir)
        return run_one(sub, run_dir=run_dir)

    experiments.run(cfg, counting, exp_dir=tmp_path / "a", overrides=overrides)
    assert len(trained) == 1
    again = OmegaConf.merge(cfg, {"reuse_from": [str(tmp_path / "a")]})
    experiments.run(again, counting, exp_dir=tmp_path / "b", overrides=overrides)
    assert len(trained) == 1  # copied
    a, b = (json.loads((tmp_path / d / "runs/dpo/s0/eval.json").read_text()) for d in "ab")
    assert a == b and (tmp_path / "b/runs/dpo/s0/checkpoints").is_dir()
    experiments.run(again, counting, exp_dir=tmp_path / "c", overrides=[*overrides, "train.lr=0.01"])
    assert len(trained) == 2  # other settings: trained, not copied
    with pytest.raises(experiments.ConfigError, match="not an experiment directory"):
        experiments.run(OmegaConf.merge(cfg, {"reuse_from": [str(tmp_path)]}), counting, exp_dir=tmp_path / "d")


def _dpo_and_sft_experiment(tmp_path):
    """A two-run experiment (DPO and SFT, 3 steps each, seed 0) in this process: its config and its overrides."""
    cfg = compose_cfg(["experiment=table2", *TINY, f"out_dir={tmp_path}", "jobs=1", "seeds=[0]"])
    runs = [
        {"label": "dpo", "overrides": ["algo=dpo", "train.steps=3"]},
        {"label": "sft", "overrides": ["algo=sft", "train.steps=3"]},
    ]
    return OmegaConf.merge(cfg, {"sweep": {"runs": runs, "section": "head_to_head"}}), [*TINY, f"out_dir={tmp_path}"]


def test_a_stop_file_lets_the_run_in_flight_finish_and_starts_no_new_one(tmp_path):
    """``touch <experiment dir>/STOP`` during a run: that run finishes, the next does not start, the invocation is
    recorded, the file is removed and the same command continues; a STOP left from before an invocation is not a
    request to it; with ``jobs`` > 1 no process starts once the file exists."""
    from benchmarks.lifecycle import ExperimentStopped

    cfg, overrides = _dpo_and_sft_experiment(tmp_path)
    exp, trained = tmp_path / "exp", []

    def stopping(sub, run_dir):
        trained.append(run_dir.parent.name)
        (exp / experiments.STOP_FILE).touch()  # the request arrives while this run trains
        return run_one(sub, run_dir=run_dir)

    with pytest.raises(ExperimentStopped, match=r"1 run\(s\) finished in this invocation, 1 not started"):
        experiments.run(cfg, stopping, exp_dir=exp, overrides=overrides)
    assert trained == ["dpo"] and (exp / "runs/dpo/s0/eval.json").exists() and not (exp / "runs/sft").exists()
    assert not (exp / experiments.STOP_FILE).exists() and not (exp / "section.md").exists()
    stopped = json.loads((exp / "experiment.json").read_text())
    assert [c["trained"] for c in stopped["invocations"]] == [1]
    assert stopped["experiment"] == str(cfg.experiment)  # a first invocation that never finished names it too

    def counting(sub, run_dir):
        trained.append(run_dir.parent.name)
        return run_one(sub, run_dir=run_dir)

    (exp / experiments.STOP_FILE).touch()  # before the invocation: removed, not obeyed
    experiments.run(cfg, counting, exp_dir=exp, overrides=overrides)
    assert trained == ["dpo", "sft"] and (exp / "section.md").exists()
    assert [c["trained"] for c in json.loads((exp / "experiment.json").read_text())["invocations"]] == [1, 1]
    stop = tmp_path / "STOP"
    stop.touch()
    never = tmp_path / "never"
    assert experiments.run_processes([("dpo/s0", never, ["algo=dpo"])], 2, "t", stop=stop) == {}
    assert not never.exists()  # no process was started


def test_records_keep_an_experiment_without_weights_and_continue_it_elsewhere(tmp_path, monkeypatch):
    """``benchmarks.records``: the finished runs' eval.json / metrics.jsonl / config.yaml and the experiment's record,
    no checkpoint; copied back into a new directory the experiment continues there (finished runs reused, the rest
    trained, the same numbers as the original) and its invocations extend the records'; a record that differs, or a
    destination that is another experiment, is refused."""
    from benchmarks import records

    cfg, overrides = _dpo_and_sft_experiment(tmp_path)
    trained = []

    def counting(sub, run_dir):
        trained.append(run_dir.parent.name)
        return run_one(sub, run_dir=run_dir)

    experiments.run(cfg, counting, exp_dir=tmp_path / "a", overrides=overrides)
    assert (tmp_path / "a/runs/dpo/s0/checkpoints").is_dir()
    done = records.keep(tmp_path / "a", tmp_path / "rec")
    assert done["runs"] == 2 and done["unfinished"] == 0
    kept = sorted(str(p.relative_to(tmp_path / "rec")) for p in (tmp_path / "rec").rglob("*") if p.is_file())
    assert [k for k in kept if k.startswith("runs/")] == [
        f"runs/{label}/s0/{name}" for label in ("dpo", "sft") for name in sorted(records.RUN_FILES)
    ]
    assert "experiment.json" in kept and "section.md" in kept and "aggregate.json" in kept
    assert records.keep(tmp_path / "a", tmp_path / "rec")["added"] == 0  # again: nothing to write
    import shutil

    copy = shutil.copyfile

    def killed_at_sfts_rows(a, b):  # a copy killed while it writes SFT's per-draw rows
        if str(a).endswith("sft/s0/per_sample.npz"):
            raise KeyboardInterrupt
        return copy(a, b)

    monkeypatch.setattr(shutil, "copyfile", killed_at_sfts_rows)
    with pytest.raises(KeyboardInterrupt):
        records.keep(tmp_path / "a", tmp_path / "cut")
    monkeypatch.undo()
    # eval.json is copied last: SFT is not a finished run there (it would be one without its rows otherwise)
    assert records.finished_runs(tmp_path / "cut") == [tmp_path / "cut/runs/dpo/s0"]
    assert (tmp_path / "cut/runs/sft/s0/config.yaml").exists()
    # Another machine has the records with the SFT run missing (it was not finished when they were kept).

    shutil.rmtree(tmp_path / "rec/runs/sft")
    records.keep(tmp_path / "rec", tmp_path / "work")
    experiments.run(cfg, counting, exp_dir=tmp_path / "work", overrides=overrides)
    assert trained == ["dpo", "sft", "sft"]  # DPO reused from the records, SFT trained again
    a, work = (json.loads((tmp_path / d / "aggregate.json").read_text()) for d in ("a", "work"))
    for row in (*a, *work):  # the seconds and the memory a run took are the machine's, not the run's numbers
        row["metrics"] = {k: v for k, v in row["metrics"].items() if not k.endswith(("wall_s", "peak_mem_mb"))}
    assert json.dumps(a) == json.dumps(work)  # the same numbers as the experiment that never moved (NaN included)
    calls = json.loads((tmp_path / "work/experiment.json").read_text())["invocations"]
    assert len(calls) == 2 and calls[0] == json.loads((tmp_path / "a/experiment.json").read_text())["invocations"][0]
    assert records.keep(tmp_path / "work", tmp_path / "rec")["runs"] == 2  # kept back: the records continue
    with pytest.raises(experiments.ConfigError, match="not an earlier state"):
        records.keep(tmp_path / "a", tmp_path / "rec")  # the old directory's history is not the records' any more
    (tmp_path / "rec/runs/dpo/s0/eval.json").write_text("{}")
    with pytest.raises(experiments.ConfigError, match=r"differ from .*runs/dpo/s0/eval.json"):
        records.keep(tmp_path / "work", tmp_path / "rec")
    with pytest.raises(experiments.ConfigError, match="not an experiment directory"):
        records.keep(tmp_path / "rec/runs", tmp_path / "x")
    with pytest.raises(experiments.ConfigError, match="outside"):
        records.keep(tmp_path / "work", tmp_path / "work/records")
    assert records.main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_records_continue_a_record_of_interrupted_invocations_and_refuse_another_experiment(tmp_path):
    """A destination whose ``experiment.json`` holds only the invocations of a first, interrupted invocation (as
    written before such a record named its experiment) is an earlier state of the source when those invocations are
    the source's first; two named experiments that differ are refused."""
    from benchmarks import records

    first = {"started": "2026-11-29T09:33:22+0000", "wall_s": 10.0, "trained": 2, "copied": 0}
    later = {"started": "2026-11-29T12:37:50+0000", "wall_s": 5.0, "trained": 1, "copied": 0}
    for name, record in {
        "src": {"experiment": "leaderboard", "invocations": [first, later]},
        "kept": {"invocations": [first]},
        "other": {"experiment": "paper_claims", "invocations": [first]},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "experiment.json").write_text(json.dumps(record))
    records.check_continues(tmp_path / "src", tmp_path / "kept")  # no error: the same history, the name unknown
    with pytest.raises(experiments.ConfigError, match="holds the records of experiment=paper_claims"):
        records.check_continues(tmp_path / "src", tmp_path / "other")


def test_a_page_names_every_version_of_the_code_behind_its_runs():
    """An experiment continued under newer code (`benchmarks.records`) says so on its page, with the runs of each."""

    def run(sha: str | None, commit: str = "", dirty: bool = False) -> dict:
        code = {"source_sha256": sha, "commit": commit, "dirty": dirty} if sha else None
        return {"eval": {"environment": {"code": code}} if code else {}}

    runs = [run("a" * 64, "1" * 40), run("a" * 64, "1" * 40), run("b" * 64, "2" * 40, dirty=True), run(None)]
    versions = leaderboard.code_versions(runs)
    assert versions == {
        "1111111 (sources aaaaaaaaaaaa)": 2,
        "2222222+changes (sources bbbbbbbbbbbb)": 1,
        "not recorded": 1,
    }
    sentence = leaderboard.code_sentence(versions, 4)
    assert sentence.startswith("Its 4 runs were made by 3 versions of the code") and "aaaaaaaaaaaa): 2" in sentence
    one = leaderboard.code_versions(runs[:2])
    assert leaderboard.code_sentence(one, 2) == "Every run's code: 1111111 (sources aaaaaaaaaaaa)."


def test_paper_claims_shares_its_dpo_sft_draft_alignprop_runs_with_the_leaderboard():
    """The claims' runs of the leaderboard's modules compose to the leaderboard's runs (so ``reuse_from`` can take
    them): the same settings, not merely the same algorithm."""
    from benchmarks.lifecycle import config_differences

    def specs(name: str) -> dict[str, list[str]]:
        sweep = OmegaConf.to_container(compose_cfg([f"experiment={name}"]).sweep, resolve=True)
        runs = leaderboard.expand_grid(sweep) if sweep.get("grid") else sweep["runs"]
        return {r["label"]: [*r["overrides"], f"label={r['label']}"] for r in runs}

    claims, board = specs("paper_claims"), specs("leaderboard")
    for label in ("dpo", "sft", "draft", "alignprop"):
        assert config_differences(compose_cfg(claims[label]), compose_cfg(board[label]), None) == {}, label
    # experiment=beta_sweep scales the learning rate with 1/β (β·lr of the shapes DPO tuning held within the
    # rounding of its lr values), and its β/4 and 4β runs are the claims' (so they are shared the same way).
    sweep = specs("beta_sweep")
    tuned = compose_cfg(["algo=dpo"])
    product = float(tuned.algo.beta) * float(tuned.train.lr)
    for label, overrides in sweep.items():
        cfg = compose_cfg(overrides)
        assert float(cfg.algo.beta) * float(cfg.train.lr) == pytest.approx(product, rel=0.01), label
    assert len({float(compose_cfg(o).algo.beta) for o in sweep.values()}) == len(sweep) >= 3
    for label in ("dpo_beta250", "dpo_beta4000"):
        assert config_differences(compose_cfg(claims[label]), compose_cfg(sweep[label]), None) == {}, label
    edit = specs("sdedit")["dpo_sdedit"]  # experiment=sdedit's run is the claims' SDEdit run
    assert config_differences(compose_cfg(claims["dpo_sdedit"]), compose_cfg(edit), None) == {}


def test_paper_claims_end_to_end(tmp_path):
    cfg = compose_cfg(["experiment=paper_claims", *TINY, f"out_dir={tmp_path}", "jobs=1"])  # run_one injected
    sweep = OmegaConf.to_container(cfg.sweep)
    sweep["runs"] = [
        {"label": "dpo", "overrides": ["algo=dpo", "train.steps=4", "eval.rewards=[gold,proxy]"]},
        {"label": "sft", "overrides": ["algo=sft", "train.steps=4"]},
        {"label": "dpo_b5", "overrides": ["algo=dpo", "train.steps=4", "algo.beta=5", "train.lr=4e-3"]},
        {"label": "dpo_b80", "overrides": ["algo=dpo", "train.steps=4", "algo.beta=80", "train.lr=2.5e-4"]},
        {"label": "draft", "overrides": ["algo=draft", "train.steps=2"]},
    ]
    keep = {"win", "diff", "diff_at_kl", "diff_at_updates", "beta_kl", "beta_interior", "table2", "s8", "overopt"}
    claims = [c for c in sweep["params"]["claims"] if c["rule"] in keep and c.get("run") != "dpo_sdedit"]
    for c in claims:
        if c["rule"] in ("beta_kl", "beta_interior"):
            c["runs"] = ["dpo_b5", "dpo", "dpo_b80"]
        if c["rule"] == "overopt":
            c["run"], c["others"] = "dpo", ["draft"]
    sweep["params"].update(claims=claims, docs_out=str(tmp_path / "docs" / "claims.md"))
    cfg = OmegaConf.merge(cfg, {"sweep": sweep, "seeds": 3})
    t0 = time.perf_counter()
    experiments.run(cfg, run_one, exp_dir=tmp_path / "pc", overrides=[*TINY, f"out_dir={tmp_path}"])
    wall = time.perf_counter() - t0
    md = (tmp_path / "docs" / "claims.md").read_text()
    record = json.loads((tmp_path / "docs" / "claims.json").read_text())["claims"]
    assert len(record) == len(claims)
    assert all(r["verdict"] in ("holds", "does not hold", "inconclusive") for r in record)
    assert "| DPO beats the base model | §5.2 |" in md and "Decision rule" in md
    for rule in ("beta_kl", "beta_interior"):
        beta = next(r for r in record if r["rule"] == rule)
        assert beta["measured"]["ci_low"] <= beta["measured"]["mean"] <= beta["measured"]["ci_high"]
    print(f"\npaper_claims tiny (5 runs x 3 seeds): {wall:.1f} s")


def test_verdict_rule_and_matched_kl_interpolation():
    assert leaderboard.verdict(0.55, 0.7, 0.5) == "holds"
    assert leaderboard.verdict(0.3, 0.45, 0.5) == "does not hold"
    assert leaderboard.verdict(0.45, 0.55, 0.5) == "inconclusive"
    assert leaderboard.verdict(float("nan"), float("nan"), 0.5) == "inconclusive"
    import numpy as np

    kl, gold = np.array([0.0, 10.0, 50.0]), np.array([1.0, 2.0, 4.0])
    assert protocol.value_at_kl(kl, gold, 30.0, ratio=5.0) == pytest.approx(3.0)
    assert np.isnan(protocol.value_at_kl(kl, gold, 60.0))  # never reached
    # Resolution: 30 nats lies between points at 10 and 50 — more than a factor 2 below it: not measured.
    assert np.isnan(protocol.value_at_kl(kl, gold, 30.0))
    assert protocol.value_at_kl(kl, gold, 8.0) == pytest.approx(1.8)  # from the base (exact) to 10 ≤ 2 × 8
    assert np.isnan(protocol.value_at_kl(kl, gold, 4.0))  # the chord from the base to 10 > 2 × 4
    assert protocol.value_at_kl(np.array([0.0, 19.0, 31.0]), np.array([0.0, 1.9, 3.1]), 25.0) == pytest.approx(2.5)


def test_tune_writes_the_tuning_file_and_its_table(tmp_path, monkeypatch):
    import yaml

    from benchmarks import tune

    cfg = compose_cfg(
        [
            "experiment=tune",
            "algo=dpo",
            *TINY,
            "tune.budget_nfe=300",  # a few steps of toy2d DPO
            f"out_dir={tmp_path}",
            "tune.lr_factors=[0.1,1.0]",
            "tune.knob_factors=[1.0,4.0]",
            f"tune.conf_dir={tmp_path / 'conf'}",
            f"tune.docs_dir={tmp_path / 'docs'}",
        ]
    )
    assert len(tune.trial_grid(cfg)) == 4 and tune.knob_of("dpo") == "algo.beta"
    record = tune.run(cfg, run_one)
    assert record["seeds"] == [100] and len(record["trials"]) == 4
    best = max(r["proxy"] for r in record["trials"])
    assert record["trials"][record["chosen"]]["proxy"] == best  # the stated rule (tie_tol 0)
    for r in record["trials"]:  # every trial trained for the budget: stopped by the first step at or past it
        assert 300 <= r["nfe"] < 300 + r["nfe"] / r["updates"] and r["updates"] == record["trials"][0]["updates"]
    tuned = yaml.safe_load((tmp_path / "conf" / "toy2d_dpo.yaml").read_text())
    assert set(tuned) <= {"algo", "train", "reference"}
    assert tuned["train"]["lr"] == record["trials"][record["chosen"]]["train.lr"]
    assert tuned["algo"]["beta"] == record["trials"][record["chosen"]]["algo.beta"]
    assert tuned["train"]["steps"] == record["trials"][record["chosen"]]["updates"]  # the default run: that budget
    table = (tmp_path / "docs" / "toy2d_dpo.md").read_text()
    assert "each trained for 300 UNet NFEs (budget.kind=nfe)" in table and "| train NFEs |" in table
    assert table.count("| ✓ |") == 1 and "highest mean proxy reward" in table
    assert "Command: `python -m benchmarks.run experiment=tune algo=dpo world=toy2d`" in table  # the page names it
    assert "The base model's proxy reward: " in table
    assert "at the edge of the grid in learning rate and algo.beta" in table  # a 2 × 2 grid is all edges
    assert ("No trial raised the proxy reward above the base model's" in table) == (
        max(r["proxy"] for r in record["trials"]) <= record["trials"][0]["proxy_base"]
    )
    worse = {**record, "trials": [{**r, "proxy_base": best + 1.0} for r in record["trials"]]}  # every trial below
    _, doc = tune.write_outputs(cfg, worse, tmp_path / "conf2", tmp_path / "docs2")
    assert f"No trial raised the proxy reward above the base model's (best {best:.4f} vs {best + 1:.4f})" in (
        doc.read_text()
    )
    (sweep_dir,) = tmp_path.glob("*-tune-toy2d_dpo")
    monkeypatch.setattr(tune, "hydra_output_dir", lambda: sweep_dir)  # the same directory run again ...
    moved = OmegaConf.merge(cfg, {"train": {"lr": float(cfg.train.lr) * 2}})  # ... after the tuning file changed:
    with pytest.raises(ValueError, match="not this grid's"):  # its trials are not relabelled with the new grid
        tune.run(moved, run_one)
    with pytest.raises(ValueError, match="reporting seeds"):
        tune.run(OmegaConf.merge(cfg, {"tune": {"seeds": [0]}}), run_one)
    with pytest.raises(ValueError, match="not tuned"):
        tune.run(OmegaConf.merge(cfg, {"algo": {"name": "best_of_n"}}), run_one)


def test_the_grid_of_an_integer_knob_stays_valid():
    """DRaFT's K = 1 is refused on shapes (identity last step): a grid around K = 2 is {2, 4, 8}, not {1, 2, 4}; other
    integer knobs only round, and float knobs scale."""
    from benchmarks import tune

    assert tune.knob_values("algo.k", 2, [0.5, 1.0, 2.0]) == [2, 4, 8]
    assert tune.knob_values("algo.k_min", 4, [0.5, 1.0, 2.0]) == [2, 4, 8]
    assert tune.knob_values("algo.k", 6, [0.5, 1.0, 2.0]) == [3, 6, 12]
    assert tune.knob_values("train.batch_size", 2, [0.25, 1.0, 2.0]) == [1, 2, 4]
    assert tune.knob_values("algo.beta", 2000, [0.5, 1.0, 2.0]) == [1000.0, 2000.0, 4000.0]
    cfg = compose_cfg(["experiment=tune", "algo=draft", "world=shapes", "algo.k=2"])  # a grid centred on K = 2
    assert sorted({trial["algo.k"] for trial in tune.trial_grid(cfg)}) == [2, 4, 8]


def test_a_batch_size_knob_keeps_every_trials_nfes_equal(tmp_path):
    """Twice the batch, half the steps: the trials of a batch-size knob cost the same NFEs as the tuning file's run
    (the leaderboard's budgets are NFEs), and the chosen steps are written with the chosen batch."""
    import yaml

    from benchmarks import tune

    fixed_steps = ["experiment=tune", "tune.budget_nfe=null", "world=shapes"]
    cfg = compose_cfg([*fixed_steps, "algo=grpo", "train.steps=10", "train.batch_size=16"])
    grid = tune.trial_grid(cfg)
    assert {(t["train.batch_size"], t["train.steps"]) for t in grid} == {(8, 20), (16, 10), (32, 5)}
    assert all("train.steps" not in t for t in tune.trial_grid(compose_cfg([*fixed_steps, "algo=dpo"])))
    rows = [
        {**t, "proxy": float(i), "proxy_base": 0.0, "kl": 1.0, "per_seed_proxy": [float(i)], "updates": 5, "nfe": 9}
        for i, t in enumerate(grid)
    ]
    record = {"world": "shapes", "algo": "grpo", "knob": "train.batch_size", "seeds": [100], "trials": rows}
    conf, doc = tune.write_outputs(cfg, {**record, "chosen": 8}, tmp_path / "conf", tmp_path / "docs")
    tuned = yaml.safe_load(conf.read_text())["train"]
    assert (tuned["batch_size"], tuned["steps"], tuned["lr"]) == (32, 5, grid[8]["train.lr"])
    assert "| 9 | " + f"{grid[8]['train.lr']:g} | 32 | 5 | 5 | 9 | 8.0000 |" in doc.read_text()


def test_trials_train_for_the_leaderboards_budget_whatever_a_step_costs():
    """By default every trial is an NFE budget (the leaderboard's top one, spent as it spends it), so DRaFT's K —
    which changes what a step costs — is tuned at equal compute; the runs differ only in the trial's values."""
    from benchmarks import tune

    cfg = compose_cfg(["experiment=tune", "algo=draft", "world=shapes"])
    top = max(compose_cfg(["experiment=leaderboard"]).sweep.params.budgets)
    assert cfg.tune.budget_nfe == top
    grid = tune.trial_grid(cfg)
    assert {t["budget.amount"] for t in grid} == {float(top)} and all("train.steps" not in t for t in grid)
    run = tune.trial_config(cfg, grid[0], seed=100)
    assert (run.budget.kind, run.budget.amount, run.train.steps) == ("nfe", top, 1_000_000_000)
    assert (run.seed, run.algo.k, run.train.lr) == (100, grid[0]["algo.k"], grid[0]["train.lr"])
    assert cfg.budget.kind == "steps"  # the tuning config itself is untouched


def test_flow_vs_eps_puts_each_algorithm_on_both_policies_side_by_side(tmp_path):
    """experiment=flow_vs_eps (two of its rows, tiny runs): one table row per (algorithm, policy) with the base →
    trained gold reward and distance to p*, each trained value the mean over the 3 seeds with its t-interval."""
    from rlkit_diffusion.intervals import t_interval

    cfg = compose_cfg(["experiment=flow_vs_eps", f"out_dir={tmp_path}"])
    cfg.sweep.runs = [r for r in cfg.sweep.runs if r.label in ("dpo-eps", "dpo-flow")]
    tiny = [o for o in TINY if not o.startswith("world=")]
    experiments.run(
        cfg, run_one, exp_dir=tmp_path / "exp", overrides=[*tiny, "train.steps=3", "world.optimum_pool=64"]
    )
    section = (tmp_path / "exp" / "section.md").read_text()
    rows = [line for line in section.splitlines() if line.startswith("| dpo |")]
    assert [row.split(" | ")[1] for row in rows] == ["ε (DDIM η = 1)", "flow (SDE, a = 0.7)"]
    for label, row in zip(("dpo-eps", "dpo-flow"), rows):
        evals = [
            json.loads((tmp_path / "exp" / "runs" / label / f"s{s}" / "eval.json").read_text()) for s in (0, 1, 2)
        ]
        assert {e["world"] for e in evals} == {"toy2d" if label == "dpo-eps" else "toy2d_flow"}
        m, lo, hi = t_interval([e["distance_to_optimum_trained"] for e in evals])
        assert f"{evals[0]['distance_to_optimum_base']:.3f} → {m:.3f} [{lo:.3f}, {hi:.3f}]" in row


def test_the_leaderboard_says_why_a_row_does_not_improve_its_own_reward(tmp_path, monkeypatch):
    """A trained row whose win rate by its own reward does not clear ½ gets one line, with its tuning sweep as the
    evidence (a shapes_flow row: the shapes sweep its tuning file takes whole); rows that clear it and
    inference-time rows get none."""
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "shapes_dpok.md").write_text("No trial raised the proxy reward above the base model's\n")
    (tmp_path / "tuning" / "shapes_dpo.md").write_text("Chosen: trial 5.\n")
    monkeypatch.setattr(leaderboard, "DOCS", tmp_path)

    def row(algo, world, wins):
        seeds = [
            {"eval": {"win_rate_vs_base_by_reward": {"proxy": {"win_rate": w}}}, "config": {"reward": "proxy"}}
            for w in wins
        ]
        return {"eval": {"algo": algo, "world": world}, "seed_runs": seeds}

    runs = [
        row("dpok", "shapes", [0.45, 0.50, 0.55]),
        row("dpo", "shapes_flow", [0.40, 0.52, 0.58]),
        row("ddpo", "shapes", [0.80, 0.85, 0.90]),  # clears ½: no line
        row("best_of_n", "shapes", [0.2, 0.2, 0.2]),  # trains nothing: no line
        row("dpo", "toy2d_flow", [0.3, 0.4, 0.5]),  # a tuning file, no sweep page
    ]
    lines = leaderboard.not_improved(runs, 19200)
    assert lines[:3] == ["", "### Rows not shown to improve their own reward", ""]
    dpok, dpo_flow, dpo_toy = lines[3:]
    assert dpok.startswith(
        "- **dpok** is not shown to improve the reward it optimises at 19,200 NFEs (win rate by it 50.0%"
    )
    assert "no trial of [its tuning sweep](tuning/shapes_dpok.md) raised the proxy reward" in dpok
    assert "[its tuning sweep](tuning/shapes_dpo.md) raised the proxy reward on the tuning seed" in dpo_flow
    assert "no tuning sweep on this world" in dpo_toy
    assert leaderboard.not_improved(runs[2:4], 19200) == []


def test_the_leaderboard_names_the_knobs_chosen_at_the_edge_of_each_rows_grid(tmp_path, monkeypatch):
    """Each trained row names its sweep and the knobs whose chosen value is its grid's first or last (read back from
    the sentence `benchmarks.tune` writes, `tune.EDGE`); a row without a sweep or that trains nothing says so."""
    from benchmarks.tune import EDGE

    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "shapes_ddpo.md").write_text(f"x\n\n{EDGE} learning rate and train.batch_size: the ...\n")
    (tmp_path / "tuning" / "shapes_dpo.md").write_text("Chosen: trial 5.\n")
    monkeypatch.setattr(leaderboard, "DOCS", tmp_path)
    runs = [
        {"eval": {"algo": a, "world": w}}
        for a, w in (("ddpo", "shapes"), ("dpo", "shapes_flow"), ("best_of_n", "shapes"), ("kto", "toy2d"))
    ]
    lines = leaderboard.tuning_summary(runs)
    assert lines[1] == "### The tuning behind each row"
    assert lines[5:] == [
        "| ddpo | [shapes_ddpo](tuning/shapes_ddpo.md) | learning rate and train.batch_size |",
        "| dpo | [shapes_dpo](tuning/shapes_dpo.md) | neither knob |",
        "| best_of_n | – (trains nothing) | – |",
        "| kto | none on this world | – |",
    ]


# ------------------------------------------------------------------------------------------------------------------
# The leaderboard's readers on hand-made runs
# ------------------------------------------------------------------------------------------------------------------
def _curve_run(points, final, unet_nfe=19200.0, updates=30, **ev):
    """A run whose learning curve is ``points`` = [(budget/nfe, gold)], final gold ``final``."""
    metrics = [{"step": i, "budget/nfe": nfe, "eval/gold_reward_trained": g} for i, (nfe, g) in enumerate(points)]
    e = {"algo": "ddpo", "unet_nfe": unet_nfe, "updates": updates, "gold_reward_trained": final, **ev}
    return {"eval": e, "metrics": metrics}


def test_at_budget_reads_only_the_evaluation_at_that_level():
    """A level between curve points has no value (never a later point); the top budget is the final evaluation even
    when the last step overshot it by more than 10%."""
    run = _curve_run([(48000, 5.0), (96000, 6.0), (144000, 6.5), (192000, 6.9)], 7.0, unet_nfe=192000, updates=300)
    assert math.isnan(leaderboard.at_budget(run, "gold_reward_trained", 19200))  # 48,000 is not 19,200
    assert leaderboard.at_budget(run, "gold_reward_trained", 96000) == 6.0
    assert leaderboard.at_budget(run, "gold_reward_trained", 192000, top=True) == 7.0
    coarse = _curve_run([(1792, 4.2), (3584, 4.4)], 4.5, unet_nfe=3584, updates=2)  # one step: 1,792 NFEs, 19% over
    assert leaderboard.at_budget(coarse, "gold_reward_trained", 3000, top=True) == 4.5
    assert leaderboard.at_budget(coarse, "gold_reward_trained", 1500) == 4.2  # the point within a step of 1,500


def test_the_plateau_share_is_on_the_seed_mean_curve_and_a_flat_run_is_flat():
    ci = {"gold_reward_base": 1.0, "gold_reward_trained_ci_low": 0.95, "gold_reward_trained_ci_high": 1.05}
    flat = [_curve_run([(1, 1.02), (2, 0.99), (3, 1.001)], 1.001, **ci)]
    assert leaderboard.plateau(flat) == pytest.approx(0.011 / 0.05)  # noise floor, not 0.011 / 0.001
    moving = [
        _curve_run([(1, 2.0), (2, 3.0), (3, 5.0)], 5.0, **ci),
        _curve_run([(1, 2.0), (2, 3.0), (3, 3.0)], 3.0, **ci),
    ]
    assert leaderboard.plateau(moving) == pytest.approx((4.0 - 3.0) / (4.0 - 1.0))  # mean curve 2, 3, 4
    assert math.isnan(leaderboard.plateau([_curve_run([(1, 2.0)], 2.0, **ci)]))


def test_the_reward_a_row_optimises_and_its_win_rate():
    """Pair-based rows optimise their pairs' labels (``data``: the evaluation's reward, whose win rate is the
    headline), the others the training reward; one seed keeps its caption interval and is not listed as not
    improving when that interval is above ½."""
    dpo = {"config": OmegaConf.create({"reward": "proxy", "eval": {"reward": "gold"}, "algo": {"labels": "data"}})}
    ai = {"config": OmegaConf.create({"reward": "proxy", "eval": {"reward": "gold"}, "algo": {"labels": "proxy"}})}
    ddpo = {"config": OmegaConf.create({"reward": "proxy", "eval": {"reward": "gold"}, "algo": {"name": "ddpo"}})}
    kto = {"config": OmegaConf.create({"reward": "proxy", "eval": {"reward": "gold"}, "algo": {"labels": "pairs"}})}
    assert [leaderboard.optimised_reward(r) for r in (dpo, ai, ddpo, kto)] == ["gold", "proxy", "proxy", "gold"]
    one = {
        **dpo,
        "eval": {
            "algo": "dpo",
            "world": "shapes",
            "win_rate_vs_base": 0.9,
            "win_rate_vs_base_ci_low": 0.8,
            "win_rate_vs_base_ci_high": 0.97,
        },
    }
    text, d = leaderboard._own_reward_win([one])
    assert d == {"mean": 0.9, "ci_low": 0.8, "ci_high": 0.97, "n": 1, "reward": "gold"} and text.endswith("(gold)")
    assert leaderboard.not_improved([{"eval": one["eval"], "seed_runs": [one]}], 19200) == []
    cfg = OmegaConf.create({"reward": "proxy", "eval": {"reward": "gold"}, "algo": {"name": "ddpo"}})
    silent = {"config": cfg, "eval": {"algo": "ddpo", "win_rate_vs_base": 0.5}}  # no proxy win rate recorded
    says = {
        "config": cfg,
        "eval": {"win_rate_vs_base_by_reward": {"proxy": {"win_rate": 0.7, "ci_low": 0.6, "ci_high": 0.8}}},
    }
    assert leaderboard._own_reward_win([silent, says])[1] == {
        "mean": 0.7,
        "ci_low": 0.6,
        "ci_high": 0.8,
        "n": 1,
        "reward": "proxy",
    }  # the interval of the seed that reports it


def test_data_cost_counts_the_pairs_drawn_at_most_the_pair_set():
    nfe, queries, pair_set = leaderboard.pairs_cost_per_pair("shapes")
    cfg = OmegaConf.create({"train": {"batch_size": 16, "grad_accum": 1}})
    run = {
        "eval": {"algo": "dpo", "world": "shapes", "updates": 300, "environment": {"num_processes": 2}},
        "config": cfg,
    }
    assert leaderboard.data_cost(run)["pairs"] == 300 * 16 * 2 and nfe > 0 and queries >= 2
    run["eval"]["updates"] = 10**6
    cost = leaderboard.data_cost(run)
    assert cost["pairs"] == pair_set and cost["label_queries"] == pytest.approx(queries * pair_set)
    assert leaderboard.data_cost({"eval": {"algo": "ddpo", "world": "shapes"}, "config": cfg}) is None


def test_a_budget_off_the_learning_curve_is_refused():
    from benchmarks.lifecycle import ConfigError

    sweep = {"grid": {"algos": ["dpo"], "eval_points": 4}, "params": {"budgets": [19200, 192000]}}
    with pytest.raises(ConfigError, match="19200 is not on the learning curve of 4 evaluation"):
        leaderboard.expand_grid(sweep)
    sweep["grid"]["eval_points"] = 10
    (run,) = leaderboard.expand_grid(sweep)
    assert "budget.amount=192000" in run["overrides"] and "train.eval_points=10" in run["overrides"]


def test_a_resumed_runs_re_logged_rows_are_read_once():
    from benchmarks.report import last_logged

    rows = [
        {"step": 10, "train/loss": 1.0},
        {"step": 10, "eval/gold_reward_trained": 4.0, "budget/nfe": 100},
        {"step": 20, "eval/gold_reward_trained": 4.5, "budget/nfe": 200},  # logged, then the run was killed
        {"step": 20, "eval/gold_reward_trained": 4.6, "budget/nfe": 200},  # the resume logs it again
        {"step": 30, "train/loss": 0.5},
    ]
    out = last_logged(rows)
    assert [r.get("eval/gold_reward_trained") for r in out] == [None, 4.0, 4.6, None]


def test_claims_at_matched_kl_and_the_two_beta_claims_golden(tmp_path):
    """The claim rules on hand-made runs: gold at 25 nats interpolated on each seed's (KL, gold) path, and not
    measured when the curve has no evaluation near the level; β's KL drop at every step and its interior optimum;
    S8 censoring; every claim states its n; a claim that cannot be computed stays a row."""

    def run(label: str, per_seed: dict[int, dict], beta: float = 1.0) -> dict:
        seeds = [
            {"eval": {"seed": s, "label": label, "algo": "dpo", "gold_reward_base": 4.0, "win_rate_vs_base": 0.6, **e}}
            for s, e in per_seed.items()
        ]
        return {"eval": seeds[0]["eval"], "seed_runs": seeds, "config": OmegaConf.create({"algo": {"beta": beta}})}

    # a: (0, 4) → (50, 5): 4.5 at 25 nats; b: (0, 4) → (40, 4.4): 4.25; on both seeds.
    a = run("a", {s: {"kl_to_ref": 50.0, "gold_reward_trained": 5.0} for s in (0, 1)})
    b = run("b", {s: {"kl_to_ref": 40.0, "gold_reward_trained": 4.4} for s in (0, 1)})
    (m, lo, hi, n), threshold, _ = leaderboard.CLAIM_RULES["diff_at_kl"](
        [a, b], {"run": "a", "other": "b", "level": 25}
    )
    assert (m, lo, hi, n, threshold) == (pytest.approx(0.25), pytest.approx(0.25), pytest.approx(0.25), 2, 0.0)
    # c's first evaluation is at 600 nats: the straight line from the base is no measurement at 25 nats.
    far = run("c", {s: {"kl_to_ref": 600.0, "gold_reward_trained": 6.0} for s in (0, 1)})
    (m, _, _, n), _, _ = leaderboard.CLAIM_RULES["diff_at_kl"]([a, far], {"run": "a", "other": "c", "level": 25})
    assert math.isnan(m) and n == 0
    # Equal optimizer steps: a made 300 (final gold 5); e trained 600 and logged gold 6 at step 300 on its curve.
    a3 = run("a3", {s: {"updates": 300, "gold_reward_trained": 5.0} for s in (0, 1)})
    e = run("e", {s: {"updates": 600, "gold_reward_trained": 7.0} for s in (0, 1)})
    for seed_run in e["seed_runs"]:
        seed_run["metrics"] = [
            {"step": 150, "eval/gold_reward_trained": 5.5},
            {"step": 300, "eval/gold_reward_trained": 6.0},
        ]
    (m, lo, hi, n), _, _ = leaderboard.CLAIM_RULES["diff_at_updates"]([a3, e], {"run": "a3", "other": "e"})
    assert (m, lo, hi, n) == (pytest.approx(-1.0), pytest.approx(-1.0), pytest.approx(-1.0), 2)
    # β 1, 2, 3: gold per seed (1, 1), (3, 2), (2, 2.5): interior − best end = 1 and −0.5. KL (10, 12), (6, 6), (4, 4):
    # adjacent drops (4, 6) and (2, 2): the smaller one, 2.
    b1 = run(
        "b1",
        {0: {"gold_reward_trained": 1.0, "kl_to_ref": 10.0}, 1: {"gold_reward_trained": 1.0, "kl_to_ref": 12.0}},
        1,
    )
    b2 = run(
        "b2", {0: {"gold_reward_trained": 3.0, "kl_to_ref": 6.0}, 1: {"gold_reward_trained": 2.0, "kl_to_ref": 6.0}}, 2
    )
    b3 = run(
        "b3", {0: {"gold_reward_trained": 2.0, "kl_to_ref": 4.0}, 1: {"gold_reward_trained": 2.5, "kl_to_ref": 4.0}}, 3
    )
    claim = {"runs": ["b3", "b1", "b2"]}  # any order: sorted by algo.beta
    (m, lo, hi, n), _, _ = leaderboard.CLAIM_RULES["beta_interior"]([b1, b2, b3], claim)
    assert m == pytest.approx(0.25) and lo < 0 < hi and n == 2
    (m, lo, hi, n), _, _ = leaderboard.CLAIM_RULES["beta_kl"]([b1, b2, b3], claim)
    assert (m, lo, hi, n) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), 2)
    # S8: a seed censored at m = 4 draws cannot decide a threshold of 4 (no interval), it can one of 1.
    s8 = run(
        "d",
        {
            s: {"s8_base_draws_for_half": v, "s8_base_draws_for_half_censored": float(v == 4.0)}
            for s, v in ((0, 4.0), (1, 2.0), (2, 3.0))
        },
    )
    (m, lo, hi, n), _, rule = leaderboard.CLAIM_RULES["s8"]([s8], {"run": "d", "threshold": 4})
    assert m == pytest.approx(3.0) and math.isnan(lo) and "censored at 4 draws" in rule
    (m, lo, hi, n), _, _ = leaderboard.CLAIM_RULES["s8"]([s8], {"run": "d", "threshold": 1})
    assert lo < 3.0 < hi and n == 3
    # A claim that cannot be computed (two βs: no interior) and one whose run is missing stay rows, inconclusive.
    params = {
        "claims": [
            {"claim": "interior", "section": "S5", "paper": "p", "rule": "beta_interior", "runs": ["b1", "b3"]},
            {"claim": "missing", "section": "§5.2", "paper": "p", "rule": "win", "run": "nowhere"},
        ]
    }
    lines = leaderboard.section_paper_claims([b1, b3], params, tmp_path)
    assert (
        "| interior | S5 | p | – (not measured: an interior optimum needs at least 3 values of β, got 2) |" in lines[2]
    )
    assert "missing from this experiment's runs) | inconclusive |" in lines[3]


def test_sweep_overrides_on_the_command_line_are_the_experiments_not_its_runs(tmp_path):
    """``experiment=leaderboard sweep.grid.algos=[...] sweep.params.docs_out=...`` (the documented flow-rows and
    10x commands): the sweep keys change the run list and the page, and are not passed to the runs (a run's config
    has no ``sweep``: passing them on failed every run); the page names the command with the run-changing keys and
    without the page's location."""
    out = tmp_path / "docs" / "flow.md"
    cli = [*TINY, f"out_dir={tmp_path}", "sweep.grid.algos=[dpo]", f"sweep.params.docs_out={out}", "seeds=1"]
    cli += ["sweep.params.budgets=[400]", "sweep.grid.eval_points=1", "train.batch_size=4"]
    cfg = compose_cfg(["experiment=leaderboard", "jobs=1", *cli])
    assert list(cfg.sweep.grid.algos) == ["dpo"] and cfg.sweep.params.docs_out == str(out)
    seen = []

    def recording(sub, run_dir):
        seen.append(sub)
        return run_one(sub, run_dir=run_dir)

    experiments.run(cfg, recording, exp_dir=tmp_path / "lb", overrides=cli)
    assert len(seen) == 1 and seen[0].sweep is None
    page = out.read_text()
    assert "sweep.grid.algos=[dpo]" in page.split("\n")[2] and "docs_out" not in page.split("\n")[2]


def test_the_leaderboard_sets_another_worlds_rows_beside_its_own(tmp_path):
    """``sweep.params.beside``: the rows of another world's leaderboard record, by algorithm, at the common top budget;
    the interval that lies wholly above the other is named, overlapping ones are said to overlap; a record without
    a ``world`` key is named by its command's ``world=`` or the default world; other budgets and files are refused."""

    def cell(mean, lo, hi):
        return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": 3}

    def row(algo, win, gold, budget=19200.0):
        return {"algo": algo, "budget_nfe": budget, "win_rate": cell(*win), "gold": cell(*gold)}

    eps = {
        "budgets": [4800.0, 19200.0],
        "rows": [
            row("dpo", (0.9, 0.85, 0.95), (4.7, 4.6, 4.8)),
            row("dpo", (0.6, 0.5, 0.7), (4.1, 4.0, 4.2), budget=4800.0),  # a lower budget: not shown
            row("ddpo", (0.6, 0.5, 0.7), (4.0, 3.9, 4.1)),
            row("sft", (0.8, 0.7, 0.9), (4.5, 4.4, 4.6)),
        ],
        "command": "python -m benchmarks.run experiment=leaderboard",  # from before records named their world
    }
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "lb.json").write_text(json.dumps(eps))
    flow = {
        "budgets": [19200.0],
        "world": "shapes_flow",
        "rows": [row("dpo", (0.7, 0.6, 0.8), (3.0, 2.9, 3.1)), row("ddpo", (0.65, 0.55, 0.75), (2.5, 2.4, 2.6))],
    }
    lines = leaderboard.beside(flow, tmp_path / "docs" / "lb.json", str(tmp_path / "docs" / "lb_flow.md"))
    assert lines[1] == "### Beside [shapes](lb.md) at 19,200 training UNet NFEs"
    assert lines[-3:] == [
        "| dpo | 70.0% [60.0%, 80.0%] | 90.0% [85.0%, 95.0%] | shapes | 3.000 [2.900, 3.100] | 4.700 [4.600, 4.800] |",
        "| ddpo | 65.0% [55.0%, 75.0%] | 60.0% [50.0%, 70.0%] | overlap | 2.500 [2.400, 2.600] | "
        "4.000 [3.900, 4.100] |",
        "| sft | – | 80.0% [70.0%, 90.0%] | – | – | 4.500 [4.400, 4.600] |",
    ]
    assert flow["beside"]["rows"][0] == {"algo": "dpo", "higher": "shapes"}
    assert leaderboard.record_world(
        {**eps, "command": "python -m benchmarks.run experiment=leaderboard world=toy2d"}
    ) == ("toy2d")
    with pytest.raises(leaderboard.ConfigError, match="stops at 19,200 training NFEs, this leaderboard at 192,000"):
        leaderboard.beside({**flow, "budgets": [192000.0]}, tmp_path / "docs" / "lb.json", None)
    with pytest.raises(leaderboard.ConfigError, match="is not a leaderboard record"):
        leaderboard.beside(flow, tmp_path / "docs" / "missing.json", None)
