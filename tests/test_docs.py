"""The docs stay true: code links resolve, cited equations exist, results blocks are rewritable, the tutorial runs.

* Every link [`dotted.name`](relative/path.py) in docs/ points at a file that exists relative to the page, the
  dotted name imports, and the object is defined in that very file.
* Every other relative link (pages, images) points at an existing file.
* Every equation number cited ("eq. 14", "eqs. 21–23", "(48–49)") is one of the Diffusion-DPO paper's.
* Every algorithm of the registry has a page with exactly one results block, which `benchmarks.docs_tables` can
  rewrite.
* ``python -m benchmarks.run experiment=toy2d_tutorial`` runs at a tiny budget and writes its figure.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted([DOCS / "README.md", DOCS / "derivation.md", DOCS / "experiments.md", *(DOCS / "algos").glob("*.md")])

# The Diffusion-DPO paper (Wallace et al.) numbers its equations 1-14 in the main text, 15-16 in S1 (DDPO),
# 17-18 in S2 (primary derivation), 19-27 in S3 (RL view) and 28-50 in S4 (noise-aware preference model).
PAPER_EQUATIONS = frozenset(range(1, 51))

CODE_LINK = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\(([^)\s#]+\.py)\)")
ANY_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EQ_REF = re.compile(r"\b[Ee]qs?\.\s*\(?(\d+(?:\s*(?:[–-]|,|and)\s*\d+)*)")
EQ_TAG = re.compile(r"\\qquad\s*\((\d+)(?:\\text\{–\}(\d+))?\)")


def code_links(page: Path) -> list[tuple[str, str]]:
    return CODE_LINK.findall(page.read_text())


def resolve_dotted(name: str):
    """Import the longest importable module prefix of ``name`` and getattr the rest."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = inspect.getattr_static(obj, attr) if inspect.isclass(obj) else getattr(obj, attr)
        return obj
    raise ImportError(f"no importable module prefix in {name!r}")


def source_file(obj) -> Path:
    """The file that defines ``obj`` (functions, classes, methods, static/class methods, properties, modules)."""
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return Path(inspect.getsourcefile(inspect.unwrap(obj))).resolve()


def cited_equations(text: str) -> set[int]:
    """Every equation number cited in ``text``; ranges ("21–23") are expanded."""
    out: set[int] = set()
    for group in EQ_REF.findall(text):
        for part in re.split(r"\s*(?:,|and)\s*", group):
            bounds = [int(x) for x in re.split(r"\s*[–-]\s*", part)]
            out.update(range(bounds[0], bounds[-1] + 1))
    for lo, hi in EQ_TAG.findall(text):
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Links
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_code_links_resolve(page: Path):
    links = code_links(page)
    errors = []
    for name, rel in links:
        path = (page.parent / rel).resolve()
        if not path.is_file():
            errors.append(f"[{name}]({rel}): {path} does not exist")
            continue
        try:
            obj = resolve_dotted(name)
        except (ImportError, AttributeError) as err:
            errors.append(f"[{name}]({rel}): does not import ({err})")
            continue
        if source_file(obj) != path:
            errors.append(f"[{name}]({rel}): defined in {source_file(obj)}, not in {path}")
    assert not errors, "\n".join(errors)


def test_pages_link_enough_code():
    assert len(code_links(DOCS / "derivation.md")) >= 60
    for page in (DOCS / "algos").glob("*.md"):
        assert len(code_links(page)) >= 4, page.name


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (letters of any script kept), spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_and_anchors_resolve(page: Path):
    missing = []
    for target in ANY_LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            missing.append(target)
    assert not missing, missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_table_rows_have_no_pipes_inside_math(page: Path):
    """A ``|`` inside $...$ in a table row splits the cell on GitHub; use \\lvert, \\rvert, \\mid, \\Vert."""
    bad = [m for line in page.read_text().splitlines() if line.startswith("|") for m in re.findall(r"\$[^$]*\$", line)]
    assert not [m for m in bad if "|" in m]


def test_resolver_catches_a_wrong_file_and_a_wrong_name():
    assert source_file(resolve_dotted("algos.dpo.dpo_loss")) == (REPO / "algos" / "dpo.py").resolve()
    assert source_file(resolve_dotted("algos.dpo.DPO.loss")) == (REPO / "algos" / "dpo.py").resolve()
    assert source_file(resolve_dotted("rlkit_diffusion.policy.DiffusionPolicy.log_prob")).name == "policy.py"
    assert source_file(resolve_dotted("algos.ddpo.DPOK.objective")) != (REPO / "algos" / "dpo.py").resolve()
    with pytest.raises(AttributeError):
        resolve_dotted("algos.dpo.no_such_loss")


# ----------------------------------------------------------------------------------------------------------------
# Equations
# ----------------------------------------------------------------------------------------------------------------
def test_equation_parser():
    text = r"eq. 5, eqs. 6–7, Eq. (14), eqs. 24, 26 and 27, eqs. 48-49 $$x \qquad (48\text{–}49)$$"
    assert cited_equations(text) == {5, 6, 7, 14, 24, 26, 27, 48, 49}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_cited_equations_exist(page: Path):
    cited = cited_equations(page.read_text())
    assert cited <= PAPER_EQUATIONS, sorted(cited - PAPER_EQUATIONS)


