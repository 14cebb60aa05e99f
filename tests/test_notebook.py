"""The walkthrough notebook as committed (no outputs) and its first cell without artifacts. It runs end to end on
a real pipeline's artifacts in tests/test_end_to_end.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"

_spec = importlib.util.spec_from_file_location("run_notebook", REPO / "scripts" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebook)


def test_the_committed_notebook_is_valid_and_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert code
    with_outputs = [i for i, c in code if c.outputs or c.execution_count is not None]
    assert with_outputs == [], f"cells {with_outputs} keep outputs: clear them before committing"
    assert "widgets" not in nb.metadata


@pytest.mark.integration  # starts a kernel
def test_without_artifacts_the_first_cell_says_how_to_get_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(run_notebook.NotebookCellError) as caught:
        run_notebook.execute(NOTEBOOK, root=tmp_path, out=tmp_path / "out" / "walkthrough.ipynb", timeout=300)
    message = str(caught.value)
    assert message.startswith("walkthrough.ipynb: cell 1 failed: FileNotFoundError: "), message
    assert f"{tmp_path / 'params.yaml'} is missing" in message
    assert "make demo" in message and "dvc pull" in message and "SEQVISION_ROOT" in message
    # The executed copy is written anyway, with the traceback in it.
    executed = nbformat.read(tmp_path / "out" / "walkthrough.ipynb", as_version=4)
    assert [o.ename for o in executed.cells[1].outputs if o.output_type == "error"] == ["FileNotFoundError"]
