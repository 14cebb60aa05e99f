"""``python -m seqvision.study`` runs a tiny study end to end and writes its JSON results and figures."""

from __future__ import annotations

import json

import pytest

from seqvision.study.__main__ import main
from seqvision.study.complexity import RowResult
from seqvision.study.figures import plot_compute
from seqvision.study.presets import PRESETS, StudyConfig


@pytest.mark.slow
@pytest.mark.integration
def test_a_tiny_study_writes_json_and_figures(tmp_path, capsys):
    out = tmp_path / "study"
    code = main([
        "--out", str(out), "--preset", "ci", "--quiet", "--rows", "compute", "streaming", "parallelism",
        "--variants", "lstm", "transformer", "transformer_naive",
        "mingru", "--parallel-variants", "lstm", "mingru", "--repeats", "2", "--stream-steps", "2",
    ])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"compute.json", "streaming.json", "parallelism.json", "compute.png",
                                               "parallelism.png"}
    for name in ("compute.png", "parallelism.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 10_000

    compute = json.loads((out / "compute.json").read_text())
    assert compute["config"]["n_values"] == [16, 32, 64] and compute["environment"]["torch"]
    cells = {c["name"]: c for c in compute["cells"]}
    assert set(cells) == {f"compute/{v}/n={n}" for v in ("lstm", "transformer", "transformer_naive", "mingru")
                          for n in (16, 32, 64)}
    assert all(len(c["metrics"]["time_s"]) == 2 and not c["errors"] for c in cells.values())
    fits = {(f["variant"], f["metric"]): f for f in compute["findings"]}
    assert fits["lstm", "time_s"]["fit"]["n_fitted"] == [16, 32, 64]
    assert fits["transformer", "time_s"]["verdict"]["claim"] == "O(N^2)"
    assert {t["column"] for t in compute["table"]} == {"RNNs", "Transformers", "minGRU"}

    streaming = json.loads((out / "streaming.json").read_text())
    state = {(c["variant"], c["key"]["n"]): c["medians"]["state_bytes"] for c in streaming["cells"]}
    assert state["lstm", 16] == state["lstm", 64] and state["transformer", 64] > 3 * state["transformer", 16]

    parallelism = json.loads((out / "parallelism.json").read_text())
    assert parallelism["extra"]["critical_path"]["lstm"] == {"16": 16, "32": 32, "64": 64}
    assert parallelism["extra"]["critical_path"]["mingru"] == {"16": 8, "32": 10, "64": 12}
    assert {(r["variant"], r["n"]) for r in parallelism["extra"]["speedups"]} == {("lstm", 32), ("mingru", 32)}
    again = RowResult.from_json(compute)  # a report stage can re-plot from the JSON alone
    assert RowResult.from_json(json.loads(json.dumps(again.to_json()))).findings == again.findings
    plot_compute(again, RowResult.from_json(streaming), tmp_path / "replotted.png")
    assert (tmp_path / "replotted.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "RNNs time: claim O(N)" in printed and "study: compute, streaming, parallelism" in printed


def test_bad_flags_are_one_clear_line(capsys):
    with pytest.raises(SystemExit):
        main(["--out", "x", "--variants", "lstm", "gpt"])
    assert "study.variants[1]: expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", "x", "--fit-min-n", "100000"])
    assert "fit_min_n=100000 leaves fewer than 2 points of n_values" in capsys.readouterr().err


def test_presets_are_valid_and_the_default_matches_the_brief():
    default = PRESETS["default"]
    assert default == StudyConfig()
    assert default.n_values[0] == 16 and default.n_values[-1] == 4096 and default.repeats >= 5
    assert set(default.variants) == {"rnn", "lstm", "gru", "transformer", "transformer_naive", "mingru"}
    assert PRESETS["gpu"].device == "cuda" and PRESETS["gpu"].precision == "bfloat16"
