"""The ordinary suite catches the mutations of the kernels that a kinder
emulator let through: each test plants one defect in a copy of kernels/ and
shows emu reporting it, next to the unmodified kernels running clean."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from gpubn import kernels as catalog
from conftest import assert_same_under_schedules, unavailable_reason
from gpubn.backends import get_backend
from gpubn.backends import emu as emu_backend
from gpubn.backends.numpy_backend import NumpyBackend
from gpubn.emu.compiler import cache_dir

_REASON = unavailable_reason("emu")

pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

RESET = "            *counter = 0u;\n"


def _clear_caches():
    catalog.read_source.cache_clear()
    catalog.headers_fingerprint.cache_clear()
    emu_backend._module.cache_clear()


@pytest.fixture
def plant(monkeypatch):
    """plant(old, new, source="gpubn_common.cuh"): the kernels with one edit
    to ``source`` (the edit must apply exactly once).  The mutant lives in a
    directory named after its content under emu's cache, so its compiled
    modules are cached like any."""

    def apply(old: str, new: str, source: str = "gpubn_common.cuh") -> None:
        kernels = catalog.kernels_dir()
        text = (Path(kernels) / source).read_text()
        assert text.count(old) == 1, f"the mutation no longer applies: {old!r}"
        digest = hashlib.sha256(catalog.headers_fingerprint().encode() + source.encode() + b"\0"
                                + old.encode() + b"\0" + new.encode())
        copy = cache_dir() / "mutants" / digest.hexdigest()[:16]
        if not copy.is_dir():
            staging = Path(tempfile.mkdtemp(dir=cache_dir()))
            shutil.copytree(kernels, staging / "kernels")
            (staging / "kernels" / source).write_text(text.replace(old, new))
            copy.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(staging / "kernels", copy)
            except OSError:          # another process made it first
                pass
            shutil.rmtree(staging, ignore_errors=True)
        monkeypatch.setattr(catalog, "kernels_dir", lambda: os.fspath(copy))
        _clear_caches()

    yield apply
    monkeypatch.undo()
    _clear_caches()


def _x(shape=(8, 3, 256), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _check_stats(stats, x3):
    ref = NumpyBackend().bn_stats(x3)
    # float32 Welford merges over m = 2048 values: relative error bound ~ m * eps32
    np.testing.assert_allclose(stats.mean, ref.mean, rtol=0, atol=2048 * np.finfo(np.float32).eps)
    np.testing.assert_allclose(stats.m2, ref.m2, rtol=2048 * np.finfo(np.float32).eps)


class ReusingBackend(emu_backend.EmuBackend):
    """Keeps one counter buffer across launches, as a backend caching its
    workspace (or a captured graph replayed) would: correct only because the
    kernels leave the counters zero."""

    def __init__(self):
        super().__init__()
        self.counters = np.zeros(64, np.uint32)

    def _launch_counters(self, n: int):
        return self.counters[:n]


def test_workspace_counters_belong_to_one_launch():
    backend = emu_backend.EmuBackend()
    from gpubn.launch import reduce_launch

    cfg = reduce_launch("stats", (8, 3, 256), "float", True, backend._device(), backend.tuning)
    assert cfg.splits > 1
    (p1, c1), (p2, c2) = backend._workspace(cfg), backend._workspace(cfg)
    assert not np.shares_memory(c1, c2) and not np.shares_memory(p1, p2)
    assert c1.dtype == np.uint32 and c1.size == cfg.counters and not c1.any()


def test_counters_kept_across_launches_give_correct_second_launches():
    backend = ReusingBackend()
    for seed in range(3):
        x3 = _x(seed=seed)
        _check_stats(backend.bn_stats(x3), x3)
    assert not backend.counters.any()


def test_a_counter_the_last_block_does_not_reset_is_caught(plant):
    plant(RESET, "")
    x3 = _x()
    from gpubn.emu import KernelError

    with pytest.raises(KernelError, match=r"kernel 'bn_stats_nchw' left 3 of 3 arrival counters non-zero "
                                          r"\(counter 0 = \d+\): the last block .* must reset its counter"):
        get_backend("emu").bn_stats(x3)
    # and what it would have done to a backend reusing the counters: a wrong second launch
    backend = ReusingBackend()
    backend._launch = super(emu_backend.EmuBackend, backend)._launch      # without the check
    _check_stats(backend.bn_stats(x3), x3)
    with pytest.raises(AssertionError):
        _check_stats(backend.bn_stats(x3), x3)


PUBLISH = "    __threadfence();  // publish this thread's partial before the block is counted\n"
SEE = "            __threadfence();  // see every other block's partial\n"


@pytest.mark.parametrize("fence", [PUBLISH, SEE], ids=["writer-fence", "reader-fence"])
@pytest.mark.parametrize("shape", [(8, 3, 256), (500, 12, 1)], ids=["nchw", "nhwc"])
def test_a_missing_fence_in_the_last_block_handshake_is_caught(plant, fence, shape):
    x3 = _x(shape)
    _check_stats(get_backend("emu").bn_stats(x3), x3)              # the kernels as they are: clean
    plant(fence, "")
    from gpubn.emu import RaceError

    with pytest.raises(RaceError, match=r"inter-block race \(read-after-write hazard\) .* of argument [34] \(uint8 array .*"
                                        r"kernel 'gpubn::bn_stats_n(chw|hwc)<float, float.*loads it after block"):
        get_backend("emu").bn_stats(x3)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_layer_norm_backward_clean_and_identical_under_schedule_seeds(dtype):
    # the weight-gradient reduction merges partials through the last-block
    # handshake; under every schedule it runs clean (all checks, inter-block
    # racecheck included) and gives the same bits
    backend = get_backend("emu")
    rng = np.random.default_rng(5)
    rows, n = 300, 33
    from gpubn.launch import reduce_launch

    assert reduce_launch("grad", (rows, n, 1), "float", False, backend._device(), backend.tuning).splits > 1
    x2 = rng.standard_normal((rows, n)).astype(dtype)
    dy2 = rng.standard_normal((rows, n)).astype(dtype)
    weight = rng.standard_normal(n).astype(np.float32)
    _, mean, rstd = backend.ln_forward(x2, weight, None, 1e-5)
    assert_same_under_schedules(lambda: backend.ln_backward(dy2, x2, mean, rstd, weight, True),
                                seeds=(1, 2, 3))


# -- the residual-block epilogue --------------------------------------------------------

def _epilogue_outputs(layout, read_once=None):
    """emu's (its read-once kernels forced on or off, or as planned) and the
    reference's y = relu(bn(x) + z) and its dresidual, dx."""
    import dataclasses

    import gpubn
    from gpubn.backends.emu import EMU_TUNING, EmuBackend

    shape, axis = ((4, 3, 64), 1) if layout == "nchw" else ((64, 8), 1)
    rng = np.random.default_rng(3)
    x, z, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    out = {}
    emu_backend = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=read_once))
    for name, backend in (("emu", emu_backend), ("numpy", "numpy")):
        y, saved = gpubn.batch_norm_forward(x, axis=axis, backend=backend, residual=z,
                                            activation="relu")
        dx, _, _, dres = gpubn.batch_norm_backward(dy, saved)
        out[name] = (y, dres, dx)
    return out


