"""The emu runtime runs CUDA C++ with CUDA's semantics: results, shuffles,
atomics, shared memory, block scheduling, traffic counts, argument checking,
compilation, options and caching."""

from __future__ import annotations

import numpy as np
import pytest

emu = pytest.importorskip("gpubn.emu")
if not emu.available():  # pragma: no cover - machines without g++
    pytest.skip("no C++ compiler for the emu backend", allow_module_level=True)

SRC = r"""
template <class T>
__global__ void copy(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        y[i] = x[i];
}

// Block sum of any block size: shared-memory tree (partial warps, tails), one
// double atomicAdd per block.
extern "C" __global__ void block_sum(const float* x, double* out, long long n) {
    extern __shared__ double part[];
    double v = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        v += x[i];
    part[threadIdx.x] = v;
    __syncthreads();
    unsigned p = 1;
    while (p < blockDim.x) p <<= 1;
    for (unsigned s = p >> 1; s > 0; s >>= 1) {
        if (threadIdx.x < s && threadIdx.x + s < blockDim.x) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) atomicAdd(out, part[0]);
}

// Warp-shuffle reduction (blockDim a multiple of 32), one partial per block.
extern "C" __global__ void warp_sum(const float* x, float* partial, int n) {
    __shared__ float warp_part[32];
    float v = 0.f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v += x[i];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    if (lane == 0) warp_part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < blockDim.x / warpSize ? warp_part[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) partial[blockIdx.x] = v;
    }
}

// out[k][lane] for k = idx, up, down, xor of `value` (per lane), at `width`.
template <class T>
__global__ void shuffles(const T* value, T* out, int arg, int width) {
    const int t = threadIdx.x;
    T v = value[t];
    out[0 * 32 + t] = __shfl_sync(0xffffffffu, v, arg, width);
    out[1 * 32 + t] = __shfl_up_sync(0xffffffffu, v, arg, width);
    out[2 * 32 + t] = __shfl_down_sync(0xffffffffu, v, arg, width);
    out[3 * 32 + t] = __shfl_xor_sync(0xffffffffu, v, arg, width);
}

extern "C" __global__ void votes(const int* pred, unsigned* out) {
    const int p = pred[threadIdx.x];
    const unsigned b = __ballot_sync(0xffffffffu, p);
    const int any = __any_sync(0xffffffffu, p), all = __all_sync(0xffffffffu, p);
    const int cnt = __syncthreads_count(p);
    if (threadIdx.x == 0) { out[0] = b; out[1] = any; out[2] = all; out[3] = cnt; out[4] = __activemask(); }
}

// Histogram: shared-memory bins (atomics on shared memory are not races), merged
// into global bins with atomicAdd.
extern "C" __global__ void histogram(const int* x, unsigned* bins, int n, int nbins) {
    extern __shared__ unsigned sbins[];
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) sbins[b] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&sbins[x[i]], 1u);
    __syncthreads();
    for (int b = threadIdx.x; b < nbins; b += blockDim.x) atomicAdd(&bins[b], sbins[b]);
}

// Reverses each block's tile through dynamic shared memory.
extern "C" __global__ void reverse_tiles(const float* x, float* y) {
    extern __shared__ __align__(16) float tile[];
    const int base = blockIdx.x * blockDim.x;
    tile[threadIdx.x] = x[base + threadIdx.x];
    __syncthreads();
    y[base + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// Each block takes a ticket: the order in which blocks ran.
extern "C" __global__ void tickets(unsigned* counter, unsigned* order) {
    if (threadIdx.x == 0) order[blockIdx.x] = atomicAdd(counter, 1u);
}

// 2-D and 3-D coordinates.
extern "C" __global__ void coords(int* out) {
    const int bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int nt = blockDim.x * blockDim.y * blockDim.z;
    int* o = out + 6 * (bx * nt + tx);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
}

// A private array indexed at run time lives on the thread's own stack.
extern "C" __global__ void local_array(const int* k, int* out) {
    int a[16];
    for (int i = 0; i < 16; ++i) a[i] = i * (int)threadIdx.x;
    out[threadIdx.x] = a[k[threadIdx.x] & 15];
}

// Scalars of every width arrive intact; vector types load 16 bytes at once.
extern "C" __global__ void scalars(const float4* v, double* out, signed char a, short b, int c,
                                   long long d, float e, double f, unsigned g) {
    float4 q = v[0];
    out[0] = a; out[1] = b; out[2] = c; out[3] = (double)d; out[4] = e; out[5] = f; out[6] = g;
    out[7] = q.x + q.y + q.z + q.w;
    out[8] = rsqrtf(4.0f) + __fdividef(1.0f, 4.0f) + fmaxf(1.0f, 2.0f) + min(3, 4) + max(2.5, 1.0);
    out[9] = __popc(0xF0u) + __clz(1) + __ffs(8) + __float_as_int(1.0f) / 1065353216;
}
"""

