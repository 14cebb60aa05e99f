"""extract stage: videos and images -> uint8 frame shards in ``artifacts/frames/``.

    python -m pipelines.extract --params params.yaml --out artifacts/frames [--video-dir ... data flags]

Inputs: the ``extract`` and ``data`` sections of params.yaml (the whole file is validated first), and the raw
data named by the flags below (a flag left out falls back to params.yaml's ``data:`` value). Videos are the union of
the captioned (``--video-captions``) and labelled (``--activity-dir``) clips; images are those listed by
``--image-captions-dir`` / ``--karpathy-split``.

Outputs in ``--out`` (contract: docs/design.md):
  videos-{split}-{k:03d}.npy  uint8 (n, T, H, W, 3) RGB       images-{split}-{k:03d}.npy  uint8 (n, H, W, 3)
  index.json   config + one entry per stored video/image (shard, row, frame indices, decoder)
  skipped.json every file that could not be decoded, with the reason

Exit status: 0 done; 1 more files undecodable than extract.max_skipped_fraction (see skipped.json);
2 bad params or a missing input. The work is seqvision.frames.extract; this flow loads records and hands it
a Prefect task per shard (retried on I/O errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import FailedRun
from prefect.states import Failed, State

from seqvision import annotations, frames
from seqvision.config import ConfigError, DataConfig, ExtractConfig, load_params

from pipelines.common import IO_RETRIES, add_data_arguments, add_params_argument, exit_fast, read_params, run_main


def check_inputs(data: DataConfig) -> None:
    """Fail fast, naming the path, when a configured input is missing (before any decoding starts)."""
    annotations.check_sources(
        video_captions=data.video_captions,
        activity_dir=data.activity_dir,
        activity_split=data.activity_split,
        image_captions_dir=data.image_captions_dir,
        karpathy_split=data.karpathy_split,
    )
    has_videos = bool(data.video_captions or data.activity_dir)
    has_images = bool(data.image_captions_dir or data.karpathy_split)
    if not (has_videos or has_images):
        raise ConfigError("nothing to extract: data.video_captions, data.activity_dir, data.image_captions_dir "
                          "and data.karpathy_split are all empty")
    for wanted, folder in ((has_videos, data.video_dir), (has_images, data.image_dir)):
        if wanted and not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")


@task(cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def load_records(data: DataConfig) -> tuple[list[Any], list[Any]]:
    """(video records, image records) for the sources that are configured; an annotation source that leaves a
    split empty is an error naming it (here, not after features are computed)."""
    videos: list[Any] = []
    images: list[Any] = []
    if data.video_captions or data.activity_dir:
        videos = annotations.load_video_records(
            video_dir=data.video_dir,
            video_captions=data.video_captions,
            video_captions_format=data.video_captions_format,
            activity_dir=data.activity_dir,
            activity_split=data.activity_split,
        )
        annotations.check_video_splits(
            videos, video_captions=data.video_captions, video_captions_format=data.video_captions_format,
            activity_dir=data.activity_dir, activity_split=data.activity_split,
        )
    if data.image_captions_dir or data.karpathy_split:
        images = annotations.load_image_records(
            image_dir=data.image_dir, image_captions_dir=data.image_captions_dir,
            karpathy_split=data.karpathy_split,
        )
        annotations.check_image_splits(
            images, image_captions_dir=data.image_captions_dir, karpathy_split=data.karpathy_split
        )
    return videos, images


@task(
    **IO_RETRIES,
    cache_policy=NO_CACHE,
    task_run_name="{plan.kind}-{plan.split}-{plan.number:03d}",
)
def extract_shard(extractor: frames.FrameExtractor, plan: frames.ShardPlan) -> frames.ShardResult:
    """Decode one shard's files and write its .npy (atomically, so a retry starts clean)."""
    return extractor.extract_shard(plan)


@flow(name="extract")
def extract_flow(
    *,
    config: ExtractConfig | None = None,
    data: DataConfig | None = None,
    params: str = "params.yaml",
    out: str = "artifacts/frames",
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any] | State:
    """Extract every configured video and image into ``out``; returns counts (stored, skipped, by decoder).

    ``config`` / ``data``: the ``extract`` and ``data`` sections (``main`` passes them, read once); a section not
    given is read from the ``params`` file (a deployment run). Too many undecodable files end the run Failed with a
    one-line message (calling the flow then raises ``prefect.exceptions.FailedRun``); ``skipped.json`` is written,
    ``index.json`` is not.
    """
    logger = get_run_logger()
    if config is None or data is None:
        loaded = load_params(params)
        config, data = config or loaded.extract, data or loaded.data
    videos, images = load_records(data)
    try:
        result = frames.extract(videos, images, out, config=config, workers=workers, progress=progress,
                                run_shard=extract_shard, log_line=logger.info)
    except frames.TooManySkipped as err:  # a verdict on the data, not a crash: no traceback in the log
        return Failed(message=str(err))
    stats = summary_stats(result)
    logger.info(summary(stats))
    return stats


def summary_stats(result: frames.ExtractResult) -> dict[str, Any]:
    decoders: dict[str, int] = {}
    for entry in result.videos:
        decoders[entry.decoder] = decoders.get(entry.decoder, 0) + 1
    return {
        "videos": len(result.videos),
        "images": len(result.images),
        "skipped": len(result.skipped),
        "attempted_videos": result.num_videos,
        "attempted_images": result.num_images,
        "decoders": decoders,
    }


def summary(stats: dict[str, Any]) -> str:
    decoders = ", ".join(f"{n} {name}" for name, n in sorted(stats["decoders"].items())) or "none"
    return (
        f"{stats['videos']}/{stats['attempted_videos']} videos ({decoders}) and "
        f"{stats['images']}/{stats['attempted_images']} images stored; {stats['skipped']} skipped"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.extract",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_params_argument(parser, sections="extract and data")
    parser.add_argument("--out", required=True, help="output folder (artifacts/frames)")
    add_data_arguments(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="decoding processes, overriding extract.workers (0: one per CPU core)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        params = read_params(args)
        check_inputs(params.data)  # the common mistakes get one clean line before Prefect starts
        if args.workers is not None and args.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {args.workers}")
        try:
            stats = extract_flow(config=params.extract, data=params.data, out=args.out, workers=args.workers,
                                 progress=args.progress)
        except FailedRun as err:  # too many undecodable files; the message names skipped.json
            print(f"extract: error: {err}", file=sys.stderr)
            return 1
        print(f"extract: {summary(stats)} -> {args.out}")
        return 0

    return run_main("extract", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
