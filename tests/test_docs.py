"""The docs stay true: code links resolve, cited equations exist, results blocks are rewritable, the tutorial runs.

* Every link [`dotted.name`](relative/path.py) in docs/ points at a file that exists relative to the page, the
  dotted name imports, and the object is defined in that very file.
* Every other relative link (pages, images) points at an existing file.
* Every equation cited ("eq. 14", "eqs. 21–23", "(48–49)", "eq. D3", "(D3)") resolves: a number to an equation that
  exists in the Diffusion-DPO paper (parsed from the seed text into tests/paper_equations.json, re-checked against
  the seed when it is present), a "D" label to a display of docs/derivation.md tagged with it.
* Every ``python -m benchmarks.run <overrides>`` shown in docs/ or README.md composes as a Hydra override set.
* Every number in docs/ that looks measured (see `run_numbers`) sits inside a pasted results block or quotes one.
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
PAGES = sorted(
    [
        DOCS / "README.md",
        DOCS / "derivation.md",
        DOCS / "experiments.md",
        *(DOCS / "algos").glob("*.md"),
        *(DOCS / "exercises").glob("*.md"),
    ]
)
ALL_DOC_PAGES = sorted(DOCS.rglob("*.md"))
SEEDS = Path(os.environ.get("RLKIT_SEEDS", REPO.parent / "shared" / "seeds"))

# The Diffusion-DPO paper (Wallace et al.) numbers its equations 1-14 in the main text, 15-16 in S1 (DDPO),
# 17-18 in S2 (primary derivation), 19-27 in S3 (RL view) and 28-50 in S4 (noise-aware preference model). The
# list is parsed from the paper's text (`parse_paper_equations`) and kept in tests/paper_equations.json so that the
# docs tests run without the seed; `test_paper_equations_match_the_seed` re-parses the seed when it is present.
PAPER_EQUATIONS = frozenset(
    int(n) for n in json.loads((Path(__file__).parent / "paper_equations.json").read_text())["equations"]
)

CODE_LINK = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\(([^)\s#]+\.py)\)")
ANY_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
EQ_REF = re.compile(r"\b[Ee]qs?\.\s*\(?(D?\d+(?:\s*(?:[–-]|,|and)\s*D?\d+)*)")
EQ_TAG = re.compile(r"\\qquad\s*\((D?\d+)(?:\\text\{–\}(\d+))?\)")
D_REF = re.compile(r"\((D\d+)\)")  # a derivation-defined equation cited in prose: "(D3)"


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
    """Every paper equation number cited in ``text`` ("eq. N", "eqs. N–M", display tags); ranges are expanded."""
    out: set[int] = set()
    for group in EQ_REF.findall(text):
        for part in re.split(r"\s*(?:,|and)\s*", group):
            if part.startswith("D"):
                continue
            bounds = [int(x) for x in re.split(r"\s*[–-]\s*", part)]
            out.update(range(bounds[0], bounds[-1] + 1))
    for lo, hi in EQ_TAG.findall(text):
        if not lo.startswith("D"):
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def cited_labels(text: str) -> set[str]:
    """Every derivation-defined equation cited in ``text``: "eq. D3", "eqs. D1–D2" (ends only), "(D3)"."""
    out = set(D_REF.findall(text))
    for group in EQ_REF.findall(text):
        out.update(re.findall(r"D\d+", group))
    return out


def defined_labels(text: str) -> list[str]:
    """The labels of the displays tagged ``\\qquad (Dn)`` in ``text``, in order."""
    return [lo for lo, _ in EQ_TAG.findall(text) if lo.startswith("D")]


def parse_paper_equations(text: str) -> dict[int, str]:
    """Equation numbers of the paper's text (main text and supplement up to S4): a line ending in "(n)" where n is
    the next number of the sequence 1, 2, ... (figure captions and the pseudocode come after S4 and are ignored)."""
    end = text.find("S5. β Ablation")
    lines = text[: end if end >= 0 else len(text)].splitlines()
    out: dict[int, str] = {}
    for i, line in enumerate(lines):
        m = re.search(r"\((\d{1,2})\)\s*$", line)
        if m and int(m.group(1)) == len(out) + 1:
            out[len(out) + 1] = " ".join(x.strip() for x in lines[max(0, i - 2) : i + 1] if x.strip())[-80:]
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


def test_equation_checks_catch_what_does_not_exist():
    assert cited_equations("eq. 51 and eq. 14") - PAPER_EQUATIONS == {51}
    text = r"$$a = b \qquad (D1)$$ see (D1), eq. D2 and eqs. D1–D3"
    assert defined_labels(text) == ["D1"] and cited_labels(text) - set(defined_labels(text)) == {"D2", "D3"}


def test_paper_equations_match_the_seed():
    marker = "S2. Details of the Primary Derivation"
    seed = next((p for p in sorted(SEEDS.glob("*.txt")) if marker in p.read_text()), None)
    if seed is None:
        pytest.skip(f"the Diffusion-DPO seed text is not in {SEEDS}")
    parsed = parse_paper_equations(seed.read_text())
    stored = json.loads((Path(__file__).parent / "paper_equations.json").read_text())["equations"]
    assert {str(k): v for k, v in parsed.items()} == stored
    assert set(parsed) == set(range(1, 51))


@pytest.mark.parametrize("page", ALL_DOC_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_cited_equations_exist(page: Path):
    """Numbers resolve to the paper's equations; "D" labels to a tagged display of docs/derivation.md."""
    text = page.read_text()
    cited = cited_equations(text)
    assert cited <= PAPER_EQUATIONS, sorted(cited - PAPER_EQUATIONS)
    defined = set(defined_labels((DOCS / "derivation.md").read_text()))
    assert cited_labels(text) <= defined, sorted(cited_labels(text) - defined)


