"""Paper-style experiments (benchmarks/experiments.py), the S8 best-of-N metric, the SDEdit evaluation mode and the
Hydra composition of every config group."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from benchmarks import experiments
from benchmarks.eval_schema import validate
from benchmarks.report import write_report
from benchmarks.run import group_choices
from benchmarks.run import run as run_one
from rlkit_diffusion.evaluate import EvalConfig, best_of_n_equivalent, edit_inputs, expected_best_of_n
from tests.helpers import compose_cfg

REPO = Path(__file__).resolve().parent.parent
TINY = ["eval.max_prompts=4", "eval.samples_per_prompt=2", "eval.heldout=false", "eval.bootstrap=50"]


# ------------------------------------------------------------------------------------------------------------------
# S8: best-of-N equivalence
# ------------------------------------------------------------------------------------------------------------------
def test_expected_best_of_n_equals_brute_force_over_subsets():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(3, 6))
    keys = rng.normal(size=(3, 6))
    curve, curve_keyed = expected_best_of_n(rewards), expected_best_of_n(rewards, keys)
    for n in range(1, 7):
        subsets = list(itertools.combinations(range(6), n))
        oracle = np.mean([[rewards[p, list(s)].max() for s in subsets] for p in range(3)])
        keyed = np.mean([[rewards[p, max(s, key=lambda j: keys[p, j])] for s in subsets] for p in range(3)])
        assert curve[n - 1] == pytest.approx(oracle, abs=1e-12)
        assert curve_keyed[n - 1] == pytest.approx(keyed, abs=1e-12)
    assert curve[0] == pytest.approx(rewards.mean()) and curve[-1] == pytest.approx(rewards.max(1).mean())
    assert np.all(np.diff(curve) >= 0)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_expected_best_of_n_with_a_minus_infinite_draw():
    """A −inf draw (a diverged sample under a log-density reward) is the mean's, not the best of all draws'."""
    rewards = np.array([[3.0, -np.inf, 1.0, 2.0], [0.5, 1.5, 2.5, 3.5]])
    curve = expected_best_of_n(rewards)
    assert curve[0] == -np.inf  # N = 1: the mean reward
    # N ≥ 2: a subset all of −inf needs two −inf draws; one alone loses to any finite partner (brute force)
    for n in range(2, 5):
        subsets = list(itertools.combinations(range(4), n))
        oracle = np.mean([[rewards[p, list(s)].max() for s in subsets] for p in range(2)])
        assert curve[n - 1] == pytest.approx(oracle, abs=1e-12)


def test_best_of_n_equivalent_interpolates_and_censors():
    curve = np.array([2.75, 3.8333333, 4.5, 5.0])  # the brute-force curve of draws (3, 1, 2, 5)
    assert best_of_n_equivalent(curve, 4.0) == (pytest.approx(2.25), False)
    assert best_of_n_equivalent(curve, 2.0) == (1.0, False)  # no better than one draw
    assert best_of_n_equivalent(curve, 6.0) == (4.0, True)  # beats best-of-4: N >= 4


# ------------------------------------------------------------------------------------------------------------------
# SDEdit
# ------------------------------------------------------------------------------------------------------------------
def test_sdedit_scenes_contradict_the_caption_in_exactly_one_attribute():
    from rlkit_diffusion.worlds.shapes.captions import caption_targets
    from rlkit_diffusion.worlds.shapes.render import COMPATIBLE
    from rlkit_diffusion.worlds.shapes.world import EDIT_ATTRIBUTES, eval_prompts, sdedit_inputs, sdedit_scenes

    prompts = eval_prompts(32, 0, seed=0)[0]
    spec, edited = sdedit_scenes(prompts, seed=5)
    targets = caption_targets(prompts)
    for i, attr in enumerate(edited):
        specified = [a for a in EDIT_ATTRIBUTES if targets[a][i] >= 0]
        assert attr == specified[0]  # the first specified attribute is the one changed
        wrong = [a for a in specified if int(getattr(spec, a)[i]) != int(targets[a][i])]
        assert wrong == [attr]
        assert COMPATIBLE[spec.colour[i], spec.background[i]]  # the object stays visible
    assert all(float(getattr(spec, n).min()) > 0 for n in ("blur", "noise", "contrast"))  # corrupted renders
    x = sdedit_inputs(prompts, 5)
    assert x.shape == (32, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, sdedit_inputs(prompts, 5)) and not torch.equal(x, sdedit_inputs(prompts, 6))


def test_sdedit_mode_starts_from_the_input(shapes_world_small):
    """Low strength keeps the edit near the input; strength 1 forgets it (the env's ρ_0 = q(x_t | x_in))."""
    from rlkit_diffusion.evaluate import sample_split

    world = shapes_world_small
    prompts = world.train_prompts[:8]
    cfg = EvalConfig(mode="sdedit", strength=0.1, samples_per_prompt=1)
    x_in = edit_inputs(world, prompts, cfg)
    near = sample_split(world, world.policy, prompts, cfg, x_input=x_in, strength=0.1)
    far = sample_split(world, world.policy, prompts, cfg, x_input=x_in, strength=1.0)
    d_near, d_far = (near["x0"] - x_in).abs().mean(), (far["x0"] - x_in).abs().mean()
    assert d_near < 0.5 * d_far
    assert near["nfe"] < far["nfe"]  # fewer denoising steps from t = 0.1·T


def test_sdedit_needs_edit_inputs_and_valid_settings():
    from rlkit_diffusion.worlds import build_world

    toy = build_world("toy2d")
    with pytest.raises(ValueError, match="no edit inputs"):
        edit_inputs(toy, toy.train_prompts[:2], EvalConfig(mode="sdedit"))
    with pytest.raises(ValueError, match="eval.mode='edit' is not a valid choice; available: sample, sdedit"):
        EvalConfig(mode="edit")
    with pytest.raises(ValueError, match="eval.strength"):
        EvalConfig(mode="sdedit", strength=1.5)


# ------------------------------------------------------------------------------------------------------------------
# Hydra: every option of every config group composes
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", group_choices("world"))
@pytest.mark.parametrize("algo", group_choices("algo"))
def test_every_algo_composes_with_every_world(algo, world):
    cfg = compose_cfg([f"algo={algo}", f"world={world}"])
    assert cfg.algo.name == algo and cfg.world.name == world


@pytest.mark.parametrize("name", group_choices("experiment"))
def test_every_experiment_composes_and_its_runs_compose(name):
    cfg = compose_cfg([f"experiment={name}"])
    assert cfg.experiment == name
    if name == "toy2d_tutorial":
        assert cfg.world.name == "toy2d" and cfg.tutorial.algos
        return
    if cfg.sweep is None:  # a one-run recipe that changes the world or the evaluation (e.g. sd15_ddpo_aesthetic)
        assert cfg.tutorial is None and cfg.algo.name in group_choices("algo")
        return
    assert cfg.sweep.section in experiments.SECTIONS
    sweep = OmegaConf.to_container(cfg.sweep, resolve=True)
    runs = experiments.leaderboard.expand_grid(sweep) if sweep.get("grid") else cfg.sweep.runs
    for spec in OmegaConf.create(runs):  # each run of the experiment is a valid single-run config
        sub = compose_cfg([*spec.overrides, experiments.label_override(spec.label)])
        assert sub.label == spec.label and sub.sweep is None


def test_head_to_head_runs_every_module_as_the_leaderboard_does_at_its_top_budget():
    """A module added to algos/ is in the head-to-head without an edit, and its run there is the leaderboard's run
    at the top budget (so one leaderboard directory renders both views)."""
    from algos import ALGOS

    def runs(name: str) -> dict[str, list[str]]:
        sweep = OmegaConf.to_container(compose_cfg([f"experiment={name}"]).sweep, resolve=True)
        return {r["label"]: r["overrides"] for r in experiments.leaderboard.expand_grid(sweep)}

    h2h, lb = runs("head_to_head"), runs("leaderboard")
    assert sorted(h2h) == sorted(ALGOS) and h2h == lb
    assert "budget.amount=19200" in h2h["dpo"] and h2h["best_of_n"] == ["algo=best_of_n", "eval.rewards=[proxy]"]


def test_every_tuning_file_names_a_world_and_an_algo():
    worlds, algos = set(group_choices("world")), set(group_choices("algo"))
    for f in sorted((REPO / "benchmarks" / "conf" / "tuning").glob("*.yaml")):
        world = max((w for w in worlds if f.stem.startswith(w + "_")), key=len)  # toy2d_flow_dpo: world toy2d_flow
        algo = f.stem[len(world) + 1 :]
        assert world in worlds and algo in algos, f.name
        assert compose_cfg([f"world={world}", f"algo={algo}"]).algo.name == algo


# ------------------------------------------------------------------------------------------------------------------
# Sections on fake runs, and one real experiment at a tiny budget
# ------------------------------------------------------------------------------------------------------------------
def _fake(root: Path, label: str, seed_dir: str = "", **ev) -> dict:
    d = root / "runs" / label / seed_dir
    d.mkdir(parents=True)
    record = {
        "schema_version": 1,
        "algo": ev.pop("algo", "dpo"),
        "world": "shapes",
        "seed": ev.pop("seed", 0),
        "label": label,
        "win_rate_vs_base": 0.6,
        "win_rate_vs_base_ci_low": 0.55,
        "win_rate_vs_base_ci_high": 0.65,
        "heldout_win_rate_vs_base": 0.58,
        "heldout_win_rate_vs_base_ci_low": 0.52,
        "heldout_win_rate_vs_base_ci_high": 0.64,
        "gold_reward_base": 4.0,
        "gold_reward_trained": 4.5,
        "gold_reward_trained_ci_low": 4.3,
        "gold_reward_trained_ci_high": 4.7,
        "proxy_reward_base": 6.0,
        "proxy_reward_trained": 6.2,
        "kl_to_ref": 100.0,
        "diversity": 1.0,
        "unet_nfe": 19200,
        "reward_queries": 0,
        "train_wall_s": 60.0,
        "wall_s": 100.0,
        "peak_mem_mb": 500.0,
        "inference_nfe_per_sample": 40.0,
        "inference_nfe_per_sample_base": 40.0,
        "inference_reward_queries_per_sample": 0.0,
        "best_of_n_curve": [4.0, 4.4, 4.6, 4.7],
        "best_of_n_curve_by_proxy": [4.0, 4.2, 4.3, 4.35],
        "best_of_n_equivalent": 2.5,
        "best_of_n_equivalent_by_proxy": 4.0,
        "best_of_n_equivalent_censored": False,
        **ev,
    }
    (d / "eval.json").write_text(json.dumps(record))
    OmegaConf.save(
        OmegaConf.create({"algo": {"beta": float(label.split("=")[1]) if "=" in label else 2000.0}}), d / "config.yaml"
    )
    return {"dir": d, "eval": record, "metrics": []}


def test_table1_marks_follow_the_numbers(tmp_path):
    dpo = _fake(tmp_path, "dpo")
    bon = _fake(
        tmp_path,
        "best_of_n",
        algo="best_of_n",
        inference_nfe_per_sample=160.0,
        inference_reward_queries_per_sample=4.0,
        kl_to_ref=1.6,
    )
    draft = _fake(tmp_path, "draft", algo="draft", kl_to_ref=900.0, heldout_win_rate_vs_base_ci_low=0.3)
    marks = {r["eval"]["label"]: experiments.table1_marks(r["eval"], kl_budget=200.0) for r in (dpo, bon, draft)}
    assert [m[0] for m in marks["dpo"].values()] == [True, True, True]
    assert [m[0] for m in marks["best_of_n"].values()] == [True, False, True]
    assert marks["best_of_n"]["equal inference cost"][1].startswith("4× NFE")
    assert [m[0] for m in marks["draft"].values()] == [False, True, False]
    lines = "\n".join(experiments.section_table1([dpo, bon, draft], {"kl_budget": 200.0}, tmp_path))
    assert "| draft | ✗ (held-out win 58.0% [30.0%, 64.0%]) | ✓" in lines and "✗ (KL 900)" in lines


def test_sections_write_their_figures_and_the_report_includes_them(tmp_path):
    runs = [_fake(tmp_path, f"beta={b}", kl_to_ref=1e5 / b) for b in (500, 2000, 5000)]
    lines = experiments.section_beta_sweep(runs, {}, tmp_path)
    assert lines[2].startswith("| 500 |") and (tmp_path / "beta_sweep.png").stat().st_size > 0
    by = {n: {"win_rate": 0.5 + 0.1 * i} for i, n in enumerate(["gold", "proxy"])}
    fig6 = experiments.section_fig6(
        [_fake(tmp_path, "human", win_rate_vs_base_by_reward=by)], {"rewards": ["gold", "proxy"]}, tmp_path
    )
    assert "| human | 50.0% | 60.0% |" in fig6 and (tmp_path / "fig6_ai_feedback.png").exists()
    bon = experiments.section_best_of_n([runs[1]], {}, tmp_path)
    assert "| beta=2000 | 4.500 | 2.50 | 4.00 |" in bon and (tmp_path / "best_of_n.png").exists()
    (tmp_path / "section.md").write_text(
        "## S5 test section\n\n" + "\n".join(lines) + "\n\n![beta sweep](beta_sweep.png)\n"
    )
    (tmp_path / "experiment.json").write_text(json.dumps({"experiment": "beta_sweep"}))
    out = tmp_path / "report"
    md = write_report([tmp_path], out).read_text()
    assert "## S5 test section" in md and "](../beta_sweep.png)" in md
    assert "dpo [beta=500]" in md  # runs are grouped by label, not pooled as seeds
    assert "data:image/png;base64" in (out / "report.html").read_text()


def test_table2_experiment_on_shapes_at_a_tiny_budget(tmp_path):
    """End to end on shapes: an experiment config → one real run (eval.json valid) → its section → the report."""
    overrides = ["train.steps=2", "eval.implicit_pairs=8", "eval.implicit_draws=2", *TINY]
    cfg = compose_cfg(["experiment=table2", f"out_dir={tmp_path}", "seeds=1", *overrides])
    exp_dir = tmp_path / "table2"
    experiments.run(cfg, run_one, exp_dir=exp_dir, overrides=[*overrides, f"out_dir={tmp_path}"])
    ev = json.loads((exp_dir / "runs" / "dpo" / "s0" / "eval.json").read_text())
    validate(ev)
    assert ev["label"] == "dpo" and ev["updates"] == 2
    assert "grid_shapes.png" in (exp_dir / "runs" / "dpo" / "s0" / "report.md").read_text()  # each run's own report
    assert {"reward_acc_gold", "reward_acc_proxy", "implicit_acc", "best_of_n_curve"} <= set(ev)
    assert len(ev["best_of_n_curve"]) == 2 and ev["best_of_n_curve"][1] >= ev["best_of_n_curve"][0]
    section = (exp_dir / "section.md").read_text()
    assert "implicit reward of dpo" in section and "gold reward" in section
    record = json.loads((exp_dir / "experiment.json").read_text())
    assert record["runs"] == {"dpo/s0": "runs/dpo/s0"} and record["seeds"] == [0] and record["wall_s"] > 0
    # Running the same experiment directory again reuses the complete run (no retraining, no overwrite).
    mtime = (exp_dir / "runs" / "dpo" / "s0" / "eval.json").stat().st_mtime
    experiments.run(cfg, run_one, exp_dir=exp_dir, overrides=[*overrides, f"out_dir={tmp_path}"])
    assert (exp_dir / "runs" / "dpo" / "s0" / "eval.json").stat().st_mtime == mtime
    md = write_report([exp_dir]).read_text()
    assert "Table 2" in md and (exp_dir / "grid_shapes.png").exists()


def test_docs_tables_render_from_a_head_to_head_experiment(tmp_path):
    from benchmarks.docs_tables import END, START
    from benchmarks.docs_tables import main as docs_tables_main

    run = _fake(tmp_path / "exp", "dpo", implicit_acc=0.64, diversity_base=1.1)
    OmegaConf.save(
        OmegaConf.create({"world": {"name": "shapes"}, "reward": "proxy", "eval": {"optimum_beta": 1.0}}),
        run["dir"] / "config.yaml",
    )
    docs = tmp_path / "docs"
    (docs / "algos").mkdir(parents=True)
    (docs / "algos" / "dpo.md").write_text(f"# DPO\n\n{START}\nold\n{END}\n\ntext after\n")
    (docs / "README.md").write_text(f"{START}\nold summary\n{END}\n")
    argv = ["--world", "shapes", "--algos", "dpo", "--experiment", str(tmp_path / "exp"), "--docs-dir", str(docs)]
    assert docs_tables_main(argv) == 0
    page = (docs / "algos" / "dpo.md").read_text()
    assert "experiment=head_to_head world=shapes" in page and "budget.kind=nfe budget.amount=19200" in page
    assert "| win rate vs base, training prompts (gold reward, 95% CI) | 60.0% [55.0%, 65.0%] |" in page
    assert "| implicit-reward accuracy on validation pairs | 0.640 |" in page and page.endswith("text after\n")
    summary = (docs / "README.md").read_text()  # one experiment = one comparison, missing modules named
    assert "old summary" not in summary and "| [dpo](algos/dpo.md) | 60.0% |" in summary
    assert "Not in this experiment's runs: dpo_l2, sft" in summary
    # A leaderboard directory: every reporting seed of a module (runs/<algo>/s<seed>/), its commands from the
    # directory's own composed config (the grid at the top budget), numbers with t-intervals over seeds.
    lb = tmp_path / "lb"
    for seed, win in ((0, 0.6), (1, 0.7)):
        ev = _fake(lb, "kto", f"s{seed}", algo="kto", seed=seed, win_rate_vs_base=win)
        OmegaConf.save(OmegaConf.create({"world": {"name": "shapes"}, "reward": "proxy"}), ev["dir"] / "config.yaml")
    (lb / ".hydra").mkdir()
    grid = {"algos": ["kto"], "eval_points": 4, "overrides": ["eval.rewards=[proxy]"]}
    OmegaConf.save(
        OmegaConf.create({"experiment": "leaderboard", "sweep": {"grid": grid, "params": {"budgets": [4800, 19200]}}}),
        lb / ".hydra" / "config.yaml",
    )
    (docs / "algos" / "kto.md").write_text(f"# KTO\n\n{START}\nold\n{END}\n")
    assert docs_tables_main([*argv[:4], "kto", "--experiment", str(lb), "--docs-dir", str(docs)]) == 0
    page = (docs / "algos" / "kto.md").read_text()
    assert "experiment=leaderboard world=shapes (seeds 0, 1)" in page and "budget.amount=19200" in page
    assert "| win rate vs base, training prompts (gold reward, 95% CI) | 65.0% [1.5%, 100.0%] |" in page
    assert "| [kto](algos/kto.md) | 65.0% [1.5%, 100.0%] |" in (docs / "README.md").read_text()
    # Costs are not estimates: a value every seed shares stands alone, differing ones give mean (min–max).
    assert "| UNet evaluations during training | 19200 |" in page
    # With per_sample.npz, the win rates are the leaderboard's: every seed's rows pooled (seed 0 wins 6 of 8
    # draws, seed 1 wins 2 of 8: 50.0%), the interval from the cluster bootstrap (inside [0%, 100%]).
    for seed, wins, wall in ((0, [1, 1, 1, 1, 1, 1, 0, 0], 60.0), (1, [1, 1, 0, 0, 0, 0, 0, 0], 90.0)):
        d = lb / "runs" / "kto" / f"s{seed}"
        np.savez(d / "per_sample.npz", samples_per_prompt=np.array(2), **{"train/wins": np.array(wins, bool)})
        ev = json.loads((d / "eval.json").read_text())
        (d / "eval.json").write_text(json.dumps({**ev, "train_wall_s": wall}))
    assert docs_tables_main([*argv[:4], "kto", "--experiment", str(lb), "--docs-dir", str(docs)]) == 0
    page = (docs / "algos" / "kto.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| win rate vs base, training prompts"))
    mean, lo, hi = (float(x) for x in re.findall(r"(-?[0-9.]+)%", row.split("|")[2]))
    assert mean == 50.0 and 0.0 <= lo < 50.0 < hi <= 100.0
    assert "| training wall seconds | 75.0 (60.0–90.0) |" in page
    assert "| win rate vs base, held-out prompts | 58.0% |" in page  # no held-out rows stored: seeds' values


