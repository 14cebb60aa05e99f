"""report: fabricated train-stage runs (every seed, docs/design.md's artifacts/runs layout) and baselines ->
intervals over seeds, verdicts that follow from their tests, HTML/Markdown/summary.json, MLflow."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from seqvision import content, metrics, report, results
from seqvision.config import MODEL_FAMILIES
from seqvision.synth.captions import image_captions
from seqvision.synth.scene import INVERSE_RELATION, ObjectSpec
from tests.test_content import IMAGE, LONE, PERFECT_IMAGE, PERFECT_VIDEO, VIDEO
from tests.tiny import TINY_CLASSES as CLASSES
from tests.tiny import TINY_VIDEO_IDS as VIDEO_IDS
from tests.tiny import tiny_label as label_of
from tests.tiny import write_tiny_artifacts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "SEQVISION_PARENT_RUN_ID")
SWAP = {"move_left": "move_right", "move_right": "move_left"}
PAIRS = results.reversal_pairs_for(CLASSES)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


# --------------------------------------------------------------------------------------------------------
# Fabricated stage outputs, written with the pipeline's own writers


def activity_records(ids, predict) -> list[dict]:
    """One prediction per clip; ``predict(id, label) -> class``; a clip's label is its number modulo 4."""
    records = []
    for i in ids:
        label = CLASSES[int(i[1:]) % len(CLASSES)]
        predicted = predict(i, label)
        records.append({"id": i, "label": label, "predicted": predicted, "score": 0.9,
                        "topk": [predicted, *(c for c in CLASSES if c != predicted)]})
    return records


def write_activity(folder: Path, records) -> dict:
    return results.write_activity_outputs(folder, records, class_names=CLASSES, reversal_pairs=PAIRS)


def write_captions(folder: Path, records, *, per_item: dict | None = None) -> dict:
    """results.write_caption_outputs, then ``per_item`` merged into details.json (what the train stage records)."""
    out = results.write_caption_outputs(folder, records, meteor="never")
    if per_item:
        details = json.loads((folder / "details.json").read_text())
        details["per_item"] = {**details.get("per_item", {}), **per_item}
        (folder / "details.json").write_text(json.dumps(details))
    return out


def write_model(runs: Path, task: str, family: str, seeds: list, write, *, params: int = 1000, budget: int | None = 1000,
                converged: list[bool] | None = None, best_epochs: list[int] | None = None, epochs: int = 6,
                extra: dict | None = None) -> Path:
    """A train stage's outputs: test/seed{k}/ by ``write(folder, seeds[k])``, then metrics.json (each numeric seed
    metric as metrics.seed_summary), summary.json and learning_curve.json over the seeds (results.aggregate's
    layout)."""
    folder = runs / task / family
    n = len(seeds)
    converged = converged if converged is not None else [True] * n
    best_epochs = best_epochs or [epochs - 2] * n
    per_seed = [write(folder / "test" / f"seed{k}", payload) for k, payload in enumerate(seeds)]
    keys = [k for k, v in per_seed[0].items() if k not in ("num_items", "decode_time_s", "items_per_s")
            and (v is None or isinstance(v, (int, float)))]  # write() returns metrics.json plus the timing
    aggregated = {k: metrics.seed_summary([m.get(k) for m in per_seed]) for k in keys}
    aggregated.update({"num_seeds": n, "num_parameters": params, "converged": sum(converged)})
    (folder / "metrics.json").write_text(json.dumps(aggregated))
    seed_summaries = [{"task": task, "family": family, "seed": k, "num_parameters": params, "converged": converged[k],
                       "best_epoch": best_epochs[k], "epochs_run": epochs, "best_val_metric": 0.5 + 0.01 * k,
                       "device": "cpu", "metric": "accuracy"} for k in range(n)]
    summary = {"task": task, "family": family, "num_parameters": params, "budget": budget, "metric": "accuracy",
               "seeds": seed_summaries, "num_seeds": n, "converged_seeds": sum(converged)}
    (folder / "summary.json").write_text(json.dumps(summary))
    # The measurements and MLflow ids: runinfo.json (results.aggregate, pipelines.train.stamp_run_ids).
    (folder / "runinfo.json").write_text(json.dumps({
        "seeds": [{"train_time_s": 10.0, "samples_per_s": 100.0 + k, "peak_memory_mb": 300.0} for k in range(n)],
        "train_time_s": 10.0 * n, **(extra or {})}))
    curve = [{"seed": k, "epoch": e, "train_loss": 2.0 / e + 0.1 * k, "val_loss": 2.2 / e, "val_metric": 0.1 * e}
             for k in range(n) for e in range(1, epochs + 1)]
    (folder / "learning_curve.json").write_text(json.dumps(curve))
    return folder


def accuracy_predictor(rate: float, rng):
    """Right on a ``rate`` fraction of clips (drawn by ``rng``), else the next class."""
    def predict(i, label):
        return label if rng.random() < rate else CLASSES[(CLASSES.index(label) + 1) % len(CLASSES)]
    return predict


