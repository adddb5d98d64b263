"""Settings that cannot differ between algorithms: on a given world every algorithm is built in the same world and
scored by the same evaluation. Tuning files (conf/tuning/<world>_<algo>.yaml) may set only algo/train/reference;
a recipe that changes the world or the evaluation is a conf/experiment/ file."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from benchmarks.run import group_choices
from benchmarks.wiring import CONF_DIR, TUNING_KEYS, check_tuning
from tests.helpers import compose_cfg


def resolved(node) -> dict:
    return OmegaConf.to_container(node, resolve=True)


@pytest.mark.parametrize("world", group_choices("world"))
def test_world_and_eval_nodes_are_identical_across_algorithms(world):
    algos = group_choices("algo")
    cfgs = {algo: compose_cfg([f"world={world}", f"algo={algo}"]) for algo in algos}
    first = cfgs[algos[0]]
    for algo, cfg in cfgs.items():
        assert resolved(cfg.world) == resolved(first.world), f"world node differs: {world} {algo}"
        assert resolved(cfg.eval) == resolved(first.eval), f"eval node differs: {world} {algo}"


def test_default_run_keeps_its_evaluation_settings():
    """The settings the tuning files used to repeat now come from the world (the same values as before)."""
    toy, shapes = compose_cfg(["world=toy2d"]), compose_cfg([])
    assert (toy.eval.samples_per_prompt, toy.eval.optimum_beta) == (256, 1.0)
    assert shapes.world.name == "shapes" and shapes.eval.samples_per_prompt == 4
    sd15 = compose_cfg(["world=sd15"])
    assert (sd15.world.resolution, sd15.world.hflip, sd15.eval.samples_per_prompt, sd15.eval.batch_size) == (
        512,
        True,
        2,
        16,
    )


def test_every_tuning_file_sets_only_algo_train_reference():
    files = sorted((CONF_DIR / "tuning").glob("*.yaml"))
    assert files
    for f in files:
        assert set(OmegaConf.load(f)) <= {*TUNING_KEYS, "defaults"}, f.name
        world, _, algo = f.stem.partition("_")
        check_tuning(world, algo)


def test_a_tuning_file_that_sets_the_evaluation_is_refused(tmp_path):
    (tmp_path / "tuning").mkdir()
    bad = tmp_path / "tuning" / "toy2d_dpo.yaml"
    bad.write_text("# @package _global_\nalgo:\n  beta: 20.0\neval:\n  samples_per_prompt: 8\n")
    with pytest.raises(ValueError) as err:
        check_tuning("toy2d", "dpo", conf_dir=tmp_path)
    message = str(err.value)
    assert str(bad) in message and "'eval'" in message and "\n" not in message
    check_tuning("toy2d", "ddpo", conf_dir=tmp_path)  # no tuning file: nothing to check


def test_the_aesthetic_recipe_is_an_experiment():
    cfg = compose_cfg(["experiment=sd15_ddpo_aesthetic"])
    assert (cfg.world.name, cfg.algo.name) == ("sd15", "ddpo")
    assert (cfg.world.proxy_reward, cfg.world.eval_reward, cfg.world.guidance_scale) == ("aesthetic", "aesthetic", 5.0)
    assert cfg.algo.num_minibatches == 400 and cfg.reference.lora_rank == 4  # tuning/sd15_ddpo.yaml still applies
    plain = compose_cfg(["world=sd15", "algo=ddpo"])
    assert plain.world.eval_reward == plain.world.proxy_reward == "pickscore"


def test_a_tuning_file_may_take_only_other_tuning_files_whole(tmp_path):
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "toy2d_dpo.yaml").write_text("# @package _global_\nalgo:\n  beta: 20.0\n")
    flow = tmp_path / "tuning" / "toy2d_flow_dpo.yaml"
    flow.write_text("# @package _global_\ndefaults:\n  - /world/shapes\n")
    with pytest.raises(ValueError, match="only other tuning files"):
        check_tuning("toy2d_flow", "dpo", conf_dir=tmp_path)
    flow.write_text("# @package _global_\ndefaults:\n  - toy2d_dpo\n")
    check_tuning("toy2d_flow", "dpo", conf_dir=tmp_path)
    (tmp_path / "tuning" / "toy2d_dpo.yaml").write_text("# @package _global_\neval:\n  samples_per_prompt: 8\n")
    with pytest.raises(ValueError, match="'eval'"):  # what it takes whole is checked too
        check_tuning("toy2d_flow", "dpo", conf_dir=tmp_path)


@pytest.mark.parametrize("algo", group_choices("algo"))
def test_shapes_flow_uses_shapes_tuning_for_every_algorithm(algo):
    flow, eps = compose_cfg(["world=shapes_flow", f"algo={algo}"]), compose_cfg(["world=shapes", f"algo={algo}"])
    for node in TUNING_KEYS:
        assert OmegaConf.to_container(flow[node]) == OmegaConf.to_container(eps[node]), (algo, node)
