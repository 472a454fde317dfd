"""Planted defects: each small kernel carries one bug that a GPU would turn into
wrong results (or a hang) only sometimes; emu must catch each, every time, with
a message that says what, where and who.  Correct kernels run clean."""

from __future__ import annotations

import numpy as np
import pytest

emu = pytest.importorskip("gpubn.emu")
if not emu.available():  # pragma: no cover - machines without g++
    pytest.skip("no C++ compiler for the emu backend", allow_module_level=True)

SRC = r"""
// Planted: `<=` lets thread n store one element past the end.
extern "C" __global__ void oob_write(float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) y[i] = 1.0f;
}

// Planted: reads the right neighbour without checking the last element.
extern "C" __global__ void off_by_one_read(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + x[i + 1];
}

// Planted: reads the left neighbour, including x[-1].
extern "C" __global__ void underflow_read(const double* x, double* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i - 1];
}

extern "C" __global__ void deref(const int* p, int* out) { out[threadIdx.x] = p[threadIdx.x]; }

// Planted: indexes dynamic shared memory past `shared_mem`.
extern "C" __global__ void dyn_oob(float* y) {
    extern __shared__ float s[];
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x];
}

// Neighbour exchange through shared memory; `sync` selects the fixed version.
extern "C" __global__ void neighbour(const float* x, float* y, int sync) {
    __shared__ float s[256];
    s[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    if (sync) __syncthreads();              // planted (sync == 0): missing barrier
    y[blockIdx.x * blockDim.x + threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

// Planted (sync == 0): the second write overwrites a value another thread may
// not have read yet -- write-after-read across a loop iteration.
extern "C" __global__ void reuse(const float* x, float* y, int sync) {
    __shared__ float s[64];
    float acc = 0.f;
    for (int it = 0; it < 2; ++it) {
        s[threadIdx.x] = x[it * blockDim.x + threadIdx.x];
        __syncthreads();
        acc += s[blockDim.x - 1 - threadIdx.x];
        if (sync) __syncthreads();
    }
    y[threadIdx.x] = acc;
}

// A warp exchanging through shared memory: needs __syncwarp (threads of a warp
// are scheduled independently since Volta).
extern "C" __global__ void warp_exchange(const int* x, int* y, int sync) {
    __shared__ int s[32];
    s[threadIdx.x] = x[threadIdx.x];
    if (sync) __syncwarp();
    y[threadIdx.x] = s[threadIdx.x ^ 1];
}

// Shuffles exchange registers, never shared memory: no race, no barrier needed.
extern "C" __global__ void shuffle_exchange(const int* x, int* y) {
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 1);
}

// Planted: a barrier inside a branch only half of the block takes.
extern "C" __global__ void divergent_barrier(float* y) {
    if (threadIdx.x < 16) {
        __syncthreads();
        y[threadIdx.x] = 1.0f;
    }
}

// Two __syncthreads() calls on the two sides of a branch: one block-wide
// barrier (bar.sync 0) on sm_70+, so every thread passes it.
extern "C" __global__ void split_barriers(float* y) {
    if (threadIdx.x % 2) { y[threadIdx.x] = 1.0f; __syncthreads(); }
    else { __syncthreads(); y[threadIdx.x] = 2.0f; }
}

// Planted: one side of the branch passes two barriers, the other side one.
extern "C" __global__ void uneven_barriers(float* y) {
    if (threadIdx.x % 2) { __syncthreads(); y[threadIdx.x] = 1.0f; __syncthreads(); }
    else { __syncthreads(); y[threadIdx.x] = 2.0f; }
}

// The row loop branches on threadIdx before each barrier, and g++ duplicates
// the barrier calls into both branches (tail duplication): the threads of one
// source-level barrier arrive from different call sites.
extern "C" __global__ void row_broadcast(const float* in, float* out, long long rows) {
    __shared__ float s[8];
    for (long long rb = (long long)blockIdx.x * blockDim.y; rb < rows; rb += (long long)gridDim.x * blockDim.y) {
        const long long r = rb + threadIdx.y;
        if (threadIdx.x == 0 && r < rows) s[threadIdx.y] = in[r];
        __syncthreads();
        if (r < rows) out[r * blockDim.x + threadIdx.x] = s[threadIdx.y];
        __syncthreads();
    }
}

// One thread hands a value to another through a __shared__ scalar (every
// access at an offset the compiler knows).  Planted unless `sync` orders them:
// 1 = __syncthreads(), 2 = __syncwarp() (enough only within a warp).
extern "C" __global__ void handoff(const float* x, float* y, int writer, int reader, int sync) {
    __shared__ float v;
    if (threadIdx.x == writer) v = x[0];
    if (sync == 1) __syncthreads();
    if (sync == 2) __syncwarp();
    if (threadIdx.x == reader) y[0] = v;
}

// Planted (sync == 0): two threads of different warps store to s[1].
extern "C" __global__ void two_writers(float* y, int sync) {
    __shared__ float s[2];
    if (threadIdx.x == 0) s[1] = 1.0f;
    if (sync) __syncthreads();
    if (threadIdx.x == 33) s[1] = 2.0f;
    __syncthreads();
    if (threadIdx.x == 0) y[0] = s[1];
}

// Planted: early return of the tail, then a block-wide barrier.
extern "C" __global__ void early_return(const float* x, float* y, int n) {
    __shared__ float s[64];
    int i = threadIdx.x;
    if (i >= n) return;
    s[i] = x[i];
    __syncthreads();
    y[i] = s[n - 1 - i];
}

// Planted: a full-mask shuffle after half of the warp has returned.
extern "C" __global__ void shuffle_after_exit(const int* x, int* y) {
    if (threadIdx.x >= 16) return;
    y[threadIdx.x] = __shfl_down_sync(0xffffffffu, x[threadIdx.x], 1);
}

// Atomics on the same shared word from every thread: no race.
extern "C" __global__ void shared_atomics(int* out) {
    __shared__ int total;
    if (threadIdx.x == 0) total = 0;
    __syncthreads();
    atomicAdd(&total, (int)threadIdx.x);
    __syncthreads();
    if (threadIdx.x == 0) out[0] = total;
}

// Planted: the tree reduction assumes a power-of-two block; with 48 threads the
// first step reads tile[32..63], of which 48..63 no thread wrote.
extern "C" __global__ void tail_reduce(const float* x, float* out) {
    __shared__ float tile[64];
    tile[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    for (unsigned s = 32; s > 0; s >>= 1) {
        if (threadIdx.x < s) tile[threadIdx.x] += tile[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = tile[0];
}

extern "C" __global__ void trap_kernel(int* y) { if (threadIdx.x == 3) __trap(); y[threadIdx.x] = 1; }
"""


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, filename="planted.cu")


