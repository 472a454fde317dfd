"""Subnormal numbers are kept on every backend (issue 15, item 4).

CuPy appends ``-ftz=true`` to every RawModule compile: float32 arithmetic on
the GPU would flush subnormal inputs and results to zero while emu and NumPy
keep them.  The cuda backend therefore compiles the kernels itself with
NVRTC, ``-ftz=false``, to a cubin it loads with ``RawModule(path=...)``.
Checked here without a GPU: the kernels' code has no flushing instruction
(and CuPy's option would add them), the cuda backend loads gpubn's cubin
(with a stand-in CuPy), and on emu a subnormal input gives the IEEE result;
on a GPU, cuda and emu agree bit for bit on subnormal data."""

import numpy as np
import pytest

from gpubn import _nvrtc
from gpubn import kernels as catalog
from gpubn.backends import cuda as cuda_mod
from conftest import backend_or_skip

needs_nvrtc = pytest.mark.skipif(_nvrtc.unavailable_reason() is not None,
                                 reason=_nvrtc.unavailable_reason() or "")


def _ptx(source, extra):
    """PTX of the float32 instantiations (FTZ concerns float32 arithmetic,
    which the float16/bfloat16 kernels share)."""
    return _nvrtc.compile_to_ptx(catalog.read_source(source),
                                 catalog.name_expressions(source, "float32"),
                                 catalog.compile_options() + extra, source).ptx


@needs_nvrtc
@pytest.mark.parametrize("source", catalog.SOURCES)
def test_cuda_compile_has_no_flush_to_zero(source):
    ours = _ptx(source, cuda_mod.CUDA_COMPILE_OPTIONS + ("--gpu-architecture=compute_90",))
    assert ".ftz" not in ours
    if ".f32" in ours:
        flushing = _ptx(source, ("-ftz=true", "--gpu-architecture=compute_90"))
        assert ".ftz" in flushing, "the planted -ftz=true must show in the PTX"


@needs_nvrtc
def test_build_cubin_compiles_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBN_CACHE_DIR", str(tmp_path))
    path, lowered = cuda_mod.build_cubin("bn_forward.cu", "float32", "90")
    assert path.startswith(str(tmp_path / "cuda")) and path.endswith(".cubin")
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"
    names = catalog.name_expressions("bn_forward.cu", "float32")
    assert set(lowered) == set(names) and all(v.startswith("_Z") for v in lowered.values())

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again instead of using the cache")

    monkeypatch.setattr(_nvrtc, "compile_to_cubin", no_compile)
    assert cuda_mod.build_cubin("bn_forward.cu", "float32", "90") == (path, lowered)


class _FakeCupy:
    """What the cuda backend's loader uses of CuPy, recording the calls."""

    def __init__(self):
        self.modules = []
        fake = self

        class Device:
            id = 0
            compute_capability = "90"

        class RawModule:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
                self.looked_up = []
                fake.modules.append(self)

            def get_function(self, name):
                self.looked_up.append(name)
                return name

        self.cuda = type("cuda", (), {"Device": Device})
        self.RawModule = RawModule


@needs_nvrtc
def test_cuda_backend_loads_its_own_cubin(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUBN_CACHE_DIR", str(tmp_path))
    fake = _FakeCupy()
    monkeypatch.setattr(cuda_mod, "cupy", fake)
    backend = cuda_mod.CudaBackend.__new__(cuda_mod.CudaBackend)
    cuda_mod.CudaBackend.__init__(backend)
    name = catalog.name_expression("bn_apply_nchw", "float32", 4)
    fn = backend._get_function("bn_forward.cu", "float32", name)
    (module,) = fake.modules
    assert set(module.kwargs) == {"path"}
    with open(module.kwargs["path"], "rb") as f:
        assert f.read(4) == b"\x7fELF"
    assert fn.startswith("_ZN5gpubn13bn_apply_nchw") and module.looked_up == [fn]
    # the same module serves the other functions of that source and dtype
    backend._get_function("bn_forward.cu", "float32",
                          catalog.name_expression("bn_apply_nhwc", "float32", 1))
    assert len(fake.modules) == 1

    # without gpubn's own NVRTC, CuPy compiles (and flushes): still works
    monkeypatch.setattr(_nvrtc, "unavailable_reason", lambda: "no NVRTC here")
    other = cuda_mod.CudaBackend.__new__(cuda_mod.CudaBackend)
    cuda_mod.CudaBackend.__init__(other)
    assert other._get_function("bn_forward.cu", "float32", name) == name
    assert set(fake.modules[-1].kwargs) == {"code", "options", "name_expressions"}


# -- behaviour on emu (and cuda where there is a GPU) ---------------------------------------

SCALE = 1e-39     # below float32's smallest normal number, 2**-126 = 1.18e-38


def _subnormal_batch(seed=0):
    rng = np.random.default_rng(seed)
    x = (SCALE * (2.0 + rng.standard_normal((4, 3, 16)))).astype(np.float32)
    assert np.all(np.abs(x[x != 0]) < np.finfo(np.float32).tiny)
    return x


def test_emu_keeps_subnormal_inputs():
    """Documented behaviour: IEEE arithmetic with subnormals.  The batch
    variance of these values underflows to 0 in float32, so invstd is
    1/sqrt(eps) and y = (x - mean) / sqrt(eps) ~ 3e-37, a normal number
    (flushing the inputs would give y = 0 and mean = 0).  mean is a sum of
    64 subnormal steps, each off by at most one subnormal ulp (2**-149);
    y carries that error times invstd, plus a few float32 roundings of
    2**-24 each."""
    import gpubn

    backend_or_skip("emu")
    x = _subnormal_batch()
    y, saved = gpubn.batch_norm_forward(x, training=True, eps=1e-5, backend="emu")
    ref_y, ref = gpubn.batch_norm_forward(x.astype(np.float64), training=True, eps=1e-5,
                                          backend="numpy")
    m = x.shape[0] * x.shape[2]
    mean_bound = 4 * m * 2.0 ** -149
    assert np.all(saved.mean != 0)
    np.testing.assert_allclose(saved.mean, ref.mean, rtol=0, atol=mean_bound)
    assert np.count_nonzero(y) == y.size
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=mean_bound / np.sqrt(1e-5))


@pytest.mark.gpu
def test_cuda_keeps_subnormals_like_emu():
    from gpubn.launch import EMU_DEVICE

    reason = cuda_mod.CudaBackend.unavailable_reason()
    if reason:
        pytest.skip(reason)
    import cupy

    emu = backend_or_skip("emu")
    gpu = cuda_mod.CudaBackend(tuning=emu.tuning, device_attributes=EMU_DEVICE)
    x = _subnormal_batch(1)
    want = emu.bn_forward_train(x, None, None, None, None, 0.1, 1e-5)
    got = gpu.bn_forward_train(cupy.asarray(x), None, None, None, None, 0.1, 1e-5)
    for name, e, g in zip(("y", "mean", "invstd"), want, got):
        assert cupy.asnumpy(g).tobytes() == e.tobytes(), f"{name}: cuda and emu differ"
