"""bfloat16 storage end to end: NumPy arrays of ``ml_dtypes.bfloat16`` on the
NumPy backends and emu, CuPy bfloat16 arrays on cuda.

bfloat16 runs the same tests as float16: the suite's float16 test functions
are called here with the bfloat16 dtype (their tolerances come from
``conftest.TOL``, where bfloat16's is derived from its 8-bit significand).
Statistics and parameters stay float32, outputs are rounded once to
bfloat16, to nearest even (checked on all 65536 values).
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
import test_batch_norm
import test_kernels
import test_layer_norm
import test_renorm
import test_traffic
from conftest import BFLOAT16, TOL, assert_close, to_backend, to_numpy

pytestmark = pytest.mark.skipif(BFLOAT16 is None,
                                reason="ml_dtypes (the bfloat16 NumPy dtype) is not installed")

needs_emu = pytest.mark.skipif(test_kernels.EMU is None, reason=test_kernels._REASON or "")


def test_tolerance_is_two_units_of_roundoff():
    """The bound conftest states: bfloat16 keeps 8 significant bits."""
    import ml_dtypes

    assert float(ml_dtypes.finfo(ml_dtypes.bfloat16).eps) == 2.0 ** -7   # = 2u, u = 2**-8
    rtol, atol = TOL[BFLOAT16]
    assert rtol == atol == 2.0 ** -7


# ------------------------------------------ the float16 tests, in bfloat16 ----
@pytest.mark.parametrize("shape,axis", test_batch_norm.SHAPES, ids=test_batch_norm.SHAPE_IDS)
@pytest.mark.parametrize("mode", ["train", "train-noaffine", "eval"])
def test_batch_norm_matches_torch(backend, shape, axis, mode):
    test_batch_norm.test_forward_backward_matches_torch(backend, shape, axis, BFLOAT16, mode)


@pytest.mark.parametrize("shape,axis", test_renorm.SHAPES, ids=test_renorm.SHAPE_IDS)
def test_batch_renorm_matches_paper_algorithm(backend, shape, axis):
    test_renorm.test_training_matches_paper_algorithm(backend, shape, axis, BFLOAT16)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_batch_renorm_with_rmax_1_dmax_0_is_batch_norm(backend, affine, monkeypatch):
    test_renorm.test_rmax_1_dmax_0_is_batch_norm(backend, BFLOAT16, affine, monkeypatch)


@pytest.mark.parametrize("shape,nshape", test_layer_norm.CASES, ids=test_layer_norm.CASE_IDS)
@pytest.mark.parametrize("mode", ["affine", "weight-only", "none"])
def test_layer_norm_matches_torch(backend, shape, nshape, mode):
    test_layer_norm.test_matches_torch(backend, shape, nshape, BFLOAT16, mode)


def test_layer_bfloat16_input_float32_state(backend, torch):
    c, shape = 3, (8, 3, 5)
    x = test_batch_norm.make_input(shape, 1, BFLOAT16)
    bn = gpubn.BatchNorm(c, backend=backend.name)
    y = bn(to_backend(backend, x))
    assert y.dtype == BFLOAT16 and bn.running_mean.dtype == np.float32
    ref = torch.nn.BatchNorm1d(c)
    expected = ref(torch.tensor(x.astype(np.float32))).detach().numpy()
    assert_close(y, expected, BFLOAT16, "y")
    assert_close(bn.running_mean, ref.running_mean.numpy(), np.float32, "running_mean")
    assert_close(bn.running_var, ref.running_var.numpy(), np.float32, "running_var")
    dx = bn.backward(to_backend(backend, np.ones(shape, BFLOAT16)))
    assert dx.dtype == BFLOAT16 and bn.grad_weight.dtype == np.float32


# ---------------------------------------------------- kernels on emu ----
@needs_emu
@pytest.mark.parametrize("case", test_kernels.CASE_IDS)
def test_kernels_stats_forward_backward(case):
    test_kernels.test_stats(case, BFLOAT16)
    test_kernels.test_forward_train(case, BFLOAT16, True)
    test_kernels.test_forward_eval_and_apply(case, BFLOAT16)
    for training in (True, False):
        test_kernels.test_backward(case, BFLOAT16, True, training)


@needs_emu
@pytest.mark.parametrize("shape", list(test_traffic.SHAPES.values()), ids=list(test_traffic.SHAPES))
def test_traffic_is_that_of_float16(shape):
    """2-byte elements: the same launches and element passes as float16."""
    for check in (test_traffic.test_forward_training, test_traffic.test_forward_inference,
                  test_traffic.test_backward_training,
                  test_traffic.test_backward_eval_is_one_pass_over_each_tensor,
                  test_traffic.test_stats_only):
        check(shape, BFLOAT16)


# ------------------------------------------------------------ rounding ----
def _all_values_times_3():
    """Every bfloat16 bit pattern as x, and 3 * x + 0 in float32: exact (at
    most 10 significant bits), -0 becoming +0 as in ``x * scale + shift``."""
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    with np.errstate(over="ignore", invalid="ignore"):      # Inf and NaN are among them
        prod = bits.view(BFLOAT16).astype(np.float32) * np.float32(3) + np.float32(0)
    return bits, prod


def _rounding_mismatches(y, prod):
    """Indices where bfloat16 ``y`` is not ``prod`` rounded to nearest even
    (ml_dtypes' cast is the oracle; any NaN matches a NaN)."""
    want = prod.astype(BFLOAT16)
    nan = np.isnan(prod)
    got_nan = np.isnan(y.astype(np.float32))
    return np.flatnonzero(np.where(nan, ~got_nan, y.view(np.uint16) != want.view(np.uint16)))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_output_rounds_to_nearest_even_on_every_bfloat16_value(backend):
    """All 65536 bfloat16 values through an eval forward with mean 0,
    invstd 1 and weight 3: the output is 3 * x rounded once, to nearest even
    (ties are frequent: a 10-bit significand rounded to 8), with overflow to
    Inf, subnormals kept and NaN staying NaN."""
    bits, prod = _all_values_times_3()
    x = bits.view(BFLOAT16).reshape(1, 1, -1)
    w = np.full(1, 3.0, np.float32)
    zero, one = np.zeros(1, np.float32), np.ones(1, np.float32)
    # eps far below float32's resolution at 1: invstd = 1/sqrt(1 + eps) is exactly 1
    with np.errstate(over="ignore", invalid="ignore"):
        y, _ = gpubn.batch_norm_forward(to_backend(backend, x), weight=to_backend(backend, w),
                                        running_mean=to_backend(backend, zero),
                                        running_var=to_backend(backend, one), training=False,
                                        eps=1e-30, backend=backend.name)
    y = to_numpy(y).reshape(-1)
    bad = _rounding_mismatches(y, prod)
    assert bad.size == 0, (f"{bad.size} values rounded wrongly, e.g. x bits "
                           f"{[hex(b) for b in bits[bad[:5]]]}: got "
                           f"{[hex(v) for v in y.view(np.uint16)[bad[:5]]]}")
    ties = np.isfinite(prod) & ((prod.view(np.uint32) & 0xFFFF) == 0x8000)
    assert ties.sum() > 1000, "the data have too few ties to tell rounding modes apart"


def test_rounding_check_catches_planted_defects():
    """The check above fails for a truncating conversion, for round half
    away from zero (differs only on ties), and for a NaN turned into a
    number; it passes the correct rounding."""
    _, prod = _all_values_times_3()
    u = prod.view(np.uint32)
    truncated = (u >> 16).astype(np.uint16).view(BFLOAT16)
    half_away = ((u + 0x8000) >> 16).astype(np.uint16).view(BFLOAT16)
    half_away[np.isnan(prod)] = prod[np.isnan(prod)].astype(BFLOAT16)
    nan_lost = prod.astype(BFLOAT16)
    nan_lost[np.flatnonzero(np.isnan(prod))[0]] = 0
    assert _rounding_mismatches(prod.astype(BFLOAT16), prod).size == 0
    assert _rounding_mismatches(truncated, prod).size > 10000
    assert _rounding_mismatches(half_away, prod).size > 1000
    assert _rounding_mismatches(nan_lost, prod).size == 1


# ---------------------------------------------------------- validation ----
def test_other_narrow_dtypes_are_refused_by_name(backend):
    import ml_dtypes

    xp = backend.xp
    x = np.ones((4, 3), ml_dtypes.float8_e4m3fn)
    if xp is not np:
        pytest.skip("float8 arrays are NumPy-only here")
    with pytest.raises(TypeError, match=r"x must have a floating-point dtype \(float16, "
                                        r"bfloat16, float32 or float64\), got float8_e4m3fn"):
        gpubn.batch_norm_forward(x, backend=backend.name)


def test_backward_wants_the_bfloat16_gradient(backend):
    x = to_backend(backend, test_batch_norm.make_input((4, 3, 5), 1, BFLOAT16))
    _, saved = gpubn.batch_norm_forward(x, backend=backend.name)
    with pytest.raises(TypeError, match=r"dy must have the dtype of the forward input "
                                        r"\(bfloat16\), got float32"):
        gpubn.batch_norm_backward(backend.xp.ones((4, 3, 5), np.float32), saved)


# --------------------------------------------------------------- cuda ----
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 3, 50), (300, 33, 1), (3, 2, 64)])
def test_cuda_matches_emu_bit_for_bit(shape):
    import test_cuda

    if test_cuda._REASON is not None:
        pytest.skip(test_cuda._REASON)
    test_cuda.test_cuda_matches_emu_for_the_same_launch(shape, BFLOAT16)