def _check_epilogue(out):
    (y, dres, dx), (y_ref, dres_ref, dx_ref) = out["emu"], out["numpy"]
    # float32 batch norm over 256 values plus one add: well inside 1e-5
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(dres, np.where(y > 0, dres_ref, 0))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)


# (each planted copy loads its own compiled modules into the test process,
# whose memory mappings are limited: one plant per defect)

@pytest.mark.parametrize("read_once", [False, True], ids=["two-pass", "read-once"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_epilogue_unmodified_runs_clean(layout, read_once):
    _check_epilogue(_epilogue_outputs(layout, read_once))


def test_epilogue_residual_dropped_is_caught(plant):
    plant("        if (residual) v += Acc(element(in.z, j));\n", "", "bn_forward.cu")
    with pytest.raises(AssertionError):
        _check_epilogue(_epilogue_outputs("nchw"))


@pytest.mark.parametrize("layout,read_once", [("nchw", False), ("nhwc", False), ("nchw", True),
                                              ("nhwc", True)])
def test_epilogue_mask_passing_zeros_is_caught(plant, layout, read_once):
    """A ReLU mask that lets the gradient through where y == 0 (the
    forward's ReLU, which shares the test, still gives 0 there), in the
    two-pass and the read-once backward."""
    old = "    return !(v <= Acc(0));"
    plant(old, old.replace("<=", "<"))
    with pytest.raises(AssertionError, match="dres|Arrays are not equal"):
        _check_epilogue(_epilogue_outputs(layout, read_once))


# -- the read-once forward's grid barrier ---------------------------------------------

def _read_once_forward():
    import dataclasses

    from gpubn.backends.emu import EMU_TUNING, EmuBackend

    be = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=True))
    x = _x((5, 3, 1000))   # two splits per channel: partials cross blocks
    return be.bn_forward_train(x, None, None, None, None, 0.1, 1e-5)


