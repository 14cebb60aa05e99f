"""report: a hand-made eval/train tree with ok, failed and missing runs -> HTML/Markdown, verdicts, MLflow."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from seqvision import results
from seqvision import metrics
from seqvision import report
from seqvision.config import MODEL_FAMILIES
from tests.tiny import TINY_CLASSES as CLASSES
from tests.tiny import TINY_VIDEO_IDS as VIDEO_IDS
from tests.tiny import tiny_label as label_of
from tests.tiny import write_tiny_artifacts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def activity_records(predict) -> list[dict]:
    records = []
    for i in VIDEO_IDS["test"]:
        label = CLASSES[label_of(i)]
        predicted = predict(i, label)
        others = [c for c in CLASSES if c != predicted]
        records.append({"id": i, "label": label, "predicted": predicted, "score": 0.9, "topk": [predicted, *others]})
    return records


SWAP = {"move_left": "move_right", "move_right": "move_left"}


def write_summary(train: Path, task: str, model: str, **extra) -> None:
    folder = train / task / model
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"task": task, "family": model, "num_parameters": 12345, "best_val_metric": 0.8, "epochs": 3,
               "train_time_s": 42.0, "samples_per_s": 900.5, "peak_memory_mb": 321.0, "device": "cpu", **extra}
    (folder / "summary.json").write_text(json.dumps(summary))
    curve = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_metric": 0.3 * e} for e in (1, 2, 3)]
    (folder / "learning_curve.json").write_text(json.dumps(curve))
    (folder / "best.pt").write_bytes(b"")


def build_tree(root: Path, *, mlflow_ids: dict[str, dict] | None = None) -> dict[str, Path]:
    """activity: gru (7/8, one 'grow' clip wrong), meanpool (swaps the reversal pair), lstm (unreadable
    metrics.json), rnn (trained, not evaluated), transformer (nothing); baseline_majority present,
    baseline_nearest_neighbour absent. video_captioning: gru, meanpool, a baseline. image_captioning: nothing."""
    art = write_tiny_artifacts(root / "art")._asdict()
    train, evals = root / "train", root / "eval"
    ids = mlflow_ids or {}
    pairs = results.reversal_pairs_for(CLASSES)
    first_grow = next(i for i in VIDEO_IDS["test"] if CLASSES[label_of(i)] == "grow")
    systems = {
        "gru": lambda i, y: "stay_still" if i == first_grow else y,
        "meanpool": lambda i, y: SWAP.get(y, y),
        "baseline_majority": lambda i, y: "move_left",
    }
    for name, predict in systems.items():
        results.write_activity_outputs(evals / "activity" / name, activity_records(predict), class_names=CLASSES,
                                  reversal_pairs=pairs)
    for name in ("gru", "meanpool", "lstm", "rnn"):
        write_summary(train, "activity", name, **ids.get(name, {}))
    (evals / "activity" / "lstm").mkdir(parents=True)
    (evals / "activity" / "lstm" / "metrics.json").write_text("{broken")

    refs = json.loads((art["tokens"] / "video" / "references-test.json").read_text())
    captions = {
        "gru": lambda i: refs[i][0],  # perfect on the first reference
        "meanpool": lambda i: "a ball moves",
        "baseline_frequent_caption": lambda i: "nothing moves",
    }
    for name, hyp in captions.items():
        records = [{"id": i, "hypothesis": hyp(i), "references": refs[i], "score": -1.0} for i in VIDEO_IDS["test"]]
        results.write_caption_outputs(evals / "video_captioning" / name, records, meteor="never")
        if not name.startswith("baseline"):
            write_summary(train, "video_captioning", name, **ids.get(f"video_captioning/{name}", {}))
    return {"train": train, "eval": evals, "frames": art["frames"]}


class Page(HTMLParser):
    """Collects ids, internal links, images and table rows (with the section they are in)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.rows: dict[tuple[str, str], dict] = {}
        self.section = ""
        self._row: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
            if tag == "section":
                self.section = attrs["id"]
        if tag == "a" and attrs.get("href", "").startswith("#"):
            self.links.append(attrs["href"][1:])
        elif tag == "a" or tag in ("link", "script") and ("href" in attrs or "src" in attrs):
            self.external.append(attrs.get("href") or attrs.get("src"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr" and "data-run" in attrs:
            self._row = {"status": attrs["data-status"], "class": attrs.get("class", ""), "text": ""}
            self.rows[self.section, attrs["data-run"]] = self._row

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row["text"] += data + " "


def render(tmp_path: Path, tree: dict[str, Path], *, examples: int = 2) -> tuple[dict[str, Path], dict]:
    runs = report.load_runs(train_dir=tree["train"], eval_dir=tree["eval"])
    sections = report.build_sections(runs, frames_dir=tree["frames"], examples=examples)
    return report.write_report(sections, tmp_path / "reports"), runs


def test_report_renders_self_contained_with_failed_and_missing_runs_marked(tmp_path):
    from PIL import Image

    paths, _ = render(tmp_path, build_tree(tmp_path))
    text = paths["html"].read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    page.close()

    assert page.images, "no figures"
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(png)).verify()
    assert page.external == [] and "http" not in text.split("<body>")[0]
    assert len(page.ids) == len(set(page.ids))
    assert page.links and set(page.links) <= set(page.ids)
    # headline + learning curves + confusion (activity), headline + curves (video captioning), example frames
    assert len(page.images) >= 5 + 2 * 2

    rows = page.rows
    assert rows["task-activity", "gru"]["status"] == "ok" and "winner" in rows["task-activity", "gru"]["class"]
    assert rows["task-activity", "lstm"]["status"] == "failed" and "failed" in rows["task-activity", "lstm"]["class"]
    assert "unreadable metrics.json" in rows["task-activity", "lstm"]["text"]
    assert rows["task-activity", "rnn"]["status"] == "missing" and "not evaluated" in rows["task-activity", "rnn"]["text"]
    assert "not trained" in rows["task-activity", "transformer"]["text"]
    assert rows["task-activity", "baseline_nearest_neighbour"]["status"] == "missing"
    assert "12,345" in rows["task-activity", "gru"]["text"] and "900" in rows["task-activity", "gru"]["text"]
    assert all(rows["task-image_captioning", m]["status"] == "missing" for m in MODEL_FAMILIES)
    assert rows["task-video_captioning", "gru"]["status"] == "ok"

    md = paths["md"].read_text(encoding="utf-8")
    assert "| **lstm** | **failed: evaluate: unreadable metrics.json" in md
    for figure in ("activity_headline.png", "activity_learning_curves.png", "activity_confusion.png",
                   "video_captioning_headline.png"):
        assert (paths["figures"] / figure).read_bytes().startswith(PNG_MAGIC)
        assert f"](figures/{figure})" in md
    assert "not x100" in md and "not x100" in text


def test_a_training_recorded_as_failed_is_failed_even_with_an_earlier_evaluation(tmp_path):
    """The compare flow records a failed training in its summary.json; the evaluation of an earlier successful
    training of the same model, still on disk, must not be reported as this one's."""
    tree = build_tree(tmp_path)
    (tree["train"] / "activity" / "gru" / "summary.json").write_text(json.dumps(
        {"task": "activity", "family": "gru", "status": "failed", "error": "RuntimeError: simulated crash"}))
    runs = report.load_runs(train_dir=tree["train"], eval_dir=tree["eval"])
    gru = next(r for r in runs["activity"] if r.name == "gru")
    assert (gru.status, gru.note, gru.metrics) == ("failed", "train failed: RuntimeError: simulated crash", {})
    assert report.verdict("activity", runs["activity"])[0].startswith("meanpool is the only model evaluated")
    published = report.parent_metrics(runs)
    assert "activity.gru.top1" not in published and "activity.meanpool.top1" in published
    md = report.render_markdown(report.build_sections(runs, examples=0))
    assert "| **gru** | **failed: train failed: RuntimeError: simulated crash** |" in md


def test_verdicts_are_computed_from_the_numbers(tmp_path):
    _, runs = render(tmp_path, build_tree(tmp_path), examples=0)
    activity = report.verdict("activity", runs["activity"])
    assert activity[0] == ("gru wins on Top-1 with 0.875, 0.375 ahead of meanpool (0.500, +75.0% relative; "
                           "3 of 8 test clips).")
    # gru alone right on the 4 reversal clips, meanpool alone right on 1: exact McNemar 2 * (1 + 5) / 2**5
    assert activity[1] == ("Paired test, gru vs meanpool: McNemar exact p = 0.375 (not significant at the 5% "
                           "level; 5 discordant clips).")
    assert any(line.startswith("Best baseline: baseline_majority at 0.250") for line in activity)
    reversal = report.reversal_verdict(runs["activity"])
    assert reversal.startswith("Reversal-pair accuracy separates order-aware models from mean-pool")
    assert "meanpool 0.000, swap rate 1.000" in reversal and "+1.000 (gru)" in reversal
    assert "lstm (failed" in activity[-1] and "transformer (missing" in activity[-1]
    video = report.verdict("video_captioning", runs["video_captioning"])
    assert video[0].startswith("gru wins on CIDEr-D with") and "x," not in video[0]
    assert video[1].startswith("Paired test, gru vs meanpool: 95% paired-bootstrap interval") and "(excludes 0)" in video[1]
    # The frequent-caption baseline ("nothing moves") is a reference of the stay_still clips, so it is not 0.
    assert any(line.startswith("Best baseline: baseline_frequent_caption") for line in video)
    assert report.verdict("image_captioning", runs["image_captioning"])[0].startswith("No model finished")

    # With the order-aware model no better on the pair, the verdict flips.
    meanpool = next(r for r in runs["activity"] if r.name == "meanpool")
    gru = next(r for r in runs["activity"] if r.name == "gru")
    worse = gru._replace(metrics={**gru.metrics, "reversal_pair_accuracy": 0.02})
    assert "does not separate" in report.reversal_verdict([worse, meanpool])


def test_paired_tests_and_ties():
    assert report.mcnemar_p([1, 1, 0, 1], [1, 1, 0, 1]) == (1.0, 0)
    assert report.mcnemar_p([1] * 10, [0] * 10) == (pytest.approx(2 / 2**10), 10)
    low, high = report.bootstrap_interval([0.5, 0.4, 0.6, 0.5, 0.45])
    assert 0.4 <= low < 0.5 < high <= 0.6
    low, high = report.bootstrap_interval([1.0, -1.0] * 20)
    assert low < 0 < high
    ok = {"top_1": 0.5, "num_items": 10}
    runs = [report.Run("activity", name, "model", "ok", "", ok, {}, {}, [], Path("/nonexistent"))
            for name in ("gru", "lstm")]
    assert report.verdict("activity", runs)[0] == "gru and lstm tie on Top-1 at 0.500."
    assert "Ranking: gru (0.500) = lstm (0.500)." in report.verdict("activity", runs)
    assert report.verdict("activity", runs[:1])[0] == "gru is the only model evaluated: Top-1 0.500."


def test_examples_show_the_best_models_successes_and_failures_with_frames(tmp_path):
    tree = build_tree(tmp_path)
    runs = report.load_runs(train_dir=tree["train"], eval_dir=tree["eval"])
    store = report._frame_store(tree["frames"], "videos")
    best, examples = report.pick_examples("activity", runs["activity"], store=store, count=2)
    assert best == "gru"
    correct = [e for e in examples if e.verdict == "correct"]
    failed = [e for e in examples if e.verdict == "failed"]
    assert len(correct) == 2 and len(failed) == 1  # gru got exactly one clip wrong
    assert failed[0].truth == ["grow"]
    # Correct clips that the order-blind model got wrong come first: reversal-pair clips.
    assert all(e.truth[0] in SWAP for e in correct)
    assert all(e.image is not None and e.image.startswith(PNG_MAGIC) for e in examples)
    best, examples = report.pick_examples("video_captioning", runs["video_captioning"], store=store, count=1)
    assert best == "gru" and [e.verdict for e in examples] == ["correct", "failed"]
    scores = {name: score for name, _, _, score in examples[0].outputs}
    assert scores["gru"] > scores["meanpool"]


@pytest.mark.slow
def test_mlflow_parent_gets_the_report_and_every_childs_headline_metric(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from seqvision import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
    children = {}
    for name in ("gru", "meanpool"):
        with tracking.start_child(parent_run_id=parent, run_name=f"activity-{name}", repo_root=tmp_path) as tracker:
            pass
        children[name] = tracker.run_id
    ids = {name: {"mlflow": {"run_id": run_id, "parent_run_id": parent}} for name, run_id in children.items()}
    paths, runs = render(tmp_path, build_tree(tmp_path, mlflow_ids=ids), examples=1)
    assert report.parent_run_ids(runs) == [parent]

    logged = report.parent_metrics(runs)
    tracking.publish_comparison(parent, repo_root=tmp_path, metrics=logged,
                                child_metrics=report.child_metrics(runs, parent_run_id=parent),
                                files=[paths["html"], paths["md"]], folders={"report/figures": paths["figures"]})
    client = MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert metrics["activity.gru.top1"] == pytest.approx(0.875) == logged["activity.gru.top1"]
    assert metrics["activity.meanpool.top1"] == pytest.approx(0.5)
    assert metrics["activity.meanpool.reversal_pair_acc"] == 0.0
    assert metrics["activity.baseline_majority.top1"] == pytest.approx(0.25)
    assert "video_captioning.gru.cider_d" in metrics and not any(".lstm." in k for k in metrics)
    files = {f.path for f in client.list_artifacts(parent, "report")}
    assert {"report/report.html", "report/report.md", "report/figures"} <= files
    html_copy = Path(client.download_artifacts(parent, "report/report.html", str(tmp_path / "dl")))
    assert html_copy.read_bytes() == paths["html"].read_bytes()
    assert client.get_run(children["gru"]).data.metrics["test_top_1"] == pytest.approx(0.875)


@pytest.mark.slow
def test_report_flow_cli(tmp_path, monkeypatch, prefect_harness, capsys):
    from mlflow import MlflowClient

    from pipelines import report as report_cli
    from seqvision import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
    tree = build_tree(tmp_path, mlflow_ids={"gru": {"mlflow_parent_run_id": parent}})
    with pytest.raises(SystemExit) as exc:
        report_cli.parse_args(["--help"])
    assert exc.value.code == 0
    capsys.readouterr()
    assert report_cli.main(["--eval", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("report: error: ") and err.count("\n") == 1
    args = ["--train", str(tree["train"]), "--eval", str(tree["eval"]), "--frames", str(tree["frames"]),
            "--out", str(tmp_path / "reports"), "--repo-root", str(tmp_path)]
    assert report_cli.main([*args, "--no-mlflow"]) == 0
    assert "not logged to MLflow" in capsys.readouterr().out
    assert MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path)).get_run(parent).info.status == "RUNNING"
    assert report_cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"logged on MLflow parent run {parent}" in out and "make mlflow-ui" in out
    assert str(tmp_path / "reports" / "report.html") in out
    run = MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path)).get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["activity.gru.top1"] == pytest.approx(0.875)