def test_derivation_covers_the_chain():
    """The derivation walks eq. 5 → 14, S2, S3 (19–27), S4.1 (48–49) and DDPO's eq. 15–16."""
    cited = cited_equations((DOCS / "derivation.md").read_text())
    assert set(range(5, 15)) | {15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 27, 48, 49} <= cited


# ----------------------------------------------------------------------------------------------------------------
# Algorithm pages and their results blocks
# ----------------------------------------------------------------------------------------------------------------
def test_every_algorithm_has_a_page_with_one_results_block():
    from algos import ALGOS
    from benchmarks.docs_tables import ALGOS as TABLE_ALGOS
    from benchmarks.docs_tables import BLOCK

    assert set(TABLE_ALGOS) == set(ALGOS)
    pages = {p.stem: p for p in (DOCS / "algos").glob("*.md")}
    assert set(pages) == set(ALGOS)
    for name, page in pages.items():
        text = page.read_text()
        assert len(BLOCK.findall(text)) == 1, name
        for section in ("## Overview", "## Paper", "## Usage", "## Logged metrics", "## Implementation details"):
            assert section in text, (name, section)
        assert f"algo={name}" in text
    assert len(BLOCK.findall((DOCS / "README.md").read_text())) == 1


def _fake_result(algo: str, seed: int) -> dict:
    keys = [
        "win_rate_vs_base",
        "heldout_win_rate_vs_base",
        "gold_reward_base",
        "gold_reward_trained",
        "proxy_reward_base",
        "proxy_reward_trained",
        "distance_to_optimum_base",
        "distance_to_optimum_trained",
        "kl_to_ref",
        "diversity",
        "diversity_base",
        "updates",
        "train_wall_s",
        "unet_nfe",
        "reward_queries",
        "inference_nfe_per_sample",
    ]
    r = {k: 0.5 + 0.1 * seed for k in keys}
    r.update(win_rate_vs_base_ci_low=0.4, win_rate_vs_base_ci_high=0.6, algo=algo, world="toy2d", seed=seed)
    return r


def test_docs_tables_rewrites_only_the_block(tmp_path: Path):
    from benchmarks.docs_tables import END, START, algo_table, replace_block, summary_table

    page = tmp_path / "x.md"
    page.write_text(f"# Title\n\nprose\n\n{START}\nold numbers\n{END}\n\nmore prose\n")
    config = OmegaConf.create({"reward": "proxy", "eval": {"optimum_beta": 1.0}})
    block = algo_table([_fake_result("dpo", 0)], config, ["python -m benchmarks.run algo=dpo world=toy2d"], "regen")
    replace_block(page, block)
    text = page.read_text()
    assert "old numbers" not in text and text.startswith("# Title\n\nprose\n") and text.endswith("more prose\n")
    assert "| win rate vs base, training prompts (gold reward, 95% CI) | 50.0% [40.0%, 60.0%] |" in text
    assert "β* = 1" in text
    two = algo_table([_fake_result("dpo", 0), _fake_result("dpo", 1)], config, ["a", "b"], "regen")
    assert "55.0% ± 7.1%" in two
    summary = summary_table({"dpo": [_fake_result("dpo", 0)]}, "toy2d", "regen")
    assert "[dpo](algos/dpo.md)" in summary
    page.write_text("no block here")
    with pytest.raises(ValueError):
        replace_block(page, block)


# ----------------------------------------------------------------------------------------------------------------
# The tutorial
# ----------------------------------------------------------------------------------------------------------------
def test_tutorial_settings_are_checked():
    from benchmarks.tutorial import algo_settings

    spec = OmegaConf.create({"beta_key": "beta", "beta_scale": 10.0, "algo": {}, "train": {"steps": 200}})
    algo_cfg, train_cfg = algo_settings("dpo", spec, 0.5, 0.05)
    assert algo_cfg.beta == 5.0 and train_cfg.steps == 10
    with pytest.raises(Exception, match="betaa"):
        algo_settings("dpo", OmegaConf.create({"algo": {"betaa": 1.0}}), None, 1.0)


def test_tutorial_command_writes_the_figure(tmp_path: Path):
    run_dir = tmp_path / "tutorial"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "experiment=toy2d_tutorial",
        "tutorial.steps_scale=0.01",
        "tutorial.samples=64",
        "tutorial.grid=41",
        "tutorial.copy_to=null",
        "tutorial.progress=false",
        "world.optimum_pool=512",
        f"out_dir={tmp_path}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figure = run_dir / "toy2d_tutorial.png"
    assert figure.is_file() and figure.stat().st_size > 10_000
    summary = json.loads((run_dir / "tutorial.json").read_text())
    cfg = OmegaConf.load(REPO / "benchmarks" / "conf" / "experiment" / "toy2d_tutorial.yaml")
    algos = {"reference", *cfg.tutorial.algos}
    assert {p["algo"] for p in summary["panels"]} == algos
    assert len(summary["panels"]) == len(algos) * len(cfg.tutorial.betas)
    assert {"dpo", "ddpo", "draft", "dpok"} <= algos
