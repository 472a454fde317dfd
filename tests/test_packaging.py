"""The built wheel carries the CUDA sources as package data (gpubn/_kernels)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _build_tools_reason():
    try:
        import setuptools
        import wheel  # noqa: F401
    except ImportError as exc:
        return f"building the wheel needs setuptools and wheel: {exc}"
    if int(setuptools.__version__.split(".")[0]) < 68:
        return f"pyproject.toml needs setuptools>=68, found {setuptools.__version__}"
    return None


def test_wheel_ships_kernels_and_package(tmp_path):
    reason = _build_tools_reason()
    if reason:
        pytest.skip(reason)
    kernels = sorted(p.name for p in (ROOT / "kernels").iterdir()
                     if p.suffix in (".cu", ".cuh"))
    assert kernels, "kernels/ holds no .cu/.cuh sources"
    # build from a copy so the checkout gets no build/ or egg-info litter
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.o")
    shutil.copytree(ROOT / "gpubn", src / "gpubn", ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=ignore)
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("gpubn-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("gpubn/_kernels/")
                     and n.endswith((".cu", ".cuh")))
    assert shipped == kernels
    for module in ("gpubn/__init__.py", "gpubn/functional.py", "gpubn/layers.py",
                   "gpubn/backends/numpy_backend.py", "gpubn/__main__.py"):
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith("tests/") for n in names)
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert entry_points and "gpubn = gpubn.__main__:main" in \
        zipfile.ZipFile(whl).read(entry_points[0]).decode()