def build_tree(root: Path, *, mlflow_ids: dict[str, dict] | None = None) -> dict[str, Path]:
    """activity on the tiny test clips: gru (3 seeds, 7/8 right), meanpool (3 seeds, swaps the reversal pair),
    lstm (unreadable metrics.json), rnn (trained, not finished), transformer (training failed), mingru (nothing);
    baseline_majority present, baseline_nearest_neighbour absent. video_captioning: gru, meanpool and a baseline.
    image_captioning: nothing."""
    art = write_tiny_artifacts(root / "art")._asdict()
    runs, evals = root / "runs", root / "eval"
    ids = mlflow_ids or {}
    test = VIDEO_IDS["test"]
    first_grow = next(i for i in test if CLASSES[label_of(i)] == "grow")
    gru = [activity_records(test, lambda i, y: "stay_still" if i == first_grow else y)] * 3
    meanpool = [activity_records(test, lambda i, y: SWAP.get(y, y))] * 3
    write_model(runs, "activity", "gru", gru, write_activity, extra=ids.get("gru"))
    write_model(runs, "activity", "meanpool", meanpool, write_activity, extra=ids.get("meanpool"))
    write_activity(evals / "activity" / "baseline_majority", activity_records(test, lambda i, y: "move_left"))
    (runs / "activity" / "lstm").mkdir(parents=True)
    (runs / "activity" / "lstm" / "metrics.json").write_text("{broken")
    (runs / "activity" / "rnn" / "train" / "seed0").mkdir(parents=True)
    (runs / "activity" / "transformer").mkdir(parents=True)
    (runs / "activity" / "transformer" / "summary.json").write_text(json.dumps(
        {"task": "activity", "family": "transformer", "status": "failed", "error": "RuntimeError: simulated crash"}))

    refs = json.loads((art["tokens"] / "video" / "references-test.json").read_text())
    captions = {"gru": lambda i: refs[i][0], "meanpool": lambda i: "a ball moves",
                "baseline_frequent_caption": lambda i: "nothing moves"}
    for name, hyp in captions.items():
        records = [{"id": i, "hypothesis": hyp(i), "references": refs[i], "score": -1.0} for i in test]
        if name.startswith("baseline"):
            write_captions(evals / "video_captioning" / name, records)
        else:
            write_model(runs, "video_captioning", name, [records] * 2, write_captions,
                        extra=ids.get(f"video_captioning/{name}"))
    return {"runs": runs, "eval": evals, "frames": art["frames"]}


class Page(HTMLParser):
    """Collects ids, internal links, images and the runs table's rows (with the section they are in)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.links: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self.rows: dict[tuple[str, str], dict] = {}
        self.verdicts: list[str] = []
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
        if tag == "tr" and "data-verdict" in attrs:
            self.verdicts.append(attrs["data-verdict"])
        if tag == "tr" and "data-run" in attrs:
            self._row = {"status": attrs["data-status"], "class": attrs.get("class", ""), "text": ""}
            self.rows[self.section, attrs["data-run"]] = self._row

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row is not None:
            self._row["text"] += data + " "


def render(tmp_path: Path, tree: dict[str, Path], *, examples: int = 2, **kwargs) -> tuple[dict[str, Path], dict]:
    runs = report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"])
    sections = report.build_sections(runs, frames_dir=tree.get("frames"), examples=examples, resamples=400, **kwargs)
    return report.write_report(sections, tmp_path / "reports", resamples=400), runs


def test_report_bytes_do_not_depend_on_the_runs_measurements(tmp_path):
    # DVC hashes reports/: the times, memory and MLflow ids of the runs (runinfo.json, which DVC ignores) must not
    # reach report.md/html/summary.json/figures, only runinfo.md.
    tree = build_tree(tmp_path / "tree", mlflow_ids={"gru": {"mlflow_run_id": "child-gru"}})
    first, _ = render(tmp_path / "first", tree)
    runinfo = tree["runs"] / "activity" / "gru" / "runinfo.json"
    assert "child-gru" in first["runinfo"].read_text() and "30.0 s" in first["runinfo"].read_text()
    runinfo.write_text(json.dumps({"train_time_s": 4321.0, "mlflow_run_id": "another-run",
                                   "seeds": [{"peak_memory_mb": 9999.0}]}))
    second, _ = render(tmp_path / "second", tree)
    for key in ("html", "md", "summary"):
        assert first[key].read_bytes() == second[key].read_bytes(), key
    assert sorted(p.name for p in first["figures"].iterdir()) == sorted(p.name for p in second["figures"].iterdir())
    for fig in first["figures"].iterdir():
        assert fig.read_bytes() == (second["figures"] / fig.name).read_bytes(), fig.name
    measured = second["runinfo"].read_text()
    assert "72.0 min" in measured and "9999 MB" in measured and "another-run" in measured
    runinfo.unlink()  # a run pulled from a DVC remote has none: the report still renders, without times
    third, _ = render(tmp_path / "third", tree)
    assert third["md"].read_bytes() == first["md"].read_bytes()


# --------------------------------------------------------------------------------------------------------
# Rendering, with missing and failed runs


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
    assert rows["task-activity", "gru"]["status"] == "ok" and "3 (0, 1, 2)" in rows["task-activity", "gru"]["text"]
    assert "3/3 converged" in rows["task-activity", "gru"]["text"]
    assert rows["task-activity", "lstm"]["status"] == "failed" and "failed" in rows["task-activity", "lstm"]["class"]
    assert "unreadable metrics.json" in rows["task-activity", "lstm"]["text"]
    assert rows["task-activity", "rnn"]["status"] == "missing" and "not finished" in rows["task-activity", "rnn"]["text"]
    assert rows["task-activity", "transformer"]["status"] == "failed"
    assert "train failed: RuntimeError: simulated crash" in rows["task-activity", "transformer"]["text"]
    assert "not trained" in rows["task-activity", "mingru"]["text"]
    assert rows["task-activity", "baseline_nearest_neighbour"]["status"] == "missing"
    assert rows["task-activity", "baseline_majority"]["status"] == "ok"
    assert "1,000" in rows["task-activity", "gru"]["text"] and "+0.0% of 1,000" in rows["task-activity", "gru"]["text"]
    assert all(rows["task-image_captioning", m]["status"] == "missing" for m in MODEL_FAMILIES)
    assert rows["task-video_captioning", "gru"]["status"] == "ok"

    md = paths["md"].read_text(encoding="utf-8")
    assert "| **lstm** | **failed: train: unreadable metrics.json" in md
    assert "| **transformer** | **failed: train failed: RuntimeError: simulated crash** |" in md
    for figure in ("activity_headline.png", "activity_learning_curves.png", "activity_confusion.png",
                   "video_captioning_headline.png"):
        assert (paths["figures"] / figure).read_bytes().startswith(PNG_MAGIC)
        assert f"](figures/{figure})" in md
    assert "not x100" in md and "not x100" in text
    assert "Holm" in md and "Holm" in text  # the correction is stated
    assert "The seed's table, measured: [study.md](study.md)" in md  # the study's section, one line
    assert "<code>study.html</code> beside this file" in text
    summary = json.loads(paths["summary"].read_text())
    assert summary["tasks"]["activity"]["runs"]["transformer"]["status"] == "failed"
    assert summary["tasks"]["image_captioning"]["headline"].startswith("No model finished")


def test_a_training_recorded_as_failed_is_failed_even_with_earlier_outputs(tmp_path):
    """The compare flow records a failed training in its summary.json; the test outputs of an earlier successful
    training of the same model, still on disk, must not be reported as this one's."""
    tree = build_tree(tmp_path)
    (tree["runs"] / "activity" / "gru" / "summary.json").write_text(json.dumps(
        {"task": "activity", "family": "gru", "status": "failed", "error": "RuntimeError: simulated crash"}))
    runs = report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"])
    gru = next(r for r in runs["activity"] if r.name == "gru")
    assert (gru.status, gru.note, gru.metrics, gru.seeds) == ("failed", "train failed: RuntimeError: simulated crash",
                                                             {}, ())
    stats = report.task_statistics("activity", runs["activity"], resamples=200)
    assert report.verdict("activity", runs["activity"], stats)[0].startswith("meanpool is the only model evaluated")
    published = report.parent_metrics(runs)
    assert "activity.gru.top1" not in published and "activity.meanpool.top1" in published