def test_derivation_labels_are_unique_and_numbered_in_order():
    labels = defined_labels((DOCS / "derivation.md").read_text())
    assert labels == [f"D{i}" for i in range(1, len(labels) + 1)], labels


def test_derivation_covers_the_chain():
    """The derivation walks eq. 5 → 14, S2, S3 (19–27), S4.1 (48–49) and DDPO's eq. 15–16."""
    cited = cited_equations((DOCS / "derivation.md").read_text())
    assert set(range(5, 15)) | {15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 27, 48, 49} <= cited


# ----------------------------------------------------------------------------------------------------------------
# Commands: every `python -m benchmarks.run ...` shown composes
# ----------------------------------------------------------------------------------------------------------------
RUN_COMMAND = re.compile(r"python -m benchmarks\.run\b([^`\n|]*)")
PATH_KEYS = ("resume", "init_from", "out_dir", "hydra.run.dir", "hydra.sweep.dir")


def run_commands(text: str) -> list[str]:
    """The argument strings of every ``python -m benchmarks.run`` in ``text`` (code blocks and inline code), with a
    trailing shell comment removed."""
    return [m.group(1).split("#")[0].strip() for m in RUN_COMMAND.finditer(text)]


def overrides_of(args: str) -> list[str] | None:
    """The Hydra override set of one shown command, or None for a template.

    * ``-m`` / ``--multirun`` is dropped and each comma sweep (``seed=0,1,2``) is reduced to its first value;
    * values of path keys (``resume=``, ``init_from=``, ``out_dir=``, ``hydra.*.dir=``) are placeholders by nature
      (``runs/<run dir>``) and are replaced by a dummy path;
    * a command with any other ``<placeholder>``, ``[...]`` or ``...`` is a template and is not composed.
    """
    import shlex

    tokens = shlex.split(re.sub(r"<[^>]*>", lambda m: m.group(0).replace(" ", "_"), args))
    multirun = any(t in ("-m", "--multirun") for t in tokens)
    out = []
    for tok in tokens:
        if tok in ("-m", "--multirun"):
            continue
        key, sep, value = tok.partition("=")
        if not sep:
            return None  # "...", "[any", a bare word: a template, not a command
        if key.lstrip("+~") in PATH_KEYS:
            value = "/tmp/placeholder"
        elif "<" in value or "[" in tok:
            return None
        elif multirun and "," in value:
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


