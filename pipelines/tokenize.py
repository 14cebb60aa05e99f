"""tokenize stage: raw captions -> one vocabulary + padded ids per corpus, in ``artifacts/tokens/{video,image}/``.

    python -m pipelines.tokenize --params params.yaml --out artifacts/tokens [--video-dir ... data flags]

Reads the ``tokenize`` section of params.yaml (the whole file is validated first). The data paths come from
the flags, named like the ``data:`` keys; a flag left out falls back to params.yaml's ``data:`` value. The
work is :func:`seqvision.vocab.tokenize_corpus`; this flow only loads records and writes files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from seqvision import annotations
from seqvision.config import ConfigError, DataConfig, TokenizeConfig, load_params
from seqvision.vocab import tokenize_corpus, write_corpus

from pipelines.common import IO_RETRIES, add_data_arguments, add_params_argument, exit_fast, read_params, run_main


@task(**IO_RETRIES, cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def load_corpora(data: DataConfig) -> dict[str, list[Any]]:
    """{"video": captioned video records, "image": image records}, for the sources that are configured; an
    annotation source that leaves a split empty is an error naming it."""
    corpora: dict[str, list[Any]] = {}
    if data.video_captions:
        records = annotations.load_video_records(
            video_dir=data.video_dir,
            video_captions=data.video_captions,
            video_captions_format=data.video_captions_format,
            activity_dir=data.activity_dir,  # read too, so a split conflict with the labels is caught here
            activity_split=data.activity_split,
        )
        annotations.check_video_splits(
            records, video_captions=data.video_captions, video_captions_format=data.video_captions_format,
            activity_dir=data.activity_dir, activity_split=data.activity_split,
        )
        corpora["video"] = [r for r in records if r.captions]
    if data.image_captions_dir or data.karpathy_split:
        corpora["image"] = annotations.load_image_records(
            image_dir=data.image_dir, image_captions_dir=data.image_captions_dir,
            karpathy_split=data.karpathy_split,
        )
        annotations.check_image_splits(
            corpora["image"], image_captions_dir=data.image_captions_dir, karpathy_split=data.karpathy_split
        )
    if not corpora:
        raise ConfigError("nothing to tokenize: data.video_captions, data.image_captions_dir and "
                          "data.karpathy_split are all empty")
    return corpora


@task(**IO_RETRIES, cache_policy=NO_CACHE)
def tokenize_and_write(name: str, records: list[Any], config: TokenizeConfig, out: Path) -> dict[str, Any]:
    corpus = tokenize_corpus(records, config)
    write_corpus(corpus, out / name)
    return corpus.stats


@flow(name="tokenize")
def tokenize_flow(
    *,
    config: TokenizeConfig | None = None,
    data: DataConfig | None = None,
    params: str = "params.yaml",
    out: str = "artifacts/tokens",
) -> dict[str, dict[str, Any]]:
    """Tokenize every configured corpus into ``{out}/{video,image}/``; returns ``{corpus: stats}``.

    ``config`` / ``data``: the ``tokenize`` and ``data`` sections (``main`` passes them, read once); a section not
    given is read from the ``params`` file (a deployment run).
    """
    logger = get_run_logger()
    if config is None or data is None:
        loaded = load_params(params)
        config, data = config or loaded.tokenize, data or loaded.data
    corpora = load_corpora(data)
    stats = {}
    for name, records in corpora.items():
        stats[name] = tokenize_and_write(name, records, config, Path(out))
        logger.info(summary(name, stats[name]))
    return stats


def summary(name: str, stats: dict[str, Any]) -> str:
    splits = stats["splits"]
    return (
        f"{name}: {sum(s['captions'] for s in splits.values())} captions "
        f"({splits['train']['captions']} train) -> {stats['vocab_size']} tokens in the vocabulary; "
        f"{stats['truncated']} truncated to {stats['max_length']} words; "
        f"{stats['dropped_empty']} empty captions dropped"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tokenize", description=__doc__.split("\n\n")[0])
    add_params_argument(parser, sections="tokenize and data")
    parser.add_argument("--out", required=True, help="output folder (artifacts/tokens)")
    add_data_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        params = read_params(args)
        data = params.data
        annotations.check_sources(  # the common mistakes get one clean line before Prefect starts
            video_captions=data.video_captions,
            activity_dir=data.activity_dir,
            activity_split=data.activity_split,
            image_captions_dir=data.image_captions_dir,
            karpathy_split=data.karpathy_split,
        )
        stats = tokenize_flow(config=params.tokenize, data=params.data, out=args.out)
        for name, corpus_stats in stats.items():
            print(f"tokenize: {summary(name, corpus_stats)}")
        return 0

    return run_main("tokenize", work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