# --------------------------------------------------------------------------------------------------------
# Intervals over seeds


def test_intervals_over_seeds_of_fabricated_runs_with_known_spread(tmp_path):
    """gru gets 6, 7 and 8 of 10 clips right on its three seeds: top-1 0.7 +- t(0.975, 2) * 0.1 / sqrt(3)."""
    runs_dir = tmp_path / "runs"
    ids = [f"c{i:02d}" for i in range(10)]
    seeds = [activity_records(ids, lambda i, y, k=k: y if int(i[1:]) < 6 + k else "grow" if y != "grow" else "stay_still")
             for k in range(3)]
    write_model(runs_dir, "activity", "gru", seeds, write_activity)
    write_model(runs_dir, "activity", "lstm", seeds[:1], write_activity)  # one seed: no interval
    runs = report.load_runs(runs_dir=runs_dir, baselines_dir=None, tasks=("activity",), models=("gru", "lstm"))
    gru, lstm = runs["activity"][:2]
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert gru.metrics["top_1"]["seeds"] == pytest.approx([0.6, 0.7, 0.8])
    assert gru.interval("top_1") == pytest.approx((0.7 - half, 0.7 + half), abs=1e-6)
    assert report.mean_ci(gru, "top_1") == f"0.700 ± {half:.3f}" == "0.700 ± 0.248"
    assert lstm.interval("top_1") is None and report.mean_ci(lstm, "top_1") == "0.600 (1 seed)"
    sections = report.build_sections(runs, resamples=300)
    lines = report.verdict("activity", runs["activity"], sections[0].stats)
    assert any(line.startswith("One seed only: lstm") for line in lines)
    assert "gru 0.700 [0.452, 0.948]" in lines[0]  # the headline carries the interval
    data = report.summary_json(sections)
    assert data["tasks"]["activity"]["runs"]["gru"]["metrics"]["top_1"]["ci95"] == pytest.approx(
        [0.7 - half, 0.7 + half], abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# Verdicts that follow from their tests


def _fabricated_activity(root: Path, rates: dict[str, list[float]], *, items: int = 120) -> dict[str, list]:
    """Families with the given per-seed accuracy on ``items`` clips (each seed right on its own random clips)."""
    ids = [f"c{i:03d}" for i in range(items)]
    for family, seed_rates in rates.items():
        rng = np.random.default_rng(zlib.crc32(family.encode()))  # not hash(): randomised per process
        seeds = [activity_records(ids, accuracy_predictor(rate, rng)) for rate in seed_rates]
        write_model(root / "runs", "activity", family, seeds, write_activity)
    return report.load_runs(runs_dir=root / "runs", baselines_dir=None, tasks=("activity",), models=tuple(rates))


def test_a_fabricated_tie_is_reported_as_no_significant_difference(tmp_path):
    runs = _fabricated_activity(tmp_path, {"gru": [0.70, 0.66, 0.72], "lstm": [0.68, 0.71, 0.65]})
    section = report.build_sections(runs, resamples=1000)[0]
    (tie,) = section.stats.comparisons
    assert tie.symbol == "~" and tie.sentence() in ("gru ~ lstm", "lstm ~ gru")
    assert tie.comparison.interval[0] < 0 < tie.comparison.interval[1] and tie.p_holm > 0.05
    headline = section.verdict[0]
    assert headline.startswith("No significant winner on Top-1:") and " wins" not in headline
    assert "Holm p =" in headline and "[" in headline  # the summary carries the interval
    assert "Ranking on Top-1 (adjacent pairs): " in section.verdict[1] and " ~ " in section.verdict[1]
    md = report.render_markdown([section])
    assert "| Top-1 | " in md and "~" in md.split("### Comparisons", 1)[1]
    page = Page()
    page.feed(report.render_html([section]))
    assert page.verdicts == [tie.sentence()]


def test_a_fabricated_clear_difference_is_significant_and_the_best_is_named(tmp_path):
    runs = _fabricated_activity(tmp_path, {"transformer": [0.95, 0.93, 0.96], "gru": [0.55, 0.6, 0.5],
                                           "lstm": [0.58, 0.52, 0.57]})
    section = report.build_sections(runs, resamples=1000)[0]
    by_pair = {(c.a, c.b): c for c in section.stats.comparisons}
    assert by_pair["transformer", "gru"].symbol == ">" and by_pair["transformer", "lstm"].symbol == ">"
    assert section.verdict[0].startswith("transformer is best on Top-1: transformer 0.9")
    assert "significantly ahead of every other family" in section.verdict[0]
    # Holm: adjusted p-values are at least the raw ones, and the ranking reads the pair verdicts.
    assert all(c.p_holm >= c.comparison.p_value for c in section.stats.comparisons)
    assert section.verdict[1].startswith("Ranking on Top-1 (adjacent pairs): transformer 0.9")
    assert "> " in section.verdict[1]
    data = report.summary_json([section])
    stated = data["tasks"]["activity"]["comparisons"]
    closest = next(c for c in stated if {c["a"], c["b"]} == {"transformer", "lstm"})
    assert f"{closest['difference']:+.3f} [{closest['interval'][0]:+.3f}, {closest['interval'][1]:+.3f}]" in \
        section.verdict[0]
    assert data["summary"][0] == {"task": "activity", "text": section.verdict[0]}


def test_holm_correction_can_turn_a_marginal_difference_into_a_tie(tmp_path):
    """Six families: 15 pairs on top-1 (one Holm family), 5 order-aware ones against mean-pool on reversal-pair
    accuracy (another). A pair significant on its own is not, once corrected for the other comparisons."""
    rates = {"transformer": [0.80, 0.82, 0.78], "gru": [0.74, 0.75, 0.73], "lstm": [0.72, 0.70, 0.74],
             "rnn": [0.6, 0.62, 0.58], "mingru": [0.7, 0.68, 0.72], "meanpool": [0.5, 0.52, 0.48]}
    runs = _fabricated_activity(tmp_path, rates)
    stats = report.task_statistics("activity", runs["activity"], resamples=1000)
    for family in ("pairs", "order"):
        found = [c for c in stats.comparisons if c.family == family]
        assert [c.p_holm for c in found] == pytest.approx(metrics.holm([c.comparison.p_value for c in found]))
    assert len([c for c in stats.comparisons if c.family == "pairs"]) == 15
    for c in stats.comparisons:
        assert (c.symbol != "~") == (c.p_holm < report.ALPHA)
    marginal = [c for c in stats.comparisons if c.comparison.p_value < report.ALPHA <= c.p_holm]
    assert marginal and all(c.symbol == "~" for c in marginal)


def test_reversal_verdict_uses_within_pair_accuracy_and_swap_rate(tmp_path):
    """gru is right on every clip; meanpool swaps every reversal-pair clip; rnn swaps half of them."""
    ids = [f"c{i:03d}" for i in range(80)]
    families = {
        "gru": lambda i, y: y,
        "meanpool": lambda i, y: SWAP.get(y, y),
        "rnn": lambda i, y: SWAP.get(y, y) if int(i[1:]) % 8 < 4 else y,
    }
    for family, predict in families.items():
        write_model(tmp_path / "runs", "activity", family, [activity_records(ids, predict)] * 3, write_activity)
    runs = report.load_runs(runs_dir=tmp_path / "runs", baselines_dir=None, tasks=("activity",),
                            models=tuple(families))
    stats = report.task_statistics("activity", runs["activity"], resamples=500)
    order = {(c.a, c.b): c for c in stats.comparisons if c.family == "order"}
    assert set(order) == {("gru", "meanpool"), ("rnn", "meanpool")}
    assert order["gru", "meanpool"].comparison.difference == pytest.approx(1.0)
    assert order["gru", "meanpool"].symbol == ">"
    line = report.reversal_verdict(runs["activity"], stats)
    assert line.startswith("Reversal pairs separate every order-aware family from mean-pool")
    assert "meanpool 0.000" in line and "swap rate 1.000" in line and "gru +1.000" in line
    meanpool = next(r for r in runs["activity"] if r.name == "meanpool")
    assert meanpool.value("reversal_swap_rate") == 1.0
    # Order-blind framing only where order matters.
    assert report.order_blind_verdict("activity", runs["activity"], stats).startswith("Order-blind meanpool")
    assert report.order_blind_verdict("image_captioning", runs["activity"], stats) is None


def test_convergence_and_parameter_budget_are_shown_and_flagged(tmp_path):
    ids = [f"c{i:02d}" for i in range(20)]
    seeds = [activity_records(ids, lambda i, y: y)] * 3
    write_model(tmp_path / "runs", "activity", "gru", seeds, write_activity, converged=[True, False, False],
                best_epochs=[3, 6, 6], epochs=6, params=1000, budget=1000)
    write_model(tmp_path / "runs", "activity", "lstm", seeds, write_activity, params=1250, budget=1000)
    write_model(tmp_path / "runs", "activity", "rnn", seeds, write_activity, params=905, budget=1000)
    runs = report.load_runs(runs_dir=tmp_path / "runs", baselines_dir=None, tasks=("activity",),
                            models=("gru", "lstm", "rnn"))
    gru, lstm, rnn = runs["activity"]
    assert report.convergence(gru) == "not converged: 2/3 seeds hit train.epochs while still improving (best epoch 6 of 6, 6 of 6)"
    assert report.convergence(lstm) == "3/3 converged"
    assert report.parameter_note(lstm) == ("⚠ +25.0% of 1,000", True)
    assert report.parameter_note(rnn) == ("-9.5% of 1,000", False)
    lines = report.build_sections(runs, resamples=200)[0].verdict
    assert any(line.startswith("Parameter counts more than 10% from the budget: lstm 1,250 (+25.0% of 1,000)")
               for line in lines)
    assert any(line.startswith("Not converged: gru, 2/3 seeds hit train.epochs while still improving") for line in lines)
    training = report.summary_json(report.build_sections(runs, resamples=200))["tasks"]["activity"]["runs"]["gru"]
    assert [(t["converged"], t["best_epoch"], t["epochs"]) for t in training["training"]] == [
        (True, 3, 6), (False, 6, 6), (False, 6, 6)]  # the numbers the sentence states
    # Without a budget (match_params off) the spread of sizes is stated.
    write_model(tmp_path / "nb" / "runs", "activity", "gru", seeds, write_activity, params=500, budget=None)
    write_model(tmp_path / "nb" / "runs", "activity", "lstm", seeds, write_activity, params=2000, budget=None)
    unmatched = report.load_runs(runs_dir=tmp_path / "nb" / "runs", baselines_dir=None, tasks=("activity",),
                                 models=("gru", "lstm"))
    assert report.size_note("activity", unmatched["activity"]).startswith(
        "No parameter budget (models.match_params off): sizes range 500-2,000 (4.0x)")


# --------------------------------------------------------------------------------------------------------
# Captioning: content metrics are the headline, computed from per-item records


def _image_data(count: int = 30):
    """``count`` images alternating the hand-made three-object scene and a lone object; five references each from
    the generator's templates."""
    metas, refs = {}, {}
    rng = np.random.default_rng(0)
    for n in range(count):
        meta = dict(IMAGE if n % 2 == 0 else LONE, id=f"image{n}")
        objects = [ObjectSpec(o["shape"], o["color"], o["size"]) for o in meta["objects"]]
        relations = {}
        for r in meta["relations"]:
            relations[(r["subject"], r["object"])] = r["relation"]
            relations[(r["object"], r["subject"])] = INVERSE_RELATION[r["relation"]]
        metas[meta["id"]] = meta
        refs[meta["id"]] = image_captions(objects, relations, [o["region"] for o in meta["objects"]], rng)
    return metas, refs


def _write_captioner(runs: Path, family: str, seeds_hyps: list[dict], metas, refs) -> None:
    def write(folder, hyps):
        records = [{"id": i, "hypothesis": hyps[i], "references": refs[i], "score": -1.0} for i in sorted(hyps)]
        scored = content.image_content_scores(hyps, metas)
        return write_captions(folder, records, per_item={"content": scored.per_item})
    write_model(runs, "image_captioning", family, seeds_hyps, write)


def test_content_metrics_over_seeds_with_the_compositional_subset_and_template_ceilings(tmp_path):
    metas, refs = _image_data()
    perfect = {i: PERFECT_IMAGE if m["objects"][0]["shape"] == "circle" else refs[i][0] for i, m in metas.items()}
    vague = {i: "there is a red circle" for i in metas}
    _write_captioner(tmp_path / "runs", "transformer", [perfect, perfect, dict(perfect, image0="a red circle")],
                     metas, refs)
    _write_captioner(tmp_path / "runs", "gru", [vague] * 3, metas, refs)
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps({"videos": [], "images": list(metas.values())}))
    runs = report.load_runs(runs_dir=tmp_path / "runs", baselines_dir=None, tasks=("image_captioning",),
                            models=("transformer", "gru"))
    transformer, gru = runs["image_captioning"]
    # The table's numbers are content.summarize over each seed's per-item records.
    seed2 = content.image_content_scores(dict(perfect, image0="a red circle"), metas)
    assert transformer.metrics["content_object_f1"]["seeds"] == pytest.approx([1.0, 1.0, seed2.mean["object_f1"]])
    compositional = [v for v in seed2.per_item.values() if v["compositional"]]
    assert transformer.metrics["content_object_f1/compositional"]["seeds"][2] == pytest.approx(
        content.summarize(compositional)["object_f1"])
    section = report.build_sections(runs, resamples=500, metadata=metadata)[0]
    assert section.stats.primary == "content_object_f1"
    assert section.verdict[0].startswith("transformer is best on Object F1: transformer 0.9")
    # gru names no relation, so its relation F1 is undefined (content.summarize): said, not silently dropped.
    assert {c.metric for c in section.stats.comparisons} == {"content_object_f1", "cider_d"}
    assert "Not compared: Relation F1: undefined for gru" in " ".join(section.verdict)
    # Perfect content in each of the five templates, scored against these references.
    assert set(section.ceilings) == set(content.template_ceilings(metas, refs))
    md = report.render_markdown([section])
    assert "### Content metrics (the headline on the synthetic benchmark)" in md
    assert "Object F1 (compositional)" in md and "### Per-template oracle ceiling of CIDEr-D" in md
    assert report.order_blind_verdict("image_captioning", runs["image_captioning"], section.stats) is None
    with pytest.raises(ValueError, match="metadata.json"):
        (tmp_path / "bad.json").write_text("{}")
        report.build_sections(runs, resamples=100, metadata=tmp_path / "bad.json")


