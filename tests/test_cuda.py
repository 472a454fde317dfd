"""The ``cuda`` backend: CuPy arrays in and out, NumPy arrays refused, and the
same launches giving the same results as on ``emu`` (they run the same
kernels/*.cu with the same launch configuration).

Without CuPy or a CUDA device the GPU tests skip, saying which is missing;
the checks that need neither (availability reason, NumPy input refused)
always run.  The backend-parametrized suite (conftest ``backend`` fixture)
runs on ``cuda`` as well wherever a device exists.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubn.backends.cuda import CudaBackend

_REASON = CudaBackend.unavailable_reason()
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def test_unavailable_reason_says_what_is_missing():
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert _REASON is not None and "CuPy is not installed" in _REASON
        return
    if _REASON is not None:
        assert "no CUDA device" in _REASON


def test_numpy_input_is_refused_with_a_clear_message():
    backend = CudaBackend()
    x = np.ones((2, 3, 4), np.float32)
    with pytest.raises(TypeError, match=r"x is a NumPy array.*cupy\.asarray"):
        backend.bn_stats(x)
    with pytest.raises(TypeError, match="NumPy array"):
        backend.bn_forward_train(x, None, None, None, None, 0.1, 1e-5)


# ------------------------------------------------------------------ GPU ----
def _emu_or_skip():
    from gpubn.backends import get_backend

    try:
        return get_backend("emu")
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    acc = np.float64 if dtype == np.float64 else np.float32
    c = shape[1]
    return ((rng.standard_normal(shape) * 2 + 3).astype(dtype),
            rng.standard_normal(shape).astype(dtype),
            (rng.standard_normal(c) + 1).astype(acc), rng.standard_normal(c).astype(acc),
            rng.standard_normal(c).astype(acc), (rng.random(c) + 0.5).astype(acc))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 3, 50), (300, 33, 1), (3, 2, 64)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_cuda_matches_emu_for_the_same_launch(shape, dtype):
    """Both backends configured alike (emu's device attributes and tuning):
    the same grid, the same kernels, the same rounding (explicit FMAs,
    correctly rounded division and sqrt) -- the same bits."""
    import cupy

    from gpubn.launch import EMU_DEVICE

    emu = _emu_or_skip()
    gpu = CudaBackend(tuning=emu.tuning, device_attributes=EMU_DEVICE)
    x, dy, w, b, rm, rv = _data(shape, dtype)
    g = lambda a: None if a is None else cupy.asarray(a)  # noqa: E731

    rm_e, rv_e = rm.copy(), rv.copy()
    rm_g, rv_g = g(rm), g(rv)
    fwd_e = emu.bn_forward_train(x, w, b, rm_e, rv_e, 0.1, 1e-5)
    fwd_g = gpu.bn_forward_train(g(x), g(w), g(b), rm_g, rv_g, 0.1, 1e-5)
    bwd_e = emu.bn_backward(dy, x, fwd_e[1], fwd_e[2], w, True)
    bwd_g = gpu.bn_backward(g(dy), g(x), g(fwd_e[1]), g(fwd_e[2]), g(w), True)
    ev_e = emu.bn_forward_eval(x, w, b, rm, rv, 1e-5)
    ev_g = gpu.bn_forward_eval(g(x), g(w), g(b), g(rm), g(rv), 1e-5)
    st_e, st_g = emu.bn_stats(x), gpu.bn_stats(g(x))
    pairs = {"y": (fwd_e[0], fwd_g[0]), "mean": (fwd_e[1], fwd_g[1]),
             "invstd": (fwd_e[2], fwd_g[2]), "running_mean": (rm_e, rm_g),
             "running_var": (rv_e, rv_g), "dx": (bwd_e[0], bwd_g[0]),
             "dweight": (bwd_e[1], bwd_g[1]), "dbias": (bwd_e[2], bwd_g[2]),
             "y eval": (ev_e[0], ev_g[0]), "stats mean": (st_e.mean, st_g.mean),
             "stats m2": (st_e.m2, st_g.m2)}
    for name, (e, c) in pairs.items():
        c = cupy.asnumpy(c)
        assert c.dtype == e.dtype, name
        if c.tobytes() != e.tobytes():
            np.testing.assert_allclose(c.astype(np.float64), e.astype(np.float64), rtol=0,
                                       atol=0, err_msg=f"{name}: cuda and emu differ")


@needs_gpu
@pytest.mark.gpu
def test_cupy_in_cupy_out():
    import cupy

    gpu = CudaBackend()
    x, dy, w, b, rm, rv = (cupy.asarray(a) for a in _data((4, 3, 20), np.float32))
    y, mean, invstd = gpu.bn_forward_train(x, w, b, rm, rv, 0.1, 1e-5)
    dx, dw, db = gpu.bn_backward(dy, x, mean, invstd, w, True)
    stats = gpu.bn_stats(x)
    for a in (y, mean, invstd, dx, dw, db, stats.mean, stats.m2):
        assert isinstance(a, cupy.ndarray)
    with pytest.raises(TypeError, match="weight must be a cupy array"):
        gpu.bn_forward_train(x, cupy.asnumpy(w), b, rm, rv, 0.1, 1e-5)


@needs_gpu
@pytest.mark.gpu
def test_gpu_configuration_against_numpy_reference():
    """The device's own configuration (its SM count, 256-thread blocks) on a
    shape with few channels and many values: channels split over blocks."""
    import cupy

    from gpubn.backends.numpy_backend import NumpyBackend
    from gpubn.launch import reduce_launch

    gpu = CudaBackend()
    shape = (16, 4, 6400)
    assert reduce_launch("stats", shape, "float32", True, gpu.device_attributes(),
                         gpu.tuning).splits > 1
    x, dy, w, b, _, _ = _data(shape, np.float32)
    y, mean, invstd = gpu.bn_forward_train(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b),
                                           None, None, 0.1, 1e-5)
    ref = NumpyBackend().bn_forward_train(x.astype(np.float64), w.astype(np.float64),
                                          b.astype(np.float64), None, None, 0.1, 1e-5)
    np.testing.assert_allclose(cupy.asnumpy(y), ref[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(cupy.asnumpy(invstd), ref[2], rtol=1e-5)


@needs_gpu
@pytest.mark.gpu
def test_dlpack_tensors_through_cupy_from_dlpack():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA support here")
    import cupy

    t = torch.randn(4, 3, 10, device="cuda")
    x = cupy.from_dlpack(t)
    y, _, _ = CudaBackend().bn_forward_train(x, None, None, None, None, 0.1, 1e-5)
    back = torch.from_dlpack(y)
    ref = torch.nn.functional.batch_norm(t, None, None, training=True, eps=1e-5)
    assert torch.allclose(back, ref, atol=1e-5)


@pytest.mark.parametrize("optin", [163 * 1024, None])
def test_device_attributes_read_the_shared_memory_opt_in(monkeypatch, optin):
    """The read-once plan's per-block shared memory limit comes from the
    device (cudaDevAttrMaxSharedMemoryPerBlockOptin: an A100's 163 KiB
    here); where the driver does not report it, the sm_80 / sm_90 default,
    227 KiB.  A stand-in for CuPy's device."""
    from gpubn.backends import cuda as cuda_mod

    attributes = {"MultiProcessorCount": 108, "MaxThreadsPerBlock": 1024, "MaxGridDimY": 65535,
                  "CooperativeLaunch": 1, "MaxSharedMemoryPerMultiprocessor": 164 * 1024}
    if optin is not None:
        attributes["MaxSharedMemoryPerBlockOptin"] = optin

    class Device:
        id = 0

        def __init__(self):
            self.attributes = attributes

    monkeypatch.setattr(cuda_mod, "cupy", type("cupy", (), {"cuda": type("cuda", (), {
        "Device": Device})}))
    backend = CudaBackend.__new__(CudaBackend)
    CudaBackend.__init__(backend)
    dev = backend.device_attributes()
    assert (dev.sm_count, dev.shared_per_sm) == (108, 164 * 1024)
    assert dev.max_shared_per_block_optin == (optin or 227 * 1024)
