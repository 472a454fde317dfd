"""Every kernel instantiation the catalog lists compiles with NVRTC for each
supported virtual architecture, with no CUDA toolkit headers on the include
path, and with an empty compiler log (no errors, no warnings).

Runs without a GPU or a driver (NVRTC through ctypes); skips only when the
NVRTC library itself cannot be found.
"""

import concurrent.futures
import os
import re

import pytest

from gpubn import _nvrtc, kernels

ARCHES = ("compute_75", "compute_80", "compute_90")

_reason = _nvrtc.unavailable_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def _compile(source_text, names, arch, filename="kernel.cu"):
    options = kernels.compile_options() + (f"--gpu-architecture={arch}",)
    assert not any("cuda" in o.lower() and o.startswith("-I") for o in options)
    return _nvrtc.compile_to_ptx(source_text, names, options, filename)


@pytest.fixture(scope="module")
def catalog_builds():
    """Every (source, arch) compiled once, concurrently (NVRTC runs outside
    the GIL); a failure is kept and raised by the test that asks for it."""
    def build(job):
        source, arch = job
        try:
            return _compile(kernels.read_source(source), kernels.all_name_expressions(source),
                            arch, source)
        except _nvrtc.NvrtcError as exc:
            return exc

    jobs = [(s, a) for s in kernels.SOURCES for a in ARCHES]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(jobs, pool.map(build, jobs)))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("source", kernels.SOURCES)
def test_catalog_compiles_clean(source, arch, catalog_builds):
    names = kernels.all_name_expressions(source)
    assert names, f"the catalog lists no kernels for {source}"
    result = catalog_builds[(source, arch)]
    if isinstance(result, Exception):
        raise result
    assert result.log == "", f"NVRTC reported for {source} ({arch}):\n{result.log}"
    assert f".target sm_{arch.split('_')[1]}" in result.ptx
    entries = set(re.findall(r"\.entry\s+([\w$]+)", result.ptx))
    for name in names:
        assert result.lowered_names[name] in entries, f"{name} has no kernel entry in the PTX"


def test_every_catalog_kernel_belongs_to_a_source():
    for spec in kernels.KERNELS.values():
        text = kernels.read_source(spec.source)
        assert re.search(rf"__global__[^;{{]*\b{spec.name}\s*\(", text), spec.name


def test_warnings_are_reported():
    # The check above relies on NVRTC putting warnings in the log.
    src = 'extern "C" __global__ void k(float* p) { int unused = 3; p[0] = 1.0f; }'
    result = _compile(src, ["k"], "compute_80")
    assert "warning" in result.log


def test_errors_raise_with_the_log():
    with pytest.raises(_nvrtc.NvrtcError, match="undefined_thing"):
        _compile('extern "C" __global__ void k(float* p) { p[0] = undefined_thing; }',
                 ["k"], "compute_80")


def test_compute_70_is_not_a_target():
    # Documented floor: CUDA 13's NVRTC no longer accepts compute_70.
    major, _ = _nvrtc.version()
    if major < 13:
        pytest.skip("older NVRTC still targets compute_70")
    with pytest.raises(_nvrtc.NvrtcError):
        _compile('extern "C" __global__ void k(float* p) { p[0] = 1.0f; }', ["k"], "compute_70")