NAMES = ("copy<float>", "copy<double>", "shuffles<int>", "shuffles<double>")


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17", "--use_fast_math", "-arch=sm_90"),
                         name_expressions=NAMES)


@pytest.fixture(autouse=True)
def fresh_log():
    emu.clear_launch_log()
    yield


def test_copy_result_and_traffic(mod):
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    y = np.zeros_like(x)
    mod.get_function("copy<float>")((3,), (128,), (x, y, np.int64(x.size)))
    np.testing.assert_array_equal(y, x)
    (rec,) = emu.launch_log()
    assert rec.kernel == "copy<float>" and rec.grid == (3, 1, 1) and rec.block == (128, 1, 1)
    assert rec.bytes_loaded == 4 * x.size and rec.bytes_stored == 4 * x.size
    assert rec.buffers == {0: emu.Traffic(4 * x.size, 0), 1: emu.Traffic(0, 4 * x.size)}
    assert rec.sizes == {0: x.nbytes, 1: y.nbytes}   # argument sizes: traffic in passes


def test_recording_region_and_labels(mod):
    x = np.ones(100)
    y = np.zeros_like(x)
    fn = mod.get_function("copy<double>")
    fn(1, 32, (x, y, np.int64(100)))
    with emu.recording() as log, emu.label("op-a"):
        fn(2, 32, (x, y, np.int64(100)))
        fn(2, 32, (x, y, np.int64(50)))
    assert [r.bytes_loaded for r in log] == [800, 400]
    assert [r.label for r in log] == ["op-a", "op-a"]
    assert len(emu.launch_log()) == 3
    emu.clear_launch_log()
    assert emu.launch_log() == []


@pytest.mark.parametrize("n, block, grid", [(1, 32, 1), (33, 37, 2), (1000, 64, 3), (4097, 256, 5),
                                            (77, 1024, 1)])
def test_block_reduction_partial_warps_and_tails(mod, n, block, grid):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = np.zeros(1)
    mod.get_function("block_sum")((grid,), (block,), (x, out, np.int64(n)), shared_mem=8 * block)
    assert out[0] == pytest.approx(x.astype(np.float64).sum(), rel=1e-12, abs=1e-12)
    (rec,) = emu.launch_log()
    assert rec.buffers[0] == emu.Traffic(4 * n, 0)          # each element read once
    assert rec.buffers[1] == emu.Traffic(8 * grid, 8 * grid)  # one atomic per block


@pytest.mark.parametrize("n", [1, 200, 1000])
def test_warp_shuffle_reduction(mod, n):
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    partial = np.zeros(4, np.float32)
    mod.get_function("warp_sum")((4,), (96,), (x, partial, np.int32(n)))
    assert partial.sum(dtype=np.float64) == pytest.approx(x.sum(dtype=np.float64), rel=1e-5, abs=1e-5)


def _expected_shuffles(v, arg, width):
    """CUDA's definitions, written independently of the runtime."""
    lanes = np.arange(32)
    base = lanes - lanes % width
    idx = base + arg % width
    up = np.where(lanes - base >= arg, lanes - arg, lanes)
    down = np.where(lanes - base + arg < width, lanes + arg, lanes)
    x = lanes ^ arg
    xor = np.where(x < base + width, x, lanes)
    return np.stack([v[idx], v[up], v[down], v[xor]])


@pytest.mark.parametrize("dtype, name", [(np.int32, "shuffles<int>"), (np.float64, "shuffles<double>")])
@pytest.mark.parametrize("arg, width", [(5, 32), (3, 16), (1, 8), (2, 4), (9, 32), (6, 8)])
def test_shuffle_semantics(mod, dtype, name, arg, width):
    v = (np.arange(32) * 7 + 3).astype(dtype) * (1.5 if dtype == np.float64 else 1)
    out = np.zeros(4 * 32, dtype)
    mod.get_function(name)((1,), (32,), (v, out, np.int32(arg), np.int32(width)))
    np.testing.assert_array_equal(out.reshape(4, 32), _expected_shuffles(v, arg, width))


