"""encoder and features stages: train (or load) the frame encoder, then encode every frame shard.

    python -m pipelines.features encoder --params params.yaml --frames artifacts/frames \\
        --metadata data/annotations/metadata.json --out artifacts/encoder
    python -m pipelines.features features --encoder artifacts/encoder/encoder.pt --frames artifacts/frames \\
        --out artifacts/features

encoder: reads the ``encoder`` section of params.yaml (the whole file is validated first). ``small_cnn`` is
trained on the train split's frames and images to recognise the synthetic objects' attributes from
``--metadata`` (a real dataset has no metadata: choose a torchvision backbone with local weights instead);
torchvision backbones are loaded from ``encoder.weights`` and not trained. Writes to ``--out``:
  encoder.pt    the encoder alone (seqvision.encoders.encoder_from_checkpoint rebuilds it)
  history.json  training frames, loss and val attribute accuracy per epoch
  metrics.json  final val attribute accuracies ({} when nothing was trained)
  runinfo.json  seconds per part and per epoch (a measurement of this run: DVC ignores it)

features: reads no params (the encoder comes from its checkpoint). Writes to ``--out`` (contract: docs/design.md):
  videos-{split}.npy  float16 (n, T, D) pooled per frame      images-{split}.npy  float16 (n, G, D) grid cells
  index.json          the frames' index (same row order) plus a "features" section

Exit status: 0 done; 2 bad params or a missing or unusable input (one line on stderr). The work is in
seqvision.attributes (training small_cnn) and seqvision.features; these flows only orchestrate it (one Prefect
task per feature array, retried on I/O errors).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm.auto import tqdm

from pipelines.common import IO_RETRIES, add_params_argument, exit_fast, require_files, run_main
from seqvision import attributes, features
from seqvision.config import ConfigError, EncoderConfig, load_params
from seqvision.encoders import RandomWeightsWarning
from seqvision.runtime import resolve_device


def check_encoder_inputs(config: EncoderConfig, *, frames: str | Path, metadata: str | Path) -> None:
    """Fail fast, with one line naming the problem, before Prefect starts."""
    if not (Path(frames) / "index.json").is_file():
        raise FileNotFoundError(f"{Path(frames) / 'index.json'}: no such file; run the extract stage first")
    if config.backbone == "small_cnn":
        features.require_metadata(metadata)
    if config.backbone != "small_cnn" and config.weights and not Path(config.weights).is_file():
        raise FileNotFoundError(f"encoder.weights: {config.weights}: no such file")


# --------------------------------------------------------------------------------------------------------
# encoder


@task(cache_policy=NO_CACHE)  # DVC decides what reruns, not a Prefect cache
def train_small_cnn(config: EncoderConfig, frames: str, metadata: str, device: str) -> features.EncoderRun:
    """Attribute training of the small CNN on the train split (val scored every epoch)."""
    logger = get_run_logger()
    return attributes.train_attribute_encoder(config, frames_dir=frames, metadata_path=metadata, device=device,
                                              log=logger.info)


@task(cache_policy=NO_CACHE)
def load_backbone(config: EncoderConfig) -> features.EncoderRun:
    """A torchvision backbone from its local weights file; random weights are logged as a warning."""
    logger = get_run_logger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomWeightsWarning)
        run = features.pretrained_encoder(config)
    for warning in caught:
        logger.warning(str(warning.message))
    return run


@flow(name="encoder")
def encoder_flow(
    *,
    config: EncoderConfig | None = None,
    params: str = "params.yaml",
    frames: str = "artifacts/frames",
    metadata: str = "data/annotations/metadata.json",
    out: str = "artifacts/encoder",
    device: str = "auto",
) -> dict[str, Any]:
    """Train (small_cnn) or load (torchvision) the encoder; write encoder.pt, history.json, metrics.json.
    ``config``: the ``encoder`` section (``main`` passes it, read once); None: read from the ``params`` file.

    Returns ``{"backbone", "trained", "metrics", "seconds"}``."""
    logger = get_run_logger()
    config = config or load_params(params).encoder
    check_encoder_inputs(config, frames=frames, metadata=metadata)
    device = str(resolve_device(device))
    if config.backbone == "small_cnn":
        run = train_small_cnn(config, frames, metadata, device)
    else:
        run = load_backbone(config)
    features.save_encoder(run, out)
    stats = {"backbone": config.backbone, "trained": run.history["trained"], "metrics": run.metrics,
             "seconds": run.runinfo.get("seconds", {}), "random_weights": run.history.get("random_weights", False)}
    logger.info(encoder_summary(stats))
    return stats


def encoder_summary(stats: dict[str, Any]) -> str:
    if not stats["trained"]:
        weights = "RANDOM weights (encoder.weights is empty)" if stats["random_weights"] else "weights loaded"
        return f"{stats['backbone']}: {weights}, not trained"
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in stats["metrics"].items()) or "no val split"
    seconds = sum(stats["seconds"].values())
    return f"small_cnn trained in {seconds:.1f} s; val attribute accuracy: {metrics}"


# --------------------------------------------------------------------------------------------------------
# features


@task(**IO_RETRIES, cache_policy=NO_CACHE,
      task_run_name="{job.kind}-{job.split}")
def encode_array(
    encoder: torch.nn.Module, frames: str, job: features.FeatureJob, out: str, batch_size: int, device: str, bar: Any
) -> tuple[int, ...]:
    """One ``{kind}-{split}.npy`` (written atomically, so a retry starts clean)."""
    return features.write_feature_array(encoder, frames, job, out, batch_size=batch_size, device=device,
                                        on_frames=bar.update)


@flow(name="features")
def features_flow(
    *,
    encoder: str = "artifacts/encoder/encoder.pt",
    frames: str = "artifacts/frames",
    out: str = "artifacts/features",
    batch_size: int = 256,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every frame shard of ``frames`` with the encoder checkpoint; returns ``{file: shape}``."""
    logger = get_run_logger()
    model = features.load_encoder(encoder)
    device = str(resolve_device(device))
    jobs = features.plan_features(frames)
    features.start_features(out)
    logger.info(f"{len(jobs)} arrays, {features.count_frames(jobs)} frames, encoder {type(model).__name__} "
                f"(D = {model.feature_dim}, grid {model.grid}x{model.grid}) on {device}")
    with tqdm(total=features.count_frames(jobs), unit="frame", desc="features", disable=not progress) as bar:
        shapes = {job.name: encode_array(model, frames, job, out, batch_size, device, bar) for job in jobs}
    features.write_feature_index(frames, out, encoder_info=features.encoder_info(model), shapes=shapes)
    logger.info(features_summary(shapes))
    return shapes


