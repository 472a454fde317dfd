"""gpubn.fold_batch_norm against PyTorch's fusion helpers and against running
the unfused pair (a layer, then an eval-mode batch norm)."""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from gpubn.backends.cuda import CudaBackend
from conftest import torch_or_skip

RNG = np.random.default_rng(18)


def _bn_state(c, dtype=np.float32, affine=True):
    state = {"running_mean": RNG.standard_normal(c).astype(dtype),
             "running_var": RNG.uniform(0.2, 3.0, c).astype(dtype)}
    if affine:
        state["weight"] = RNG.uniform(0.5, 2.0, c).astype(dtype)
        state["bias"] = RNG.standard_normal(c).astype(dtype)
    return state


def _bn_layer(c, eps=1e-3, **kwargs):
    bn = gpubn.BatchNorm(c, eps=eps, dtype="float64", backend="numpy", **kwargs)
    state = _bn_state(c, np.float64, affine=bn.affine)
    state["num_batches_tracked"] = np.int64(3)
    bn.load_state_dict(state)
    return bn.eval()


# float32 in and out against PyTorch's helpers run on the same values in
# float64: ours is the float64 result rounded once to float32 (half an ulp);
# 4 eps bounds that with room.
F32 = dict(rtol=4 * np.finfo(np.float32).eps, atol=4 * np.finfo(np.float32).eps)


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv_against_torch_fuse_conv_bn_weights(with_bias):
    torch = torch_or_skip()
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    w = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(6).astype(np.float32) if with_bias else None
    st = _bn_state(6)
    eps = 1e-3
    t = {k: torch.from_numpy(v).double() for k, v in st.items()}
    ew, eb = fuse_conv_bn_weights(torch.from_numpy(w).double(),
                                  None if b is None else torch.from_numpy(b).double(),
                                  t["running_mean"], t["running_var"], eps, t["weight"], t["bias"])
    fw, fb = gpubn.fold_batch_norm(w, b, st, eps=eps)
    assert fw.dtype == np.float32 and fb.dtype == np.float32 and fw.shape == w.shape
    np.testing.assert_allclose(fw, ew.detach().numpy(), **F32)
    np.testing.assert_allclose(fb, eb.detach().numpy(), **F32)