def test_video_content_verdicts_use_event_f1_and_order_accuracy_against_mean_pool(tmp_path):
    """gru tells the three events in order (but misses one on a few clips, differently per seed); meanpool names
    two of them in the wrong order: event F1 ranks them, order accuracy separates gru from the order-blind model."""
    metas = {f"video{n}": dict(VIDEO, id=f"video{n}") for n in range(40)}
    refs = {i: [PERFECT_VIDEO] for i in metas}
    partial = "the red circle turns green, then the blue square grows"
    backwards = "the blue square grows, then the red circle turns green"

    def write(folder, hyps):
        records = [{"id": i, "hypothesis": hyps[i], "references": refs[i], "score": -1.0} for i in sorted(hyps)]
        return write_captions(folder, records, per_item={"content": content.video_content_scores(hyps, metas).per_item})

    gru = [{i: partial if int(i[5:]) % 10 == k else PERFECT_VIDEO for i in metas} for k in range(3)]
    write_model(tmp_path / "runs", "video_captioning", "gru", gru, write)
    write_model(tmp_path / "runs", "video_captioning", "meanpool", [{i: backwards for i in metas}] * 3, write)
    runs = report.load_runs(runs_dir=tmp_path / "runs", baselines_dir=None, tasks=("video_captioning",),
                            models=("gru", "meanpool"))
    gru_run, meanpool = runs["video_captioning"]
    assert meanpool.value("content_order_accuracy") == 0.0 and gru_run.value("content_order_accuracy") == 1.0
    assert meanpool.value("content_event_f1") == pytest.approx(0.8)  # precision 1, recall 2/3
    stats = report.task_statistics("video_captioning", runs["video_captioning"], resamples=500)
    assert stats.primary == "content_event_f1"
    order = [c for c in stats.comparisons if c.family == "order"]
    assert [(c.metric, c.a, c.b, c.symbol) for c in order] == [("content_order_accuracy", "gru", "meanpool", ">")]
    line = report.order_blind_verdict("video_captioning", runs["video_captioning"], stats)
    assert "on Order acc. (multi-event)" in line and "significantly above it: gru" in line
    assert report.headline_verdict("video_captioning", runs["video_captioning"], stats).startswith(
        "gru is best on Event F1: gru 0.9")


