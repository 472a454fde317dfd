"""The public surface: what the package exports, backend selection by layers
and by the environment, and the messages a new user meets first."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import gpubn
from conftest import to_numpy


# ------------------------------------------------------------ exports ----
def test_errors_users_catch_are_exported():
    from gpubn.distributed import RemoteRankError
    from gpubn.preprocessing import NotFittedError

    assert gpubn.RemoteRankError is RemoteRankError
    assert gpubn.NotFittedError is NotFittedError
    for name in ("EmuError", "EmuCompileError", "KernelError", "MemcheckError", "RaceError",
                 "DeadlockError"):
        assert issubclass(getattr(gpubn.emu, name), Exception), name
    assert {"RemoteRankError", "NotFittedError", "emu"} <= set(gpubn.__all__)
    for name in gpubn.__all__:
        assert hasattr(gpubn, name), f"gpubn.__all__ lists {name!r}, which is missing"


def test_internals_stay_in_their_submodules():
    for name in ("get_backend", "empty_host_cache"):
        assert not hasattr(gpubn, name), f"gpubn.{name} is an internal"
        assert name not in gpubn.__all__
    from gpubn.backends import get_backend

    assert get_backend("numpy").name == "numpy"


# -------------------------------------------------------- environment ----
def test_bad_gpubn_backend_names_the_environment_variable(monkeypatch):
    monkeypatch.setenv("GPUBN_BACKEND", "nonsense")
    x = np.ones((4, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"GPUBN_BACKEND='nonsense' \(environment variable\) "
                                         r"is not one of 'numpy'"):
        gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    # an explicit argument wins over the variable and keeps its own message
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        gpubn.batch_norm_forward(x, backend="tpu")
    y, _ = gpubn.batch_norm_forward(x, backend="numpy")
    assert y.shape == x.shape


# ------------------------------------------------------------- layers ----
class OneRank(gpubn.distributed.Communicator):
    """The collectives of a single process."""

    def allgather(self, buf):
        return buf[None].copy()

    def allreduce(self, buf):
        return buf.copy()


LAYERS = {
    "BatchNorm": lambda **kw: gpubn.BatchNorm(3, **kw),
    "BatchRenorm": lambda **kw: gpubn.BatchRenorm(3, **kw),
    "LayerNorm": lambda **kw: gpubn.LayerNorm(3, **kw),
    "SyncBatchNorm": lambda **kw: gpubn.SyncBatchNorm(3, comm=OneRank(), **kw),
}


@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_layers_choose_the_backend_per_call(monkeypatch, make):
    """A layer built without ``backend=`` resolves the backend on every call,
    as the functional API does; one built with ``backend=`` keeps it."""
    from gpubn.backends import get_backend

    try:
        get_backend("emu")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    auto, fixed = make(), make(backend="numpy")
    assert "backend=None" in repr(auto) and "backend='numpy'" in repr(fixed)
    monkeypatch.setenv("GPUBN_BACKEND", "emu")
    auto(x)
    fixed(x)
    assert auto._saved is not None
    assert _saved_backend(auto) == "emu"
    assert _saved_backend(fixed) == "numpy"
    monkeypatch.delenv("GPUBN_BACKEND")
    auto(x)
    assert _saved_backend(auto) == get_backend(None, x).name     # cpu, or numpy without Numba
    assert isinstance(auto.weight, np.ndarray)


def _saved_backend(layer):
    saved = layer._saved
    return getattr(saved, "bn", saved).backend.name


@pytest.mark.gpu
@pytest.mark.parametrize("make", LAYERS.values(), ids=LAYERS.keys())
def test_layers_follow_cupy_input_and_back(make):
    """CuPy input runs on ``cuda`` and moves the state there; NumPy input
    afterwards moves it back, values intact."""
    cupy = pytest.importorskip("cupy")
    try:
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - any CUDA failure means no device here
        pytest.skip(f"no CUDA device: {exc}")
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    layer, ref = make(), make(backend="numpy")
    y = layer(cupy.asarray(x))
    assert isinstance(y, cupy.ndarray) and isinstance(layer.weight, cupy.ndarray)
    ref(x)
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(to_numpy(layer.state_dict()[key]), value, rtol=1e-6,
                                   atol=1e-7, err_msg=key)
    y = layer(x)
    assert isinstance(y, np.ndarray) and isinstance(layer.weight, np.ndarray)


# ------------------------------------------------------------ renorm ----
def test_batch_renorm_is_not_a_batch_norm_with_a_deleted_attribute():
    brn = gpubn.BatchRenorm(3)
    assert not isinstance(brn, gpubn.BatchNorm)
    assert isinstance(brn, gpubn.layers.ChannelNorm)
    assert not hasattr(brn, "running_var")
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    brn(x)
    brn.reset_running_stats()
    np.testing.assert_array_equal(brn.running_std, 1.0)
    assert brn.num_batches_tracked == 0
    assert set(brn.state_dict()) == {"weight", "bias", "running_mean", "running_std",
                                     "num_batches_tracked"}


@pytest.mark.parametrize("value", [0.0, -1.0])
@pytest.mark.parametrize("training", [True, False])
def test_batch_renorm_rejects_non_positive_running_std(value, training):
    brn = gpubn.BatchRenorm(3).train(training)
    brn.running_std[1] = value
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no divide-by-zero warning on the way
        with pytest.raises(ValueError, match=rf"running_std must be positive .* got "
                                             rf"{value!r} at channel 1"):
            brn(x)
    np.testing.assert_array_equal(brn.running_mean, 0.0)
    np.testing.assert_array_equal(brn.running_std, [1.0, value, 1.0])
    assert brn.num_batches_tracked == 0


def test_batch_renorm_load_state_dict_rejects_non_positive_running_std():
    brn = gpubn.BatchRenorm(3)
    state = brn.state_dict()
    state["running_mean"] = np.full(3, 5.0, np.float32)
    state["running_std"] = np.array([1.0, 2.0, -3.0], np.float32)
    with pytest.raises(ValueError, match=r"state\['running_std'\] must be positive"):
        brn.load_state_dict(state)
    np.testing.assert_array_equal(brn.running_mean, 0.0)   # nothing was written
    np.testing.assert_array_equal(brn.running_std, 1.0)


# ------------------------------------------------------- preprocessing ----
def test_whitening_before_fit_says_call_fit_only():
    from gpubn.preprocessing import StandardScaler, Whitening

    with pytest.raises(gpubn.NotFittedError, match=r"call fit before") as info:
        Whitening().transform(np.ones((4, 2)))
    assert "partial_fit" not in str(info.value)
    with pytest.raises(gpubn.NotFittedError, match=r"call fit or partial_fit"):
        StandardScaler().transform(np.ones((4, 2)))


# ------------------------------------------------------------ the suite ----
class _Config:
    def __init__(self, run_slow_option):
        self._option = run_slow_option

    def getoption(self, name):
        assert name == "--run-slow"
        return self._option


@pytest.mark.parametrize("ci,option,expected", [
    (None, False, False), ("", False, False), ("false", False, False), ("0", False, False),
    ("true", False, True), ("1", False, True), (None, True, True),
])
def test_slow_tests_run_in_ci_or_on_request(monkeypatch, ci, option, expected):
    from conftest import run_slow

    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert run_slow(_Config(option)) is expected
