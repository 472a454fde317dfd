"""The built wheel carries the CUDA sources as package data (gpubn/_kernels),
and an installed (non-editable) wheel runs the kernels from there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the checkout (so the checkout gets no
    build/ or egg-info litter)."""
    reason = _build_tools_reason()
    if reason:
        pytest.skip(reason)
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    return whl


def test_wheel_ships_kernels_and_package(wheel):
    whl = wheel
    kernels = sorted(p.name for p in (ROOT / "kernels").iterdir()
                     if p.suffix in (".cu", ".cuh"))
    assert kernels, "kernels/ holds no .cu/.cuh sources"
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


# Runs inside the fresh virtual environment, from an empty directory.
_INSTALLED_CHECK = textwrap.dedent("""
    import json, os, sys, sysconfig
    checkout = sys.argv[1]
    assert not any(os.path.abspath(p or os.curdir) == checkout for p in sys.path), sys.path
    import numpy as np
    import gpubn
    from gpubn.kernels import kernels_dir
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 6)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    out = {}
    for name in ("numpy", "emu"):
        y, saved = gpubn.batch_norm_forward(x, backend=name)
        dx, _, _ = gpubn.batch_norm_backward(dy, saved)
        out[name] = [y.tolist(), dx.tolist()]
    print(json.dumps({"gpubn": gpubn.__file__, "kernels": kernels_dir(),
                      "purelib": sysconfig.get_paths()["purelib"], "results": out}))
""")


@pytest.mark.slow
def test_installed_wheel_runs_emu(wheel, tmp_path):
    """``pip install`` of the wheel (not editable) into a fresh venv without
    system site packages: gpubn comes from that venv's site-packages, finds its
    kernels in gpubn/_kernels and runs forward and backward on ``emu``."""
    import json

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("the emu backend needs a C++ compiler")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
         "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    purelib = subprocess.run([str(py), "-I", "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # NumPy without network: a .pth naming the directory that holds this
    # interpreter's numpy.  Path entries added by a .pth are not site
    # directories, so an editable install of the checkout there stays inactive.
    Path(purelib, "numpy_from_tests.pth").write_text(
        str(Path(np.__file__).resolve().parents[1]) + "\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "GPUBN_BACKEND", "VIRTUAL_ENV"))}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run([str(py), "-I", "-c", _INSTALLED_CHECK, str(ROOT)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    site = Path(report["purelib"]).resolve()
    assert Path(report["gpubn"]).resolve() == site / "gpubn" / "__init__.py"
    assert Path(report["kernels"]).resolve() == site / "gpubn" / "_kernels"
    ref_y, ref_dx = (np.array(a) for a in report["results"]["numpy"])
    y, dx = (np.array(a) for a in report["results"]["emu"])
    # float32 against the float64-accumulating reference over 120 values per
    # channel: a few ulps of the O(1) outputs
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=0, atol=1e-5)
