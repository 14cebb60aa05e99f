"""params.yaml's ``study:`` section -> the study's validated :class:`~seqvision.study.presets.StudyConfig`.

Its own module, light on imports (the presets and the config types), because ``pipelines/check_params.py`` validates
the section before any stage runs and should not load the study's row code for it.
"""

from __future__ import annotations

from seqvision.config import ConfigError, StudySection, from_mapping, merge, to_dict
from seqvision.study.presets import PRESETS, StudyConfig


def study_config(section: StudySection) -> StudyConfig:
    """The preset ``section.preset`` with ``section.overrides`` set over it, validated. Raises ``ConfigError``
    naming ``study.preset`` or ``study.overrides.<knob>`` and what is allowed."""
    if section.preset not in PRESETS:
        raise ConfigError(f"study.preset: expected one of {', '.join(map(repr, PRESETS))}, got {section.preset!r}")
    return from_mapping(StudyConfig, merge(to_dict(PRESETS[section.preset]), section.overrides),
                        where="study.overrides")