# ---------------------------------------------------------------- memcheck
def test_out_of_bounds_write_is_caught_and_does_not_happen(mod):
    backing = np.zeros(80, np.float32)
    y = backing[:60]                                      # the kernel sees 60 elements
    # the default schedule (blocks in order), whatever GPUBN_EMU_SEED says: the
    # last assert checks that block 0 ran before block 1 hit the bad store
    with emu.options(seed=None), pytest.raises(emu.MemcheckError) as info:
        mod.get_function("oob_write")((2,), (32,), (y, np.int32(60)))
    e = info.value
    assert (e.kernel, e.block, e.thread, e.access, e.size) == ("oob_write", (1, 0, 0), (28, 0, 0), "store", 4)
    assert (e.buffer, e.offset) == (0, 240)
    assert "invalid 4-byte store" in str(e) and "kernel 'oob_write', block (1, 0, 0), thread (28, 0, 0)" in str(e)
    assert ("nearest buffer: argument 0 (240 bytes, float32 array of shape (60,)), offset 240 "
            "(element 60, 0 bytes past its end)") in str(e)
    assert backing[60] == 0.0                             # the bad store never happened
    np.testing.assert_array_equal(y, 1.0)                 # the launch ran up to it


def test_off_by_one_read(mod):
    x = np.arange(50, dtype=np.float32)
    y = np.zeros_like(x)
    with pytest.raises(emu.MemcheckError, match=r"invalid 4-byte load .* kernel 'off_by_one_read', "
                                                r"block \(1, 0, 0\), thread \(17, 0, 0\).*argument 0 "
                                                r"\(200 bytes, float32 array of shape \(50,\)\), offset 200 "
                                                r"\(element 50, 0 bytes past its end\)") as info:
        mod.get_function("off_by_one_read")((2,), (32,), (x, y, np.int32(50)))
    assert info.value.access == "load" and info.value.buffer == 0


def test_read_before_start(mod):
    x = np.ones(40)
    y = np.zeros(40)
    with pytest.raises(emu.MemcheckError, match=r"8-byte load.*thread \(0, 0, 0\).*argument 0 \(320 bytes, float64 "
                                                r"array of shape \(40,\)\), offset -8 \(8 bytes before its start\)"):
        mod.get_function("underflow_read")((2,), (32,), (x, y, np.int32(40)))


def test_null_pointer(mod):
    with pytest.raises(emu.MemcheckError, match=r"4-byte load at 0x0 in kernel 'deref'.*null pointer"):
        mod.get_function("deref")(1, 4, (np.uint64(0), np.zeros(4, np.int32)))


def test_none_is_not_a_null_pointer(mod):
    # CuPy's RawKernel passes None as a garbage address, not NULL: code relying
    # on it would pass here and crash on the GPU, so emu refuses it
    with pytest.raises(TypeError, match=r"argument 0: None is not a null pointer.*np\.uint64\(0\)"):
        mod.get_function("deref")(1, 4, (None, np.zeros(4, np.int32)))


def test_dynamic_shared_out_of_bounds(mod):
    y = np.zeros(64, np.float32)
    with pytest.raises(emu.MemcheckError, match=r"thread \(32, 0, 0\).*out of bounds of dynamic shared "
                                                r"memory; offset 128 of dynamic shared memory \(shared_mem=128"):
        mod.get_function("dyn_oob")(1, 64, (y,), shared_mem=32 * 4)
    mod.get_function("dyn_oob")(1, 64, (y,), shared_mem=64 * 4)
    np.testing.assert_array_equal(y, 1.0)


def test_memcheck_off_lets_the_access_through(mod):
    backing = np.arange(60, dtype=np.float32)
    x = backing[:50]
    y = np.zeros(50, np.float32)
    with emu.options(memcheck=False):
        mod.get_function("off_by_one_read")((2,), (32,), (x, y, np.int32(50)))
    # the check was what stopped it: the load past the end happened (it read the
    # staged copy's page, not backing[50]: arguments run in their own copies)
    np.testing.assert_array_equal(y[:49], x[:49] + x[1:])
    assert y[49] == 49.0


# ---------------------------------------------------------------- racecheck
def test_missing_syncthreads_before_reading_shared(mod):
    x = np.arange(128, dtype=np.float32)
    y = np.zeros_like(x)
    # both blocks race; the default schedule (blocks in order, whatever
    # GPUBN_EMU_SEED says) makes block 0 the one reported
    with emu.options(seed=None), pytest.raises(emu.RaceError) as info:
        mod.get_function("neighbour")((2,), (64,), (x, y, np.int32(0)))
    e = info.value
    assert e.kernel == "neighbour" and e.block == (0, 0, 0)
    assert {e.thread, e.other_thread} == {(0, 0, 0), (1, 0, 0)}
    assert e.memory == "static shared" and e.variable == "neighbour::s"
    assert "racecheck" in str(e) and "'neighbour::s'" in str(e) and "thread (1, 0, 0)" in str(e)
    mod.get_function("neighbour")((2,), (64,), (x, y, np.int32(1)))    # the fix runs clean
    np.testing.assert_array_equal(y, np.roll(x.reshape(2, 64), -1, axis=1).ravel())


def test_buffer_reused_across_iterations_without_barrier(mod):
    x = np.arange(128, dtype=np.float32)
    y = np.zeros(64, np.float32)
    with pytest.raises(emu.RaceError, match=r"read-after-write hazard at byte 124 of __shared__ variable "
                                            r"'reuse::s'") as info:
        mod.get_function("reuse")(1, 64, (x, y, np.int32(0)))
    # thread 31 overwrote s[31] for the next iteration before thread 32 read this one's
    assert (info.value.thread, info.value.other_thread) == ((32, 0, 0), (31, 0, 0))
    assert info.value.access == "load" and info.value.other_access == "store"
    mod.get_function("reuse")(1, 64, (x, y, np.int32(1)))
    np.testing.assert_array_equal(y, x[:64][::-1] + x[64:][::-1])


def test_warp_exchange_through_shared_needs_syncwarp(mod):
    x = np.arange(32, dtype=np.int32)
    y = np.zeros_like(x)
    with pytest.raises(emu.RaceError, match=r"hazard .* 'warp_exchange::s'.*no __syncthreads\(\) "
                                            r"\(or __syncwarp\(\) within a warp\)"):
        mod.get_function("warp_exchange")(1, 32, (x, y, np.int32(0)))
    mod.get_function("warp_exchange")(1, 32, (x, y, np.int32(1)))
    np.testing.assert_array_equal(y, x ^ 1)


def test_write_after_read():
    src = r'''extern "C" __global__ void k(int* y) {
        __shared__ int s[32];
        s[threadIdx.x] = threadIdx.x;
        __syncthreads();
        int v = s[(threadIdx.x + 1) % 32];
        s[threadIdx.x] = v;                     // thread t-1 may not have read s[t] yet
        y[threadIdx.x] = v;
    }'''
    with pytest.raises(emu.RaceError, match=r"write-after-read hazard at byte 4 of __shared__ variable 'k::s'.*"
                                            r"thread \(1, 0, 0\) stores it after thread \(0, 0, 0\) loaded it"):
        emu.RawModule(code=src).get_function("k")(1, 32, (np.zeros(32, np.int32),))


