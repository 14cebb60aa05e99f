"""scripts/install.py: uv gets the indexes, find-links folders, constraints and certificate pip would use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("install", Path(__file__).resolve().parents[1] / "scripts" / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

# What `pip config list` prints on this project's machines.
LISTING = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/other.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/srv/ignored-because-the-variable-wins'
install.index-url='https://mirror.invalid/simple'
site.index-url='https://not-a-pip-source.invalid'
"""


def test_each_option_comes_from_the_strongest_source_that_sets_it():
    config = install.pip_config(LISTING)
    assert config == {
        "cert": "/etc/ssl/certs/ca-certificates.crt",  # PIP_CERT beats the file
        "disable-pip-version-check": "1",
        "find-links": "/opt/wheels",
        "constraint": "/etc/xdg/pip/constraints.txt",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/pypi-more/simple",
        "index-url": "https://mirror.invalid/simple",  # [install] beats [global]; "site" is not a pip section
    }


def test_uv_gets_every_index_folder_and_constraint_and_the_certificate(monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    args, env = install.uv_arguments(install.pip_config(LISTING))
    assert args == ["--index-url", "https://mirror.invalid/simple",
                    "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
                    "--find-links", "/opt/wheels", "--constraint", "/etc/xdg/pip/constraints.txt"]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    monkeypatch.setenv("SSL_CERT_FILE", "/mine.crt")  # the user's own setting stays
    assert install.uv_arguments(install.pip_config(LISTING))[1] == {}


def test_no_configuration_means_uv_defaults_and_no_index_passes_through():
    assert install.uv_arguments(install.pip_config("")) == ([], {})
    assert install.uv_arguments({"no-index": "true", "find-links": "/w"}) == (["--find-links", "/w", "--no-index"], {})


def test_when_uv_cannot_be_installed_pip_installs_the_project(monkeypatch, capsys):
    calls: list[list[str]] = []

    def fake_run(args, env=None):
        calls.append(args)
        return args[-1] != install.UV  # installing uv fails; everything else works

    monkeypatch.setattr(install, "run", fake_run)
    assert install.main([]) == 0
    assert calls[-1][-5:] == ["--quiet", "-c", "constraints.txt", "-e", ".[dev]"] and "-m" in calls[-1]
    assert calls[-1][calls[-1].index("-m") + 1] == "pip"
    assert "installing with pip instead" in capsys.readouterr().err
