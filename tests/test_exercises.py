"""docs/exercises: every notebook runs (its solution's asserts hold) and is in sync with its jupytext source.

The notebooks run on toy2d in ONE kernel (the interpreter running the tests, started once; the user namespace is
reset between notebooks, imported modules stay loaded), so together they take seconds of compute rather than six
interpreter start-ups. The budget is 60 s of kernel CPU time for all of them; wall time is checked too unless the
machine is oversubscribed (load average above the core count), where it measures the neighbours, not the notebooks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jupytext  # the dev extras (pyproject.toml) install jupytext, nbclient, nbformat and ipykernel
import nbclient
import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
EXERCISES = REPO / "docs" / "exercises"
SOURCES = sorted(EXERCISES.glob("ex*.py"))
BUDGET_S = 60.0
TIMES: dict[str, tuple[float, float]] = {}  # notebook → (wall s, kernel CPU s)


def test_there_are_at_least_six_exercises():
    assert len(SOURCES) >= 6
    readme = (EXERCISES / "README.md").read_text()
    for src in SOURCES:
        assert f"({src.stem}.ipynb)" in readme, f"{src.name} is not listed in docs/exercises/README.md"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_is_paired_and_stripped(source: Path):
    """The .ipynb holds exactly the cells of the .py (jupytext percent format) and no outputs."""
    notebook = source.with_suffix(".ipynb")
    assert notebook.is_file(), f"run: jupytext --sync {source.relative_to(REPO)}"
    from_py = jupytext.read(source)
    stored = nbformat.read(notebook, as_version=4)
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in from_py.cells], (
        f"{notebook.name} is out of sync with {source.name}: jupytext --sync {source.relative_to(REPO)}"
    )
    assert stored.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"
    for cell in stored.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{notebook.name}: strip the outputs"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One python3 kernel on THIS interpreter (a kernelspec written for sys.executable), at the repository root,
    with the repository first on the path and one torch thread."""
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "rlkit-exercises"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rlkit-diffusion exercises",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "JUPYTER_PATH": str(spec_dir.parent.parent),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]
    try:
        km = KernelManager(kernel_name="rlkit-exercises")
        km.start_kernel(cwd=str(REPO), env=env)
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    yield km
    km.shutdown_kernel(now=True)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_runs(source: Path, kernel):
    """Execute the stored notebook (its solution asserts its answer); a failing assert fails here."""
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f\nimport torch\ntorch.set_num_threads(1)"))
    client = nbclient.NotebookClient(nb, km=kernel, timeout=300, resources={"metadata": {"path": str(REPO)}})
    pid = kernel.provisioner.process.pid
    cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
    client.execute()
    TIMES[source.stem] = (time.perf_counter() - t0, _cpu_seconds(pid) - cpu0)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Error" not in outputs


def test_all_exercises_run_within_budget():
    if len(TIMES) != len(SOURCES):
        pytest.skip("run together with test_notebook_runs")
    wall = sum(w for w, _ in TIMES.values())
    cpu = sum(c for _, c in TIMES.values())
    each = ", ".join(f"{name} {w:.1f}s" for name, (w, _) in TIMES.items())
    print(f"exercises: {wall:.1f} s wall, {cpu:.1f} s kernel CPU ({each})")
    assert cpu <= BUDGET_S, f"the exercises take {cpu:.1f} s of CPU together (budget {BUDGET_S:.0f} s)"
    if os.getloadavg()[0] <= (os.cpu_count() or 1):
        assert wall <= BUDGET_S, f"the exercises take {wall:.1f} s together (budget {BUDGET_S:.0f} s)"
