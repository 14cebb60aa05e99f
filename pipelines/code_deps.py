"""The code each stage runs, fingerprinted for DVC: one file per entry module, ``{out}/{module}.txt``.

    python -m pipelines.code_deps --root . --out artifacts/code pipelines.extract pipelines.train ...

For each entry module (what a dvc.yaml stage runs with ``python -m``): the first-party source files it runs, found
statically from the source. That is the module, every ``seqvision``/``pipelines`` module it imports, transitively,
lazy (in-function) imports included, every module it starts as a process (a dotted name in a string, as
``-m pipelines.train_worker`` under torchrun), a package's ``__main__.py`` (what ``-m package`` runs), and the
``__init__.py`` of their packages; imports in the body of ``if TYPE_CHECKING:`` are left out (it never runs, its
``else:`` does). One line per file, ``<sha256>  <path>`` sorted by path, as ``sha256sum`` writes it
(``sha256sum -c artifacts/code/pipelines.train.txt`` checks a checkout against it).

Why: a stage depends on its entry module's file here instead of listing its ~40 source files by hand. This stage
depends on the ``pipelines`` and ``src/seqvision`` folders, so it reruns on any change there (a fraction of a
second: no torch, no Prefect) and a file's bytes change only when a file in its closure did: DVC then reruns
exactly the stages whose code changed. The lists cannot drift from the code, and a no-op ``dvc repro`` checks ~80
source files once instead of ~1,200 per-stage entries (docs/benchmarks.md). tests/test_dvc_deps.py checks that every
stage depends on the file of the module it runs.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path

from seqvision.io import write_text

FIRST_PARTY = ("seqvision", "pipelines")


def source_roots(root: Path) -> dict[str, Path]:
    """Where each first-party top-level package lives in a checkout at ``root``."""
    return {"seqvision": root / "src", "pipelines": root}


@functools.cache
def module_file(name: str, root: Path) -> Path | None:
    """The source file of first-party module ``name`` in the checkout at ``root`` (a package's ``__init__.py``), or
    None when it has none."""
    top = name.split(".")[0]
    roots = source_roots(root)
    if top not in roots:
        return None
    base = roots[top].joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):  # a package wins over a module, as in Python
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


@functools.cache
def imported_modules(name: str, root: Path) -> frozenset[str]:
    """First-party modules that module ``name`` imports anywhere (not in the body of ``if TYPE_CHECKING:``), or
    names as a whole string (``"pipelines.train_worker"``: a module it runs as a process)."""
    path = module_file(name, root)
    if path is None:
        raise ModuleNotFoundError(f"no first-party module {name} under {root}")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skip: set[int] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if _is_type_checking(node):  # its body never runs; an `else:` branch does
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.count(".") >= 1:
            found.update((node.value, f"{node.value}.__main__"))  # `-m package` runs its __main__.py
    return frozenset(m for m in found if m.split(".")[0] in FIRST_PARTY and module_file(m, root) is not None)


@functools.cache
def import_closure(entry: str, root: Path) -> frozenset[Path]:
    """Source files of ``entry`` and every first-party module it reaches, parent packages' ``__init__.py`` included."""
    if module_file(entry, root) is None:
        raise ModuleNotFoundError(f"no first-party module {entry} under {root}")
    seen: set[str] = set()
    todo = [m for m in (entry, f"{entry}.__main__") if module_file(m, root)]  # `-m package` runs its __main__.py
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            parent = ".".join(parts[:k])
            if parent not in seen and module_file(parent, root) is not None:
                seen.add(parent)
                todo.append(parent)
        seen.add(name)
        todo.extend(m for m in imported_modules(name, root) if m not in seen)
    return frozenset(p for p in (module_file(m, root) for m in seen) if p is not None)


def fingerprint(entry: str, root: Path) -> str:
    """``entry``'s closure as ``sha256sum`` lines (``<hex>  <path relative to root>``), sorted by path."""
    files = sorted(import_closure(entry, root), key=lambda p: p.relative_to(root).as_posix())
    return "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}\n"
                   for p in files)


def write_fingerprints(entries: Iterable[str], out: str | Path, root: Path) -> list[Path]:
    """``{out}/{entry}.txt`` for every entry module; returns the paths written."""
    texts = {Path(out) / f"{entry}.txt": fingerprint(entry, root) for entry in entries}  # all found, or none written
    for path, text in texts.items():
        write_text(path, text)
    return list(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.code_deps", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("entries", nargs="+", metavar="MODULE", help="entry modules (pipelines.train, ...)")
    parser.add_argument("--root", default=".", help="the checkout whose pipelines/ and src/ hold the modules "
                                                         "(default: the current folder, as DVC runs it)")
    parser.add_argument("--out", required=True, help="folder for the {MODULE}.txt files")
    args = parser.parse_args(argv)
    try:
        written = write_fingerprints(args.entries, args.out, Path(args.root).resolve())
    except ModuleNotFoundError as err:
        print(f"code_deps: error: {err}; name a module under pipelines/ or src/seqvision/", file=sys.stderr)
        return 2
    files = len({line for path in written for line in path.read_text(encoding="utf-8").splitlines()})
    print(f"code_deps: {len(written)} entry modules, {files} source files -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
