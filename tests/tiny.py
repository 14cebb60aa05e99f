"""The tiny artifacts every stage-level test reads, written with the pipeline's own writers (tokenize_corpus /
write_corpus, the index.json and shard layouts of docs/design.md), and real checkpoints trained by the train
stage's code (seqvision.experiment.run). ``tests/conftest.py`` builds them once per session (fixtures
``tiny_artifacts`` and ``tiny_checkpoints``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

# (tokenize_corpus / write_corpus, the index.json and shard layouts of docs/design.md), and real checkpoints
# trained by the train stage's code (seqvision.experiment.run).

TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, TINY_DIM, TINY_GRID = 6, 8, 8, 8, 4
TINY_CLASSES = ("move_left", "move_right", "grow", "stay_still")  # move_left/right: a reversal pair
TINY_CAPTIONS = {
    "move_left": ("a red ball moves left", "the ball goes to the left"),
    "move_right": ("a red ball moves right", "the ball goes to the right"),
    "grow": ("a blue square grows", "the square gets bigger"),
    "stay_still": ("a green circle stays still", "nothing moves"),
}
TINY_VIDEO_IDS = {"train": [f"v{i:02d}" for i in range(12)], "val": [f"v{i}" for i in range(30, 34)],
                  "test": [f"v{i}" for i in range(20, 28)]}
TINY_IMAGE_IDS = {"train": [f"i{i:02d}" for i in range(8)], "val": ["i30", "i31"],
                  "test": [f"i{i}" for i in range(10, 14)]}
TINY_MODELS = {
    "rnn": {"lr": 0.01, "hidden_size": 12, "num_layers": 1, "embed_size": 8, "dropout": 0.0, "attention": True},
    "lstm": {"lr": 0.01, "hidden_size": 12, "num_layers": 1, "embed_size": 8, "dropout": 0.0, "attention": True},
    "gru": {"lr": 0.01, "hidden_size": 12, "num_layers": 1, "embed_size": 8, "dropout": 0.0, "attention": True},
    "transformer": {"lr": 0.01, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_mult": 2, "dropout": 0.0},
    "meanpool": {"lr": 0.01, "hidden_size": 12, "num_layers": 1, "embed_size": 8, "dropout": 0.0},
    "mingru": {"lr": 0.01, "hidden_size": 12, "num_layers": 1, "embed_size": 8, "dropout": 0.0, "attention": True},
}
# The tiny sizes above as written, not resized to the default parameter budgets.
TINY_UNMATCHED = {"match_params": dict.fromkeys(("activity", "image_captioning", "video_captioning"), "off")}
TINY_TRAIN = {"epochs": 2, "batch_size": 4, "num_workers": 0, "log_every": 1, "device": "cpu", "patience": 0,
              "seeds": 1}

# Every section small enough that each stage takes a second or two on one core (the tiny synthetic preset's
# pipeline: tests/test_compare.py, tests/test_dvc_deps.py); valid for every section's checks.
TINY_PIPELINE_PARAMS = {
    "extract": {"num_frames": 6, "shard_size": 16, "workers": 1},
    "encoder": {"feature_dim": 40, "slot_dim": 4, "width": 4, "epochs": 1, "frames_per_clip": 2, "batch_size": 16},
    "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "log_every": 1, "patience": 0, "seeds": 1},
    "models": {name: {"hidden_size": 16, "embed_size": 8} for name in ("rnn", "lstm", "gru", "meanpool", "mingru")}
    | {"transformer": {"hidden_size": 16, "num_heads": 2, "ffn_mult": 2}}
    | TINY_UNMATCHED,
    "evaluate": {"beam_size": 1, "max_length": 8},
    "report": {"compute_meteor": "never"},
    # The study's stages (dvc.yaml study_timing, study_trained@, study_long_range): the ci preset, two variants, two
    # families.
    "study": {"preset": "ci", "overrides": {"variants": ["lstm", "transformer"], "parallel_variants": ["lstm"],
                                            "stream_steps": 2, "bias_families": ["lstm", "transformer"],
                                            "long_families": ["lstm", "transformer"]}},
}


def tiny_label(item_id: str) -> int:
    """The class index of a tiny item: its number modulo the class count."""
    return int(item_id[1:]) % len(TINY_CLASSES)


def tiny_video_features(item_id: str) -> np.ndarray:
    """(T, D) float32: a class-specific direction plus a time ramp; move_right is move_left played backwards, so a
    mean-pooled clip of one equals the other's."""
    rng = np.random.default_rng(int(item_id[1:]))
    label = tiny_label(item_id)
    x = np.zeros((TINY_FRAMES, TINY_DIM), np.float32)
    ramp = np.linspace(0.0, 1.0, TINY_FRAMES)
    if TINY_CLASSES[label] in ("move_left", "move_right"):
        x[:, 0] = ramp if TINY_CLASSES[label] == "move_left" else ramp[::-1]
    else:
        x[:, label + 2] = 1.0
    return x + 0.05 * rng.standard_normal((TINY_FRAMES, TINY_DIM)).astype(np.float32)


class TinyArtifacts(NamedTuple):
    root: Path
    frames: Path  # artifacts/frames: uint8 shards + index.json
    features: Path  # artifacts/features: float16 arrays + index.json
    tokens: Path  # artifacts/tokens: {video,image}/ vocab, ids, references
    labels: Path  # the UCF101-style activity folder (classInd.txt, {train,val,test}list01.txt)