def test_votes(mod):
    pred = np.zeros(32, np.int32)
    pred[[1, 4, 31]] = 1
    out = np.zeros(5, np.uint32)
    mod.get_function("votes")((1,), (32,), (pred, out))
    assert out.tolist() == [(1 << 1) | (1 << 4) | (1 << 31), 1, 0, 3, 0xFFFFFFFF]
    out[:] = 0
    mod.get_function("votes")((1,), (32,), (np.ones(32, np.int32), out))
    assert out.tolist() == [0xFFFFFFFF, 1, 1, 32, 0xFFFFFFFF]


def test_histogram_atomics(mod):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 10, 3000).astype(np.int32)
    bins = np.zeros(10, np.uint32)
    mod.get_function("histogram")((3,), (64,), (x, bins, np.int32(x.size), np.int32(10)), shared_mem=40)
    np.testing.assert_array_equal(bins, np.bincount(x, minlength=10))


def test_dynamic_shared_memory(mod):
    x = np.arange(4 * 48, dtype=np.float32)
    y = np.zeros_like(x)
    mod.get_function("reverse_tiles")((4,), (48,), (x, y), shared_mem=48 * 4)
    np.testing.assert_array_equal(y, x.reshape(4, 48)[:, ::-1].ravel())


def test_dynamic_shared_memory_declared_at_namespace_scope():
    src = r'''
namespace lib {
extern __shared__ __align__(sizeof(double)) unsigned char smem[];
template <class T> __global__ void rotate(const T* x, T* y) {
    T* s = reinterpret_cast<T*>(smem);
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
}  // namespace lib
'''
    x = np.arange(40.0)
    y = np.zeros_like(x)
    emu.RawModule(code=src, name_expressions=("lib::rotate<double>",)).get_function("lib::rotate<double>")(
        1, 40, (x, y), shared_mem=320)
    np.testing.assert_array_equal(y, np.roll(x, -1))