def test_override_parser():
    assert overrides_of("-m algo=dpo seed=0,1,2") == ["algo=dpo", "seed=0"]
    assert overrides_of("algo=dpo resume=runs/<run dir>") == ["algo=dpo", "resume=/tmp/placeholder"]
    assert overrides_of("algo=dpo resume=runs/x") == ["algo=dpo", "resume=/tmp/placeholder"]
    assert overrides_of("experiment=<name> [any override, applied to every run]") is None
    assert overrides_of("...") is None


SHOWN_COMMANDS = sorted(
    {
        args
        for page in [*ALL_DOC_PAGES, REPO / "README.md", REPO / "results" / "README.md"]
        for args in run_commands(page.read_text())
    }
)


def test_docs_show_commands():
    assert len(SHOWN_COMMANDS) >= 40


@pytest.mark.parametrize("args", SHOWN_COMMANDS)
def test_shown_command_composes(args: str):
    """Compose the command's overrides with the runner's config (schemas registered: a typo'd key fails)."""
    from tests.helpers import compose_cfg

    overrides = overrides_of(args)
    if overrides is None:
        pytest.skip(f"template, not a command: {args!r}")
    cfg = compose_cfg(overrides)
    missing = object()
    for ov in overrides:  # every dotted key=value override names a key of the composed config
        key = ov.partition("=")[0]
        if "." in key and not key.startswith(("hydra.", "+", "~")):
            assert OmegaConf.select(cfg, key, default=missing) is not missing, key


def test_a_typo_in_a_shown_command_fails():
    from omegaconf.errors import ConfigKeyError

    from tests.helpers import compose_cfg

    with pytest.raises((ConfigKeyError, Exception), match="betaa|not in struct|Key"):
        compose_cfg(overrides_of("algo=dpo algo.betaa=5"))


