"""scripts/decoder_sweep.py: the grid, the choice rule and the params.yaml rewrite (the decoding itself is
seqvision.experiment.caption_cider, tested with the training)."""

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("decoder_sweep", REPO / "scripts" / "decoder_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def cell(checkpoint, beam, penalty, cider):
    return {"checkpoint": checkpoint, "beam": beam, "length_penalty": penalty, "cider_d": cider}


def test_greedy_runs_once_and_the_grid_is_cheapest_first():
    assert sweep.decoders([3, 1], [0.6, 0.0]) == [(1, 0.0), (3, 0.0), (3, 0.6)]


def test_every_checkpoint_weighs_the_same_and_a_wider_beam_must_earn_its_cost():
    grid = [(1, 0.0), (3, 0.0)]
    # a: beam 3 better by 10%; b (a checkpoint with small scores): greedy better by 10%. Normalised, they tie.
    cells = [cell("a", 1, 0.0, 9.0), cell("a", 3, 0.0, 10.0), cell("b", 1, 0.0, 0.10), cell("b", 3, 0.0, 0.09)]
    chosen, scores = sweep.choose(cells, grid, tie=0.01)
    assert abs(scores[(1, 0.0)] - scores[(3, 0.0)]) < 1e-9  # raw means would favour beam 3 by far
    assert chosen == (1, 0.0)  # tied: the cheaper decoder
    cells[1]["cider_d"] = 20.0  # now beam 3 is clearly better on a
    assert sweep.choose(cells, grid, tie=0.01)[0] == (3, 0.0)


def test_apply_rewrites_the_evaluate_section_only(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  beam_size: 7\n# How every captioner decodes\nevaluate:\n  beam_size: 3\n"
                      "  length_penalty: 0.0\n  max_length: 30\nreport:\n  compute_meteor: auto\n  length_penalty: 9\n",
                      encoding="utf-8")
    sweep.apply(params, (5, 0.6))
    loaded = yaml.safe_load(params.read_text(encoding="utf-8"))
    assert loaded["evaluate"] == {"beam_size": 5, "length_penalty": 0.6, "max_length": 30}
    assert loaded["train"] == {"beam_size": 7}
    assert loaded["report"]["length_penalty"] == 9  # the same key in a later section stays
    assert "# How every captioner decodes" in params.read_text(encoding="utf-8")