@pytest.mark.parametrize("writer, reader, hazard", [
    (0, 40, "read-after-write"),      # another warp, reader runs after the writer
    (0, 5, "read-after-write"),       # same warp, no __syncwarp
    (40, 0, "write-after-read"),      # the reader's fiber runs first
])
def test_handoff_through_a_shared_scalar_needs_a_barrier(mod, writer, reader, hazard):
    x = np.array([7.0], np.float32)
    y = np.zeros(1, np.float32)
    fn = mod.get_function("handoff")
    with pytest.raises(emu.RaceError, match=rf"{hazard} hazard at byte 0 of __shared__ variable 'handoff::v'") as info:
        fn(1, 64, (x, y, np.int32(writer), np.int32(reader), np.int32(0)))
    e = info.value
    later, earlier = (reader, writer) if hazard == "read-after-write" else (writer, reader)
    assert (e.thread, e.other_thread) == ((later, 0, 0), (earlier, 0, 0))
    assert (e.access, e.other_access) == (("load", "store") if hazard == "read-after-write" else ("store", "load"))
    assert e.memory == "static shared" and e.variable == "handoff::v" and e.offset >= 0
    if writer // 32 != reader // 32:    # __syncwarp does not order threads of different warps
        with pytest.raises(emu.RaceError, match=r"hazard at byte 0 of __shared__ variable 'handoff::v'"):
            fn(1, 64, (x, y, np.int32(writer), np.int32(reader), np.int32(2)))
    else:
        fn(1, 64, (x, y, np.int32(writer), np.int32(reader), np.int32(2)))
        assert y[0] == 7.0
    y[0] = 0.0
    fn(1, 64, (x, y, np.int32(writer), np.int32(reader), np.int32(1)))    # the fix runs clean
    assert y[0] == 7.0


def test_write_after_write(mod):
    y = np.zeros(1, np.float32)
    with pytest.raises(emu.RaceError, match=r"write-after-write hazard at byte 4 of __shared__ variable "
                                            r"'two_writers::s'") as info:
        mod.get_function("two_writers")(1, 64, (y, np.int32(0)))
    assert (info.value.thread, info.value.other_thread) == ((33, 0, 0), (0, 0, 0))
    assert info.value.access == info.value.other_access == "store"
    mod.get_function("two_writers")(1, 64, (y, np.int32(1)))
    assert y[0] == 2.0


def test_shuffles_and_atomics_are_not_races(mod):
    x = np.arange(32, dtype=np.int32)
    y = np.zeros_like(x)
    mod.get_function("shuffle_exchange")(1, 32, (x, y))
    np.testing.assert_array_equal(y, x ^ 1)
    out = np.zeros(1, np.int32)
    mod.get_function("shared_atomics")(1, 128, (out,))
    assert out[0] == sum(range(128))


def test_racecheck_off(mod):
    x = np.arange(32, dtype=np.int32)
    y = np.zeros_like(x)
    with emu.options(racecheck=False):
        mod.get_function("warp_exchange")(1, 32, (x, y, np.int32(0)))


def test_race_in_dynamic_shared_memory():
    src = r'''extern "C" __global__ void k(int* y) {
        extern __shared__ int s[];
        s[threadIdx.x] = threadIdx.x;
        y[threadIdx.x] = s[(threadIdx.x + 5) % blockDim.x];
    }'''
    with pytest.raises(emu.RaceError, match=r"at byte 20 of dynamic shared memory") as info:
        emu.RawModule(code=src).get_function("k")(1, 64, (np.zeros(64, np.int32),), shared_mem=256)
    assert info.value.memory == "dynamic shared" and info.value.offset == 20


def test_uninitialized_shared_read_in_a_partial_block(mod):
    x = np.ones(64, np.float32)
    out = np.zeros(1, np.float32)
    mod.get_function("tail_reduce")(1, 64, (x, out))                  # full block: clean
    assert out[0] == 64
    with pytest.raises(emu.MemcheckError, match=r"4-byte load .* thread \(16, 0, 0\): load of shared memory that no "
                                                r"thread of this block had written .*uninitialized.*byte 192 of "
                                                r"__shared__ variable 'tail_reduce::tile'"):
        mod.get_function("tail_reduce")(1, 48, (x, out))
    with emu.options(initcheck=False):
        mod.get_function("tail_reduce")(1, 48, (x, out))              # reads the previous launch's data


# ---------------------------------------------------------------- deadlock
def test_barrier_in_divergent_branch_is_a_deadlock_not_a_hang(mod):
    # all three blocks deadlock; the default schedule (blocks in order, whatever
    # GPUBN_EMU_SEED says) makes block 0 the one reported
    with emu.options(seed=None), pytest.raises(emu.DeadlockError) as info:
        mod.get_function("divergent_barrier")((3,), (32,), (np.zeros(32, np.float32),))
    msg = str(info.value)
    assert info.value.kernel == "divergent_barrier" and info.value.block == (0, 0, 0)
    assert "deadlock in kernel 'divergent_barrier', block (0, 0, 0)" in msg
    assert "threads 0-15 wait at __syncthreads #1" in msg and "threads 16-31 have exited" in msg


def test_barriers_on_two_branches_are_one_block_barrier(mod):
    y = np.zeros(8, np.float32)
    mod.get_function("split_barriers")(1, 8, (y,))
    np.testing.assert_array_equal(y, np.tile([2.0, 1.0], 4))
    # ... but a branch that passes more barriers than the other waits forever
    with pytest.raises(emu.DeadlockError, match=r"threads 0, 2, 4, 6 have exited; "
                                                r"threads 1, 3, 5, 7 wait at __syncthreads #1 "):
        mod.get_function("uneven_barriers")(1, 8, (y,))


def test_barrier_duplicated_by_the_compiler_is_one_barrier(mod):
    rows = 7
    x = np.arange(1, rows + 1, dtype=np.float32)
    out = np.zeros(rows * 32, np.float32)
    mod.get_function("row_broadcast")(1, (32, 4), (x, out, np.int64(rows)))
    np.testing.assert_array_equal(out, np.repeat(x, 32))


def test_early_return_before_barrier(mod):
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(emu.DeadlockError, match=r"threads 0-39 wait at __syncthreads #1.*threads 40-63 have exited"):
        mod.get_function("early_return")(1, 64, (x, np.zeros_like(x), np.int32(40)))
    y = np.zeros_like(x)
    mod.get_function("early_return")(1, 64, (x, y, np.int32(64)))          # no thread returns early
    np.testing.assert_array_equal(y, x[::-1])


def test_spin_waits():
    src = r'''
// thread 0 waits for thread 1's flag (legal since Volta, if racy without atomics)
extern "C" __global__ void flag_wait(volatile int* flag, int* out) {
    if (threadIdx.x == 0) { while (atomicAdd((int*)flag, 0) == 0) {} out[0] = 1; }
    if (threadIdx.x == 1) atomicExch((int*)flag, 1);
}
// planted: block 0 waits for block 1, which runs only after block 0 finished
extern "C" __global__ void wait_for_next_block(volatile int* flag) {
    if (blockIdx.x == 0) { while (flag[0] == 0) {} }
    else flag[0] = 1;
}
'''
    m = emu.RawModule(code=src)
    flag, out = np.zeros(1, np.int32), np.zeros(1, np.int32)
    m.get_function("flag_wait")(1, 2, (flag, out))
    assert out[0] == 1 and flag[0] == 1
    flag[:] = 0
    # the deadlock needs block 0 to start before block 1 (the default schedule,
    # whatever GPUBN_EMU_SEED says); a schedule that starts block 1 first lets
    # block 0 find the flag set, as a GPU may
    with emu.options(seed=None), pytest.raises(
            emu.DeadlockError, match=r"block \(0, 0, 0\): thread \(0, 0, 0\) spins: .* loads in a row of 4 "
                                     r"bytes at argument 0 at offset 0 returned the same value"):
        m.get_function("wait_for_next_block")(2, 1, (flag,))