def test_captioning_without_per_item_scores_in_details_scores_cider_from_predictions(tmp_path):
    tree = build_tree(tmp_path)
    runs = report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"], tasks=("video_captioning",))
    gru = next(r for r in runs["video_captioning"] if r.name == "gru")
    cider = gru.seeds[0].items.columns["cider_d"]
    assert np.mean(list(cider.values())) == pytest.approx(gru.value("cider_d"))
    stats = report.task_statistics("video_captioning", runs["video_captioning"], resamples=300)
    assert stats.primary == "cider_d"  # no content metrics on this data
    pairs = {(c.a, c.b): c for c in stats.comparisons}
    assert pairs["gru", "meanpool"].symbol == ">"
    assert ("gru", "baseline_frequent_caption") in pairs  # the best model against the best baseline
    # Without content metrics (real data) the order-blind framing falls back to the primary metric.
    blind = report.order_blind_verdict("video_captioning", runs["video_captioning"], stats)
    assert blind.startswith("Order-blind meanpool (meanpool 0.") and "on CIDEr-D" in blind
    assert "significantly above it: gru" in blind


# --------------------------------------------------------------------------------------------------------
# Examples, METEOR, MLflow


def test_examples_show_the_best_models_successes_and_failures_with_frames(tmp_path):
    tree = build_tree(tmp_path)
    runs = report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"])
    store = report._frame_store(tree["frames"], "activity")
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