def test_block_order_shuffled_by_seed(mod):
    fn = mod.get_function("tickets")

    def order(**kw):
        counter, o = np.zeros(1, np.uint32), np.zeros(50, np.uint32)
        with emu.options(**kw):
            fn((50,), (32,), (counter, o))
        return o

    # seed=None pins the default schedule (blocks start in order) against GPUBN_EMU_SEED
    np.testing.assert_array_equal(order(seed=None), np.arange(50))
    a, b = order(seed=1), order(seed=2)
    assert sorted(a.tolist()) == list(range(50))
    assert not np.array_equal(a, np.arange(50)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(order(seed=1), a)


def test_result_independent_of_block_order(mod):
    x = np.random.default_rng(3).standard_normal(5000).astype(np.float32)
    results = []
    for seed in (None, 0, 7):
        partial = np.zeros(8, np.float32)
        with emu.options(seed=seed):
            mod.get_function("warp_sum")((8,), (64,), (x, partial, np.int32(x.size)))
        results.append(partial)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_multidimensional_coordinates(mod):
    grid, block = (2, 3, 2), (4, 2, 3)
    nb, nt = 12, 24
    out = np.full((nb, nt, 6), -1, np.int32)
    mod.get_function("coords")(grid, block, (out,))
    bz, by, bx, tz, ty, tx = np.meshgrid(range(2), range(3), range(2), range(3), range(2), range(4),
                                         indexing="ij")
    expected = np.stack([tx, ty, tz, bx, by, bz], axis=-1).reshape(nb, nt, 6)
    np.testing.assert_array_equal(out, expected)


def test_local_array_on_thread_stack(mod):
    k = np.arange(64, dtype=np.int32)[::-1].copy()
    out = np.zeros(64, np.int32)
    mod.get_function("local_array")((1,), (64,), (k, out))
    np.testing.assert_array_equal(out, (k & 15) * np.arange(64))


def test_scalars_vectors_and_math(mod):
    v = np.array([1, 2, 3, 4], np.float32)
    out = np.zeros(10)
    mod.get_function("scalars")(1, 1, (v, out, np.int8(-3), np.int16(300), np.int32(-70000), np.int64(2**40),
                                       np.float32(0.25), np.float64(1e300), np.uint32(2**32 - 1)))
    assert out.tolist() == [-3, 300, -70000, 2**40, 0.25, 1e300, 2**32 - 1, 10, 0.5 + 0.25 + 2 + 3 + 2.5,
                            4 + 31 + 4 + 1]


# ---------------------------------------------------------------- argument checking
def test_argument_count_and_types(mod):
    fn = mod.get_function("copy<float>")
    x = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"'copy<float>' takes 3 arguments, got 2"):
        fn(1, 32, (x, x))
    with pytest.raises(TypeError, match=r"argument 2: the parameter is a 8-byte integer value, got numpy.int32"):
        fn(1, 32, (x, x, np.int32(4)))
    with pytest.raises(TypeError, match=r"argument 2: the parameter is a 8-byte integer value, got numpy.float64"):
        fn(1, 32, (x, x, np.float64(4)))
    with pytest.raises(TypeError, match=r"argument 1: the parameter is a pointer, got numpy.int64"):
        fn(1, 32, (x, np.int64(0), np.int64(4)))
    with pytest.raises(TypeError, match=r"argument 2: the parameter is a 8-byte integer value, got numpy.ndarray"):
        fn(1, 32, (x, x, x))
    with pytest.raises(TypeError, match=r"argument 1: the parameter is a pointer, got int$"):
        fn(1, 32, (x, 0, np.int64(4)))               # a Python int is reported as what the caller passed
    with pytest.raises(TypeError, match=r"argument 2: the parameter is a 8-byte integer value, got float$"):
        fn(1, 32, (x, x, 4.0))
    with pytest.raises(TypeError, match=r"argument 2: expected a NumPy array or a NumPy scalar, got str$"):
        fn(1, 32, (x, x, "4"))                       # (None is not offered as an option: it is refused)
    with pytest.raises(ValueError, match=r"argument 0: arrays must be contiguous"):
        fn(1, 32, (np.zeros(8, np.float32)[::2], x, np.int64(4)))
    with pytest.raises(TypeError, match=r"argument 1: arrays of Python objects"):
        fn(1, 32, (x, np.array([None] * 4), np.int64(4)))
    with pytest.raises(TypeError, match=r"args must be a tuple"):
        fn(1, 32, x)
    with pytest.raises(ValueError, match=r"block \(2048, 1, 1\) exceeds"):
        fn(1, 2048, (x, x, np.int64(4)))
    with pytest.raises(ValueError, match=r"grid dimensions must be >= 1"):
        fn((0,), 32, (x, x, np.int64(4)))
    assert emu.launch_log() == []                        # nothing ran
    fn(1, 32, (x, x, 4))                                 # Python int -> int64, as in CuPy


def test_raw_kernel():
    k = emu.RawKernel('extern "C" __global__ void twice(int* y) { y[threadIdx.x] *= 2; }', "twice")
    y = np.arange(5, dtype=np.int32)
    k((1,), (5,), (y,))
    np.testing.assert_array_equal(y, 2 * np.arange(5))
    assert (k.num_params, k.param_sizes, k.param_kinds) == (1, (8,), ("pointer",))


def test_unknown_kernel_name(mod):
    with pytest.raises(emu.EmuError, match=r"no kernel 'copy<int>'"):
        mod.get_function("copy<int>")


# ---------------------------------------------------------------- compilation
def test_compile_error_shows_compiler_output():
    bad = 'extern "C" __global__ void k(float* y) {\n  y[0] = undefined_name;\n}\n'
    with pytest.raises(emu.EmuCompileError, match=r"(?s)mine\.cu:2.*undefined_name") as info:
        emu.RawModule(code=bad, filename="mine.cu").get_function("k")
    assert "undefined_name" in info.value.log


@pytest.mark.parametrize("snippet, construct", [
    ('asm volatile("membar.gl;");', "inline assembly"),
    ("namespace cg = cooperative_groups;", "cooperative groups"),
    ("float v = tex1Dfetch<float>(t, 0);", "textures"),
    ("float v = __shfl_down(1.0f, 1);", "legacy warp intrinsics"),
])
def test_refused_constructs(snippet, construct):
    src = 'extern "C" __global__ void k(float* y) {\n' + snippet + "\n}\n"
    with pytest.raises(emu.EmuCompileError, match=rf"kernel\.cu:2: {construct}.* not supported"):
        emu.RawModule(code=src).compile()