def test_memcpy_and_memset_calls_are_checked():
    src = r'''#include <string.h>
extern "C" __global__ void k(const float* x, float* y, int n) {
    __shared__ float s[64];
    memset(s, 0, n * sizeof(float));
    __syncthreads();
    if (threadIdx.x == 0) memcpy(y, x, n * sizeof(float));
    y[n + threadIdx.x] = s[threadIdx.x];
}'''
    fn = emu.RawModule(code=src).get_function("k")
    x = np.arange(32, dtype=np.float32)
    y = np.full(64, -1, np.float32)
    with pytest.raises(emu.RaceError):            # every thread clears the whole array: write-write
        fn(1, 32, (x, y, np.int32(32)))
    with pytest.raises(emu.MemcheckError, match=r"128-byte load .*thread \(0, 0, 0\).*argument 0"):
        fn(1, 1, (x[:16].copy(), y, np.int32(32)))
    with emu.recording() as log:
        fn(1, 1, (x, y, np.int32(32)))
    np.testing.assert_array_equal(y[:33], np.r_[x, 0])
    assert log[0].buffers[0] == emu.Traffic(128, 0)


def test_shuffle_naming_an_exited_lane(mod):
    with pytest.raises(emu.KernelError, match=r"__shfl_down_sync with mask 0xffffffff names lane 16 "
                                              r"\(thread 16\), which has exited") as info:
        mod.get_function("shuffle_after_exit")(1, 32, (np.zeros(32, np.int32), np.zeros(32, np.int32)))
    assert not isinstance(info.value, emu.MemcheckError)


def test_trap(mod):
    with pytest.raises(emu.KernelError, match=r"thread \(3, 0, 0\): __trap\(\) was called"):
        mod.get_function("trap_kernel")(1, 8, (np.zeros(8, np.int32),))


def test_device_side_assert():
    src = r'''#include <assert.h>
extern "C" __global__ void k(const int* x) {
    assert(x[threadIdx.x] >= 0);
}'''
    fn = emu.RawModule(code=src).get_function("k")
    fn(1, 8, (np.arange(8, dtype=np.int32),))
    with pytest.raises(emu.KernelError, match=r"thread \(5, 0, 0\): assertion `x\[threadIdx.x\] >= 0' failed at "
                                              r"kernel\.cu:3"):
        fn(1, 8, (np.array([0, 1, 2, 3, 4, -1, 6, 7], np.int32),))


def test_stack_overflow_and_wild_access_do_not_kill_the_process():
    src = r'''
__device__ int deep(int n) {
    volatile int pad[64];
    pad[n & 63] = n;
    return n == 0 ? 0 : 1 + deep(n - 1) + pad[(n + 1) & 63] * 0;
}
extern "C" __global__ void rec(int* y, int n) { y[threadIdx.x] = deep(n); }
extern "C" __global__ void wild(int* y, long long off) { y[off] = 1; }
'''
    m = emu.RawModule(code=src)
    y = np.zeros(4, np.int32)
    with pytest.raises(emu.KernelError, match=r"thread \(0, 0, 0\): stack overflow: the thread used more than its "
                                              r"64 KiB stack"):
        m.get_function("rec")(1, 4, (y, np.int32(100000)))
    with emu.options(memcheck=False), pytest.raises(emu.KernelError, match=r"segmentation fault at address .*"
                                                                           r"memcheck is off"):
        m.get_function("wild")(1, 1, (y, np.int64(1 << 44)))
    m.get_function("rec")(1, 4, (y, np.int32(20)))
    np.testing.assert_array_equal(y, 20)


def test_module_usable_after_errors(mod):
    # an aborted launch leaves nothing behind: the next launch of the module is clean
    x = np.arange(64, dtype=np.float32)
    y = np.zeros_like(x)
    for _ in range(2):
        with pytest.raises(emu.RaceError):
            mod.get_function("neighbour")(1, 64, (x, y, np.int32(0)))
        mod.get_function("neighbour")(1, 64, (x, y, np.int32(1)))
    np.testing.assert_array_equal(y, np.roll(x, -1))


ALIGN_SRC = r"""
// Planted (off % 4 != 0): a float4 load at an address 4 * off bytes past a
// 16-byte boundary; the GPU faults with "misaligned address".
extern "C" __global__ void vec_load(const float* x, float* y, int off) {
    const float4 v = *reinterpret_cast<const float4*>(x + off + 4 * threadIdx.x);
    y[threadIdx.x] = v.x + v.y + v.z + v.w;
}
// Planted (off odd): an int load through a pointer two bytes off.
extern "C" __global__ void int_load(const unsigned short* x, int* y, int off) {
    y[threadIdx.x] = *reinterpret_cast<const int*>(x + off + 2 * threadIdx.x);
}
// Planted (off % 8 != 0): a double2 store into dynamic shared memory.
extern "C" __global__ void shared_store(float* y, int off) {
    extern __shared__ unsigned char s[];
    *reinterpret_cast<double2*>(s + off + 16 * threadIdx.x) = make_double2(1.0, 2.0);
    __syncthreads();
    y[threadIdx.x] = (float)reinterpret_cast<double2*>(s + off + 16 * threadIdx.x)->y;
}
"""


@pytest.fixture(scope="module")
def align_mod():
    return emu.RawModule(code=ALIGN_SRC)


def test_aligned_vector_loads_run_clean(align_mod):
    x = np.arange(64, dtype=np.float32)
    y = np.zeros(4, np.float32)
    align_mod.get_function("vec_load")(1, 4, (x, y, np.int32(4)))
    np.testing.assert_array_equal(y, x[4:20].reshape(4, 4).sum(axis=1))


@pytest.mark.parametrize("off", [1, 2, 3])
def test_misaligned_float4_load(align_mod, off):
    x = np.arange(64, dtype=np.float32)
    assert x.ctypes.data % 16 == 0
    y = np.zeros(4, np.float32)
    with pytest.raises(emu.MemcheckError, match=r"invalid 16-byte load .* misaligned address \(a 16-byte access "
                                                r"must be 16-byte aligned\); nearest buffer: argument 0") as info:
        align_mod.get_function("vec_load")(1, 4, (x, y, np.int32(off)))
    assert info.value.offset == 4 * off and info.value.buffer == 0 and info.value.size == 16