# ----------------------------------------------------------------------------------------------------------------
# Numbers: nothing measured is typed
# ----------------------------------------------------------------------------------------------------------------
# A "run number" is a token that looks like a measurement: a decimal with at least three significant digits
# (0.273, 6.21, 104.3, 40.7) or a percentage with a decimal point (75.0%, 4.5%). Integers, one- and two-digit
# decimals (β = 0.5, s = 0.01, std 0.12, 4.5 min) and exponents (3e-4, 10^{-4}) are not run numbers: configuration
# values and derived constants are written that way. arXiv identifiers are not numbers.
RUN_NUMBER = re.compile(r"(?<![\w.:/])(\d+\.\d+%?)(?![\w.])")
# Numbers quoted from the paper itself, not from a run of this repository.
PAPER_NUMBERS = {"2.048", "55.5%"}
# Pages whose numbers are still typed, with every typed number listed (so a new one fails and a fixed one must be
# removed from the list). docs/perf.md is written from `python -m benchmarks.perf`'s printout by hand (nothing pastes
# it yet): it is exempt as a whole, and `test_exempt_pages_are_still_unpasted` removes the exemption once it has a
# block.
KNOWN_TYPED = {
    # The paper's Fig. S4 means (quoted from the paper, not measured here).
    "protocol.md": {"13.7", "25.6"},
    # Printouts of `python -m benchmarks.diagnose_pg` (ddpo.md's diagnosis) and of the toy2d sweeps, pasted by hand
    # into prose and code blocks next to the command that prints them (a page has one docs_tables block only).
    "algos/ddpo.md": {
        # `python -m benchmarks.learning_check` on the 96,000-NFE DDPO/DPOK runs ("At a budget where they learn")
        "0.00155",
        "0.00188",
        "0.00319",
        "0.00353",
        "0.00361",
        "0.00417",
        "0.00451",
        "0.00476",
        "0.00612",
        "0.00615",
        "0.00797",
        "0.0119",
        "6.484",
        "6.496",
        "6.510",
        "6.557",
        "6.652",
        "6.674",
        "6.690",
        "6.713",
        "6.717",
        "6.721",
        "6.727",
        "6.752",
        "6.755",
        "6.783",
        "6.820",
        "6.909",
        "25.4",
        "46.3%",
        "49.6",
        "50.0",
        "53.5%",
        "55.1%",
        "57.2%",
        "59.4%",
        "59.8%",
        "60.2%",
        "61.3%",
        "61.7%",
        "62.9%",
        "64.5%",
        "64.7%",
        "65.6%",
        "67.2%",
        "69.1%",
        "69.3%",
        "70.3%",
        "70.7%",
        "71.1%",
        "72.3%",
        "73.0%",
        "75.4%",
        "77.0%",
        "77.3%",
        "77.7%",
        "82.8%",
        "88.3%",
        "92.3%",
        "102.1",
        "151.6",
        "425.5",
        "0.0544",
        "0.0761",
        "0.0769",
        "0.0811",
        "0.0958",
        "0.110",
        "0.1241",
        "0.126",
        "0.127",
        "0.134%",
        "0.137%",
        "0.138%",
        "0.141",
        "0.142%",
        "0.149%",
        "0.161%",
        "0.1624",
        "0.166%",
        "0.168",
        "0.170",
        "0.172",
        "0.173%",
        "0.183%",
        "0.1958",
        "0.196",
        "0.199%",
        "0.210",
        "0.224",
        "0.225",
        "0.226",
        "0.2263",
        "0.235%",
        "0.2552",
        "0.264%",
        "0.281",
        "0.281%",
        "0.2832",
        "0.3112",
        "0.3398",
        "0.359",
        "0.3696",
        "0.371",
        "0.383",
        "0.385",
        "0.4014",
        "0.403",
        "0.4089",
        "0.411",
        "0.414%",
        "0.425",
        "0.426",
        "0.434",
        "0.4362",
        "0.455",
        "0.455%",
        "0.458",
        "0.470",
        "0.4752",
        "0.476",
        "0.5204",
        "0.533",
        "0.5746",
        "0.605",
        "0.621",
        "0.627",
        "0.630",
        "0.6427",
        "0.667",
        "0.670",
        "0.692",
        "0.692%",
        "0.697",
        "0.709",
        "0.710",
        "0.717",
        "0.7331",
        "0.753",
        "0.763",
        "0.790",
        "0.815",
        "0.827",
        "0.846",
        "0.853",
        "0.8603",
        "0.8620",
        "0.894",
        "0.934",
        "0.951",
        "0.954",
        "1.03",
        "1.05",
        "1.09",
        "1.107%",
        "1.14",
        "1.22",
        "1.30",
        "1.411%",
        "1.42",
        "1.85",
        "100.0%",
        "12.5%",
        "14.2",
        "25.0%",
        "37.5%",
        "5.856",
        "5.876",
        "5.902",
        "5.906",
        "5.938",
        "5.982",
        "50.0%",
        "6.028",
        "6.034",
        "6.039",
        "6.095",
        "6.098",
        "6.120",
        "6.153",
        "6.162",
        "6.196",
        "6.203",
        "6.240",
        "6.278",
        "6.286",
        "6.289",
        "6.300",
        "6.305",
        "6.360",
        "6.402",
        "6.511",
        "6.6882",
        "6.6890",
        "6.739",
        "6.782",
        "6.822",
        "62.5%",
        "75.0%",
        "87.5%",
        "93.558%",
    },
    "algos/dspo.md": {"0.312", "0.394"},
    # "Cost against GRPO": the toy2d runs of `docs_tables --world toy2d --algos grpo mix_grpo`, copied from their
    # printout (the Results blocks now hold the shapes leaderboard's runs).
    "algos/mix_grpo.md": {"0.135", "0.166", "0.339", "1.00", "87.5%", "90.6%"},
    "algos/rethink_dpo.md": {
        "0.374",
        "0.711",
        "0.850",
        "0.931",
        "1.212",
        "1.900",
        "54.3",
        "91.0%",
        "92.3%",
        "92.4%",
        "93.7%",
        "93.8%",
    },
    # "On a flow-matching base": the printouts of `benchmarks.prepare world=shapes(_flow)` (stage=grid) and of
    # `benchmarks.run algo=dpo world=shapes_flow seeds=3` (and the timing runs), pasted by hand beside their commands.
    "algos/dpo.md": {
        # the cold-cache run (`python -m benchmarks.run algo=dpo world=shapes_flow out_dir=<new dir> ...`)
        "116.2",
        "151.1",
        "231.0",
        "246.7",
        # the stage=grid printouts of the two prepare commands
        "0.11328125",
        "0.21484375",
        "0.3203125",
        "0.50390625",
        "3.1771247386932373",
        "4.130190372467041",
        # `OMP_NUM_THREADS=1 python -m benchmarks.run algo=dpo world=shapes_flow seeds=3` (the timing runs repeat
        # 64.1%, 57.4%, 70.3%)
        "1.265",
        "1.396",
        "1.729",
        "3.201",
        "3.300",
        "3.338",
        "3.339",
        "3.350",
        "3.373",
        "3.399",
        "40.000",
        "56.2%",
        "57.4%",
        "59.4%",
        "59.8%",
        "60.5%",
        "62.1%",
        "63.3%",
        "64.1%",
        "66.4%",
        "67.2%",
        "67.6%",
        "68.9%",
        "70.3%",
        "72.7%",
        "73.4%",
        "73.8%",
        "74.3%",
        "75.4%",
        "76.6%",
        "69.9%",
    },
}
# docs/tuning/ pages are sweep records written or printed by a command (`benchmarks.tune`, `benchmarks.sweep_toy2d`,
# `benchmarks.sweep_toy2d_offpolicy`): every number on them is that command's output, and the page must name it.
GENERATED_DIRS = {"tuning"}
# Pages an experiment writes whole (`docs_out` of benchmarks/conf/experiment/leaderboard.yaml and paper_claims.yaml):
# every number on them is that command's output, and the page names the command on its second line.
GENERATED_PAGES = {"leaderboard.md", "leaderboard_flow.md", "leaderboard_10x.md", "paper_claims.md"}
EXEMPT_PAGES = {"perf.md"}


