"""params.yaml validation: one clear error naming the key, before any work."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from seqvision.config import (
    SECTIONS,
    ConfigError,
    SynthConfig,
    add_config_arguments,
    load_params,
    overrides_from_args,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_committed_params_validate_and_repeat_the_embedded_defaults() -> None:
    loaded = load_params(REPO / "params.yaml")
    assert set(yaml.safe_load((REPO / "params.yaml").read_text())) == set(SECTIONS)
    for name in SECTIONS:
        # The committed file must equal the dataclass defaults, or "embedded defaults" would lie.
        config = getattr(loaded, name)
        assert to_dict(config) == to_dict(SECTIONS[name]()), f"params.yaml section {name!r} differs from defaults"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"synth": {"fps": "fast"}}, "synth.fps: expected an integer, got 'fast'"),
        ({"synth": {"fps": 12.5}}, "synth.fps: expected an integer"),
        ({"synth": {"videos": {"train": 0}}}, "synth.videos.train: expected a value in [1, 1000000], got 0"),
        ({"synth": {"noise_std": 100}}, "synth.noise_std: expected a value in [0.0, 64.0]"),
        ({"synth": {"long_range": "yes"}}, "synth.long_range: expected true or false"),
        ({"synth": {"fsp": 12}}, "synth.fsp: unknown key; allowed keys are"),
        ({"synth": {"videos": {"training": 5}}}, "synth.videos.training: unknown key"),
        ({"synt": {}}, "synt: unknown section; allowed sections are"),
        ({"synth": {"height": 63}}, "synth: height and width must be even"),
        ({"synth": {"min_frames": 40, "max_frames": 20}}, "min_frames (40) must not exceed max_frames (20)"),
        ({"data": {"video_captions_format": "youtube"}}, "data.video_captions_format: expected one of 'msrvtt', 'msvd'"),
        ({"synth": [1, 2]}, "synth: expected a mapping"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path: Path, data: object, expected: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(_write(tmp_path, "synth: [unclosed"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_params(_write(tmp_path, "- a\n- b\n"))


def test_absent_sections_get_defaults_and_configs_are_frozen(tmp_path: Path) -> None:
    loaded = load_params(_write(tmp_path, {"synth": {"seed": 7}}))
    assert loaded.synth.seed == 7 and loaded.synth.fps == SynthConfig().fps
    with pytest.raises(Exception):
        loaded.synth.seed = 8  # type: ignore[misc]


def test_every_knob_becomes_a_documented_flag() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, SynthConfig)
    help_text = parser.format_help()
    for flag in ("--fps", "--videos.train", "--long-range", "--noise-std"):
        assert flag in help_text
    args = parser.parse_args(["--fps", "8", "--videos.train", "5", "--no-long-range"])
    assert overrides_from_args(args) == {"fps": 8, "videos": {"train": 5}, "long_range": False}


def test_params_rewritten_by_dvc_exp_run_keep_their_strings(tmp_path):
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2 and drops the quotes of "off"."""
    text = re.sub(r"(?m)^    activity: .*$", "    activity: off", Path("params.yaml").read_text(), count=1)
    assert "activity: off\n" in text
    (tmp_path / "params.yaml").write_text(text + "\n")
    loaded = load_params(tmp_path / "params.yaml")
    assert loaded.models.match_params.activity == "off"
    assert loaded.train.deterministic is True  # true/false stay booleans


def test_match_params_is_a_budget_per_task(tmp_path):
    loaded = load_params(_write(tmp_path, {"models": {"match_params": {"activity": 5000}}}))
    assert loaded.models.match_params.budget("activity") == 5000
    assert loaded.models.match_params.budget("image_captioning") == 200000  # the default budget
    for bad, expected in (("lstm", "expected an integer or one of 'off'"), (0, "expected an integer or one of")):
        with pytest.raises(ConfigError, match=expected):
            load_params(_write(tmp_path, {"models": {"match_params": {"activity": bad}}}))


def test_tbptt_is_a_knob_of_the_recurrent_families_only(tmp_path):
    loaded = load_params(_write(tmp_path, {"models": {"gru": {"tbptt_steps": 4}}}))
    assert loaded.models.gru.tbptt_steps == 4 and loaded.models.lstm.tbptt_steps == 0
    with pytest.raises(ConfigError, match="train.tbptt_steps: unknown key"):
        load_params(_write(tmp_path, {"train": {"tbptt_steps": 4}}))
    with pytest.raises(ConfigError, match="models.transformer.tbptt_steps: unknown key"):
        load_params(_write(tmp_path, {"models": {"transformer": {"tbptt_steps": 4}}}))


def _float_knobs(cls: type, prefix: str) -> list[str]:
    """Dotted keys of every float knob under ``cls`` (nested sections included)."""
    import dataclasses
    import typing

    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _float_knobs(tp, f"{prefix}{name}.")
        elif tp is float or float in typing.get_args(tp):
            keys.append(f"{prefix}{name}")
    return keys


FLOAT_KNOBS = [key for section, cls in SECTIONS.items() for key in _float_knobs(cls, f"{section}.")]


def test_every_section_has_float_knobs_to_check():
    # The parametrisation below must not silently shrink to nothing (e.g. after a refactor of the hints).
    assert {"models.gru.lr", "extract.max_skipped_fraction", "evaluate.length_penalty", "models.gru.dropout"} <= set(
        FLOAT_KNOBS
    )


@pytest.mark.parametrize("key", FLOAT_KNOBS)
@pytest.mark.parametrize(("text", "shown"), [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1.0e+999", "inf")])
def test_float_knobs_reject_nan_and_infinity(tmp_path: Path, key: str, text: str, shown: str) -> None:
    """YAML ``.nan`` compares false with every bound, so it passed every range check (and a NaN
    max_skipped_fraction disabled the skip guard); no knob documents a meaning for infinity."""
    section, *inner = key.split(".")
    body = "".join(f"{'  ' * (i + 1)}{part}:\n" for i, part in enumerate(inner[:-1]))
    path = _write(tmp_path, f"{section}:\n{body}{'  ' * len(inner)}{inner[-1]}: {text}\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: {key}: expected a finite number, got {shown}"


def test_nan_from_a_command_line_flag_is_rejected_too() -> None:
    from seqvision.config import TrainConfig, from_mapping, merge

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    overrides = overrides_from_args(parser.parse_args(["--clip-grad-norm", ".nan"]))
    with pytest.raises(ConfigError, match=r"^train.clip_grad_norm: expected a finite number, got nan$"):
        from_mapping(TrainConfig, merge({}, overrides), where="train")


def test_huge_integer_for_a_float_knob_is_an_error_not_a_crash(tmp_path: Path) -> None:
    path = _write(tmp_path, "models:\n  lstm:\n    lr: " + "9" * 400 + "\n")
    with pytest.raises(ConfigError, match="models.lstm.lr: expected a finite number"):
        load_params(path)


def test_the_task_specs_are_the_configs_tasks():
    from seqvision import config, tasks

    assert tuple(tasks.TASKS) == config.TASKS
    assert all(spec.name == name for name, spec in tasks.TASKS.items())