def test_constant_memory():
    src = r'''__constant__ float coeff[3] = {0.5f, 2.0f, -1.0f};
extern "C" __global__ void k(const float* x, float* y) { y[threadIdx.x] = coeff[threadIdx.x % 3] * x[threadIdx.x]; }
'''
    x = np.arange(6, dtype=np.float32)
    y = np.zeros_like(x)
    emu.RawModule(code=src).get_function("k")(1, 6, (x, y))
    np.testing.assert_array_equal(y, x * np.tile([0.5, 2.0, -1.0], 2))
    with pytest.raises(emu.EmuCompileError, match=r"kernel\.cu:1: __constant__ variables without an initializer"):
        emu.RawModule(code="__constant__ float c[4];\n").compile()


def test_refusals_follow_the_preprocessor():
    src = r'''
#if defined(__CUDA_ARCH__)
#define FENCE() asm volatile("membar.gl;")
#else
#define FENCE() __threadfence()
#endif
extern "C" __global__ void k(int* y) { y[0] = 1; FENCE(); }
#ifndef GPUBN_EMU
__device__ int only_on_the_gpu;
#endif
'''
    y = np.zeros(1, np.int32)
    emu.RawModule(code=src).get_function("k")(1, 1, (y,))                # the GPU-only branches are not refused
    assert y[0] == 1
    with pytest.raises(emu.EmuCompileError, match=r"kernel\.cu:7: inline assembly"):
        emu.RawModule(code=src, options=("-D__CUDA_ARCH__=800",)).compile()


def test_device_global_variable_refused():
    src = '__device__ int counter;\nextern "C" __global__ void k(int* y) { y[0] = counter; }\n'
    with pytest.raises(emu.EmuCompileError, match=r"kernel\.cu:1: __device__ global variables"):
        emu.RawModule(code=src).compile()


def test_options_macros_and_includes(tmp_path):
    (tmp_path / "inc.cuh").write_text("#define FROM_HEADER 5\n")
    src = r'''
#include "inc.cuh"
extern "C" __global__ void k(int* y) {
#if defined(GPUBN_EMU) && !defined(__CUDACC__) && !defined(__CUDA_ARCH__) && !defined(__CUDACC_RTC__)
    y[0] = FOO + FROM_HEADER;
#endif
}
'''
    y = np.zeros(1, np.int32)
    emu.RawModule(code=src, options=(f"-I{tmp_path}", "-DFOO=37", "--gpu-architecture=compute_80",
                                     "-lineinfo")).get_function("k")(1, 1, (y,))
    assert y[0] == 42


def test_no_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(emu.EmuCompileError, match=r"needs a C\+\+ compiler.*no-such-compiler-xyz"):
        emu.RawModule(code='extern "C" __global__ void fresh_k(int* y) { y[0] = 1; }').compile()
    assert not emu.available()
    monkeypatch.delenv("CXX")
    assert emu.available()


def test_cache_compiles_each_source_once(tmp_path, monkeypatch):
    import shutil

    from gpubn.emu import compiler

    runtime_o = compiler._runtime_object(compiler.find_compiler())     # built once per machine
    monkeypatch.setenv("GPUBN_CACHE_DIR", str(tmp_path))
    (tmp_path / "emu").mkdir()
    shutil.copy(runtime_o, tmp_path / "emu" / runtime_o.name)
    calls = []
    real_run = compiler._run
    monkeypatch.setattr(compiler, "_run", lambda cmd, *a: (calls.append(cmd), real_run(cmd, *a)))
    src = 'extern "C" __global__ void k(int* y) { y[threadIdx.x] = threadIdx.x + 1000; }\n'

    def builds():      # compile steps (each followed by its link step)
        assert sum("-c" in c for c in calls) == sum("-shared" in c for c in calls)
        return sum("-c" in c for c in calls)

    a = emu.RawModule(code=src)
    b = emu.RawModule(code=src)
    assert a.library_path == b.library_path and builds() == 1      # memory cache
    compiler._memory_cache.clear()
    assert emu.RawModule(code=src).library_path == a.library_path and builds() == 1   # disk cache
    assert len(list((tmp_path / "emu").glob("module-*.so"))) == 1
    c = emu.RawModule(code=src, options=("-DX=1",))                   # other flags: another library
    assert c.library_path != a.library_path and builds() == 2
    y = np.zeros(4, np.int32)
    c.get_function("k")(1, 4, (y,))
    np.testing.assert_array_equal(y, [1000, 1001, 1002, 1003])


