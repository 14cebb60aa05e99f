"""Execute the walkthrough notebook headless on a repository's artifacts and write the executed copy (`make notebook`).

    python scripts/run_notebook.py [--root .] [--notebook notebooks/walkthrough.ipynb]
                                   [--out notebooks/executed/walkthrough.ipynb] [--timeout 600]

Every cell runs in a fresh ``python3`` kernel of this interpreter (ipykernel, from the ``dev`` extra), in the
notebook's folder, with ``SEQVISION_ROOT`` naming the repository whose ``artifacts/``, ``reports/`` and MLflow
store the notebook reads (``MLFLOW_TRACKING_URI`` passes through when set). The committed notebook keeps no
outputs; the executed copy goes outside ``reports/``, which is the report stage's DVC output.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"


class NotebookCellError(RuntimeError):
    """A cell raised; the message names the cell (number and section) and the error."""


def _section(cells: list, index: int) -> str:
    """The last section heading (``## ...``) at or before cell ``index`` ('' if none)."""
    for cell in reversed(cells[: index + 1]):
        if cell.cell_type == "markdown":
            headings = [line[3:].strip() for line in cell.source.splitlines() if line.startswith("## ")]
            if headings:
                return headings[-1]
    return ""


def execute(notebook: str | Path, *, root: str | Path, out: str | Path | None = None, timeout: int = 600,
            env: Mapping[str, str] | None = None) -> float:
    """Run every cell of ``notebook`` with ``SEQVISION_ROOT=root``; write the executed copy to ``out`` (atomically,
    also when a cell fails, so its traceback can be read there). ``timeout``: seconds per cell; ``env``: the
    kernel's environment (default: this process's). Returns the seconds the execution took; raises
    :class:`NotebookCellError` naming the failing cell."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    notebook = Path(notebook)
    nb = nbformat.read(notebook, as_version=4)
    current = {"index": -1}

    def on_cell_start(cell: object, cell_index: int) -> None:
        current["index"] = cell_index

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", on_cell_start=on_cell_start,
                            resources={"metadata": {"path": str(notebook.parent)}})
    kernel_env = {**(os.environ if env is None else env), "SEQVISION_ROOT": str(Path(root).resolve())}
    start = time.perf_counter()
    try:
        client.execute(env=kernel_env)
    except (CellExecutionError, CellTimeoutError) as err:
        index = current["index"]
        section = _section(nb.cells, index)
        what = f"{type(err).__name__}" if isinstance(err, CellTimeoutError) else f"{err.ename}: {err.evalue}"
        details = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the traceback without its terminal colours
        raise NotebookCellError(f"{notebook.name}: cell {index}" + (f" (section '{section}')" if section else "")
                                + f" failed: {what}\n{details}") from None
    finally:
        if out is not None:
            from seqvision.io import write_text

            write_text(out, nbformat.writes(nb))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/run_notebook.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="the repository whose artifacts the notebook reads (default: .)")
    parser.add_argument("--notebook", default=str(NOTEBOOK.relative_to(REPO)), help="the notebook to run")
    parser.add_argument("--out", default="notebooks/executed/walkthrough.ipynb", help="where the executed copy goes")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default: 600)")
    args = parser.parse_args(argv)
    try:
        seconds = execute(args.notebook, root=args.root, out=args.out, timeout=args.timeout)
    except NotebookCellError as err:
        print(f"error: {err}\nThe executed cells are in {args.out}.", file=sys.stderr)
        return 1
    print(f"Executed {args.notebook} in {seconds:.0f} s on the artifacts in {Path(args.root).resolve()}: {args.out}\n"
          f"Open it with any notebook viewer (VS Code, JupyterLab); to rerun cells interactively: "
          f"pip install jupyterlab, then jupyter lab {args.notebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
