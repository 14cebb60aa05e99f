"""Readers for the real annotation formats, each with the quirks of the real files, written in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seqvision.annotations import (
    AnnotationError,
    ImageRecord,
    VideoRecord,
    check_image_splits,
    check_sources,
    check_video_splits,
    load_class_names,
    load_image_records,
    load_video_records,
)


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ MSR-VTT


def msrvtt(videos, sentences):
    return {
        "info": {"year": 2016},
        "videos": [{"video_id": v, "split": s, "category": 1, "url": "u", "id": i} for i, (v, s) in enumerate(videos)],
        "sentences": [{"video_id": v, "caption": c, "sen_id": i} for i, (v, c) in enumerate(sentences)],
    }


def test_msrvtt_splits_captions_and_paths(tmp_path):
    data = msrvtt(
        [("video1", "train"), ("video0", "validate"), ("video2", "test"), ("video3", "train")],
        [("video1", "A Man  Cooks \n"), ("video0", "a dog"), ("video1", "Ein Mann kocht Käse"), ("video1", "")],
    )
    path = write(tmp_path / "msrvtt.json", data)
    records = load_video_records(video_dir=tmp_path / "videos", video_captions=path)
    assert [r.id for r in records] == ["video0", "video1", "video2", "video3"]  # sorted
    assert [r.split for r in records] == ["val", "train", "test", "train"]  # "validate" -> val
    assert records[1] == VideoRecord(
        "video1", tmp_path / "videos" / "video1.mp4", "train", None, ("A Man  Cooks", "Ein Mann kocht Käse", "")
    )
    assert records[2].captions == () and records[3].captions == ()


def test_msrvtt_folder_merges_the_official_two_files(tmp_path):
    write(tmp_path / "ann" / "train_val_videodatainfo.json", msrvtt([("video0", "train")], [("video0", "a")]))
    write(tmp_path / "ann" / "test_videodatainfo.json", msrvtt([("video9", "test")], [("video9", "b")]))
    records = load_video_records(video_dir=tmp_path, video_captions=tmp_path / "ann")
    assert [(r.id, r.split) for r in records] == [("video0", "train"), ("video9", "test")]
    write(tmp_path / "ann" / "dup.json", msrvtt([("video0", "train")], []))
    with pytest.raises(AnnotationError, match="video0"):
        load_video_records(video_dir=tmp_path, video_captions=tmp_path / "ann")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sentences": []}, r"msrvtt.json: top level: missing key 'videos'"),
        ({"videos": [{"video_id": "v"}], "sentences": []}, r"msrvtt.json: videos\[0\]: missing key 'split'"),
        ({"videos": [{"video_id": "v", "split": "train"}], "sentences": [{"video_id": "v"}]},
         r"sentences\[0\]: missing key 'caption'"),
        ({"videos": [{"video_id": "v", "split": "train"}], "sentences": [{"video_id": "w", "caption": "c"}]},
         r"'w' has no entry in 'videos'"),
        ({"videos": [{"video_id": "v", "split": "dev2"}], "sentences": []}, r"unknown split 'dev2'"),
        ({"videos": [{"video_id": 7, "split": "train"}], "sentences": []}, r"videos\[0\].video_id: expected str"),
    ],
)
def test_msrvtt_malformed_input_names_file_and_key(tmp_path, data, message):
    path = write(tmp_path / "msrvtt.json", data)
    with pytest.raises(AnnotationError, match=message):
        load_video_records(video_dir=tmp_path, video_captions=path)


def test_missing_caption_file_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_video_records(video_dir=tmp_path, video_captions=tmp_path / "nope.json")
    path = write(tmp_path / "broken.json", "{not json")
    with pytest.raises(AnnotationError, match="broken.json: not valid JSON"):
        load_video_records(video_dir=tmp_path, video_captions=path)


# ------------------------------------------------------------------------------------------ MSVD

MSVD_TXT = """# MSVD descriptions (comment lines start with '#')
-4wsuPCjDBc_5_15 A squirrel is eating a peanut in it's shell.
-4wsuPCjDBc_5_15 a squirrel eats
ab_cd-ef_12_20 Someone is slicing a tomato
Zz9-_x_0_4 A man plays a guitar.\u00a0
ab_cd-ef_12_20 une femme coupe une tomate
"""


def test_msvd_txt_ids_with_underscores_and_dashes(tmp_path):
    path = write(tmp_path / "AllVideoDescriptions.txt", MSVD_TXT)
    write(tmp_path / "clips" / "ab_cd-ef_12_20.mp4", "")  # a clip stored with another extension
    records = load_video_records(video_dir=tmp_path / "clips", video_captions=path, video_captions_format="msvd")
    by_id = {r.id: r for r in records}
    assert [r.id for r in records] == sorted(by_id) == ["-4wsuPCjDBc_5_15", "Zz9-_x_0_4", "ab_cd-ef_12_20"]
    assert by_id["-4wsuPCjDBc_5_15"].captions == ("A squirrel is eating a peanut in it's shell.", "a squirrel eats")
    assert by_id["Zz9-_x_0_4"].captions == ("A man plays a guitar.",)  # trailing no-break space stripped
    assert by_id["-4wsuPCjDBc_5_15"].path == tmp_path / "clips" / "-4wsuPCjDBc_5_15.avi"
    assert by_id["ab_cd-ef_12_20"].path == tmp_path / "clips" / "ab_cd-ef_12_20.mp4"
    assert {r.split for r in records} == {"train"}  # fewer than 1200 clips: all in the first block


def test_msvd_standard_split_by_order(tmp_path):
    lines = [f"clip{i:04d}_{i}_{i + 5} caption {i}" for i in range(1302)]
    path = write(tmp_path / "AllVideoDescriptions.txt", "\n".join(lines))
    records = load_video_records(video_dir=tmp_path, video_captions=path, video_captions_format="msvd")
    splits = {r.id: r.split for r in records}
    assert splits["clip0000_0_5"] == splits["clip1199_1199_1204"] == "train"
    assert splits["clip1200_1200_1205"] == splits["clip1299_1299_1304"] == "val"
    assert splits["clip1300_1300_1305"] == splits["clip1301_1301_1306"] == "test"


def test_msvd_split_from_youtube_mapping(tmp_path):
    path = write(tmp_path / "AllVideoDescriptions.txt", MSVD_TXT)
    write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\nab_cd-ef_12_20 vid1250\nZz9-_x_0_4 vid1301\n")
    records = load_video_records(video_dir=tmp_path, video_captions=path, video_captions_format="msvd")
    assert {r.id: r.split for r in records} == {
        "-4wsuPCjDBc_5_15": "train", "ab_cd-ef_12_20": "val", "Zz9-_x_0_4": "test"
    }
    write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\n")
    with pytest.raises(AnnotationError, match="has no vidN entry"):
        load_video_records(video_dir=tmp_path, video_captions=path, video_captions_format="msvd")


def test_msvd_official_csv_keeps_english_only(tmp_path):
    csv_text = (
        "VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
        "-4wsuPCjDBc,5,15,1,clean,10,English,\"A squirrel, eating.\"\n"
        "-4wsuPCjDBc,5,15,2,clean,10,German,Ein Eichhörnchen\n"
        "a_b-c,1,2,3,unverified,8,English,a cat\n"
    )
    path = write(tmp_path / "MSR Video Description Corpus.csv", csv_text)
    records = load_video_records(video_dir=tmp_path, video_captions=path, video_captions_format="msvd")
    assert [(r.id, r.captions) for r in records] == [
        ("-4wsuPCjDBc_5_15", ("A squirrel, eating.",)),
        ("a_b-c_1_2", ("a cat",)),
    ]


def test_msvd_malformed_clip_id(tmp_path):
    path = write(tmp_path / "AllVideoDescriptions.txt", "-4wsuPCjDBc_5_15 ok\nnotaclip a caption\n")
    with pytest.raises(AnnotationError, match=r"AllVideoDescriptions.txt: line 2: clip id 'notaclip'"):
        load_video_records(video_dir=tmp_path, video_captions=path, video_captions_format="msvd")


# ------------------------------------------------------------------------------------------ UCF101

CLASSES = ["ApplyEyeMakeup", "Archery", "YoYo"]


def ucf_real(root: Path, *, with_val: str | None = None) -> Path:
    """Real UCF101 layout: class folders, 1-based labels, a test list without labels."""
    write(root / "classInd.txt", "".join(f"{i} {c}\n" for i, c in enumerate(CLASSES, start=1)))
    train, test = [], []
    for label, name in enumerate(CLASSES, start=1):
        for group in range(1, 8):
            for clip in range(1, 3):
                rel = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"
                (test.append(rel) if group <= 2 else train.append(f"{rel} {label}"))
    write(root / "trainlist01.txt", "\r\n".join(train) + "\r\n")  # the official files have CRLF endings
    write(root / "testlist01.txt", "\n".join(test) + "\n")
    if with_val is not None:
        write(root / "vallist01.txt", with_val)
    return root


def test_class_names_are_zero_based(tmp_path):
    ucf_real(tmp_path)
    assert load_class_names(tmp_path) == CLASSES
    write(tmp_path / "classInd.txt", "2 A\n3 B\n")
    with pytest.raises(AnnotationError, match="1-based"):
        load_class_names(tmp_path)


def test_ucf_real_layout_labels_and_group_safe_val(tmp_path):
    ucf = ucf_real(tmp_path / "ucf")
    records = load_video_records(video_dir=tmp_path / "UCF-101", activity_dir=ucf)
    assert len(records) == 3 * 7 * 2
    by_id = {r.id: r for r in records}
    r = by_id["v_Archery_g01_c02"]  # test list: no label column, class from the folder
    assert (r.split, r.label, r.captions) == ("test", 1, ())
    assert r.path == tmp_path / "UCF-101" / "Archery" / "v_Archery_g01_c02.avi"
    assert by_id["v_ApplyEyeMakeup_g05_c01"].label == 0  # 1-based list -> 0-based label
    assert by_id["v_YoYo_g03_c01"].label == 2
    # No val list: val is carved from train by whole groups, some from every class, deterministic.
    splits_of_group: dict[str, set[str]] = {}
    for rec in records:
        splits_of_group.setdefault(rec.id.rsplit("_c", 1)[0], set()).add(rec.split)
    assert all(len(s) == 1 for s in splits_of_group.values())
    val_groups = sorted(g for g, s in splits_of_group.items() if s == {"val"})
    assert val_groups == [f"v_{c}_g07" for c in CLASSES]  # 10% of 5 train groups -> the last one
    assert records == load_video_records(video_dir=tmp_path / "UCF-101", activity_dir=ucf)


def test_ucf_group_crossing_splits_is_an_error(tmp_path):
    # v_Archery_g03 is in the train list; putting one of its clips in val leaks the group.
    ucf = ucf_real(tmp_path, with_val="Archery/v_Archery_g03_c01.avi 2\n")
    with pytest.raises(AnnotationError, match="group 'v_Archery_g03' spans two splits"):
        load_video_records(video_dir=tmp_path, activity_dir=ucf)


def test_ucf_synthetic_layout_with_val_list(tmp_path):
    write(tmp_path / "classInd.txt", "1 move_left\n2 move_right\n")
    write(tmp_path / "trainlist01.txt", "video0.mp4 1\nvideo1.mp4 2\n")
    write(tmp_path / "vallist01.txt", "video12.mp4 2\n")
    write(tmp_path / "testlist01.txt", "video20.mp4 1\n")  # label column tolerated in a test list
    records = load_video_records(video_dir=tmp_path / "videos", activity_dir=tmp_path)
    assert [(r.id, r.split, r.label) for r in records] == [
        ("video0", "train", 0), ("video1", "train", 1), ("video12", "val", 1), ("video20", "test", 0)
    ]
    assert records[2].path == tmp_path / "videos" / "video12.mp4"


@pytest.mark.parametrize(
    ("lists", "message"),
    [
        ({"trainlist01.txt": "video0.mp4\n"}, "trainlist01.txt: line 1: missing label column"),
        ({"trainlist01.txt": "video0.mp4 3\n"}, r"label '3' is not a class index 1..2"),
        ({"trainlist01.txt": "video0.mp4 0\n"}, r"label '0' is not a class index"),
        ({"testlist01.txt": "video9.mp4\n"}, "testlist01.txt: line 1: cannot tell the class of 'video9.mp4'"),
        ({"trainlist01.txt": "move_left/video0.mp4 2\n"}, "disagrees with the class in the path"),
    ],
)
def test_ucf_malformed_lists(tmp_path, lists, message):
    write(tmp_path / "classInd.txt", "1 move_left\n2 move_right\n")
    write(tmp_path / "trainlist01.txt", "video0.mp4 1\n")
    write(tmp_path / "testlist01.txt", "video1.mp4 1\n")
    for name, text in lists.items():
        write(tmp_path / name, text)
    with pytest.raises(AnnotationError, match=message):
        load_video_records(video_dir=tmp_path, activity_dir=tmp_path)


def test_ucf_missing_list_file(tmp_path):
    write(tmp_path / "classInd.txt", "1 a\n")
    write(tmp_path / "trainlist01.txt", "x.avi 1\n")
    with pytest.raises(FileNotFoundError, match="testlist01.txt"):
        load_video_records(video_dir=tmp_path, activity_dir=tmp_path)


# ------------------------------------------------------------------------------------------ union


def test_captions_and_labels_are_joined_by_id(tmp_path):
    caps = write(tmp_path / "msrvtt.json", msrvtt([("video0", "train"), ("video5", "test")], [("video0", "x")]))
    write(tmp_path / "ucf" / "classInd.txt", "1 a\n2 b\n")
    write(tmp_path / "ucf" / "trainlist01.txt", "video0.mp4 2\nvideo1.mp4 1\n")
    write(tmp_path / "ucf" / "vallist01.txt", "")
    write(tmp_path / "ucf" / "testlist01.txt", "video5.mp4 1\n")
    records = load_video_records(video_dir=tmp_path / "v", video_captions=caps, activity_dir=tmp_path / "ucf")
    assert [(r.id, r.split, r.label, r.captions) for r in records] == [
        ("video0", "train", 1, ("x",)), ("video1", "train", 0, ()), ("video5", "test", 0, ())
    ]
    write(tmp_path / "ucf" / "testlist01.txt", "video0.mp4 1\n")  # also in train: clip listed twice
    with pytest.raises(AnnotationError):
        load_video_records(video_dir=tmp_path / "v", video_captions=caps, activity_dir=tmp_path / "ucf")
    write(tmp_path / "ucf" / "trainlist01.txt", "video1.mp4 1\n")  # video0 now test here, train in MSR-VTT
    with pytest.raises(AnnotationError, match="'video0' is train in .*msrvtt.json but test in"):
        load_video_records(video_dir=tmp_path / "v", video_captions=caps, activity_dir=tmp_path / "ucf")


def test_no_sources_gives_no_records(tmp_path):
    assert load_video_records(video_dir=tmp_path) == []
    assert load_image_records(image_dir=tmp_path) == []


# ------------------------------------------------------------------------------------------ COCO + Karpathy


def coco(images, annotations):
    return {
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f, "width": 64, "height": 64} for i, f in images],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(annotations)],
    }


def coco_dir(root: Path) -> Path:
    write(root / "captions_train2014.json", coco(
        [(9, "COCO_train2014_000000000009.jpg"), (25, "COCO_train2014_000000000025.jpg")],
        [(9, "A plate of FOOD.\n"), (25, "a giraffe "), (9, "Crème brûlée on a plate")],
    ))
    write(root / "captions_val2014.json", coco([(42, "COCO_val2014_000000000042.jpg")], [(42, "a dog")]))
    write(root / "captions_test.json", coco([(1, "image1.png")], [(1, "a red ball")]))
    return root


def test_coco_multiple_files_split_from_file_name(tmp_path):
    ann = coco_dir(tmp_path / "ann")
    write(tmp_path / "images" / "train2014" / "COCO_train2014_000000000009.jpg", "")
    records = load_image_records(image_dir=tmp_path / "images", image_captions_dir=ann)
    assert [(r.id, r.split) for r in records] == [
        ("COCO_train2014_000000000009", "train"),
        ("COCO_train2014_000000000025", "train"),
        ("COCO_val2014_000000000042", "val"),
        ("image1", "test"),
    ]
    assert records[0] == ImageRecord(
        "COCO_train2014_000000000009",
        tmp_path / "images" / "train2014" / "COCO_train2014_000000000009.jpg",  # found in the split folder
        "train",
        ("A plate of FOOD.", "Crème brûlée on a plate"),
    )
    assert records[1].path == tmp_path / "images" / "COCO_train2014_000000000025.jpg"
    assert records[1].captions == ("a giraffe",)


def test_karpathy_split_assigns_splits_restval_is_train(tmp_path):
    ann = coco_dir(tmp_path / "ann")
    karpathy = write(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "restval", "cocoid": 42,
         "sentences": [{"raw": "ignored, COCO file wins", "tokens": []}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "test", "cocoid": 9,
         "sentences": []},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000077.jpg", "split": "val", "cocoid": 77,
         "sentences": [{"raw": "Only in Karpathy. "}]},
    ]})
    records = load_image_records(image_dir=tmp_path / "images", image_captions_dir=ann, karpathy_split=karpathy)
    assert [(r.id, r.split, r.captions) for r in records] == [
        ("COCO_train2014_000000000009", "test", ("A plate of FOOD.", "Crème brûlée on a plate")),
        ("COCO_val2014_000000000042", "train", ("a dog",)),
        ("COCO_val2014_000000000077", "val", ("Only in Karpathy.",)),
    ]  # images absent from the Karpathy file are left out
    only_karpathy = load_image_records(image_dir=tmp_path / "images", karpathy_split=karpathy)
    assert only_karpathy[1].captions == ("ignored, COCO file wins",)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("captions_train2014.json", {"images": []}, "captions_train2014.json: top level: missing key 'annotations'"),
        ("captions_train2014.json", coco([(1, "a.png")], [(2, "x")]), r"annotations\[0\]: image_id 2 has no entry"),
        ("captions_train2014.json", {"images": [{"id": 1}], "annotations": []},
         r"images\[0\]: missing key 'file_name'"),
        ("captions_dev.json", coco([], []), "unknown split 'dev'"),
    ],
)
def test_coco_malformed(tmp_path, name, data, message):
    write(tmp_path / name, data)
    with pytest.raises(AnnotationError, match=message):
        load_image_records(image_dir=tmp_path, image_captions_dir=tmp_path)


def test_coco_same_image_in_two_files(tmp_path):
    write(tmp_path / "captions_train.json", coco([(1, "a.png")], []))
    write(tmp_path / "captions_val.json", coco([(1, "a.png")], []))
    with pytest.raises(AnnotationError, match="'a' also appears in"):
        load_image_records(image_dir=tmp_path, image_captions_dir=tmp_path)


def test_karpathy_malformed(tmp_path):
    path = write(tmp_path / "dataset_coco.json", {"images": [{"filename": "a.jpg", "split": "train"}]})
    with pytest.raises(AnnotationError, match=r"dataset_coco.json: images\[0\]: missing key 'sentences'"):
        load_image_records(image_dir=tmp_path, karpathy_split=path)


def test_check_sources_names_the_missing_path(tmp_path):
    check_sources()  # nothing configured, nothing to check
    with pytest.raises(FileNotFoundError, match="trainlist02.txt"):
        write(tmp_path / "ucf" / "classInd.txt", "1 a\n")
        check_sources(activity_dir=tmp_path / "ucf", activity_split=2)
    (tmp_path / "coco").mkdir()
    with pytest.raises(FileNotFoundError, match="no captions_"):
        check_sources(image_captions_dir=tmp_path / "coco")


# ------------------------------------------------------------------------------------------ every split present


def _videos_without_val(root: Path, case: str) -> tuple[dict, str, str]:
    """(check_video_splits arguments, the source named, the advice) for one way a user ends up without val."""
    if case == "msrvtt-no-validate":
        path = write(root / "msrvtt.json", msrvtt([("video0", "train"), ("video1", "train"), ("video2", "test")],
                                                  [("video0", "a"), ("video1", "b"), ("video2", "c")]))
        return ({"video_captions": path},
                f"{path} (data.video_captions): no captioned video in the val split (2 train, 0 val, 1 test); ",
                f'give some videos "split": "validate" in {path}')
    if case == "msvd-under-1201-clips":
        path = write(root / "AllVideoDescriptions.txt", MSVD_TXT)
        return ({"video_captions": path, "video_captions_format": "msvd"},
                f"{path} (data.video_captions): no captioned video in the val split (3 train, 0 val, 0 test)",
                "MSVD's standard split puts vid1201-vid1300 in val: number the clips so in youtube_mapping.txt "
                "beside AllVideoDescriptions.txt ('{clip} vid{N}' per line); without that file, clips are numbered "
                "in order of first appearance, and AllVideoDescriptions.txt has 3")
    ucf = root / "ucf"
    write(ucf / "classInd.txt", "1 Archery\n2 YoYo\n")
    write(ucf / "testlist01.txt", "Archery/v_Archery_g01_c01.avi\nYoYo/v_YoYo_g01_c01.avi\n")
    # One source video (group) per class in train: the carve-out cannot move a whole group without emptying train.
    write(ucf / "trainlist01.txt", "".join(f"{c}/v_{c}_g02_c0{k}.avi {i}\n" for i, c in ((1, "Archery"), (2, "YoYo"))
                                           for k in (1, 2, 3)))
    source = (f"{ucf} (data.activity_dir, activity_split 1): no labelled clip in the val split "
              "(6 train, 0 val, 2 test); ")
    if case == "ucf-carve-out-finds-no-group":
        return ({"activity_dir": ucf}, source,
                "there is no vallist01.txt, and carving val out of trainlist01.txt by group (whole v_{Class}_gNN "
                "source videos, about a tenth of each class's groups) finds no class with clips from two or more "
                "groups: add a vallist01.txt ('{path} {label}' lines), or list clips of two or more groups per class "
                "in trainlist01.txt")
    write(ucf / "vallist01.txt", "\n")
    return ({"activity_dir": ucf}, source,
            f"{ucf / 'vallist01.txt'} lists no clips: add '{{path}} {{label}}' lines to it")


@pytest.mark.parametrize("case", ["msrvtt-no-validate", "msvd-under-1201-clips", "ucf-carve-out-finds-no-group",
                                  "ucf-empty-vallist"])
def test_an_empty_video_split_names_its_source_and_what_to_do(tmp_path, case):
    """#13 item 9: an empty val split used to pass extract, tokenize, encoder and features, and stop train with
    "no such file; run the features stage first" (later "the data has no videos in its val split")."""
    sources, named, advice = _videos_without_val(tmp_path, case)
    records = load_video_records(video_dir=tmp_path / "videos", **sources)
    with pytest.raises(AnnotationError) as err:
        check_video_splits(records, **sources)
    message = str(err.value)
    assert "\n" not in message and message.startswith(named) and message.endswith(advice), message
    assert "every task trains on train, picks each model's best epoch on val and reports on test" in message


def test_an_empty_test_split_of_one_msrvtt_file_points_at_the_two_file_release(tmp_path):
    path = write(tmp_path / "train_val.json", msrvtt([("video0", "train"), ("video1", "validate")],
                                                     [("video0", "a"), ("video1", "b")]))
    records = load_video_records(video_dir=tmp_path, video_captions=path)
    with pytest.raises(AnnotationError, match=r'no captioned video in the test split \(1 train, 1 val, 0 test\).*'
                                              r'"split": "test" .*point data.video_captions at a folder'):
        check_video_splits(records, video_captions=path)


def test_an_empty_image_split_names_its_source_and_what_to_do(tmp_path):
    ann = coco_dir(tmp_path / "ann")
    (ann / "captions_val2014.json").unlink()
    records = load_image_records(image_dir=tmp_path / "images", image_captions_dir=ann)
    with pytest.raises(AnnotationError) as err:
        check_image_splits(records, image_captions_dir=ann)
    assert str(err.value) == (
        f"{ann} (data.image_captions_dir): no image in the val split (2 train, 0 val, 1 test); every task trains on "
        "train, picks each model's best epoch on val and reports on test: there is no captions_val*.json: add one, or "
        "set data.karpathy_split to a Karpathy split file (dataset_coco.json), which assigns train, val and test "
        "(COCO's own test images have no public captions)"
    )
    write(ann / "captions_val2014.json", coco([], []))
    with pytest.raises(AnnotationError, match=r"in the val split .*: captions_val2014.json lists no images, or"):
        check_image_splits(load_image_records(image_dir=tmp_path, image_captions_dir=ann), image_captions_dir=ann)

    karpathy = write(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train", "sentences": []},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test", "sentences": []},
    ]})
    records = load_image_records(image_dir=tmp_path, image_captions_dir=ann, karpathy_split=karpathy)
    with pytest.raises(AnnotationError, match=rf'^{karpathy} \(data.karpathy_split\): no image in the val split '
                                              r'\(1 train, 0 val, 1 test\);.*give some images "split": "val"'):
        check_image_splits(records, image_captions_dir=ann, karpathy_split=karpathy)


def test_every_split_present_passes(tmp_path):
    ann = coco_dir(tmp_path / "ann")
    check_image_splits(load_image_records(image_dir=tmp_path, image_captions_dir=ann), image_captions_dir=ann)
    ucf = ucf_real(tmp_path / "ucf")  # no val list: carved out by group
    records = load_video_records(video_dir=tmp_path, activity_dir=ucf)
    check_video_splits(records, activity_dir=ucf)
    check_video_splits(records)  # no source configured, nothing required


# ------------------------------------------------------------------------------------------ media paths stay inside


@pytest.fixture
def media(tmp_path) -> Path:
    """``media/`` with a file inside, a file and a folder symlinked from outside, and an inner symlink."""
    outside = tmp_path / "outside"
    write(outside / "secret.mp4", "")
    write(outside / "secret.png", "")
    folder = tmp_path / "media"
    write(folder / "inside.mp4", "")
    (folder / "link.mp4").symlink_to(outside / "secret.mp4")
    (folder / "link.png").symlink_to(outside / "secret.png")
    (folder / "link_1_2.avi").symlink_to(outside / "secret.mp4")
    (folder / "linkdir").symlink_to(outside, target_is_directory=True)
    (folder / "alias.mp4").symlink_to("inside.mp4")  # resolves inside: fine
    return folder


# (relative path written in the annotation, what the error says about it)
ESCAPES = [
    ("../../etc/passwd", "leads outside the {what} folder"),
    ("sub/../../outside/secret", "leads outside the {what} folder"),
    ("/etc/passwd", "is an absolute path"),
    ("link", "resolves through a symlink to"),
    ("linkdir/secret", "resolves through a symlink to"),
]
ESCAPE_IDS = ["dotdot", "inner-dotdot", "absolute", "file-symlink", "folder-symlink"]


def _assert_refused(err: pytest.ExceptionInfo, source: Path, where: str, problem: str, folder: Path) -> None:
    message = str(err.value)
    assert message.startswith(f"{source}: {where}: "), message
    assert problem in message and f"media files must lie inside {folder}" in message, message
    assert "\n" not in message


@pytest.mark.parametrize(("rel", "problem"), ESCAPES, ids=ESCAPE_IDS)
def test_ucf_list_paths_stay_inside_the_video_folder(tmp_path, media, rel, problem):
    write(tmp_path / "ucf" / "classInd.txt", "1 a\n")
    lst = write(tmp_path / "ucf" / "trainlist01.txt", f"inside.mp4 1\n{rel}.mp4 1\n")
    write(tmp_path / "ucf" / "testlist01.txt", "alias.mp4 1\n")
    with pytest.raises(AnnotationError) as err:
        load_video_records(video_dir=media, activity_dir=tmp_path / "ucf")
    _assert_refused(err, lst, "line 2", problem.format(what="video"), media)


@pytest.mark.parametrize(("rel", "problem"), ESCAPES, ids=ESCAPE_IDS)
def test_msrvtt_video_ids_stay_inside_the_video_folder(tmp_path, media, rel, problem):
    path = write(tmp_path / "msrvtt.json", msrvtt([("inside", "train"), (rel, "test")], []))
    with pytest.raises(AnnotationError) as err:
        load_video_records(video_dir=media, video_captions=path)
    _assert_refused(err, path, "videos[1]", problem.format(what="video"), media)


@pytest.mark.parametrize(("rel", "problem"), ESCAPES, ids=ESCAPE_IDS)
def test_msvd_clip_names_stay_inside_the_video_folder(tmp_path, media, rel, problem):
    path = write(tmp_path / "AllVideoDescriptions.txt", f"# header\ninside_1_2 a cat\n{rel}_1_2 a dog\n")
    with pytest.raises(AnnotationError) as err:
        load_video_records(video_dir=media, video_captions=path, video_captions_format="msvd")
    _assert_refused(err, path, "line 3", problem.format(what="video"), media)


@pytest.mark.parametrize(("rel", "problem"), ESCAPES, ids=ESCAPE_IDS)
def test_coco_file_names_stay_inside_the_image_folder(tmp_path, media, rel, problem):
    ann = tmp_path / "ann"
    path = write(ann / "captions_train2014.json", coco([(1, "inside.png"), (2, f"{rel}.png")], [(2, "x")]))
    with pytest.raises(AnnotationError) as err:
        load_image_records(image_dir=media, image_captions_dir=ann)
    _assert_refused(err, path, "images[1]", problem.format(what="image"), media)


@pytest.mark.parametrize(("rel", "problem"), ESCAPES, ids=ESCAPE_IDS)
def test_karpathy_filenames_and_filepaths_stay_inside_the_image_folder(tmp_path, media, rel, problem):
    def karpathy(image: dict) -> Path:
        ok = {"filepath": "", "filename": "inside.png", "split": "train", "sentences": []}
        return write(tmp_path / "dataset_coco.json", {"images": [ok, {"split": "val", "sentences": [], **image}]})

    path = karpathy({"filename": f"{rel}.png"})
    with pytest.raises(AnnotationError) as err:
        load_image_records(image_dir=media, karpathy_split=path)
    _assert_refused(err, path, "images[1]", problem.format(what="image"), media)
    # filepath is only tried when {image_dir}/{filename} does not exist: then it must stay inside too
    directory, _, name = f"{rel}.png".rpartition("/")
    if directory:
        path = karpathy({"filepath": directory, "filename": name})
        with pytest.raises(AnnotationError) as err:
            load_image_records(image_dir=media, karpathy_split=path)
        _assert_refused(err, path, "images[1]", problem.format(what="image"), media)


def test_paths_inside_the_folder_are_kept_as_written(tmp_path, media):
    """Inner ``..``, inner symlinks and a media folder that is itself a symlink are all fine; record paths are
    ``folder / relative`` unchanged (not resolved)."""
    write(tmp_path / "ucf" / "classInd.txt", "1 a\n")
    write(tmp_path / "ucf" / "trainlist01.txt", "sub/../inside.mp4 1\nalias.mp4 1\n")
    write(tmp_path / "ucf" / "testlist01.txt", "missing.mp4 1\n")  # need not exist
    linked = tmp_path / "linked-media"
    linked.symlink_to(media, target_is_directory=True)
    for folder in (media, linked):
        records = load_video_records(video_dir=folder, activity_dir=tmp_path / "ucf")
        assert sorted(str(r.path) for r in records) == sorted(
            str(folder / p) for p in ("sub/../inside.mp4", "alias.mp4", "missing.mp4")
        )