def features_summary(shapes: dict[str, Any]) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items()) or "nothing to encode"


# --------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.features",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="{encoder,features}")
    enc = stages.add_parser("encoder", help="train or load the frame encoder",
                            description="Train (small_cnn) or load (torchvision backbone) the frame encoder.")
    add_params_argument(enc, sections="encoder")
    enc.add_argument("--frames", required=True, help="frame shards and index.json (artifacts/frames)")
    enc.add_argument("--metadata", default="data/annotations/metadata.json",
                     help="the synthetic benchmark's metadata.json; needed by small_cnn only "
                          "(default: %(default)s)")
    enc.add_argument("--out", required=True, help="output folder (artifacts/encoder)")
    enc.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="auto picks CUDA when present (default: %(default)s)")
    feat = stages.add_parser("features", help="encode every frame shard into feature arrays",
                             description="Encode every frame shard with the encoder checkpoint.")
    feat.add_argument("--encoder", required=True, help="encoder checkpoint (artifacts/encoder/encoder.pt)")
    feat.add_argument("--frames", required=True, help="frame shards and index.json (artifacts/frames)")
    feat.add_argument("--out", required=True, help="output folder (artifacts/features)")
    feat.add_argument("--batch-size", type=int, default=256, help="frames per forward pass (default: %(default)s)")
    feat.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="auto picks CUDA when present (default: %(default)s)")
    feat.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    feat.add_argument("--debug", action="store_true", help="print tracebacks with errors (also: SEQVISION_DEBUG=1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def work() -> int:
        resolve_device(args.device)  # the common mistakes get one clean line before Prefect starts
        if args.stage == "encoder":
            params = load_params(args.params)  # the encoder section; the metadata comes as a flag
            check_encoder_inputs(params.encoder, frames=args.frames, metadata=args.metadata)
            stats = encoder_flow(config=params.encoder, frames=args.frames, metadata=args.metadata, out=args.out,
                                 device=args.device)
            print(f"encoder: {encoder_summary(stats)} -> {args.out}")
            return 0
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        require_files(args.encoder, stage="encoder")
        require_files(Path(args.frames) / "index.json", stage="extract")
        shapes = features_flow(encoder=args.encoder, frames=args.frames, out=args.out,
                               batch_size=args.batch_size, device=args.device, progress=args.progress)
        print(f"features: {features_summary(shapes)} -> {args.out}")
        return 0

    return run_main(args.stage, work, debug=args.debug)


if __name__ == "__main__":
    exit_fast(main())  # pipelines.common: skips the interpreter teardown