BEST_CAPTIONER = {"image_captioning": "transformer", "video_captioning": "gru"}
OTHER = {"transformer": "gru", "gru": "transformer", "meanpool": "meanpool"}


def attention_tree(root: Path, art, checkpoints, *, mlflow_ids: dict[str, dict] | None = None) -> Path:
    """Captioning runs of two seeds with real checkpoints: per task the family of BEST_CAPTIONER, whose test captions
    are the first references (so it is the best), and meanpool. Seed 0's best.pt is the family's tiny_checkpoints
    one; seed 1's is another family's (OTHER), so the attention of the wrong seed would not match."""
    runs = root / "runs"
    for task, best in BEST_CAPTIONER.items():
        refs = json.loads((art.tokens / task.split("_")[0] / "references-test.json").read_text())
        for family, hypothesis in ((best, lambda i: refs[i][0]), ("meanpool", lambda i: "a ball moves")):
            records = [{"id": i, "hypothesis": hypothesis(i), "references": refs[i], "score": -1.0} for i in refs]
            folder = write_model(runs, task, family, [records] * 2, write_captions,
                                 extra=(mlflow_ids or {}).get(f"{task}/{family}"))
            for k, source in enumerate((family, OTHER[family])):
                (folder / "train" / f"seed{k}").mkdir(parents=True)
                shutil.copyfile(checkpoints[task, source], folder / "train" / f"seed{k}" / "best.pt")
    return runs


def test_captioning_examples_show_the_attention_of_the_seed_whose_caption_they_show(
        tmp_path, monkeypatch, tiny_artifacts, tiny_checkpoints):
    import torch

    from seqvision import attention, checkpoint
    from seqvision.datasets import VisualStore
    from seqvision.models import build_from_checkpoint
    from seqvision.vocab import Vocab

    art = tiny_artifacts
    runs = report.load_runs(runs_dir=attention_tree(tmp_path, art, tiny_checkpoints), baselines_dir=None,
                            tasks=tuple(BEST_CAPTIONER), models=("gru", "transformer", "meanpool"))
    drawn: list[tuple] = []
    real_figure = report.attention_figure
    monkeypatch.setattr(report, "attention_figure",
                        lambda task, words, weights, **kw: drawn.append((task, words, weights, kw)) or real_figure(
                            task, words, weights, **kw))
    sections = report.build_sections(runs, frames_dir=art.frames, features_dir=art.features, tokens_dir=art.tokens,
                                     examples=1, resamples=100)
    assert [s.best for s in sections] == list(BEST_CAPTIONER.values())
    assert all(len(s.examples) == 2 and all(ex.attention is not None and ex.attention.png.startswith(PNG_MAGIC)
                                            for ex in s.examples) for s in sections)
    # Each figure: the best family's seed-0 attention, replayed on the caption the example shows.
    assert len(drawn) == 4
    for (task, words, weights, kw), ex in zip(drawn, [ex for s in sections for ex in s.examples]):
        family, corpus = BEST_CAPTIONER[task], task.split("_")[0]
        shown = dict((name, text) for name, text, _, _ in ex.outputs)[family]
        vocab = Vocab.load(art.tokens / corpus / "vocab.json")
        ids = vocab.encode(shown)[1:]
        assert words == [*shown.split(), "<eos>"] == [vocab.itos[i] for i in ids]
        store = VisualStore(art.features, kind=f"{corpus}s", split="test")
        model = build_from_checkpoint(checkpoint.load(tiny_checkpoints[task, family])).eval()
        expected = attention.caption_attention(model, torch.from_numpy(store.load(ex.item_id)),
                                               store.length(ex.item_id), torch.tensor(ids))
        np.testing.assert_allclose(weights, expected.numpy(), atol=1e-6)
        if task == "image_captioning":  # drawn over the image itself
            frames = VisualStore(art.frames, kind="images", split="test")
            np.testing.assert_array_equal(kw["image"], frames.row(ex.item_id))
        else:
            assert kw["image"] is None and weights.shape[1] == store.length(ex.item_id)

    paths = report.write_report(sections, tmp_path / "reports", resamples=100)
    md, html_text = paths["md"].read_text(encoding="utf-8"), paths["html"].read_text(encoding="utf-8")
    for ex in [ex for s in sections for ex in s.examples]:
        assert (paths["figures"] / ex.attention.name).read_bytes() == ex.attention.png
        assert f"](figures/{ex.attention.name})" in md
        assert base64.b64encode(ex.attention.png).decode() in html_text
    assert "cross-attention of the last decoder layer, mean over heads" in html_text

    # Without the features and vocabulary, or with an unreadable checkpoint, the report goes on without them.
    plain = report.build_sections(runs, frames_dir=art.frames, examples=1, resamples=100)
    assert all(ex.attention is None for s in plain for ex in s.examples)
    (tmp_path / "runs" / "video_captioning" / "gru" / "train" / "seed0" / "best.pt").write_bytes(b"garbage")
    broken = report.build_sections(runs, frames_dir=art.frames, features_dir=art.features, tokens_dir=art.tokens,
                                   examples=1, resamples=100)
    assert [[ex.attention is None for ex in s.examples] for s in broken] == [[False, False], [True, True]]
    report.write_report(broken, tmp_path / "reports", resamples=100)
    assert {p.name for p in paths["figures"].glob("*_attention_*")} == {
        ex.attention.name for ex in broken[0].examples}  # the stale ones are gone
    # A family without attention: nothing to draw.
    meanpool = next(r for r in runs["video_captioning"] if r.name == "meanpool")
    examples = sections[1].examples
    assert report.attention_examples("video_captioning", meanpool, examples, features_dir=art.features,
                                     tokens_dir=art.tokens, store=None) == examples


