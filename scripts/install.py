"""Install the pinned package set (constraints.txt) and seqvision, editable with its ``dev`` extra, into the
interpreter that runs this script (``make install``: the project's ``.venv``).

    .venv/bin/python scripts/install.py [--pip]

It installs with uv (pinned below, itself installed with pip first): the same packages as pip from the same
places, in 48 s instead of 2 min 29 s on a fresh 2-core machine (docs/benchmarks.md, "Installation"), because
uv unpacks the multi-GB torch and CUDA wheels in parallel. uv does not read pip's configuration, so the
index, extra indexes, find-links folders, constraint files and certificate that pip would use here (``pip
config list``: files and ``PIP_*`` variables) are handed to it, and it picks from every index as pip does.
Bytecode is compiled at install time, as pip does: without it, an environment that sets PYTHONDONTWRITEBYTECODE
pays about 3 s more per process on the imports of torch, Prefect and MLflow. If uv cannot be installed or
fails, or with ``--pip``, pip installs everything as before.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UV = "uv==0.13.9"
# pip option -> uv option; the list-valued ones take several whitespace-separated values, as in pip.
UV_OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
               "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}
LIST_OPTIONS = {"extra-index-url", "find-links", "constraint", "trusted-host"}
# Where pip reads an option, strongest first: PIP_* variables, then the install and global sections of its files.
SOURCES = (":env:", "install", "global")


def pip_config(listing: str) -> dict[str, str]:
    """``{option: value}`` from ``pip config list`` output (``section.option='value'`` lines), each option from the
    strongest source that sets it."""
    found: dict[tuple[str, str], str] = {}
    for line in listing.splitlines():
        name, sep, value = line.partition("=")
        section, dot, option = name.rpartition(".")
        if sep and dot and section in SOURCES:
            found[section, option] = value.strip().strip("'\"")
    options = {option for _, option in found}
    return {option: next(found[s, option] for s in SOURCES if (s, option) in found) for option in options}


def uv_arguments(config: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The uv options and environment variables that give uv what pip's ``config`` gives pip."""
    args: list[str] = []
    for option, flag in UV_OPTIONS.items():
        values = config.get(option, "").split() if option in LIST_OPTIONS else [config.get(option, "")]
        args += [part for value in values if value for part in (flag, value)]
    if config.get("no-index", "").lower() in {"1", "true", "yes", "on"}:
        args.append("--no-index")
    env = {"SSL_CERT_FILE": config["cert"]} if config.get("cert") and "SSL_CERT_FILE" not in os.environ else {}
    return args, env


def run(args: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(args, cwd=REPO, env={**os.environ, **(env or {})}).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pip", action="store_true", help="install with pip only (slower; no uv)")
    args = parser.parse_args(argv)
    python = sys.executable
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    project = ["-c", "constraints.txt", "-e", ".[dev]"]
    if not args.pip:
        listing = subprocess.run([*pip, "config", "list"], capture_output=True, text=True).stdout
        uv_args, uv_env = uv_arguments(pip_config(listing))
        # -qq: without pip's warnings about the indexes that lack uv
        if run([*pip, "install", "-qq", UV]) and run(
            [python, "-m", "uv", "pip", "install", "--quiet", "--python", python, "--compile-bytecode",
             "--index-strategy", "unsafe-best-match", *uv_args, *project], uv_env):
            return 0
        print("install: uv could not install the package set; installing with pip instead", file=sys.stderr)
    return 0 if run([*pip, "install", "--quiet", *project]) else 1


if __name__ == "__main__":
    sys.exit(main())