def test_init_from_with_zero_steps_re_evaluates_a_finished_run(tmp_path):
    """``init_from=<run> train.steps=0`` evaluates the run's final weights: the same numbers as the run's own
    evaluation (how a trained model is re-evaluated in another mode, e.g. ``eval.mode=sdedit``)."""
    from benchmarks.run import run
    from tests.helpers import run_toy

    small = ["eval.samples_per_prompt=32", "eval.heldout=false", "eval.bootstrap=50"]
    first, first_dir = run_toy(tmp_path, ["train.steps=5", *small], name="first")
    cfg = compose_cfg(["world=toy2d", f"out_dir={tmp_path}", "train.steps=0", f"init_from={first_dir}", *small])
    again = run(cfg, run_dir=tmp_path / "again")
    assert again["updates"] == 0 and again["unet_nfe"] == 0
    for key in ("win_rate_vs_base", "gold_reward_trained", "kl_to_ref", "distance_to_optimum_trained"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key
    with pytest.raises(ValueError, match="init_from=.*: not a run directory with a checkpoint"):
        run(compose_cfg(["world=toy2d", "train.steps=0", f"init_from={tmp_path / 'nowhere'}"]), tmp_path / "x")


def test_report_has_win_rates_by_caption_category(tmp_path):
    from benchmarks.report import category_table, group

    cat = {"2 attributes": {"win_rate": 0.7}, "3 attributes": {"win_rate": 0.5}}
    runs = [
        _fake(tmp_path, "a", win_rate_by_category=cat, heldout_win_rate_by_category={"paraphrase": {"win_rate": 0.6}}),
        _fake(tmp_path, "b", algo="sft", win_rate_by_category={"2 attributes": {"win_rate": 0.4}}),
    ]
    table = category_table(group(runs)).splitlines()
    assert table[0] == "| world | algo | 2 attributes | 3 attributes | paraphrase |"
    assert "| shapes | dpo [a] | 70.0% | 50.0% | 60.0% |" in table and "| shapes | sft [b] | 40.0% | – | – |" in table
    assert "by caption category" in write_report([tmp_path / "runs"], tmp_path / "r").read_text()


def test_shapes_prompt_categories():
    from rlkit_diffusion.worlds.shapes.world import eval_prompts, prompt_categories

    train, held = eval_prompts(64, 64, 0)
    cats = prompt_categories(train, held)
    assert {cats[p] for p in held} == {"paraphrase", "unseen colour+shape"}
    assert {cats[p] for p in train} <= {"1 attribute", *(f"{n} attributes" for n in range(2, 6))}
    assert cats["a square"] == "1 attribute"


def test_docs_tables_paste_experiment_sections(tmp_path):
    from benchmarks.docs_tables import END, START
    from benchmarks.docs_tables import main as docs_tables_main

    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps({"experiment": "beta_sweep"}))
    (exp / "section.md").write_text("## S5 title\n\n### sub\n\n![beta sweep](beta_sweep.png)\n")
    (exp / "beta_sweep.png").write_bytes(b"\x89PNG fake")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "experiments.md").write_text(f"# Experiments\n\n{START}\nold\n{END}\n")
    assert docs_tables_main(["--sections", str(exp), "--docs-dir", str(docs)]) == 0
    text = (docs / "experiments.md").read_text()
    assert "### S5 title" in text and "#### sub" in text and "old" not in text
    assert "](images/experiments/beta_sweep_beta_sweep.png)" in text
    assert (docs / "images" / "experiments" / "beta_sweep_beta_sweep.png").read_bytes() == b"\x89PNG fake"


