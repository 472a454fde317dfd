"""Every array argument must live on the input's device (issue 15, item 3):
a weight on GPU 1 with x on GPU 0 would hand the kernel an address it cannot
read.  Without several GPUs the arrays here are a stand-in: NumPy arrays that
report a device the way CuPy's do (``a.device.id``), run by the numpy
backend.  Each op refuses the misplaced argument by name, before any state
changes."""

import numpy as np
import pytest

import gpubn
from gpubn import _validation as V


class _Device:
    def __init__(self, id):
        self.id = id


class OnDevice(np.ndarray):
    """A NumPy array that says it lives on GPU ``gpu`` (default 0)."""

    gpu = 0

    @property
    def device(self):
        return _Device(getattr(self, "_gpu", 0))


def on(a, gpu=0):
    out = np.ascontiguousarray(a).view(OnDevice)
    out._gpu = gpu
    return out


def _inputs(c=3):
    rng = np.random.default_rng(0)
    x = on(rng.standard_normal((4, c, 5)))
    vectors = {"weight": on(rng.random(c) + 0.5), "bias": on(rng.standard_normal(c)),
               "running_mean": on(np.zeros(c)), "running_var": on(np.ones(c))}
    return x, vectors


def test_device_id():
    assert V.device_id(np.ones(2)) is None          # NumPy 2: device == "cpu"
    assert V.device_id(on(np.ones(2), 1)) == 1
    assert V.device_id(3.0) is None


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_batch_norm_refuses_a_vector_on_another_device(name):
    x, vec = _inputs()
    vec[name] = on(vec[name], gpu=1)
    before = {k: np.array(v) for k, v in vec.items()}
    with pytest.raises(ValueError, match=rf"{name} is on device 1 but x is on device 0"):
        gpubn.batch_norm_forward(x, **vec, training=True, backend="numpy")
    for k, v in vec.items():
        assert np.array_equal(np.asarray(v), before[k]), f"{k} was modified"


def test_same_device_passes_and_host_arrays_are_not_compared():
    x, vec = _inputs()
    y, saved = gpubn.batch_norm_forward(x, **vec, training=True, backend="numpy")
    gpubn.batch_norm_backward(on(np.ones(x.shape)), saved)
    vec["weight"] = np.asarray(vec["weight"]).copy()     # a host array: no device to compare
    gpubn.batch_norm_forward(x, **vec, training=True, backend="numpy")


def test_backward_refuses_dy_on_another_device():
    x, vec = _inputs()
    _, saved = gpubn.batch_norm_forward(x, **vec, training=True, backend="numpy")
    with pytest.raises(ValueError, match="dy is on device 1 but the forward input is on "
                                         "device 0"):
        gpubn.batch_norm_backward(on(np.ones(x.shape), gpu=1), saved)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_std"])
def test_batch_renorm_refuses_a_vector_on_another_device(name):
    x, vec = _inputs()
    vec["running_std"] = vec.pop("running_var")
    vec[name] = on(vec[name], gpu=2)
    with pytest.raises(ValueError, match=rf"{name} is on device 2 but x is on device 0"):
        gpubn.batch_renorm_forward(x, **vec, training=True, backend="numpy")
    vec[name] = on(vec[name], gpu=0)
    _, saved = gpubn.batch_renorm_forward(x, **vec, training=True, backend="numpy")
    with pytest.raises(ValueError, match="dy is on device 2"):
        gpubn.batch_renorm_backward(on(np.ones(x.shape), gpu=2), saved)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_layer_norm_refuses_a_parameter_on_another_device(name):
    rng = np.random.default_rng(1)
    x = on(rng.standard_normal((4, 6)))
    params = {"weight": on(np.ones(6)), "bias": on(np.zeros(6))}
    params[name] = on(params[name], gpu=1)
    with pytest.raises(ValueError, match=rf"{name} is on device 1 but x is on device 0"):
        gpubn.layer_norm_forward(x, 6, params["weight"], params["bias"], backend="numpy")
    params[name] = on(params[name], gpu=0)
    _, saved = gpubn.layer_norm_forward(x, 6, params["weight"], params["bias"], backend="numpy")
    with pytest.raises(ValueError, match="dy is on device 1"):
        gpubn.layer_norm_backward(on(np.ones(x.shape), gpu=1), saved)