def write_tiny_artifacts(root: Path) -> TinyArtifacts:
    """frames/, features/, tokens/{video,image}/ and a UCF101-style label folder under ``root``."""
    from seqvision.annotations import ImageRecord, VideoRecord
    from seqvision.config import TokenizeConfig
    from seqvision.vocab import tokenize_corpus, write_corpus

    frames, features, tokens, labels = root / "frames", root / "features", root / "tokens", root / "ucf"
    for folder in (frames, features, labels):
        folder.mkdir(parents=True)
    T, H, W, G = TINY_FRAMES, TINY_HEIGHT, TINY_WIDTH, TINY_GRID
    index: dict = {"config": {"num_frames": T}, "videos": [], "images": []}
    for split, ids in TINY_VIDEO_IDS.items():
        np.save(features / f"videos-{split}.npy", np.stack([tiny_video_features(i) for i in ids]).astype(np.float16))
        pixels = np.stack([np.full((T, H, W, 3), 20 * (tiny_label(i) + 1), np.uint8) for i in ids])
        pixels[:, :, :, :, 0] = np.arange(T, dtype=np.uint8)[None, :, None, None] * 40  # frames differ
        np.save(frames / f"videos-{split}-000.npy", pixels)
        for row, i in enumerate(ids):  # every other clip one frame short: the length masks are exercised
            index["videos"].append({"id": i, "split": split, "shard": 0, "row": row, "num_valid": T - row % 2,
                                    "frame_indices": list(range(T)), "num_source_frames": T, "decoder": "pyav"})
    for split, ids in TINY_IMAGE_IDS.items():
        grid = np.stack([np.tile(tiny_video_features(f"v{int(i[1:]) % 4:02d}").mean(0), (G, 1)) for i in ids])
        np.save(features / f"images-{split}.npy", grid.astype(np.float16))
        np.save(frames / f"images-{split}-000.npy",
                np.stack([np.full((H, W, 3), 60 * (int(i[1:]) % 4), np.uint8) for i in ids]))
        for row, i in enumerate(ids):
            index["images"].append({"id": i, "split": split, "shard": f"images-{split}-000.npy", "row": row})
    for folder in (frames, features):
        (folder / "index.json").write_text(json.dumps(index))

    videos = [VideoRecord(i, Path("x"), split, tiny_label(i), TINY_CAPTIONS[TINY_CLASSES[tiny_label(i)]])
              for split, ids in TINY_VIDEO_IDS.items() for i in ids]
    images = [ImageRecord(i, Path("x"), split, TINY_CAPTIONS[TINY_CLASSES[int(i[1:]) % 4]])
              for split, ids in TINY_IMAGE_IDS.items() for i in ids]
    config = TokenizeConfig(min_count=1, max_length=8)
    write_corpus(tokenize_corpus(videos, config), tokens / "video")
    write_corpus(tokenize_corpus(images, config), tokens / "image")

    (labels / "classInd.txt").write_text("".join(f"{k + 1} {name}\n" for k, name in enumerate(TINY_CLASSES)))
    for split, name in (("train", "trainlist01"), ("val", "vallist01"), ("test", "testlist01")):
        (labels / f"{name}.txt").write_text("".join(f"{i}.mp4 {tiny_label(i) + 1}\n" for i in TINY_VIDEO_IDS[split]))
    return TinyArtifacts(root, frames, features, tokens, labels)


def tiny_params(**train_overrides: object):
    """``Params`` for the tiny artifacts: TINY_TRAIN / TINY_MODELS, every other section at its defaults."""
    from seqvision.config import ModelsConfig, Params, TrainConfig, from_mapping

    return Params(train=from_mapping(TrainConfig, {**TINY_TRAIN, **train_overrides}, where="train"),
                  models=from_mapping(ModelsConfig, TINY_MODELS | TINY_UNMATCHED, where="models"))


def train_tiny(artifacts: TinyArtifacts, task: str, family: str, out_dir: Path, **train_overrides: object) -> Path:
    """Train ``family`` on ``task`` of the tiny artifacts with the train stage's code; returns ``best.pt``."""
    import torch

    from seqvision import experiment
    from seqvision.config import EvaluateConfig

    params = tiny_params(**train_overrides)
    data = experiment.load_for_training(task, seed=params.train.seed, activity_dir=artifacts.labels, activity_split=1,
                                        features_dir=artifacts.features, frames_dir=None, tokens_dir=artifacts.tokens,
                                        encoder=None)
    decoding = None if task == "activity" else EvaluateConfig(beam_size=2, max_length=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        experiment.run(task, family, data=data, train_config=params.train, model_config=params.models.family(family),
                       budget=params.models.match_params.budget(task), decoding=decoding, out_dir=out_dir,
                       progress=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    return out_dir / "best.pt"




def tiny_encoder(path: Path) -> Path:
    """A tiny random frame encoder saved as the encoder stage saves one (``encoder.pt``): what the study's long-range
    row encodes its rendered clips with. 40-d features, seed 0."""
    import torch

    from seqvision.encoders import SmallCNN, SmallCNNConfig, encoder_state

    torch.manual_seed(0)
    torch.save(encoder_state(SmallCNN(SmallCNNConfig(feature_dim=40, width=4, slot_dim=4))), path)
    return path
