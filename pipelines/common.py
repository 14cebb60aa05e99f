"""What several stage CLIs share: the raw-data flags (named like params.yaml's ``data:`` keys)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from seqvision.config import DataConfig, from_mapping, load_params, to_dict

DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--video-dir``-style flag per ``data:`` key; a flag left out falls back to params.yaml."""
    for f in dataclasses.fields(DataConfig):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=int if f.type in (int, "int") else str,
            default=None,
            help=f"{f.metadata.get('help', '')} (default: params.yaml data.{f.name})",
        )


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The data flags as ``{key: value or None}`` (``None`` = not given)."""
    return {key: getattr(args, key) for key in DATA_KEYS}


def resolve_configs(params: str | Path, overrides: dict[str, Any], section: str) -> tuple[DataConfig, Any]:
    """Validate the whole params file; return (data paths with the given flags applied, ``section``'s config)."""
    loaded = load_params(params)
    data = to_dict(loaded["data"])
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(DataConfig, data, where="data (params + flags)"), loaded[section]