def test_option_validation():
    with pytest.raises(TypeError, match="unknown emu option 'memchek'"):
        emu.set_options(memchek=False)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        with emu.options(seed="3"):
            pass
    with pytest.raises(TypeError, match="global_racecheck must be a bool, got int"):
        emu.set_options(global_racecheck=0)
    assert emu.get_options().memcheck and emu.get_options().racecheck


def test_portable_ucontext_fibers(monkeypatch):
    # the fallback fiber switch (processors other than x86-64) runs barriers,
    # shuffles and deadlock detection too
    monkeypatch.setenv("GPUBN_EMU_FIBERS", "ucontext")
    src = r'''
extern "C" __global__ void k(const int* x, int* y, int dead) {
    __shared__ int s[64];
    int v = __shfl_xor_sync(0xffffffffu, x[threadIdx.x], 3);
    s[threadIdx.x] = v;
    if (dead && threadIdx.x == 5) return;
    __syncthreads();
    y[threadIdx.x] = s[63 - threadIdx.x];
}'''
    fn = emu.RawModule(code=src).get_function("k")
    x = np.arange(64, dtype=np.int32)
    y = np.zeros_like(x)
    fn(1, 64, (x, y, np.int32(0)))
    np.testing.assert_array_equal(y, (x ^ 3)[::-1])
    with pytest.raises(emu.DeadlockError, match=r"threads 0-4, 6-63 wait at __syncthreads #1 \(code offset 0x[0-9a-f]+\); thread 5 has exited"):
        fn(1, 64, (x, y, np.int32(1)))


def test_seed_from_environment_and_module_defaults(monkeypatch, mod):
    from gpubn.emu import config

    monkeypatch.setenv("GPUBN_EMU_SEED", "17")
    assert config._env_seed() == 17
    monkeypatch.setenv("GPUBN_EMU_SEED", "x")
    with pytest.raises(ValueError, match="GPUBN_EMU_SEED must be an integer, got 'x'"):
        config._env_seed()
    previous = emu.set_options(seed=4, racecheck=False)
    try:
        assert emu.get_options().seed == 4 and not emu.get_options().racecheck
        with emu.options(racecheck=True):
            assert emu.get_options() == emu.Options(True, True, True, 4)
    finally:
        emu.set_options(memcheck=previous.memcheck, racecheck=previous.racecheck, seed=previous.seed)
    assert emu.get_options() == previous


def test_launches_from_several_python_threads(mod):
    import threading

    fn = mod.get_function("warp_sum")
    x = np.random.default_rng(9).standard_normal(3000).astype(np.float32)
    expected = np.zeros(4, np.float32)
    fn((4,), (64,), (x, expected, np.int32(x.size)))
    results, errors = [], []

    def work():
        try:
            for _ in range(5):
                out = np.zeros(4, np.float32)
                fn((4,), (64,), (x, out, np.int32(x.size)))
                results.append(out)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 15
    for out in results:
        np.testing.assert_array_equal(out, expected)


def test_headers_are_checked_and_rewritten(tmp_path):
    # a SharedMemory helper in a header (the CUDA samples' idiom) and a header
    # including a neighbour by a relative path
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "smem.cuh").write_text(
        '#pragma once\n#include "detail.cuh"\n'
        "template <class T> struct SharedMemory {\n"
        "    __device__ T* get() { extern __shared__ __align__(16) unsigned char raw[]; "
        "return reinterpret_cast<T*>(raw); }\n};\n")
    (tmp_path / "lib" / "detail.cuh").write_text("#pragma once\n#define OFFSET 1\n")
    src = r'''#include "lib/smem.cuh"
template <class T> __global__ void rotate(const T* x, T* y) {
    T* s = SharedMemory<T>().get();
    s[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    y[threadIdx.x] = s[(threadIdx.x + OFFSET) % blockDim.x];
}
'''
    x = np.arange(32, dtype=np.float32)
    y = np.zeros_like(x)
    mod = emu.RawModule(code=src, options=(f"-I{tmp_path}",), name_expressions=("rotate<float>",))
    mod.get_function("rotate<float>")(1, 32, (x, y), shared_mem=128)
    np.testing.assert_array_equal(y, np.roll(x, -1))
    (tmp_path / "lib" / "detail.cuh").write_text('#pragma once\n#define OFFSET 2\nasm("nop");\n')
    with pytest.raises(emu.EmuCompileError, match=r"detail\.cuh:3: inline assembly"):
        emu.RawModule(code=src, options=(f"-I{tmp_path}",), name_expressions=("rotate<float>",)).compile()
    (tmp_path / "lib" / "detail.cuh").write_text("#pragma once\n#define OFFSET 3\n")   # edited header: rebuilt
    emu.RawModule(code=src, options=(f"-I{tmp_path}",), name_expressions=("rotate<float>",)).get_function(
        "rotate<float>")(1, 32, (x, y), shared_mem=128)
    np.testing.assert_array_equal(y, np.roll(x, -3))