def test_misaligned_scalar_load(align_mod):
    x = np.arange(64, dtype=np.uint16)
    y = np.zeros(4, np.int32)
    align_mod.get_function("int_load")(1, 4, (x, y, np.int32(2)))
    with pytest.raises(emu.MemcheckError, match=r"invalid 4-byte load .* misaligned address") as info:
        align_mod.get_function("int_load")(1, 4, (x, y, np.int32(1)))
    assert info.value.offset == 2


def test_misaligned_shared_store(align_mod):
    y = np.zeros(2, np.float32)
    align_mod.get_function("shared_store")(1, 2, (y, np.int32(16)), shared_mem=64)
    np.testing.assert_array_equal(y, 2.0)
    with pytest.raises(emu.MemcheckError, match=r"invalid 16-byte store .* misaligned address.*offset 8 of "
                                                r"dynamic shared memory"):
        align_mod.get_function("shared_store")(1, 2, (y, np.int32(8)), shared_mem=64)


def test_pointer_walking_from_one_argument_into_the_next():
    # a and b are neighbours in memory (two halves of one allocation, as a
    # caching allocator may place them); a[n + i] is b[i] on the host, and a
    # per-buffer check would let it through.
    src = r"""
extern "C" __global__ void walk(const float* a, const float* b, float* y, int shift) {
    y[threadIdx.x] = a[threadIdx.x + shift] + b[0];
}
"""
    walk = emu.RawKernel(src, "walk")
    whole = np.arange(32, dtype=np.float32)
    a, b = whole[:16], whole[16:]
    y = np.zeros(4, np.float32)
    walk(1, 4, (a, b, y, np.int32(12)))                     # a[12..15]: clean
    np.testing.assert_array_equal(y, a[12:16] + b[0])
    with pytest.raises(emu.MemcheckError, match=r"thread \(2, 0, 0\): pointer from argument 0 reached argument 1 "
                                                r"at offset 0 .*argument 0 \(64 bytes.*offset 64") as info:
        walk(1, 4, (a, b, y, np.int32(14)))
    assert info.value.buffer == 0 and info.value.offset == 64 and info.value.address == b.ctypes.data


def test_the_same_array_twice_is_one_buffer():
    # in-place use: both pointers name one staged copy, and the result reaches the array
    src = r"""extern "C" __global__ void twice(const float* x, float* y) { y[threadIdx.x] = 2 * x[threadIdx.x]; }"""
    x = np.arange(8, dtype=np.float32)
    emu.RawKernel(src, "twice")(1, 8, (x, x))
    np.testing.assert_array_equal(x, 2 * np.arange(8))
    z = np.arange(8, dtype=np.float32)
    emu.RawKernel(src, "twice")(1, 4, (z[2:6], z[:4]))       # overlapping views
    np.testing.assert_array_equal(z[:4], 2 * np.arange(2, 6))


# ---------------------------------------------------------------- resource limits of the modelled device
LIMITS_SRC = r"""
__device__ float through_helper(float v) {
    __shared__ float t[1024];                       // 4 KiB, reached only through the helper
    t[threadIdx.x] = v;
    __syncthreads();
    return t[0];
}
// 40 KiB of static shared memory plus the launch's dynamic shared memory.
extern "C" __global__ void big_shared(float* y) {
    __shared__ float s[10240];
    extern __shared__ float d[];
    s[threadIdx.x] = 1.0f;
    d[threadIdx.x] = 2.0f;
    __syncthreads();
    y[threadIdx.x] = s[threadIdx.x] + d[threadIdx.x];
}
extern "C" __global__ void uses_helper(float* y) { y[threadIdx.x] = through_helper(1.0f); }
extern "C" __global__ void plain(float* y) { y[threadIdx.x] = 1.0f; }
struct Huge { char bytes[40000]; };
extern "C" __global__ void huge_param(Huge h, float* y) { y[threadIdx.x] = h.bytes[threadIdx.x]; }
"""


@pytest.fixture(scope="module")
def limits_mod():
    return emu.RawModule(code=LIMITS_SRC)


def test_static_shared_size_per_kernel(limits_mod):
    # each kernel counts the static shared memory it can reach, not the module's
    assert limits_mod.get_function("big_shared").shared_size_bytes == 40 * 1024
    assert limits_mod.get_function("uses_helper").shared_size_bytes == 4 * 1024
    assert limits_mod.get_function("plain").shared_size_bytes == 0
    assert limits_mod.get_function("plain").max_dynamic_shared_size_bytes == 48 * 1024
    assert limits_mod.get_function("big_shared").max_dynamic_shared_size_bytes == 8 * 1024


def test_shared_memory_above_48_kib_needs_the_opt_in():
    fn = emu.RawModule(code=LIMITS_SRC).get_function("big_shared")   # its own attribute state
    y = np.full(4, -1.0, np.float32)
    with pytest.raises(emu.LaunchError, match=r"^CUDA_ERROR_INVALID_VALUE: kernel 'big_shared': 40960 bytes of "
                                              r"static plus 16384 bytes of dynamic shared memory = 57344 bytes per "
                                              r"block, more than the 49152 .* unless the function opts in") as info:
        fn(1, 4, (y,), shared_mem=16 * 1024)
    assert info.value.cuda_error == "CUDA_ERROR_INVALID_VALUE"
    np.testing.assert_array_equal(y, -1.0)                             # refused before any thread ran
    fn(1, 4, (y,), shared_mem=8 * 1024)                               # 48 KiB in all: fine
    fn.max_dynamic_shared_size_bytes = 16 * 1024
    fn(1, 4, (y,), shared_mem=16 * 1024)
    np.testing.assert_array_equal(y, 3.0)
    with pytest.raises(emu.LaunchError, match=r"= 61440 bytes per block, .*unless the function opts in"):
        fn(1, 4, (y,), shared_mem=20 * 1024)
    limit = 227 * 1024 - 40 * 1024
    fn.max_dynamic_shared_size_bytes = limit
    with pytest.raises(emu.LaunchError, match=r"more than the 232448 a block may use on H100/H200"):
        fn(1, 4, (y,), shared_mem=limit + 16)
    with pytest.raises(emu.LaunchError, match=r"max_dynamic_shared_size_bytes must be an int in \[0, 191488\]"):
        fn.max_dynamic_shared_size_bytes = limit + 1


@pytest.mark.parametrize("grid, block, what", [
    (1, 1025, r"block \(1025, 1, 1\) exceeds CUDA's limits \(1024 threads"),
    (1, (1, 1, 65), r"block \(1, 1, 65\) exceeds"),
    ((1, 65536), 32, r"grid \(1, 65536, 1\) exceeds CUDA's limits"),
    ((1, 1, 65536), 32, r"grid \(1, 1, 65536\) exceeds"),
])
def test_launch_configuration_limits(limits_mod, grid, block, what):
    y = np.zeros(4, np.float32)
    with pytest.raises(emu.LaunchError, match=r"^CUDA_ERROR_INVALID_VALUE: kernel 'plain': " + what):
        limits_mod.get_function("plain")(grid, block, (y,))


