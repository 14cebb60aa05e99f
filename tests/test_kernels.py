"""The CPU kernel pins (seqvision/kernels.py): set before torch loads, never over a user's value, off on request."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqvision.kernels import PINS, SWITCH, cpu_has_avx2, pin_cpu_kernels

REPO = Path(__file__).resolve().parents[1]


def test_pins_set_only_what_the_user_left_unset() -> None:
    env = {"MKL_CBWR": "AUTO"}
    assert pin_cpu_kernels(env, machine="x86_64", has_avx2=True) == {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}
    assert env == {**PINS, "MKL_CBWR": "AUTO"}


@pytest.mark.parametrize(("env", "machine", "avx2"), [
    ({SWITCH: "native"}, "x86_64", True),  # the user's opt-out
    ({}, "aarch64", True),  # not x86-64: the names mean nothing there
    ({}, "x86_64", False),  # no AVX2: there is no wider path to fall back from
])
def test_nothing_is_pinned_when_off_elsewhere_or_without_avx2(env: dict[str, str], machine: str, avx2: bool) -> None:
    before = dict(env)
    assert pin_cpu_kernels(env, machine=machine, has_avx2=avx2) == {}
    assert env == before


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    (tmp_path / "with").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    (tmp_path / "without").write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    assert cpu_has_avx2(tmp_path / "with") and not cpu_has_avx2(tmp_path / "without")


def _capability(extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in (*PINS, SWITCH)} | extra
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    code = "import pipelines, torch, os; print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          cwd=REPO).stdout.strip()


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64" and cpu_has_avx2()),
                    reason="the pins apply on x86-64 CPUs with AVX2 only")
def test_a_stage_process_runs_torch_on_the_pinned_path() -> None:
    # Importing any stage module (pipelines/) applies the pins before torch loads.
    assert _capability({}) == "AVX2 COMPATIBLE"
    assert _capability({"ATEN_CPU_CAPABILITY": "default"}) == "DEFAULT COMPATIBLE"  # the user's value wins


@pytest.mark.skipif(not (sys.platform == "linux" and os.uname().machine == "x86_64" and cpu_has_avx2()),
                    reason="the pins apply on x86-64 CPUs with AVX2 only")
def test_a_stage_process_runs_numpy_blas_on_the_pinned_path() -> None:
    # numpy's OpenBLAS picks its kernels when numpy loads; the baselines' cosine similarities ran on SkylakeX
    # kernels on an AVX-512 machine and differed in their last bits from an AVX2 machine's (docs/reproducibility.md).
    pytest.importorskip("threadpoolctl")  # pinned in constraints.txt (a scikit-learn dependency)
    env = {k: v for k, v in os.environ.items() if k not in (*PINS, SWITCH)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    code = ("import pipelines, numpy, threadpoolctl; "
            "print(*[i.get('architecture') for i in threadpoolctl.threadpool_info() if i['internal_api'] == 'openblas'])")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert run.stdout.split() and set(run.stdout.split()) == {"Haswell"}, run.stdout