def test_static_shared_variables_of_every_form_are_checked(tmp_path):
    # Accesses at offsets the compiler knows (a scalar, s[1], p.b) are checked too,
    # whatever the declaration looks like and wherever it is.
    (tmp_path / "forms.cuh").write_text(r'''#pragma once
struct Pair { float a; int b; };
__shared__ int counter;                                   // namespace scope, in a header
template <class T> __device__ T& slot() { __shared__ T s; return s; }
''')
    src = r'''#include "forms.cuh"
namespace nsp { __shared__ float table[4]; }
template <class T> __global__ void forms(const T* x, T* y, int which, int sync) {
    __shared__ __align__(16) T a[32], b[2][2];
    __shared__ Pair p __attribute__((aligned(8)));
    if (threadIdx.x == 0) { counter = 3; nsp::table[1] = x[1]; p.b = 4; b[1][1] = x[2]; slot<T>() = x[3]; }
    if (threadIdx.x < 32) a[threadIdx.x] = x[threadIdx.x];
    if (sync) __syncthreads();
    if (threadIdx.x == 40) {
        switch (which) {
            case 0: y[0] = counter; break;
            case 1: y[0] = nsp::table[1]; break;
            case 2: y[0] = p.b; break;
            case 3: y[0] = [=] { return b[1][1]; }(); break;      // lambdas use shared
            case 4: y[0] = [] { return slot<T>(); }(); break;     // variables uncaptured
            default: y[0] = a[31]; break;
        }
    }
}
'''
    fn = emu.RawModule(code=src, options=(f"-I{tmp_path}",),
                       name_expressions=("forms<float>",)).get_function("forms<float>")
    x = np.arange(10, 42, dtype=np.float32)
    y = np.zeros(1, np.float32)
    cases = [("counter", 0, 0), ("nsp::table", 4, 0), (r"forms<float>\(.*\)::p", 4, 0),
             (r"forms<float>\(.*\)::b", 12, 0), (r"slot<float>\(\)::s", 0, 0), (r"forms<float>\(.*\)::a", 124, 31)]
    for which, (variable, byte, writer) in enumerate(cases):
        with pytest.raises(emu.RaceError, match=rf"read-after-write hazard at byte {byte} of __shared__ variable "
                                                rf"'{variable}'") as info:
            fn(1, 64, (x, y, np.int32(which), np.int32(0)))
        assert (info.value.thread, info.value.other_thread) == ((40, 0, 0), (writer, 0, 0))
    for which, want in enumerate([3, x[1], 4, x[2], x[3], x[31]]):
        fn(1, 64, (x, y, np.int32(which), np.int32(1)))
        assert y[0] == want


def _mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"),
                    reason="counts memory mappings through Linux's /proc/self/maps")
def test_launches_leave_no_memory_mappings_behind():
    # A block's fiber stacks have a guard page per thread: two mappings per
    # thread.  Kept after the launch, each module would hold thousands, and a
    # long process with many modules passes vm.max_map_count.  Four blocks of
    # 256 threads, co-resident: about 2000 mappings while it runs, none after.
    own = emu.RawModule(code=SRC, options=("-std=c++17", "-DGPUBN_TEST_MAPPINGS"),
                        name_expressions=("copy<float>",))
    copy = own.get_function("copy<float>")             # compiled and loaded here
    x = np.ones(1 << 14, np.float32)
    y = np.zeros_like(x)
    before = _mappings()
    for _ in range(3):
        copy((4,), (256,), (x, y, np.int64(x.size)))
    np.testing.assert_array_equal(y, x)
    assert _mappings() - before < 64