def test_kernel_parameters_above_the_limit(limits_mod):
    y = np.zeros(4, np.float32)
    huge = np.zeros(1, dtype="V40000")[0]
    with pytest.raises(emu.LaunchError, match=r"CUDA_ERROR_INVALID_VALUE: kernel 'huge_param': 40008 bytes of "
                                              r"kernel parameters; at most 32764"):
        limits_mod.get_function("huge_param")(1, 4, (huge, y))


# ---------------------------------------------------------------- inter-block racecheck (global memory)
LAST_BLOCK_SRC = r"""
// Last-block reduction: every block stores its partial sum; the block that
// arrives last at the counter adds them up.  Planted: either fence left out.
extern "C" __global__ void last_block(const float* x, float* partials, unsigned int* counter, float* out,
                                      int fence_writer, int fence_reader) {
    __shared__ int is_last;
    float v = x[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) partials[blockIdx.x] = v;
    if (fence_writer) __threadfence();        // publish the partial before the block is counted
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned int ticket = atomicAdd(counter, 1u);
        is_last = ticket == gridDim.x - 1;
        if (is_last && fence_reader) __threadfence();   // see every other block's partial
    }
    __syncthreads();
    if (is_last && threadIdx.x < 32) {
        float s = 0.f;
        for (int b = threadIdx.x; b < gridDim.x; b += 32) s += ((volatile float*)partials)[b];
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) { *out = s; *counter = 0; }
    }
}
// Planted: a block reads its neighbour's slot, which nothing orders.
extern "C" __global__ void neighbour_slot(float* slots, float* out) {
    if (threadIdx.x == 0) slots[blockIdx.x] = (float)blockIdx.x;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = slots[(blockIdx.x + 1) % gridDim.x];
}
"""


@pytest.fixture(scope="module")
def last_block_mod():
    return emu.RawModule(code=LAST_BLOCK_SRC)


def _last_block(mod, fence_writer, fence_reader, seed=None):
    x = np.arange(12 * 32, dtype=np.float32)
    partials = np.zeros(12, np.float32)
    counter = np.zeros(1, np.uint32)
    out = np.zeros(1, np.float32)
    with emu.options(seed=seed):
        mod.get_function("last_block")(12, 32, (x, partials, counter, out, np.int32(fence_writer),
                                                 np.int32(fence_reader)))
    return out[0], x.sum(), counter[0]


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_last_block_reduction_with_both_fences_runs_clean(last_block_mod, seed):
    total, expected, counter = _last_block(last_block_mod, 1, 1, seed)
    assert total == expected and counter == 0


@pytest.mark.parametrize("fence_writer, fence_reader", [(0, 1), (1, 0), (0, 0)])
def test_last_block_reduction_without_a_fence_is_an_inter_block_race(last_block_mod, fence_writer, fence_reader):
    with pytest.raises(emu.RaceError, match=r"racecheck: inter-block race \(read-after-write hazard\) at byte \d+ "
                                            r"\(element \d+\) of argument 1 \(float32 array of shape \(12,\)\) in "
                                            r"kernel 'last_block': block \(11, 0, 0\) thread \(\d+, 0, 0\) loads it "
                                            r"after block \(\d+, 0, 0\) thread \(0, 0, 0\) stored it") as info:
        _last_block(last_block_mod, fence_writer, fence_reader)
    e = info.value
    assert e.memory == "global" and e.buffer == 1 and e.other_block != e.block and e.access == "load"
    assert e.other_access == "store" and e.other_thread == (0, 0, 0) and e.offset == 4 * e.other_block[0]


def test_reading_another_blocks_store_with_no_atomic_is_a_race(last_block_mod):
    slots = np.zeros(4, np.float32)
    out = np.zeros(4, np.float32)
    # blocks in order: block 0 loads slot 1 before block 1 stores it (write-after-read);
    # block 3 loads slot 0 after block 0 stored it (read-after-write)
    with emu.options(seed=None), pytest.raises(
            emu.RaceError, match=r"inter-block race \(write-after-read hazard\) at byte 4 .* block \(1, 0, 0\) "
                                 r"thread \(0, 0, 0\) stores it after block \(0, 0, 0\) thread \(0, 0, 0\) loaded "
                                 r"it, with no chain ordering them \(the reader's __threadfence\(\) after its load"):
        last_block_mod.get_function("neighbour_slot")(4, 32, (slots, out))
    for seed in range(4):
        with emu.options(seed=seed), pytest.raises(emu.RaceError, match=r"inter-block race \((read-after-write|"
                                                                        r"write-after-read) hazard\)"):
            last_block_mod.get_function("neighbour_slot")(4, 32, (slots, out))
    # one block: nothing to race with
    last_block_mod.get_function("neighbour_slot")(1, 32, (slots, out))
    assert out[0] == 0.0
    with emu.options(racecheck=False):
        last_block_mod.get_function("neighbour_slot")(4, 32, (slots, out))


def _partial_sums_left_out(mod, fence_writer, seeds):
    """The last-block reduction with race reports off, per seed: the result, and
    the sets of blocks whose partial it is missing (stale loads read the zeros
    the partials held before the launch), None where it is no such sum."""
    x = np.arange(12 * 32, dtype=np.float32)
    per_block = x.reshape(12, 32).sum(axis=1, dtype=np.float64)
    out = {}
    for seed in seeds:
        with emu.options(global_racecheck=False):
            total, expected, counter = _last_block(mod, fence_writer, 1, seed)
        assert counter == 0 and expected == per_block.sum()
        # float32 sums of integers below 2**24 are exact, so the missing blocks show exactly
        missing = [m for m in range(1 << 12)
                   if per_block.sum() - sum(per_block[b] for b in range(12) if m >> b & 1) == total]
        out[seed] = (total, missing[0] if missing else None)
    return out, per_block.sum()


def test_without_the_writers_fence_a_load_may_return_the_value_from_before_the_store(last_block_mod):
    # reports off: the race is not raised, but the last block may read a
    # partial as it was before the other block stored it (0), as on a GPU
    seeds = [None, *range(1, 9)]
    results, expected = _partial_sums_left_out(last_block_mod, 0, seeds)
    wrong = {seed: r for seed, r in results.items() if r[0] != expected}
    assert len(wrong) >= 1, results
    for seed, (total, missing) in wrong.items():
        # some partials read as 0, never the last block's own (so never all 12)
        assert missing is not None and 0 < bin(missing).count("1") < 12, (seed, total)
    # the same seed, the same schedule, the same stale loads
    again, _ = _partial_sums_left_out(last_block_mod, 0, list(wrong))
    assert again == wrong
    with pytest.raises(emu.RaceError, match=r"inter-block race \(read-after-write hazard\)"):
        _last_block(last_block_mod, 0, 1)       # reports on: the race itself


def test_with_both_fences_no_load_returns_an_old_value(last_block_mod):
    results, expected = _partial_sums_left_out(last_block_mod, 1, [None, *range(1, 9)])
    assert all(total == expected for total, _ in results.values()), results


