"""gpubn.BatchNorm against torch.nn.BatchNorm1d/2d/3d: modes, options, state."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import assert_close, to_backend, to_numpy
from test_batch_norm import make_input

TORCH_CLASS = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 7), (3, 3, 5, 4), (2, 3, 3, 2, 4)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)],
                         ids=["affine", "noaffine", "notrack"])
def test_layer_train_eval_cycle_matches_torch(backend, torch, shape, affine, track):
    c = shape[1]
    ref = getattr(torch.nn, TORCH_CLASS[len(shape)])(
        c, affine=affine, track_running_stats=track, dtype=torch.float64)
    bn = gpubn.BatchNorm(c, affine=affine, track_running_stats=track, dtype="float64",
                         backend=backend.name)
    if affine:
        rng = np.random.default_rng(4)
        w, b = rng.uniform(0.5, 1.5, c), rng.standard_normal(c)
        with torch.no_grad():
            ref.weight.copy_(torch.tensor(w))
            ref.bias.copy_(torch.tensor(b))
        bn.load_state_dict(dict(bn.state_dict(), weight=w, bias=b))
    for step, training in enumerate([True, True, False, True, False]):
        ref.train(training)
        bn.train(training)
        x = make_input(shape, 1, np.float64, seed=step)
        dy = np.random.default_rng(100 + step).standard_normal(shape)
        xt = torch.tensor(x, requires_grad=True)
        yt = ref(xt)
        yt.backward(torch.tensor(dy))
        y = bn(to_backend(backend, x))
        dx = bn.backward(to_backend(backend, dy))
        assert_close(y, yt.detach().numpy(), np.float64, f"y step {step}")
        assert_close(dx, xt.grad.numpy(), np.float64, f"dx step {step}")
        if affine:
            assert_close(bn.grad_weight, ref.weight.grad.numpy(), np.float64, "grad_weight")
            assert_close(bn.grad_bias, ref.bias.grad.numpy(), np.float64, "grad_bias")
            ref.weight.grad = ref.bias.grad = None
        else:
            assert bn.grad_weight is None and bn.grad_bias is None
        ours = {k: to_numpy(v) for k, v in bn.state_dict().items()}
        theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
        assert ours.keys() == theirs.keys()
        for k in theirs:
            assert_close(ours[k], theirs[k], np.float64, k)


def test_state_dict_from_torch_gives_same_eval_output(backend, torch):
    c, shape = 4, (5, 4, 6, 3)
    ref = torch.nn.BatchNorm2d(c)
    ref.train()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
        for step in range(3):
            ref(torch.tensor(make_input(shape, 1, np.float32, seed=step)))
    ref.eval()
    bn = gpubn.BatchNorm(c, backend=backend.name)
    bn.load_state_dict(ref.state_dict())          # torch tensors are accepted directly
    assert bn.num_batches_tracked == 3
    bn.eval()
    x = make_input(shape, 1, np.float32, seed=9)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy()
    assert_close(bn(to_backend(backend, x)), expected, np.float32, "eval y")
    # and the NumPy copy of the state dict works the same
    bn2 = gpubn.BatchNorm(c, backend=backend.name).eval()
    bn2.load_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
    assert_close(bn2(to_backend(backend, x)), expected, np.float32, "eval y (numpy state)")


@pytest.mark.parametrize("momentum", [0.1, 0.0, 1.0, None])
def test_layer_momentum_matches_torch(backend, torch, momentum):
    c, shape = 3, (6, 3, 4)
    ref = torch.nn.BatchNorm1d(c, momentum=momentum, dtype=torch.float64)
    bn = gpubn.BatchNorm(c, momentum=momentum, dtype="float64", backend=backend.name)
    for step in range(4):
        x = make_input(shape, 1, np.float64, seed=20 + step)
        ref(torch.tensor(x))
        bn(to_backend(backend, x))
    assert bn.num_batches_tracked == 4
    assert_close(bn.running_mean, ref.running_mean.numpy(), np.float64, "running_mean")
    assert_close(bn.running_var, ref.running_var.numpy(), np.float64, "running_var")


def test_channels_last_layer_equals_channels_first(backend, torch):
    """axis=-1 on NHWC data gives what BatchNorm2d gives on the NCHW transpose."""
    c, shape = 5, (3, 4, 6, 5)
    x = make_input(shape, -1, np.float32)
    dy = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = torch.nn.BatchNorm2d(c)
    xt = torch.tensor(np.moveaxis(x, -1, 1).copy(), requires_grad=True)
    yt = ref(xt)
    yt.backward(torch.tensor(np.moveaxis(dy, -1, 1).copy()))
    bn = gpubn.BatchNorm(c, axis=-1, backend=backend.name)
    y = bn(to_backend(backend, x))
    dx = bn.backward(to_backend(backend, dy))
    assert_close(y, np.moveaxis(yt.detach().numpy(), 1, -1), np.float32, "y")
    assert_close(dx, np.moveaxis(xt.grad.numpy(), 1, -1), np.float32, "dx")
    assert_close(bn.running_var, ref.running_var.numpy(), np.float32, "running_var")


def test_float16_input_float32_state(backend, torch):
    c, shape = 3, (8, 3, 5)
    x = make_input(shape, 1, np.float16)
    bn = gpubn.BatchNorm(c, backend=backend.name)
    y = bn(to_backend(backend, x))
    assert y.dtype == np.float16 and bn.running_mean.dtype == np.float32
    ref = torch.nn.BatchNorm1d(c)
    expected = ref(torch.tensor(x.astype(np.float32))).detach().numpy()
    assert_close(y, expected, np.float16, "y")
    assert_close(bn.running_mean, ref.running_mean.numpy(), np.float32, "running_mean")
    assert_close(bn.running_var, ref.running_var.numpy(), np.float32, "running_var")
    dx = bn.backward(to_backend(backend, np.ones(shape, np.float16)))
    assert dx.dtype == np.float16 and bn.grad_weight.dtype == np.float32


def test_repr_and_reset():
    bn = gpubn.BatchNorm(2, momentum=None)
    bn(np.arange(8, dtype=np.float32).reshape(4, 2))
    assert bn.num_batches_tracked == 1 and bn.running_mean[0] != 0
    bn.reset_running_stats()
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert "BatchNorm(2" in repr(bn) and "momentum=None" in repr(bn)
