"""The fused op's sources ship with the package: a wheel (hence a non-editable ``pip install .``)
carries ``knnlm/csrc/`` and ``knnlm.ops`` finds them inside the installed package, so the op is
JIT-built there instead of silently falling back to the torch reference.

The wheel is built from a copy of the project in a temp dir (the checkout stays untouched), with
``pip wheel . --no-deps --no-build-isolation``: a few seconds, no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "knnlm" / "csrc"
SOURCE_SUFFIXES = {".h", ".cpp", ".cu"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # setuptools >= 70.1 builds wheels itself (the dev extra pins it; no `wheel` package needed)
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o", "*.egg-info")
    shutil.copytree(ROOT / "knnlm", src / "knnlm", ignore=ignore)
    out = tmp / "dist"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INDEX="1")
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out)],
        cwd=src, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    wheels = list(out.glob("knnlm-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_the_csrc_sources(wheel):
    expected = {
        "knnlm/" + p.relative_to(ROOT / "knnlm").as_posix()
        for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES
    }
    # the files the JIT build compiles and includes, at least
    assert {"knnlm/csrc/knnlm.cpp", "knnlm/csrc/interp.h", "knnlm/csrc/checks.h",
            "knnlm/csrc/cpu/interp_cpu.cpp", "knnlm/csrc/cuda/interp_kernels.cu",
            "knnlm/csrc/cuda/knnlm_cuda.cpp", "knnlm/csrc/cuda/launch.h"} <= expected
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.endswith((".so", ".o"))], "build outputs in the wheel"


def test_installed_layout_finds_the_sources(wheel, tmp_path):
    """Unpack the wheel as site-packages would hold it: csrc_dir() and every translation unit
    of the build (CPU and CUDA) resolve inside that installed package, not in a checkout."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import knnlm, knnlm.ops as ops\n"
        "site = Path(sys.argv[1]).resolve()\n"
        "assert Path(knnlm.__file__).resolve().is_relative_to(site), knnlm.__file__\n"
        "d = ops.csrc_dir()\n"
        "assert d == site / 'knnlm' / 'csrc', d\n"
        "files = ops.source_files(cuda=True)\n"
        "assert files and all(f.is_file() and f.is_relative_to(d) for f in files), files\n"
        "assert (d / 'interp.h').is_file()\n"
        "print('OK')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(site))
    # run outside the checkout so that neither the cwd nor an editable install can shadow it
    res = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and "OK" in res.stdout, (res.stdout + res.stderr)[-3000:]