def test_a_store_to_the_last_byte_of_an_odd_sized_buffer_at_a_page_end():
    # the old value is kept per 2 bytes; the byte after the buffer is not mapped
    src = r"""
extern "C" __global__ void last_byte(unsigned char* y) {
    if (threadIdx.x == 0 && blockIdx.x == 1) y[2] = 7;
}
"""
    page = np.zeros(3 * 4096, np.uint8)
    end = (-page.ctypes.data) % 4096 + 4096        # an index whose address is a multiple of 4096
    y = page[end - 3:end]
    assert y.ctypes.data % 2 == 1 and (y.ctypes.data + 3) % 4096 == 0
    for report in (True, False):
        y[:] = 0
        with emu.options(global_racecheck=report):
            emu.RawKernel(src, "last_byte")(2, 32, (y,))
        np.testing.assert_array_equal(y, [0, 0, 7])


def test_global_racecheck_off_keeps_shared_memory_racecheck(mod):
    x = np.arange(256, dtype=np.float32)
    y = np.zeros(256, np.float32)
    with emu.options(global_racecheck=False), pytest.raises(emu.RaceError, match=r"hazard at byte \d+ of "
                                                                                r"__shared__ variable"):
        mod.get_function("neighbour")(2, 128, (x, y, np.int32(0)))


# ---------------------------------------------------------------- concurrent blocks, cooperative launch
GRID_BARRIER_SRC = r"""
// A grid barrier written with an atomic and fences (no cooperative-groups header).
__device__ void grid_barrier(unsigned int* arrived) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(arrived, 1u);
        while (*(volatile unsigned int*)arrived < gridDim.x) {}
        __threadfence();
    }
    __syncthreads();
}
// Every block publishes a value, waits for all, then reads its neighbour's.
extern "C" __global__ void exchange(float* slots, unsigned int* arrived, float* out) {
    if (threadIdx.x == 0) slots[blockIdx.x] = (float)(blockIdx.x + 1);
    grid_barrier(arrived);
    out[blockIdx.x * blockDim.x + threadIdx.x] = slots[(blockIdx.x + 1) % gridDim.x];
}
// Rotates v in place: every block loads its neighbour's element, then stores
// its own.  Planted (sync == 0): nothing orders a block's load before the
// neighbour's store (write-after-read between blocks).
extern "C" __global__ void rotate(float* v, unsigned int* arrived, int sync) {
    float mine = 0.f;
    if (threadIdx.x == 0) mine = v[(blockIdx.x + 1) % gridDim.x];
    if (sync) grid_barrier(arrived);
    if (threadIdx.x == 0) v[blockIdx.x] = mine;
}
"""


def _exchange(fn, blocks, threads=32, **kwargs):
    slots = np.zeros(blocks, np.float32)
    arrived = np.zeros(1, np.uint32)
    out = np.full(blocks * threads, -1.0, np.float32)
    fn(blocks, threads, (slots, arrived, out), **kwargs)
    return out.reshape(blocks, threads)


@pytest.mark.parametrize("seed", [None, 1, 2])
def test_grid_barrier_under_a_cooperative_launch(seed):
    fn = emu.RawModule(code=GRID_BARRIER_SRC, enable_cooperative_groups=True).get_function("exchange")
    with emu.options(seed=seed):
        out = _exchange(fn, 6)
    np.testing.assert_array_equal(out, np.roll(np.arange(1, 7, dtype=np.float32), -1)[:, None] * np.ones(32))


def _rotate(sync, seed=None):
    fn = emu.RawModule(code=GRID_BARRIER_SRC, enable_cooperative_groups=True).get_function("rotate")
    v = np.arange(1, 7, dtype=np.float32)
    arrived = np.zeros(1, np.uint32)
    with emu.options(seed=seed):
        fn(6, 32, (v, arrived, np.int32(sync)))
    return v


def test_store_after_another_blocks_load_with_no_chain_is_a_write_after_read_race():
    # blocks started in order: block 0 loads v[1], then block 1 stores it
    with pytest.raises(emu.RaceError, match=r"^racecheck: inter-block race \(write-after-read hazard\) at byte 4 "
                                            r"\(element 1\) of argument 0 \(float32 array of shape \(6,\)\) in "
                                            r"kernel 'rotate': block \(1, 0, 0\) thread \(0, 0, 0\) stores it after "
                                            r"block \(0, 0, 0\) thread \(0, 0, 0\) loaded it, with no chain ordering "
                                            r"them") as info:
        _rotate(0)
    e = info.value
    assert (e.access, e.other_access, e.memory, e.buffer, e.offset) == ("store", "load", "global", 0, 4)
    assert e.block == (1, 0, 0) and e.other_block == (0, 0, 0)
    for seed in range(1, 5):    # other schedules: the load after the store, or before it
        with pytest.raises(emu.RaceError, match=r"inter-block race \((write-after-read|read-after-write) hazard\)"):
            _rotate(0, seed)


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_loads_ordered_before_the_stores_by_a_grid_barrier_run_clean(seed):
    np.testing.assert_array_equal(_rotate(1, seed), [2, 3, 4, 5, 6, 1])


def test_grid_barrier_cooperative_per_launch():
    # CuPy's Function.__call__(..., enable_cooperative_groups=True) on an ordinary module
    fn = emu.RawModule(code=GRID_BARRIER_SRC).get_function("exchange")
    out = _exchange(fn, 3, enable_cooperative_groups=True)
    np.testing.assert_array_equal(out[:, 0], [2, 3, 1])


def test_grid_barrier_under_an_ordinary_launch_is_a_deadlock():
    # an ordinary launch promises no co-residency: one block has not started
    fn = emu.RawModule(code=GRID_BARRIER_SRC).get_function("exchange")
    with pytest.raises(emu.DeadlockError, match=r"thread \(0, 0, 0\) spins: .* at argument 1 at offset 0 .*"
                                                r"a block that has not started: an ordinary launch does not make all "
                                                r"its blocks co-resident"):
        _exchange(fn, 4)


def test_cooperative_grid_too_large_to_be_co_resident():
    fn = emu.RawModule(code=GRID_BARRIER_SRC, enable_cooperative_groups=True).get_function("exchange")
    # 1024 threads x 64 registers fill an SM's 65536 registers: one block per SM
    assert fn.max_active_blocks_per_multiprocessor(1024) == 1
    assert fn.max_active_blocks_per_multiprocessor(256, 100 * 1024) == 2      # shared memory: 2 x 101 KiB
    assert fn.max_active_blocks_per_multiprocessor(32) == 32                  # blocks per SM
    slots = np.zeros(133, np.float32)
    arrived = np.zeros(1, np.uint32)
    out = np.full(133 * 1024, -1.0, np.float32)
    with pytest.raises(emu.LaunchError, match=r"^CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: kernel 'exchange': a "
                                              r"cooperative launch of 133 blocks, but at most 132 can be "
                                              r"co-resident") as info:
        fn(133, 1024, (slots, arrived, out))
    assert info.value.cuda_error == "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE"
    assert (out == -1).all() and arrived[0] == 0                                # nothing ran


