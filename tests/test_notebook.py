"""The quickstart notebook runs: every code cell, in order, in a fresh Python process.

No Jupyter is needed: the notebook is nbformat-4 JSON, and its cells' sources run with
``exec`` in one namespace, as a kernel would run them. The test then checks the values the
cells computed: the run's audit logs verify, every site stayed within the ε the run asked
for, the ledger holds the run's charges, and the site trained alone stayed within its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcare.client.local import RUN_CEILING_TOLERANCE

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebooks" / "quickstart.ipynb"

#: Runs the notebook's code cells in order, then prints what they computed as one JSON line.
RUNNER = """
import json
import sys

import tempfile

tempfile.tempdir = sys.argv[2]  # the notebook's working folder goes in the test's folder
notebook = json.loads(open(sys.argv[1], encoding="utf-8").read())
namespace = {"__name__": "__main__"}
for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), f"<cell {index}>", "exec"), namespace)

result, ledger, local = namespace["result"], namespace["ledger"], namespace["local"]
print("NOTEBOOK " + json.dumps({
    "target": namespace["TARGET_EPSILON"],
    "statuses": [s.status for s in result.summary.sites],
    "rounds": sorted(result.round_metrics),
    "epsilon_spent": result.epsilon_spent,
    "charges": [[c.run_id == result.run_id, c.kind, c.round] for c in ledger.charges],
    "verified": namespace["verification"].ok,
    "logs": sorted(log.writer for log in namespace["verification"].logs),
    "local_epsilon": local.epsilon_spent,
    "local_steps": local.steps,
    "workdir": str(namespace["workdir"]),
}))
"""


def test_the_notebook_is_nbformat_4_with_code_to_run() -> None:
    notebook = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 4
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code")
        assert isinstance(cell["source"], list) and cell["metadata"] == {}
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            compile("".join(cell["source"]), cell["id"], "exec")  # each cell is Python
    assert sum(cell["cell_type"] == "code" for cell in notebook["cells"]) >= 5


@pytest.mark.slow
@pytest.mark.integration
def test_every_cell_of_the_quickstart_runs_and_computes_what_it_says(tmp_path: Path) -> None:
    child = subprocess.run(
        # Not TMPDIR: Ray puts its sockets there, and a long path exceeds a socket name.
        [sys.executable, "-c", RUNNER, str(NOTEBOOK), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert child.returncode == 0, (child.stdout[-2000:], child.stderr[-4000:])
    (line,) = [out for out in child.stdout.splitlines() if out.startswith("NOTEBOOK ")]
    seen = json.loads(line.removeprefix("NOTEBOOK "))
    assert Path(seen["workdir"]).parent == tmp_path
    assert seen["statuses"] == ["completed", "completed"]
    assert seen["rounds"] == [0, 1, 2]
    assert set(seen["epsilon_spent"]) == {"site-0", "site-1"}
    for spent in seen["epsilon_spent"].values():
        assert 0 < spent <= seen["target"] + RUN_CEILING_TOLERANCE
    trained = [c for c in seen["charges"] if c[1] == "train"]
    assert trained == [[True, "train", 1], [True, "train", 2]]
    assert seen["verified"] is True
    assert seen["logs"] == ["server", "site-0", "site-1"]
    assert 0 < seen["local_epsilon"] <= 1.0 + RUN_CEILING_TOLERANCE
    assert seen["local_steps"] > 0