def _meteor_runs(tmp_path):
    tree = build_tree(tmp_path / "tree")
    return report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"], tasks=("video_captioning",))


def test_without_java_meteor_is_unavailable_in_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr("seqvision.metrics.java_available", lambda: False)
    runs, note = report.add_meteor(_meteor_runs(tmp_path), mode="auto")
    assert "no Java" in note
    header, rows = report.metric_table("video_captioning", runs["video_captioning"], report.COCO_METRICS)
    col = header.index("METEOR")
    by_name = {run.name: cells for run, cells in rows}
    assert by_name["gru"][col] == "unavailable" and by_name["baseline_frequent_caption"][col] == "unavailable"
    assert "lstm" not in by_name  # a missing run has no metrics row
    with pytest.raises(RuntimeError, match="Java"):
        report.add_meteor(runs, mode="always")
    assert report.add_meteor(runs, mode="never")[0]["video_captioning"][0].value("meteor") is None


@pytest.mark.slow
@pytest.mark.skipif(not metrics.java_available(), reason="METEOR needs a Java runtime; none on this machine")
def test_meteor_from_one_java_process_equals_scoring_the_first_and_last_set_alone(tmp_path):
    runs, note = report.add_meteor(_meteor_runs(tmp_path), mode="always")
    scored = [r for r in runs["video_captioning"] if r.ok]
    assert "5 captioning test sets" in note and len(scored) == 3
    seeds = [seed for run in scored for seed in run.seeds]
    assert len(seeds) == 5
    # The first and the last test set of the one Java process, each scored alone in its own (a JVM start is ~10 s
    # here): a segment boundary off by one item, or sets scored out of order, changes both ends.
    for seed in (seeds[0], seeds[-1]):
        records = metrics.read_jsonl(seed.folder / "predictions.jsonl")
        alone = metrics.caption_scores({r["id"]: r["hypothesis"] for r in records},
                                       {r["id"]: r["references"] for r in records}, meteor="always")["meteor"]
        assert seed.metrics["meteor"] == pytest.approx(alone, abs=1e-9)
    best = {r.name: r.value("meteor") for r in scored}
    assert best["gru"] > best["meanpool"]  # gru repeats a reference word for word


def test_parent_and_child_metrics_carry_means_intervals_and_seeds(tmp_path):
    ids = {"gru": {"mlflow_run_id": "child-gru", "mlflow_parent_run_id": "parent"}}
    runs = report.load_runs(runs_dir=build_tree(tmp_path, mlflow_ids=ids)["runs"], baselines_dir=tmp_path / "eval")
    parent = report.parent_metrics(runs)
    assert parent["activity.gru.top1"] == pytest.approx(0.875)
    assert "activity.gru.top1.ci95_low" in parent and parent["activity.meanpool.reversal_pair_acc"] == 0.0
    assert parent["activity.baseline_majority.top1"] == pytest.approx(0.25)
    assert report.parent_run_ids(runs) == ["parent"]
    # the train stage logged top-1 on its child run already; only what the report scores goes there from here
    assert report.child_metrics(runs, parent_run_id="parent") == {}
    gru = next(r for r in runs["activity"] if r.name == "gru")
    gru.metrics["meteor"] = metrics.seed_summary([0.2, 0.3, 0.25])
    children = report.child_metrics(runs, parent_run_id="parent")
    assert set(children) == {"child-gru"}
    assert children["child-gru"]["test/meteor"] == pytest.approx(0.25)
    assert [children["child-gru"][f"test/meteor/seed{k}"] for k in range(3)] == pytest.approx([0.2, 0.3, 0.25])
    assert children["child-gru"]["test/meteor/ci95_low"] < 0.2


def test_the_best_model_of_a_task_is_its_first_ranked_family_at_its_best_validation_seed(tmp_path):
    ids = {"gru": {"mlflow_run_id": "child-gru"}}
    runs = report.load_runs(runs_dir=build_tree(tmp_path, mlflow_ids=ids)["runs"], baselines_dir=tmp_path / "eval")
    sections = report.build_sections(runs, examples=0, resamples=100)
    best = {b.task: b for b in report.best_models(sections)}
    assert set(best) == {"activity", "video_captioning"}  # image captioning has no trained family
    activity = best["activity"]
    assert (activity.family, activity.metric, activity.run_id) == ("gru", "top_1", "child-gru")
    assert activity.mean == pytest.approx(0.875)  # ranked above meanpool (0.5); the baseline is no candidate
    assert activity.seed == 2  # best_val_metric 0.5 + 0.01 k: the last of three seeds
    assert activity.checkpoint == tmp_path / "runs" / "activity" / "gru" / "train" / "seed2" / "best.pt"
    assert (best["video_captioning"].family, best["video_captioning"].metric) == ("gru", "cider_d")
    assert best["video_captioning"].run_id is None


@pytest.mark.slow
def test_mlflow_parent_gets_the_report_and_every_childs_headline_metric(tmp_path, monkeypatch, mlflow_store):
    from mlflow import MlflowClient

    from seqvision import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    parent = tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
    children = {}
    for name in ("gru", "meanpool"):
        with tracking.start_child(parent_run_id=parent, run_name=f"activity-{name}", repo_root=tmp_path) as tracker:
            pass
        children[name] = tracker.run_id
    ids = {name: {"mlflow_run_id": run_id, "mlflow_parent_run_id": parent} for name, run_id in children.items()}
    paths, runs = render(tmp_path, build_tree(tmp_path, mlflow_ids=ids), examples=1)
    assert report.parent_run_ids(runs) == [parent]

    logged = report.parent_metrics(runs)
    tracking.publish_comparison(parent, repo_root=tmp_path, metrics=logged,
                                child_metrics=report.child_metrics(runs, parent_run_id=parent),
                                files=[paths["html"], paths["md"], paths["summary"]],
                                folders={"report/figures": paths["figures"]})
    client = MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    logged_metrics = run.data.metrics
    assert logged_metrics["activity.gru.top1"] == pytest.approx(0.875) == logged["activity.gru.top1"]
    assert logged_metrics["activity.meanpool.top1"] == pytest.approx(0.5)
    assert logged_metrics["activity.meanpool.reversal_pair_acc"] == 0.0
    assert logged_metrics["activity.baseline_majority.top1"] == pytest.approx(0.25)
    assert not any(".lstm." in k for k in logged_metrics)
    files = {f.path for f in client.list_artifacts(parent, "report")}
    assert {"report/report.html", "report/report.md", "report/summary.json", "report/figures"} <= files
    html_copy = Path(client.download_artifacts(parent, "report/report.html", str(tmp_path / "dl")))
    assert html_copy.read_bytes() == paths["html"].read_bytes()
    assert client.get_run(children["gru"]).data.metrics == {}  # the train stage logs the test metrics