def _meteor_runs(tmp_path):
    tree = build_tree(tmp_path / "tree")
    return report.load_runs(train_dir=tree["train"], eval_dir=tree["eval"], tasks=("video_captioning",))


def test_without_java_meteor_is_unavailable_in_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr("seqvision.metrics.java_available", lambda: False)
    runs, note = report.add_meteor(_meteor_runs(tmp_path), mode="auto")
    assert "no Java" in note
    header, rows = report.table("video_captioning", runs["video_captioning"])
    col = header.index("METEOR")
    by_name = {run.name: cells for run, cells in rows}
    assert by_name["gru"][col] == "unavailable" and by_name["baseline_frequent_caption"][col] == "unavailable"
    assert by_name["lstm"][col] == "—"  # a missing run has no value to be unavailable
    with pytest.raises(RuntimeError, match="Java"):
        report.add_meteor(runs, mode="always")
    assert report.add_meteor(runs, mode="never")[0]["video_captioning"][0].metrics.get("meteor") is None


@pytest.mark.slow
@pytest.mark.skipif(not metrics.java_available(), reason="METEOR needs a Java runtime; none on this machine")
def test_meteor_from_one_java_process_equals_scoring_each_run_alone(tmp_path):
    runs, note = report.add_meteor(_meteor_runs(tmp_path), mode="always")
    scored = [r for r in runs["video_captioning"] if r.ok]
    assert "3 captioning runs" in note and len(scored) == 3
    for run in scored:
        records = metrics.read_jsonl(run.eval_dir / "predictions.jsonl")
        alone = metrics.caption_scores({r["id"]: r["hypothesis"] for r in records},
                                       {r["id"]: r["references"] for r in records}, meteor="always")["meteor"]
        assert run.metrics["meteor"] == pytest.approx(alone, abs=1e-9)
    best = {r.name: r.metrics["meteor"] for r in scored}
    assert best["gru"] > best["meanpool"]  # gru repeats a reference word for word