def test_jobs_runs_the_experiment_in_parallel_processes_with_the_same_numbers(tmp_path):
    """``jobs=2``: each run is its own ``python -m benchmarks.run`` process (two at a time, one thread each); every
    eval.json number equals the in-process (``jobs=1``) run's, and the experiment's section and record are written.
    A run that fails is named with its log after the others finish."""
    overrides = ["world=toy2d", "train.steps=3", "train.batch_size=16", *TINY]
    two = [{"label": f"beta={b}", "overrides": ["algo=dpo", f"algo.beta={b}"]} for b in (500, 2000)]

    def beta_sweep(jobs: int):
        cfg = compose_cfg(["experiment=beta_sweep", f"out_dir={tmp_path}", "seeds=1", f"jobs={jobs}", *overrides])
        return OmegaConf.merge(cfg, {"sweep": {"runs": two}})  # two of its runs

    runs = []
    for jobs in (1, 2):
        exp_dir = tmp_path / f"jobs{jobs}"
        experiments.run(beta_sweep(jobs), run_one, exp_dir=exp_dir, overrides=[*overrides, f"out_dir={tmp_path}"])
        runs.append({p.parent.parent.name: json.loads(p.read_text()) for p in exp_dir.glob("runs/*/s0/eval.json")})
        assert (exp_dir / "section.md").exists()
    assert set(runs[0]) == set(runs[1]) == {"beta=500", "beta=2000"}
    assert (tmp_path / "jobs2" / "runs" / "beta=500" / "s0" / "process.log").exists()
    volatile = ("wall_s", "cpu_s", "peak_mem", "checkpoint", "environment", "saved_at")
    for label, ev in runs[0].items():
        for key, value in ev.items():
            if isinstance(value, float) and not any(v in key for v in volatile):
                same = runs[1][label][key] == value or (value != value and runs[1][label][key] != runs[1][label][key])
                assert same, (label, key)
    with pytest.raises(RuntimeError, match=r"(?s)2 run\(s\) failed.*beta=500/s0: exit code 1, log .*process.log"):
        experiments.run(beta_sweep(2), run_one, exp_dir=tmp_path / "bad", overrides=[*overrides, "train.lr=-1"])
    assert "train.lr=-1.0: must be > 0" in (tmp_path / "bad" / "runs" / "beta=500" / "s0" / "process.log").read_text()
