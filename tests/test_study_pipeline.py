"""The study as a pipeline part: a tiny study end to end through ``python -m pipelines.study`` (every row of the
registry on the ci preset, row 4 on the tiny artifacts), its report section and its MLflow runs; the stage commands'
errors."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import yaml

from pipelines import study, study_report, study_row
from seqvision.study.figures import PLOTS
from seqvision.study.fit import VERDICTS
from seqvision.study.report import SEED_TABLE, TITLE, table_cells
from seqvision.study.run import ROWS, load_results, pack_trainings, trainings_file
from tests.tiny import TINY_MODELS, TINY_TRAIN, TINY_UNMATCHED, tiny_encoder

# One xdist worker runs the module: the tiny study (module fixture, ~20-30 s) is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("study_pipeline")

# The ci preset, cut further: three variants per timing row and three families for row 4 (~half the cells).
STUDY = {"preset": "ci", "overrides": {
    "variants": ["lstm", "transformer", "mingru"], "parallel_variants": ["lstm", "mingru"], "stream_steps": 2,
    "bias_families": ["gru", "transformer", "mingru"], "long_families": ["gru", "transformer"],
    "long_control_family": "gru"}}


def write_params(path: Path, labels: Path, study_section: dict) -> Path:
    path.write_text(yaml.safe_dump({"train": TINY_TRAIN, "models": TINY_MODELS | TINY_UNMATCHED,
                                    "data": {"activity_dir": str(labels)}, "study": study_section}))
    return path


@pytest.fixture(scope="module")
def tiny_study(tiny_artifacts, tmp_path_factory, prefect_harness, mlflow_store):
    """Every row of the registry, then the report, through the all-rows flow; (tmp folder, exit code, stdout)."""
    root = tmp_path_factory.mktemp("study")
    params = write_params(root / "params.yaml", tiny_artifacts.labels, STUDY)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_store(root / "mlflow.db"))
        patch.delenv("SEQVISION_PARENT_RUN_ID", raising=False)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        code = study.main(["--params", str(params), "--out", str(root / "artifacts" / "study"),
                           "--reports", str(root / "reports"), "--features", str(tiny_artifacts.features),
                           "--encoder", str(tiny_encoder(root / "encoder.pt")), "--repo-root", str(root)])
    return root, code


@pytest.mark.slow
@pytest.mark.integration
def test_the_tiny_study_writes_the_report_section(tiny_study):
    root, code = tiny_study
    assert code == 0
    reports = root / "reports"
    assert {p.name for p in reports.iterdir()} == {"study.md", "study.html", "study"}
    figures = {p.name for p in (reports / "study").iterdir()}
    assert figures == {f"{name}.png" for name in PLOTS}
    for name in figures:
        assert (reports / "study" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (reports / "study.md").read_text()
    assert markdown.startswith(f"# {TITLE}\n")
    for name in figures:
        assert f"](study/{name})" in markdown  # linked relative to study.md
    html = (reports / "study.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures) and "study/" not in html.split("<body>")[1]
    # The summary table: one line per row of the seed's table, every measured cell "claim: **verdict**".
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert table[0] == "| seed's table | measured | RNNs | Transformers | minGRU |"
    assert [line.split(" | ")[0][2:] for line in table[1:]][:1] == [next(iter(SEED_TABLE))]
    verdicts = [cell.split("**")[1] for line in table[1:] for cell in line.split(" | ")[2:] if "**" in cell]
    assert verdicts and all(v.split(":")[0] in (*VERDICTS, "depends on the cell", "depends on the attention kernel",
                                                "depends on scan vs loop", "depends on the variant")
                            for v in verdicts), verdicts


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("seed_row", list(SEED_TABLE))
def test_every_row_of_the_seed_table_is_reported(tiny_study, seed_row):
    root, code = tiny_study
    assert code == 0
    markdown = (root / "reports" / "study.md").read_text()
    names = [name for name, row in ROWS.items() if row.seed_row == seed_row]
    if not names:
        assert f"| {seed_row} | not measured yet |" in markdown
        pytest.skip(f"{seed_row}: no row of seqvision.study.run.ROWS measures it yet (the report says so)")
    number = list(SEED_TABLE).index(seed_row) + 1
    assert f"## Row {number}: {seed_row}" in markdown
    results = load_results(root / "artifacts" / "study")
    for name in names:
        assert name in results and results[name].table, name
        for entry in results[name].table:  # every cell of the row, with its verdict, in its section
            assert f"**{entry['column']}, {entry['quantity']}**" in markdown and entry["verdict"] in markdown
    if any(ROWS[name].trains for name in names):
        for name in names:
            with tarfile.open(trainings_file(root / "artifacts" / "study", name)) as tar:
                assert any(n.startswith(f"{name}/") and n.endswith("/best.pt") for n in tar.getnames()), \
                    "a training row keeps its trainings in {out}/{row}.tar"


@pytest.mark.slow
@pytest.mark.integration
def test_the_tiny_study_is_one_mlflow_parent_with_a_child_per_cell(tiny_study):
    from mlflow import MlflowClient

    root, code = tiny_study
    assert code == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seqvision-study")
    [parent] = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'study'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    results = load_results(root / "artifacts" / "study")
    expected = table_cells(results)
    assert sorted(c.info.run_name for c in children) == sorted(cell.name for cell in expected)
    assert {"compute/RNNs", "compute/Transformers", "compute/minGRU", "inductive_bias/RNNs"} <= {
        c.info.run_name for c in children}
    by_name = {c.info.run_name: c for c in children}
    for cell in expected:
        run = by_name[cell.name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["verdict"] and run.data.tags["claim"] and run.data.tags["measured"]
        assert run.data.tags["seqvision.study.row"] == cell.row
        assert run.data.metrics == pytest.approx(dict(cell.metrics))
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "study")}
        assert f"study/{cell.row}.json" in artifacts
    lstm_time = by_name["compute/RNNs"].data.metrics
    fit = next(f.fit for f in results["compute"].findings if f.variant == "lstm" and f.metric == "time_s")
    assert lstm_time["time_s.lstm.exponent"] == pytest.approx(fit.exponent)
    assert lstm_time["time_s.lstm.low"] <= lstm_time["time_s.lstm.exponent"] <= lstm_time["time_s.lstm.high"]
    assert any(k.startswith("top_1_minus_transformer.gru.") for k in by_name["inductive_bias/RNNs"].data.metrics)
    assert any(k.startswith("speedup.lstm.n") for k in by_name["parallelism/RNNs"].data.metrics)
    parent_files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/study.md", "report/study.html"} <= parent_files
    # The rows' JSON, which the report is drawn from, and not their trainings' folders (checkpoints).
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "rows")} == {f"rows/{r}.json" for r in results}


@pytest.mark.slow
@pytest.mark.integration
def test_the_report_redraws_from_the_json_alone(tiny_study, tmp_path, prefect_harness):
    """The study_report stage on the rows' JSON, copied without the trainings: the same Markdown."""
    root, code = tiny_study
    assert code == 0
    rows = tmp_path / "rows"
    rows.mkdir()
    for path in (root / "artifacts" / "study").glob("*.json"):
        (rows / path.name).write_text(path.read_text())
    assert study_report.main(["--rows", str(rows), "--out", str(tmp_path / "reports"), "--no-mlflow"]) == 0
    assert (tmp_path / "reports" / "study.md").read_text() == (root / "reports" / "study.md").read_text()


