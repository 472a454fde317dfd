"""Bad input: a clear TypeError/ValueError naming the argument, and no state change."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import to_backend, to_numpy


def _state(rm, rv):
    return to_numpy(rm).copy(), to_numpy(rv).copy()


def _good(backend, shape=(4, 3, 5)):
    rng = np.random.default_rng(0)
    x = to_backend(backend, rng.standard_normal(shape).astype(np.float32))
    rm = to_backend(backend, rng.standard_normal(3).astype(np.float32))
    rv = to_backend(backend, rng.uniform(1, 2, 3).astype(np.float32))
    return x, rm, rv


def _bad_forward_cases(backend):
    xp = backend.xp
    x, _, _ = _good(backend)
    w3 = xp.ones(3, dtype=xp.float32)
    return [
        ("int x", dict(x=xp.ones((4, 3), dtype=xp.int32)), TypeError, r"x must have a floating-point dtype.*int32"),
        ("bool x", dict(x=xp.ones((4, 3), dtype=bool)), TypeError, r"x must have a floating-point dtype.*bool"),
        ("complex x", dict(x=xp.ones((4, 3), dtype=xp.complex64)), TypeError, r"x must have a floating-point dtype.*complex64"),
        ("list x", dict(x=[[1.0, 2.0], [3.0, 4.0]]), TypeError, r"x must be an array"),
        ("1-d x", dict(x=xp.ones(5, dtype=xp.float32), rm=None, rv=None), ValueError, r"x must have at least 2 dimensions"),
        ("weight C", dict(weight=xp.ones(4, dtype=xp.float32)), ValueError, r"weight must have shape \(3,\).*got shape \(4,\)"),
        ("bias C", dict(bias=xp.ones(2, dtype=xp.float32)), ValueError, r"bias must have shape \(3,\)"),
        ("running_mean C", dict(rm=xp.zeros(5, dtype=xp.float32)), ValueError, r"running_mean must have shape \(3,\)"),
        ("running_var C", dict(rv=xp.ones(2, dtype=xp.float32)), ValueError, r"running_var must have shape \(3,\)"),
        ("weight 2-d", dict(weight=xp.ones((3, 1), dtype=xp.float32)), ValueError, r"weight must have shape \(3,\)"),
        ("int weight", dict(weight=xp.ones(3, dtype=xp.int64)), TypeError, r"weight must have a floating-point dtype"),
        ("axis high", dict(axis=3), ValueError, r"axis=3 is out of range"),
        ("axis low", dict(axis=-4), ValueError, r"axis=-4 is out of range"),
        ("axis float", dict(axis=1.0), TypeError, r"axis must be an int"),
        ("eps zero", dict(eps=0.0), ValueError, r"eps must be a positive"),
        ("eps negative", dict(eps=-1e-5), ValueError, r"eps must be a positive"),
        ("eps nan", dict(eps=float("nan")), ValueError, r"eps must be a positive"),
        ("momentum high", dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\]"),
        ("momentum low", dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\]"),
        ("momentum str", dict(momentum="0.1"), TypeError, r"momentum must be a float"),
        ("empty batch", dict(x=xp.ones((0, 3, 5), dtype=xp.float32)), ValueError, r"x is empty"),
        ("one value per channel", dict(x=xp.ones((1, 3), dtype=xp.float32)), ValueError,
         r"more than 1 value per channel when training"),
        ("one value per channel spatial 1x1", dict(x=xp.ones((1, 3, 1, 1), dtype=xp.float32)),
         ValueError, r"more than 1 value per channel when training"),
        ("only running_mean", dict(rv=None), ValueError, r"running_mean and running_var must be given together"),
        ("num_batches_tracked negative", dict(num_batches_tracked=-1), ValueError, r"num_batches_tracked must be"),
        ("backend name", dict(backend="tpu"), ValueError, r"backend must be one of"),
        ("weight slice", dict(weight=w3[:2]), ValueError, r"weight must have shape"),
    ] + ([("x of another array module", dict(x=np.ones((4, 3), np.float32)), TypeError,
           r"x must be a cupy array")] if backend.name == "cuda" else [])


def test_every_bad_forward_raises_and_leaves_state(backend):
    for label, over, exc, pattern in _bad_forward_cases(backend):
        x, rm, rv = _good(backend)
        args = dict(x=x, weight=None, bias=None, rm=rm, rv=rv, axis=1, eps=1e-5, momentum=0.1,
                    backend=backend.name, num_batches_tracked=None)
        args.update(over)
        before = _state(rm, rv)
        with pytest.raises(exc, match=pattern):
            gpubn.batch_norm_forward(
                args["x"], weight=args["weight"], bias=args["bias"], running_mean=args["rm"],
                running_var=args["rv"], training=True,
                momentum=args["momentum"], eps=args["eps"], axis=args["axis"],
                backend=args["backend"], num_batches_tracked=args["num_batches_tracked"])
        after = _state(rm, rv)
        np.testing.assert_array_equal(after[0], before[0], err_msg=f"{label}: running_mean changed")
        np.testing.assert_array_equal(after[1], before[1], err_msg=f"{label}: running_var changed")


def test_eval_needs_running_stats(backend):
    x, _, _ = _good(backend)
    with pytest.raises(ValueError, match=r"training=False needs running_mean and running_var"):
        gpubn.batch_norm_forward(x, training=False, backend=backend.name)


def test_read_only_running_stats_rejected_before_any_write():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match=r"running_var is updated in place but is read-only"):
        gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0)


def _bad_backward_cases(backend):
    xp = backend.xp
    return [
        ("dy shape", xp.ones((4, 3, 6), dtype=xp.float32), ValueError,
         r"dy must have the shape of the forward input \(4, 3, 5\), got \(4, 3, 6\)"),
        ("dy dtype", xp.ones((4, 3, 5), dtype=xp.float64), TypeError,
         r"dy must have the dtype of the forward input \(float32\), got float64"),
        ("dy int", xp.ones((4, 3, 5), dtype=xp.int32), TypeError, r"dy must have a floating-point dtype"),
        ("dy not array", None, TypeError, r"dy must be an array"),
    ]


def test_every_bad_backward_raises(backend):
    x, rm, rv = _good(backend)
    _, saved = gpubn.batch_norm_forward(x, running_mean=rm, running_var=rv, backend=backend.name)
    for label, dy, exc, pattern in _bad_backward_cases(backend):
        with pytest.raises(exc, match=pattern):
            gpubn.batch_norm_backward(dy, saved)
    with pytest.raises(TypeError, match=r"saved must be the BatchNormSaved"):
        gpubn.batch_norm_backward(x, (1, 2))


@pytest.mark.parametrize("case", ["int", "bool", "complex", "1-d", "channels", "empty",
                                  "one-value"])
def test_layer_bad_input_leaves_state(backend, case):
    xp = backend.xp
    bn = gpubn.BatchNorm(3, backend=backend.name)
    bn(to_backend(backend, np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)))
    before = {k: to_numpy(v).copy() for k, v in bn.state_dict().items()}
    x, exc, pattern = {
        "int": (xp.ones((4, 3), dtype=xp.int64), TypeError, r"x must have a floating-point dtype"),
        "bool": (xp.ones((4, 3), dtype=bool), TypeError, r"x must have a floating-point dtype"),
        "complex": (xp.ones((4, 3), dtype=xp.complex128), TypeError, r"x must have a floating-point dtype"),
        "1-d": (xp.ones(3, dtype=xp.float32), ValueError, r"at least 2 dimensions"),
        "channels": (xp.ones((4, 5, 2), dtype=xp.float32), ValueError,
                     r"weight must have shape \(5,\) to match the 5 channels"),
        "empty": (xp.ones((0, 3), dtype=xp.float32), ValueError, r"x is empty"),
        "one-value": (xp.ones((1, 3, 1), dtype=xp.float32), ValueError, r"more than 1 value per channel"),
    }[case]
    with pytest.raises(exc, match=pattern):
        bn(x)
    after = {k: to_numpy(v) for k, v in bn.state_dict().items()}
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_layer_axis_out_of_range_leaves_state(backend):
    bn = gpubn.BatchNorm(3, axis=3, backend=backend.name)
    with pytest.raises(ValueError, match=r"axis=3 is out of range for an input with 3 dimensions"):
        bn(to_backend(backend, np.ones((4, 3, 5), np.float32)))
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(to_numpy(bn.running_mean), 0)
    np.testing.assert_array_equal(to_numpy(bn.running_var), 1)


def test_layer_backward_before_forward(backend):
    bn = gpubn.BatchNorm(3, backend=backend.name)
    with pytest.raises(ValueError, match=r"backward called before any forward"):
        bn.backward(to_backend(backend, np.ones((4, 3), np.float32)))
    assert bn.grad_weight is None and bn.grad_bias is None


def test_layer_backward_bad_dy(backend):
    bn = gpubn.BatchNorm(3, backend=backend.name)
    bn(to_backend(backend, np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)))
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward input"):
        bn.backward(to_backend(backend, np.ones((4, 4), np.float32)))
    with pytest.raises(TypeError, match=r"dy must have the dtype of the forward input"):
        bn.backward(to_backend(backend, np.ones((4, 3), np.float16)))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(num_features=0), ValueError, r"num_features must be at least 1"),
    (dict(num_features=2.5), TypeError, r"num_features must be an int"),
    (dict(num_features=3, eps=0), ValueError, r"eps must be a positive"),
    (dict(num_features=3, momentum=2), ValueError, r"momentum must be in \[0, 1\]"),
    (dict(num_features=3, dtype="int32"), TypeError, r"dtype must be float16, float32 or float64"),
])
def test_layer_constructor_rejects(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gpubn.BatchNorm(**kwargs)


def test_load_state_dict_rejects_and_leaves_state():
    bn = gpubn.BatchNorm(3)
    good = bn.state_dict()
    bad_shape = dict(good, running_mean=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"state\['running_mean'\] must have shape \(3,\)"):
        bn.load_state_dict(dict(bad_shape, weight=np.full(3, 7, np.float32)))
    np.testing.assert_array_equal(bn.weight, 1)   # nothing written before the check failed
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        bn.load_state_dict({k: v for k, v in good.items() if k != "bias"})


@pytest.mark.parametrize("name", ["batch_norm_forward", "batch_renorm_forward",
                                  "sync_batch_norm_forward"])
def test_pytorch_positional_order_is_refused(name):
    """``torch.nn.functional.batch_norm(x, running_mean, running_var)`` order:
    every parameter after x is keyword-only, so such a call raises instead of
    taking the running statistics for weight and bias."""
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"positional argument"):
        getattr(gpubn, name)(x, rm, rv)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def _plain_cases():
    """Inputs and channel axes around the edges of the common case."""
    rng = np.random.default_rng(1)
    x4 = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    return [
        (x4, 1), (x4, -1), (x4, 3), (x4, -4), (x4, 4), (x4, -5), (x4, True), (x4, np.int64(1)),
        (x4.astype(np.float16), 1), (x4.astype(np.float64), 0), (x4.astype(np.int32), 1),
        (x4.transpose(0, 2, 3, 1), 3), (np.asfortranarray(x4), 1), (x4[:, :, ::2], 1),
        (x4[0, 0], 0), (x4[0, 0, 0], 0), (x4[:0], 1), (x4.tolist(), 1),
    ]


@pytest.mark.parametrize("case", range(len(_plain_cases())))
def test_the_common_case_test_accepts_only_what_the_full_checks_pass(case):
    """plain_input, the one-test path of a forward's input, agrees with the
    checks it stands for: it answers None or the axis check_input returns,
    for an input check_owned passes whose layout is the identity and whose
    canonical view is the reshape.  Inputs that are not plain go the full
    way and keep their messages."""
    from gpubn import _validation as V
    from gpubn.backends import get_backend
    x, axis = _plain_cases()[case]
    be = get_backend("numpy")
    got = V.plain_input(x, axis, be)
    if got is None:
        return
    assert got == V.check_input(x, axis, "x")
    V.check_owned(x, be, "x")
    assert V.layout_order(x, got) == V.identity_order(x.ndim)
    shape3 = V.canonical_shape(x.shape, got)
    view = V.canonical_view(x, got, np)
    assert view.shape == shape3 and np.shares_memory(view, x)


def test_the_common_case_test_takes_the_usual_inputs():
    """The test above must not pass by answering None: the usual
    C-contiguous inputs take the one-test path."""
    from gpubn import _validation as V
    from gpubn.backends import get_backend
    be = get_backend("numpy")
    x = np.zeros((2, 3, 4, 5), np.float32)
    assert V.plain_input(x, 1, be) == 1 and V.plain_input(x, -1, be) == 3
    assert V.plain_input(x.astype(np.float64), 0, be) == 0
    assert V.plain_input(np.asfortranarray(x), 1, be) is None
    assert V.plain_input(x, True, be) is None                  # a bool is not an axis