def test_read_once_unmodified_runs_clean():
    _read_once_forward()


def test_read_once_barrier_without_publishing_fence_is_a_race(plant):
    from gpubn import emu

    plant("        __threadfence();  // publish this block's partials before it is counted\n", "",
          "bn_persistent.cu")
    with pytest.raises(emu.RaceError):
        _read_once_forward()


def _read_once_forward_staged():
    """The read-once forward on a device whose registers cannot hold the
    tensor (test_read_once.STAGING_DEVICE): values staged in shared memory."""
    import dataclasses

    from gpubn import emu
    from gpubn.backends.emu import EMU_TUNING, EmuBackend
    from test_read_once import STAGING_DEVICE

    be = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=True),
                    device_attributes=STAGING_DEVICE)
    with emu.recording() as log:
        be.bn_forward_train(_x((6, 3, 1000)), None, None, None, None, 0.1, 1e-5)
    assert log[0].shared_mem > 0


def test_read_once_staged_unmodified_runs_clean():
    _read_once_forward_staged()


def test_read_once_staging_read_by_another_thread_is_a_race(plant):
    """Each thread reads back only the values it staged, so no barrier
    stands between the staging stores and their loads.  A thread storing
    into its neighbour's slot (and reading its own, the neighbour's store)
    needs one: emu's block race checker reports the exchange."""
    from gpubn import emu

    plant("    t.each_staged([&](int k, long long off) { stage[stage_at(k)] = x[off]; });\n",
          "    t.each_staged([&](int k, long long off) { stage[stage_at(k) ^ 1] = x[off]; });\n",
          "bn_persistent.cu")
    with pytest.raises(emu.RaceError, match="shared"):
        _read_once_forward_staged()


MERGE = "            state = S::merge(state, S::load_volatile(mine + i));\n"


def test_a_merge_that_depends_on_the_last_block_is_caught_by_the_schedule_guard(plant):
    """The last block of a channel merges the partials starting from its own
    split: the sum is rounded in an order that depends on which block came
    last, so the results differ between schedules (no check of a single run
    can see it; test_emu_schedules.py's guard does)."""
    x3 = _x((4, 3, 51))
    backend = get_backend("emu")

    def stats():
        s = backend.bn_stats(x3)
        return s.mean, s.m2

    assert_same_under_schedules(stats)            # the kernels as they are
    plant(MERGE, "            state = S::merge(state, S::load_volatile(mine + (i + blockIdx.y) % splits));\n")
    _check_stats(backend.bn_stats(x3), x3)        # each run alone is right to rounding
    with pytest.raises(AssertionError, match=r"result \d depends on the block schedule: seed \d"):
        assert_same_under_schedules(stats)
