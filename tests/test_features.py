"""seqvision.features and pipelines.features on the tiny synthetic preset: torchvision backbones need no metadata,
feature arrays keep the frame shards' row order, the flows run end to end, and small_cnn without metadata fails with
one clear line. (The attribute targets and small_cnn's training: tests/test_attributes.py.)"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import yaml

from pipelines import features as features_cli
from seqvision import features as F
from seqvision.datasets import VisualStore
from seqvision.encoders import RandomWeightsWarning, build_encoder, encoder_from_checkpoint, extract_features
from tests.test_attributes import TINY_ENCODER, encoder_config, tiny  # noqa: F401  (tiny: a fixture)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------------
# Encoder stage (attribute training: tests/test_attributes.py)


def test_torchvision_backbone_needs_no_metadata_and_warns_when_random(tmp_path):
    config = encoder_config(backbone="resnet18", image_size=64)
    with pytest.warns(RandomWeightsWarning):
        run = F.pretrained_encoder(config)
    assert run.history["random_weights"] and not run.history["trained"]
    F.save_encoder(run, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # rebuilding from the checkpoint does not warn
        again = F.load_encoder(tmp_path / "encoder.pt")
    x = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    torch.testing.assert_close(again(x)[1], run.encoder(x)[1])
    # The same encoder saved again elsewhere: the same bytes (DVC hashes encoder.pt; the zip's record names used
    # to come from the random temporary file name of the atomic write).
    F.save_encoder(run, tmp_path / "again")
    assert (tmp_path / "again" / "encoder.pt").read_bytes() == (tmp_path / "encoder.pt").read_bytes()


# --------------------------------------------------------------------------------------------------------
# Features


def test_features_follow_the_frame_shards_row_order(tiny, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(encoder_config()).eval()
    out = tmp_path / "features"
    jobs = F.plan_features(tiny["frames"])  # the calls features_flow makes, without Prefect
    F.start_features(out)
    shapes = {job.name: F.write_feature_array(encoder, tiny["frames"], job, out, batch_size=8)  # 8: many chunks
              for job in jobs}
    F.write_feature_index(tiny["frames"], out, encoder_info=F.encoder_info(encoder), shapes=shapes)
    assert shapes == {"videos-train.npy": (24, 6, 40), "videos-val.npy": (8, 6, 40), "videos-test.npy": (8, 6, 40),
                      "images-train.npy": (24, 16, 40), "images-val.npy": (8, 16, 40), "images-test.npy": (8, 16, 40)}
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    index = json.loads((out / "index.json").read_text())
    assert index["features"]["encoder"]["feature_dim"] == 40 and index["features"]["dtype"] == "float16"
    for kind in ("videos", "images"):
        for split in ("train", "val", "test"):
            array = np.load(out / f"{kind}-{split}.npy", mmap_mode="r")
            assert array.dtype == np.float16
            pixels, feats = VisualStore(tiny["frames"], kind=kind, split=split), VisualStore(out, kind=kind,
                                                                                              split=split)
            assert feats.source == "features" and feats.ids == pixels.ids
            assert len(pixels.ids) > 5  # several shards
            for row, item_id in enumerate(pixels.ids):
                direct = extract_features(encoder, pixels.load(item_id)[None])[0]  # the encoder on this one item
                np.testing.assert_allclose(feats.load(item_id).astype(np.float32), direct.astype(np.float32),
                                           atol=2e-3, rtol=2e-3)
                np.testing.assert_array_equal(feats.row(item_id), array[row])
                assert feats.length(item_id) == pixels.length(item_id) if kind == "videos" else True


# --------------------------------------------------------------------------------------------------------
# Flows and command line


@pytest.mark.slow
def test_flows_run_end_to_end(tiny, tmp_path, prefect_harness, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"encoder": TINY_ENCODER}))
    encoder_dir, features_dir = tmp_path / "encoder", tmp_path / "features"
    code = features_cli.main(["encoder", "--params", str(params), "--frames", str(tiny["frames"]),
                              "--metadata", str(tiny["metadata"]), "--out", str(encoder_dir), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in encoder_dir.iterdir()) == ["encoder.pt", "history.json", "metrics.json",
                                                             "runinfo.json"]
    assert "seconds" not in (encoder_dir / "history.json").read_text()  # a measurement: runinfo.json only
    history = json.loads((encoder_dir / "history.json").read_text())
    assert history["trained"] and [e["epoch"] for e in history["epochs"]] == [1]
    metrics = json.loads((encoder_dir / "metrics.json").read_text())
    assert {"colors", "shape", "size", "region", "objects", "grid_shape"} <= set(metrics)
    assert metrics == history["probe"]["val"]  # scored after the heads are refit on the frozen features
    encoder = encoder_from_checkpoint(torch.load(encoder_dir / "encoder.pt", weights_only=True)).eval()

    code = features_cli.main(["features", "--encoder", str(encoder_dir / "encoder.pt"), "--frames",
                              str(tiny["frames"]), "--out", str(features_dir), "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    store = VisualStore(features_dir, kind="videos", split="val")
    pixels = VisualStore(tiny["frames"], kind="videos", split="val")
    first = store.ids[0]
    np.testing.assert_allclose(store.load(first).astype(np.float32),
                               extract_features(encoder, pixels.load(first)[None])[0].astype(np.float32), atol=2e-3)
    assert "features: videos-train.npy (24, 6, 40)" in capsys.readouterr().out


def test_cli_errors_are_one_clean_line(tiny, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"encoder": TINY_ENCODER}))
    code = features_cli.main(["encoder", "--params", str(params), "--frames", str(tiny["frames"]),
                              "--metadata", str(tmp_path / "metadata.json"), "--out", str(tmp_path / "enc")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("encoder: error: encoder.backbone is small_cnn") and "resnet18" in err
    params.write_text(yaml.safe_dump({"encoder": {"frames_per_clip": 0}}))
    assert features_cli.main(["encoder", "--params", str(params), "--frames", str(tiny["frames"]),
                              "--out", str(tmp_path / "enc")]) == 2
    assert "encoder.frames_per_clip" in capsys.readouterr().err
    assert features_cli.main(["features", "--encoder", str(tmp_path / "missing.pt"), "--frames",
                              str(tiny["frames"]), "--out", str(tmp_path / "feat")]) == 2
    assert "run the encoder stage first" in capsys.readouterr().err
    assert not (tmp_path / "enc").exists() and not (tmp_path / "feat").exists()