@pytest.mark.slow
def test_attention_figures_are_logged_on_the_child_run_of_the_family_they_show(
        tmp_path, monkeypatch, tiny_artifacts, tiny_checkpoints, mlflow_store):
    from mlflow import MlflowClient

    from pipelines import report as report_stage
    from seqvision import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    parent = tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
    children = {}
    for name in ("image_captioning/transformer", "video_captioning/gru", "video_captioning/meanpool"):
        with tracking.start_child(parent_run_id=parent, run_name=name, repo_root=tmp_path) as tracker:
            pass
        children[name] = tracker.run_id
    ids = {name: {"mlflow_run_id": run_id, "mlflow_parent_run_id": parent} for name, run_id in children.items()}
    art = tiny_artifacts
    runs = report.load_runs(runs_dir=attention_tree(tmp_path, art, tiny_checkpoints, mlflow_ids=ids),
                            baselines_dir=None, tasks=tuple(BEST_CAPTIONER), models=("gru", "transformer", "meanpool"))
    sections = report.build_sections(runs, frames_dir=art.frames, features_dir=art.features, tokens_dir=art.tokens,
                                     examples=1, resamples=100)
    paths = report.write_report(sections, tmp_path / "reports", resamples=100)
    report_stage.publish.fn(runs, sections, paths, parent, str(tmp_path))  # the report stage's MLflow task

    client = MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path))
    for section in sections:
        child = children[f"{section.task}/{section.best}"]
        logged = {f.path for f in client.list_artifacts(child, "attention")}
        assert logged == {f"attention/{ex.attention.name}" for ex in section.examples} and len(logged) == 2
        first = section.examples[0].attention
        copy = Path(client.download_artifacts(child, f"attention/{first.name}", str(tmp_path / "dl")))
        assert copy.read_bytes() == first.png
    assert client.list_artifacts(children["video_captioning/meanpool"], "attention") == []
    assert client.list_artifacts(parent, "attention") == []
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_report_flow_cli(tmp_path, monkeypatch, prefect_harness, capsys, mlflow_store):
    from mlflow import MlflowClient

    from pipelines import report as report_cli
    from seqvision import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    parent = tracking.start_parent("comparison", "cmp", repo_root=tmp_path)
    tree = build_tree(tmp_path, mlflow_ids={"gru": {"mlflow_parent_run_id": parent}})
    with pytest.raises(SystemExit) as exc:
        report_cli.parse_args(["--help"])
    assert exc.value.code == 0
    capsys.readouterr()
    assert report_cli.main(["--runs", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("report: error: ") and err.count("\n") == 1 and "--runs" in err
    # --meteor never: each METEOR scoring starts a JVM (5-10 s here); the METEOR tests above score it.
    args = ["--runs", str(tree["runs"]), "--baselines", str(tree["eval"]), "--frames", str(tree["frames"]),
            "--out", str(tmp_path / "reports"), "--repo-root", str(tmp_path), "--resamples", "300", "--meteor", "never"]
    assert report_cli.main([*args, "--metadata", str(tmp_path / "none.json")]) == 2
    assert "--metadata" in capsys.readouterr().err
    assert report_cli.main([*args, "--no-mlflow"]) == 0
    assert "not logged to MLflow" in capsys.readouterr().out
    assert MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path)).get_run(parent).info.status == "RUNNING"
    assert report_cli.main(args) == 0
    out = capsys.readouterr().out
    assert f"logged on MLflow parent run {parent}" in out and "make mlflow-ui" in out
    assert str(tmp_path / "reports" / "summary.json") in out
    run = MlflowClient(tracking_uri=tracking.tracking_uri(tmp_path)).get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["activity.gru.top1"] == pytest.approx(0.875)


def test_the_summary_names_a_baseline_only_when_the_best_model_does_not_beat_it(tmp_path):
    """A baseline as good as every model is a headline caveat (the summary says so); one the best model beats
    significantly is left to the task's section."""
    tree = build_tree(tmp_path)
    refs = json.loads(next(tmp_path.rglob("video/references-test.json")).read_text())
    test = VIDEO_IDS["test"]
    beaten = report.build_sections(report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"],
                                                    tasks=("video_captioning",)), resamples=300)
    video = beaten[0]
    assert video.stats.primary == "cider_d"
    comparison = next(c for c in video.stats.comparisons if c.b == "baseline_frequent_caption")
    assert comparison.symbol == ">"  # gru copies a reference, the baseline says "nothing moves"
    assert not any("baseline" in text for _, text in report.summary_lines(beaten))
    assert any("best baseline" in line for line in video.verdict)  # the section still states it

    # A retrieval baseline that returns a reference: no model is above it.
    write_captions(tree["eval"] / "video_captioning" / "baseline_nearest_neighbour",
                   [{"id": i, "hypothesis": refs[i][0], "references": refs[i], "score": -1.0} for i in test])
    tied = report.build_sections(report.load_runs(runs_dir=tree["runs"], baselines_dir=tree["eval"],
                                                  tasks=("video_captioning",)), resamples=300)
    lines = [text for _, text in report.summary_lines(tied)]
    assert any(text.startswith("The best model is not significantly different from the best baseline on CIDEr-D: "
                               "baseline_nearest_neighbour") for text in lines), lines