def test_blocks_of_an_ordinary_launch_run_concurrently():
    # even blocks wait for the odd block after them: blocks run one after
    # another would deadlock, blocks interleaved (two at a time or more) do not
    src = r"""
extern "C" __global__ void pairs(unsigned int* flags, float* out) {
    if (threadIdx.x == 0) {
        if (blockIdx.x % 2 == 0) {
            while (*(volatile unsigned int*)&flags[blockIdx.x + 1] == 0u) {}
            __threadfence();
            out[blockIdx.x] = out[blockIdx.x + 1] + 1.0f;
        } else {
            out[blockIdx.x] = (float)blockIdx.x;
            __threadfence();
            atomicExch(&flags[blockIdx.x], 1u);
        }
    }
}
"""
    fn = emu.RawKernel(src, "pairs")
    flags = np.zeros(4, np.uint32)
    out = np.zeros(4, np.float32)
    fn(4, 32, (flags, out))
    np.testing.assert_array_equal(out, [2, 1, 4, 3])


HANDOFF_SRC = r"""
// Even blocks publish a value and raise a flag; the odd block after each waits
// for the flag, then reads the value.
// writer: 0 raises the flag with atomicExch, 1 with a volatile store.
// reader: 0 spins on a volatile load, 1 on an atomic, 2 on a plain load
//         (planted: the compiler may keep it in a register), 3 on a volatile
//         load with no fence after it (planted: the value is not ordered).
extern "C" __global__ void handoff(unsigned int* flags, float* vals, float* out, int writer, int reader) {
    if (threadIdx.x != 0) return;
    const unsigned int b = blockIdx.x;
    if (b % 2 == 0) {
        vals[b] = (float)(b + 1);
        __threadfence();
        if (writer == 0) atomicExch(&flags[b], 1u);
        else *(volatile unsigned int*)&flags[b] = 1u;
    } else {
        unsigned int* flag = &flags[b - 1];
        if (reader == 1) { while (atomicAdd(flag, 0u) == 0u) {} }
        else if (reader == 2) { while (*flag == 0u) {} }
        else { while (*(volatile unsigned int*)flag == 0u) {} }
        if (reader != 3) __threadfence();
        out[b] = vals[b - 1];
    }
}
"""


@pytest.fixture(scope="module")
def handoff():
    fn = emu.RawKernel(HANDOFF_SRC, "handoff")

    def run(writer, reader, seed=None):
        flags, vals, out = np.zeros(4, np.uint32), np.zeros(4, np.float32), np.zeros(4, np.float32)
        with emu.options(seed=seed):
            fn(4, 32, (flags, vals, out, np.int32(writer), np.int32(reader)))
        return out
    return run


@pytest.mark.parametrize("writer", [0, 1])
@pytest.mark.parametrize("reader", [0, 1])
@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_flag_handoff_with_volatile_or_atomic_loads_runs_clean(handoff, writer, reader, seed):
    np.testing.assert_array_equal(handoff(writer, reader, seed), [0, 1, 0, 3])


@pytest.mark.parametrize("writer", [0, 1])
def test_spinning_on_a_plain_load_of_a_flag_is_reported(handoff, writer):
    # blocks in order: block 0 raised the flag before block 1 loads it
    with pytest.raises(emu.RaceError, match=r"^racecheck: inter-block race \(non-volatile load hazard\) at byte 0 "
                                            r"\(element 0\) of argument 0 .* block \(1, 0, 0\) thread \(0, 0, 0\) "
                                            r"loads it with a plain load while block \(0, 0, 0\) thread \(0, 0, 0\) "
                                            r"writes it with an atomic or a volatile store") as info:
        handoff(writer, 2)
    e = info.value
    assert (e.access, e.other_access, e.buffer, e.offset, e.other_block) == ("load", "store", 0, 0, (0, 0, 0))


def test_a_plain_spin_started_before_the_flag_is_raised_is_reported_not_a_hang():
    # block 0 starts first and spins; the compiler moved its plain load out of
    # the loop, so the loop would never see block 1's atomicExch, on a GPU too
    # (blocks 0 and 1 run at once: an ordinary launch of 3 blocks runs 2 at a time)
    src = r"""
extern "C" __global__ void wait_plain(unsigned int* flag, float* out, int plain) {
    if (threadIdx.x != 0) return;
    if (blockIdx.x == 0) {
        if (plain) { while (*flag == 0u) {} }
        else { while (*(volatile unsigned int*)flag == 0u) {} }
        out[0] = 1.0f;
    } else {
        atomicExch(flag, 1u);
    }
}
"""
    fn = emu.RawKernel(src, "wait_plain")
    with emu.options(seed=None), pytest.raises(emu.DeadlockError, match=r"^deadlock in kernel 'wait_plain', block "
                                                                        r"\(0, 0, 0\): thread \(0, 0, 0\) runs on "
                                                                        r"without a memory access .* after its last "
                                                                        r"load \(argument 0 at offset 0\): a spin-wait "
                                                                        r"on a plain \(non-volatile\) load"):
        fn(3, 32, (np.zeros(1, np.uint32), np.zeros(1, np.float32), np.int32(1)))
    out = np.zeros(1, np.float32)
    with emu.options(seed=None):  # blocks 0 and 1 co-resident: the volatile spin hands over and ends
        fn(3, 32, (np.zeros(1, np.uint32), out, np.int32(0)))
    assert out[0] == 1.0


def test_a_volatile_flag_load_orders_nothing_without_a_fence(handoff):
    with pytest.raises(emu.RaceError, match=r"inter-block race \(read-after-write hazard\) at byte 0 \(element 0\) "
                                            r"of argument 1 .* block \(1, 0, 0\) thread \(0, 0, 0\) loads it after "
                                            r"block \(0, 0, 0\) thread \(0, 0, 0\) stored it"):
        handoff(0, 3)


def test_a_plain_store_racing_with_another_blocks_atomic_is_reported():
    src = r"""
extern "C" __global__ void reset_early(unsigned int* counter) {
    if (threadIdx.x == 0) {
        if (blockIdx.x == 0) atomicAdd(counter, 1u);
        else *counter = 0u;       // planted: block 0's atomic may come before or after
    }
}
"""
    fn = emu.RawKernel(src, "reset_early")
    with emu.options(seed=None), pytest.raises(emu.RaceError, match=r"inter-block race \(write-after-write hazard\) "
                                                                    r"at byte 0 .* block \(1, 0, 0\) thread "
                                                                    r"\(0, 0, 0\) stores it after block \(0, 0, 0\)"):
        fn(2, 32, (np.zeros(1, np.uint32),))
    for seed in range(1, 5):      # either order: the atomic after the store is reported too
        with emu.options(seed=seed), pytest.raises(emu.RaceError, match=r"write-after-write hazard"):
            fn(2, 32, (np.zeros(1, np.uint32),))


def test_cooperative_launch_beyond_what_emu_can_hold_is_refused_clearly():
    fn = emu.RawModule(code=GRID_BARRIER_SRC, enable_cooperative_groups=True).get_function("exchange")
    slots = np.zeros(128, np.float32)
    arrived = np.zeros(1, np.uint32)
    out = np.zeros(128 * 256, np.float32)
    with pytest.raises(emu.EmuError, match=r"runs 128 blocks of 256 threads at once, more than the 24576 threads "
                                           r"emu can hold"):
        fn(128, 256, (slots, arrived, out))
    assert arrived[0] == 0