def test_a_bad_study_section_is_one_line_naming_the_key(tiny_artifacts, tmp_path, capsys):
    for section, expected in (
        ({"preset": "fast"}, "study.preset: expected one of 'ci', 'default', 'gpu', got 'fast'"),
        ({"overrides": {"repeats": 0}}, "study.overrides.repeats: expected a value in [1, inf], got 0"),
        ({"overrides": {"repeatz": 2}}, "study.overrides.repeatz: unknown key"),
    ):
        params = write_params(tmp_path / "params.yaml", tiny_artifacts.labels, section)
        assert study_row.main(["compute", "--params", str(params), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"study_row: error: {params}: {expected}") and err.count("\n") == 1, err
    params = write_params(tmp_path / "params.yaml", tiny_artifacts.labels, STUDY)
    # Several rows: the last one's missing input stops the stage before the first row runs.
    assert study_row.main(["compute", "inductive_bias", "--params", str(params), "--out", str(tmp_path / "out"),
                           "--features", str(tmp_path / "nowhere")]) == 2
    assert "nowhere/index.json: missing; the inductive_bias row needs the features" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert study_report.main(["--rows", str(tmp_path), "--out", str(tmp_path / "reports"), "--no-mlflow"]) != 0


def test_check_params_validates_the_study_section(tmp_path, capsys):
    from pipelines import check_params

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"study": {"overrides": {"bias_families": ["lstm"]}}}))
    assert check_params.main(["--params", str(path), "--out", str(tmp_path / "valid.txt")]) == 2
    assert "study.overrides: bias_families: must include transformer" in capsys.readouterr().err
    assert not (tmp_path / "valid.txt").exists()
    path.write_text(yaml.safe_dump({"study": {"preset": "ci", "overrides": {"repeats": 3}}}))
    assert check_params.main(["--params", str(path), "--out", str(tmp_path / "valid.txt")]) == 0


def test_check_params_does_not_import_torch():
    # The gate runs before every stage of dvc repro: importing the study's row code for its presets cost it ~5 s.
    import subprocess
    import sys

    code = "import json, sys, pipelines.check_params; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False


def test_the_registry_is_what_the_report_and_the_stages_know():
    assert set(ROWS) >= {"compute", "streaming", "parallelism", "inductive_bias"}
    assert {row.seed_row for row in ROWS.values()} <= set(SEED_TABLE)
    assert set(PLOTS) == set(ROWS) - {"streaming"}  # streaming's panels are in compute.png
    json.dumps({name: [row.trains, row.seed_row] for name, row in ROWS.items()})