def test_conv_transpose_output_axis_1_against_torch():
    torch = torch_or_skip()
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    w = RNG.standard_normal((3, 5, 2, 2))          # ConvTranspose2d(3, 5): (in, out, kh, kw)
    b = RNG.standard_normal(5)
    st = _bn_state(5, np.float64)
    t = {k: torch.from_numpy(v) for k, v in st.items()}
    ew, eb = fuse_conv_bn_weights(torch.from_numpy(w), torch.from_numpy(b), t["running_mean"],
                                  t["running_var"], 1e-5, t["weight"], t["bias"], transpose=True)
    fw, fb = gpubn.fold_batch_norm(w, b, st, axis=1)
    np.testing.assert_allclose(fw, ew.detach().numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(fb, eb.detach().numpy(), rtol=1e-13, atol=1e-14)


def test_linear_against_torch_fuse_linear_bn_weights():
    torch = torch_or_skip()
    from torch.nn.utils.fusion import fuse_linear_bn_weights

    w = RNG.standard_normal((4, 7))
    b = RNG.standard_normal(4)
    st = _bn_state(4, np.float64)
    t = {k: torch.from_numpy(v) for k, v in st.items()}
    ew, eb = fuse_linear_bn_weights(torch.from_numpy(w), torch.from_numpy(b), t["running_mean"],
                                    t["running_var"], 1e-5, t["weight"], t["bias"])
    fw, fb = gpubn.fold_batch_norm(w, b, st)
    np.testing.assert_allclose(fw, ew.detach().numpy(), rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(fb, eb.detach().numpy(), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_then_bn_layer_equals_the_folded_linear(affine, with_bias):
    """u @ W.T + b through a gpubn BatchNorm in eval mode (its eps used) is
    the folded layer's output (float64: equal to rounding)."""
    u = RNG.standard_normal((16, 7))
    w = RNG.standard_normal((5, 7))
    b = RNG.standard_normal(5) if with_bias else None
    bn = _bn_layer(5, affine=affine)
    unfused = bn(u @ w.T + (0 if b is None else b))
    fw, fb = gpubn.fold_batch_norm(w, b, bn)
    np.testing.assert_allclose(u @ fw.T + fb, unfused, rtol=1e-12, atol=1e-12)


def test_conv_then_bn_layer_equals_the_folded_conv():
    torch = torch_or_skip()
    conv = torch.nn.functional.conv2d
    u = torch.from_numpy(RNG.standard_normal((2, 3, 6, 6)))
    w = RNG.standard_normal((4, 3, 3, 3))
    b = RNG.standard_normal(4)
    bn = _bn_layer(4)
    unfused = bn(conv(u, torch.from_numpy(w), torch.from_numpy(b), padding=1).numpy())
    fw, fb = gpubn.fold_batch_norm(w, b, bn)
    folded = conv(u, torch.from_numpy(fw), torch.from_numpy(fb), padding=1).numpy()
    np.testing.assert_allclose(folded, unfused, rtol=1e-12, atol=1e-12)


def test_batch_renorm_layer_folds_with_running_std():
    u = RNG.standard_normal((8, 3))
    w = RNG.standard_normal((4, 3))
    b = RNG.standard_normal(4)
    rn = gpubn.BatchRenorm(4, dtype="float64", backend="numpy")
    for _ in range(3):                       # moves running_mean / running_std off 0 / 1
        rn(RNG.standard_normal((32, 4)) * 3 + 1)
    rn.weight[...] = RNG.uniform(0.5, 2, 4)
    rn.bias[...] = RNG.standard_normal(4)
    rn.eval()
    fw, fb = gpubn.fold_batch_norm(w, b, rn)
    np.testing.assert_allclose(u @ fw.T + fb, rn(u @ w.T + b), rtol=1e-12, atol=1e-12)


def test_computed_in_float64_and_rounded_once_to_the_weight_dtype():
    """float16 weight and float32 state: the float16 result is the float64
    result rounded once (a float16 computation would differ in the last bit
    for some of these 4096 values)."""
    w = RNG.standard_normal((64, 64)).astype(np.float16)
    b = RNG.standard_normal(64).astype(np.float16)
    st = _bn_state(64)
    fw, fb = gpubn.fold_batch_norm(w, b, st)
    s = st["weight"].astype(np.float64) / np.sqrt(st["running_var"].astype(np.float64) + 1e-5)
    ew = (w.astype(np.float64) * s[:, None]).astype(np.float16)
    eb = ((b.astype(np.float64) - st["running_mean"]) * s + st["bias"]).astype(np.float16)
    assert fw.dtype == np.float16 and fb.dtype == np.float16
    np.testing.assert_array_equal(fw, ew)
    np.testing.assert_array_equal(fb, eb)
    naive = (w * s.astype(np.float16)[:, None])            # float16 arithmetic
    assert (naive != ew).any(), "the data do not tell float16 from float64 arithmetic"


def test_bfloat16_weight():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    w = RNG.standard_normal((8, 5)).astype(ml_dtypes.bfloat16)
    st = _bn_state(8)
    fw, fb = gpubn.fold_batch_norm(w, None, st)
    s = st["weight"].astype(np.float64) / np.sqrt(st["running_var"].astype(np.float64) + 1e-5)
    assert fw.dtype == w.dtype and fb.dtype == w.dtype
    np.testing.assert_array_equal(fw, (w.astype(np.float64) * s[:, None]).astype(w.dtype))


@pytest.mark.parametrize("bad,exc,match", [
    (dict(weight=np.ones((4, 3)), bias=np.ones(5)), ValueError, r"bias must have shape \(4,\)"),
    (dict(axis=2), ValueError, r"axis=2 is out of range"),
    (dict(weight=np.ones((4, 3), np.int32)), TypeError, r"weight must have a floating-point"),
    (dict(weight=[[1.0]]), TypeError, r"weight must be an array"),
    (dict(bn=object()), TypeError, r"bn must be a BatchNorm layer or its state dict"),
    (dict(bn={"running_mean": np.zeros(4)}), ValueError, r"exactly one of 'running_var'"),
    (dict(bn={"running_var": np.ones(4)}), ValueError, r"has no 'running_mean'"),
    (dict(bn={"running_mean": np.zeros(3), "running_var": np.ones(3)}), ValueError,
     r"bn running_mean must have shape \(4,\)"),
    (dict(eps=0.0), ValueError, r"eps must be a positive finite number"),
])
def test_bad_arguments_name_the_argument(bad, exc, match):
    args = dict(weight=np.ones((4, 3)), bias=np.ones(4),
                bn={"running_mean": np.zeros(4), "running_var": np.ones(4)}, axis=0)
    args.update(bad)
    eps = args.pop("eps", None)
    with pytest.raises(exc, match=match):
        gpubn.fold_batch_norm(args["weight"], args["bias"], args["bn"], args["axis"], eps=eps)


def test_layer_without_running_statistics_or_with_a_second_eps_is_refused():
    bn = gpubn.BatchNorm(4, track_running_stats=False, backend="numpy")
    with pytest.raises(ValueError, match=r"track_running_stats=False.*cannot be folded"):
        gpubn.fold_batch_norm(np.ones((4, 3)), None, bn)
    with pytest.raises(ValueError, match=r"eps is taken from the bn layer"):
        gpubn.fold_batch_norm(np.ones((4, 3)), None, _bn_layer(4), eps=1e-3)


_CUDA_REASON = CudaBackend.unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_REASON is not None, reason=_CUDA_REASON or "")
def test_cupy_arrays_stay_on_the_device():
    import cupy

    w = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(6).astype(np.float32)
    st = _bn_state(6)
    ew, eb = gpubn.fold_batch_norm(w, b, st)
    gw, gb = gpubn.fold_batch_norm(cupy.asarray(w), cupy.asarray(b),
                                   {k: cupy.asarray(v) for k, v in st.items()})
    assert isinstance(gw, cupy.ndarray) and isinstance(gb, cupy.ndarray)
    np.testing.assert_allclose(gw.get(), ew, **F32)
    np.testing.assert_allclose(gb.get(), eb, **F32)
    with pytest.raises(TypeError, match=r"bn running_mean must be a cupy array like weight"):
        gpubn.fold_batch_norm(cupy.asarray(w), cupy.asarray(b), st)