def run_numbers(text: str) -> list[str]:
    """The run-number tokens of ``text`` (leading minus signs and the % are kept as written, minus excluded)."""
    out = []
    for tok in RUN_NUMBER.findall(text):
        digits = tok.rstrip("%").replace(".", "").lstrip("0")
        if len(digits) >= 3 or (tok.endswith("%") and "." in tok):
            out.append(tok)
    return out


def typed_numbers(text: str) -> set[str]:
    """Run numbers outside the pasted results blocks that are not quoted from a pasted block of the same page."""
    from benchmarks.docs_tables import BLOCK

    pasted = {tok for block in BLOCK.findall(text) for tok in run_numbers(block)}
    prose = BLOCK.sub("", text)
    return {tok for tok in run_numbers(prose) if tok not in pasted} - PAPER_NUMBERS


def test_typed_number_check_fails_on_a_typed_number():
    from benchmarks.docs_tables import END, START

    page = f"DPO reaches 0.273 and 75.0% here.\n{START}\n| a | 0.273 |\n{END}\nβ = 0.5, s = 0.01, arXiv:2311.12908"
    assert typed_numbers(page) == {"75.0%"}
    assert typed_numbers(page.replace("75.0%", "75%")) == set()
    assert typed_numbers("the reward is 0.2734") == {"0.2734"}


@pytest.mark.parametrize("page", ALL_DOC_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_no_typed_run_numbers(page: Path):
    name = str(page.relative_to(DOCS))
    if name in EXEMPT_PAGES:
        pytest.skip(f"{name}: exempt (typed from a printout; see EXEMPT_PAGES)")
    if name.split("/")[0] in GENERATED_DIRS:
        assert "python -m benchmarks." in page.read_text(), f"{name}: a sweep record must name the command"
        return
    if name in GENERATED_PAGES:
        assert page.read_text().split("\n")[2].startswith("Written by `python -m benchmarks.run experiment="), name
        return
    assert typed_numbers(page.read_text()) == KNOWN_TYPED.get(name, set())


def test_exempt_pages_are_still_unpasted():
    from benchmarks.docs_tables import BLOCK

    for name in EXEMPT_PAGES:
        text = (DOCS / name).read_text()
        assert not BLOCK.findall(text) and typed_numbers(text), f"{name} is pasted now: drop it from EXEMPT_PAGES"


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
    # mean 0.55 ± t_{0.975,1}·std/√2 = 12.706·0.0707/√2 = [-8.5%, 118.5%], cut to a win rate's range [0, 1]
    assert "55.0% [0.0%, 100.0%]" in two
    assert "mean [Student-t 95% interval over seeds, cut to the metric's range]" in two
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