def _trainings(folder: Path, *, mtime: int, mode: int) -> dict[str, bytes]:
    """A training row's folder as the cells leave it: nested seeds, a measurement file, an empty plots folder."""
    files = {"gru/f1/seed0/train/best.pt": b"weights", "gru/f1/seed0/train/history.json": b"[]",
             "gru/f1/seed0/test/metrics.json": b"{}", "gru/f1/seed0/test/plots/confusion.csv": b"1,0\n0,1\n",
             "transformer/f0.5/seed1/train/best.pt": b"other weights"}
    for rel, data in {**files, "gru/f1/seed0/train/runinfo.json": b'{"epoch_time_s": 0.8}'}.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
    (folder / "lstm" / "f1" / "seed0" / "test" / "plots").mkdir(parents=True)
    return files


def test_a_training_rows_trainings_pack_into_one_tar_that_hashes_the_same_for_the_same_trainings(tmp_path):
    packed = []
    for run, (mtime, mode) in enumerate([(1_000_000, 0o644), (2_000_000, 0o600)]):  # other times and permissions
        out = tmp_path / f"run{run}"
        files = _trainings(out / "bias", mtime=mtime, mode=mode)
        archive = pack_trainings(out, "bias")
        assert archive == out / "bias.tar"
        packed.append(archive.read_bytes())
        # Everything but the measurement left the folder (and its emptied folders with it); tar -xf puts it back.
        assert [p.relative_to(out).as_posix() for p in sorted((out / "bias").rglob("*"))] == [
            "bias/gru", "bias/gru/f1", "bias/gru/f1/seed0", "bias/gru/f1/seed0/train",
            "bias/gru/f1/seed0/train/runinfo.json"]
        with tarfile.open(archive) as tar:
            assert tar.getnames() == sorted(f"bias/{rel}" for rel in files)
            tar.extractall(tmp_path / f"unpacked{run}", filter="data")
        unpacked = tmp_path / f"unpacked{run}" / "bias"
        assert {p.relative_to(unpacked).as_posix(): p.read_bytes() for p in unpacked.rglob("*") if p.is_file()} == files
    assert packed[0] == packed[1]


@pytest.mark.slow
@pytest.mark.integration
def test_deployed_rows_are_submitted_at_once_and_a_failed_one_is_named(tiny_study, tmp_path, monkeypatch, capsys):
    """--deployment: each row one run of the deployment with the paths as given (they resolve on the workers); a
    row whose run fails is named, the others are reported. run_deployment is stood in for by a worker that
    'writes' the row's JSON (a copy of the tiny study's), except for parallelism, whose run ends Failed."""
    from prefect.states import Completed, Failed

    root, code = tiny_study
    assert code == 0
    calls = []

    class FlowRun:
        def __init__(self, row: str, state):
            self.name, self.id, self.state = f"run-{row}", f"id-{row}", state

    def run_deployment(name, *, parameters, timeout):
        calls.append((name, parameters, timeout))
        row = parameters["row"]
        if row == "parallelism":
            return FlowRun(row, Failed(message="worker lost"))
        out = Path(parameters["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{row}.json").write_text((root / "artifacts" / "study" / f"{row}.json").read_text())
        return FlowRun(row, Completed())

    monkeypatch.setattr(study, "run_deployment", run_deployment)
    monkeypatch.setattr(study, "check_deployment", lambda name: None)
    params = write_params(tmp_path / "params.yaml", tmp_path / "no-labels-here", STUDY)  # inputs: the workers'
    out = tmp_path / "artifacts" / "study"
    code = study.main(["--params", str(params), "--out", str(out), "--reports", str(tmp_path / "reports"),
                       "--deployment", "study-row/study-row", "--row-timeout", "60", "--no-mlflow"])
    assert code == 1
    assert "parallelism: study-row/study-row, flow run run-parallelism (id-parallelism) ended Failed: worker lost" \
        in capsys.readouterr().err
    assert sorted(p["row"] for _, p, _ in calls) == sorted(ROWS)
    assert all(name == "study-row/study-row" and timeout == 60 for name, _, timeout in calls)
    assert all(p == {"row": p["row"], "params": str(params), "out": str(out)} for _, p, _ in calls)
    markdown = (tmp_path / "reports" / "study.md").read_text()
    assert "| parallelizability | not run |" in markdown and "## Row 3: compute & memory" in markdown


def test_an_unknown_deployment_stops_before_any_row(tiny_artifacts, tmp_path, capsys, prefect_harness):
    params = write_params(tmp_path / "params.yaml", tiny_artifacts.labels, STUDY)
    for name, expected in (("nope", "expected 'flow name/deployment name'"),
                           ("study-row/nope", "deployment 'study-row/nope' not found on the Prefect server")):
        assert study.main(["--params", str(params), "--out", str(tmp_path / "out"), "--deployment", name,
                           "--no-mlflow"]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
