"""``python -m seqvision.synth --out DIR``: generate the synthetic benchmark (see docs/data.md)."""

from __future__ import annotations

import argparse
import sys

import yaml

from ..config import (
    SYNTH_PRESETS,
    ConfigError,
    SynthConfig,
    add_config_arguments,
    from_mapping,
    load_params,
    merge,
    overrides_from_args,
    to_dict,
)
from .events import GenerationError
from .generate import OutputFolderError, generate

EPILOG = """\
precedence: embedded defaults < the params file's synth section (--params) < --preset < explicit flags.

output folder: an empty or missing --out is filled. A folder holding an earlier run with the same
synth.json is resumed (complete files kept, temporary leftovers removed, missing files written). Anything
else - a different configuration, or files the generator does not write - is refused unless --overwrite.
--overwrite deletes only what the generator writes (synth.json, videos/video{N}.mp4, images/image{N}.png,
the annotation files, and temporary leftovers of these), then generates; other files are never deleted.

exit status: 0 done, 2 invalid parameters, a refused output folder (nothing is written then), or a
configuration that leaves no valid item to draw.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seqvision.synth",
        description="Generate the deterministic synthetic video/image benchmark (MSR-VTT, UCF101 and COCO formats).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="output folder (e.g. data)")
    parser.add_argument(
        "--preset", choices=sorted(SYNTH_PRESETS), default="default", help="named overrides (default: default)"
    )
    parser.add_argument("--params", help="params.yaml to read the synth section from (validated as a whole)")
    parser.add_argument("--overwrite", action="store_true", help="replace the generator's own files in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_arguments(parser, SynthConfig)
    return parser


def resolve_config(args: argparse.Namespace) -> SynthConfig:
    """Defaults < params file < preset < flags, validated once at the end. Raises ConfigError."""
    base = to_dict(load_params(args.params).synth) if args.params else to_dict(SynthConfig())
    merged = merge(merge(base, SYNTH_PRESETS[args.preset]), overrides_from_args(args))
    return from_mapping(SynthConfig, merged, where="synth")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except yaml.YAMLError as err:  # flag values are parsed as YAML scalars ("3" -> 3)
        parser.error(f"a flag value is not valid YAML: {' '.join(str(err).split())}")
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err} (see --help)", file=sys.stderr)
        return 2
    try:
        summary = generate(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    except (OutputFolderError, GenerationError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
