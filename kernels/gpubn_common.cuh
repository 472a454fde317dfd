// gpubn_common.cuh -- the project's own device header.
//
// Everything the batch-norm kernels share: half / bfloat16 storage types and
// their conversions, vector loads, Welford triples with Chan's merge, warp and
// block reductions, and the "last block of a channel finishes" handshake.
//
// It includes nothing: NVRTC compiles the kernels with no CUDA toolkit headers
// on the include path, and the emu backend compiles the same text as C++ for
// the CPU.  The one place that tells the two apart is the GPUBN_DEVICE_PTX
// switch below: on the GPU, half-precision conversions are single PTX
// instructions (gpubn_half_ptx.cuh, never seen by the CPU build); elsewhere
// the bit-exact portable versions defined here.
#pragma once

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#define GPUBN_DEVICE_PTX 1
#else
#define GPUBN_DEVICE_PTX 0
#endif

// Largest block (threads) the reduction kernels are written for; the launch
// configuration (gpubn/launch.py, MAX_REDUCE_THREADS) never exceeds it.
#define GPUBN_MAX_REDUCE_THREADS 256
// Blocks of GPUBN_MAX_REDUCE_THREADS every reduction kernel keeps resident per
// SM (its __launch_bounds__: ptxas caps registers at 80 per thread for it);
// grids of one wave are sized from it where no device can be asked
// (gpubn/launch.py: REDUCE_MIN_BLOCKS).
#define GPUBN_REDUCE_MIN_BLOCKS 3
// Largest elementwise block, and most threads along x of a channels-last one
// (gpubn/launch.py: MAX_MAP_THREADS, MAX_MAP_COLUMNS).
#define GPUBN_MAX_MAP_THREADS 256
#define GPUBN_MAX_MAP_COLUMNS 64

namespace gpubn {

// ---------------------------------------------------------------------------
// Storage types.  Arrays of float16 / bfloat16 arrive as raw 2-byte values.
// ---------------------------------------------------------------------------
struct __align__(2) half {
    unsigned short bits;
};
struct __align__(2) bfloat16 {
    unsigned short bits;
};

// Round-to-nearest-even float -> IEEE binary16, by bit manipulation.
__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
    const unsigned int x = __float_as_uint(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf or nan (nan stays quiet nan)
        return (unsigned short)(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
    if (ax >= 0x477ff000u)  // >= 65520 rounds to infinity
        return (unsigned short)(sign | 0x7c00u);
    if (ax < 0x38800000u) {  // below 2^-14: subnormal half or zero
        if (ax < 0x33000000u)  // at most 2^-25: rounds to (signed) zero
            return (unsigned short)sign;
        const unsigned int e = ax >> 23;
        const unsigned int m = (ax & 0x7fffffu) | 0x800000u;
        const unsigned int shift = 126u - e;  // 14..24
        unsigned int r = m >> shift;
        const unsigned int rem = m & ((1u << shift) - 1u);
        const unsigned int halfway = 1u << (shift - 1u);
        if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
        return (unsigned short)(sign | r);
    }
    unsigned int r = (ax - 0x38000000u) >> 13;  // rebias exponent 127 -> 15
    const unsigned int rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
    return (unsigned short)(sign | r);
}

__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    const unsigned int e = ((unsigned int)h >> 10) & 0x1fu;
    const unsigned int m = (unsigned int)h & 0x3ffu;
    if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    if (e == 0u) {  // zero or subnormal: m * 2^-24, exact in float
        const float v = (float)m * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

#if GPUBN_DEVICE_PTX
}  // namespace gpubn
#include "gpubn_half_ptx.cuh"  // one conversion instruction each way on the GPU
namespace gpubn {
#else
__device__ __forceinline__ float half_to_float(unsigned short h) { return half_bits_to_float(h); }
__device__ __forceinline__ unsigned short float_to_half(float f) { return float_to_half_bits(f); }
#endif

__device__ __forceinline__ float to_acc(half v) { return half_to_float(v.bits); }
__device__ __forceinline__ void store_acc(half& d, float v) { d.bits = float_to_half(v); }

// bfloat16: the upper half of a float; round to nearest even on store.
__device__ __forceinline__ float to_acc(bfloat16 v) {
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

// Both results are computed and one is selected: no branch.  With an early
// return for NaN every stored element ended a basic block, and ptxas for sm_80
// scheduled the first block of an unrolled step (all its loads, then the
// first row up to that branch) by its critical path: the first row's loads,
// its conversion and rounding, then the other loads -- 2 of 8 in flight in
// the channels-last bfloat16 VEC1 apply.  A select keeps the step one block.
__device__ __forceinline__ void store_acc(bfloat16& d, float v) {
    const unsigned int x = __float_as_uint(v);
    const unsigned int rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const unsigned int quiet = (x >> 16) | 0x0040u;  // nan stays nan, quiet, same sign
    d.bits = (unsigned short)((x & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ void store_acc(float& d, float v) { d = v; }
__device__ __forceinline__ void store_acc(double& d, double v) { d = v; }

// VEC consecutive elements moved as one aligned load / store (16 or 8 bytes
// when the launch configuration chose vectorization, one element otherwise).
template <class T, int VEC>
struct __align__(sizeof(T) * VEC) Vec {
    T v[VEC];
};

template <class T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p) {
    return *reinterpret_cast<const Vec<T, VEC>*>(p);
}

template <class T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, VEC>& v) {
    *reinterpret_cast<Vec<T, VEC>*>(p) = v;
}

// What the streaming loops load: VEC elements as Packed<T, VEC>::type, read
// with load_packed and converted with element(v, j).  For 2-byte types in
// pairs that is Words, the 32-bit words one load brings, cut into elements
// only where one is used: a Vec<half, VEC> load is split into 16-bit
// registers right after it arrives, and ptxas schedules those moves (which
// wait for the load) ahead of the next loads of an unrolled step, leaving
// one or two in flight.  Otherwise it is the Vec itself.
template <class T, int VEC>
struct __align__(sizeof(T) * VEC) Words {
    unsigned int w[sizeof(T) * VEC / 4];
};

template <class T, int VEC, bool WORDS = (sizeof(T) == 2 && VEC % 2 == 0)>
struct Packed {
    typedef Vec<T, VEC> type;
    __device__ __forceinline__ static type load(const T* p) { return load_vec<T, VEC>(p); }
};

template <class T, int VEC>
struct Packed<T, VEC, true> {
    typedef Words<T, VEC> type;
    __device__ __forceinline__ static type load(const T* p) {
#if GPUBN_DEVICE_PTX
        type r;
        load_words(p, r.w);  // one PTX load the compiler cannot cut into halves
        return r;
#else
        return *reinterpret_cast<const type*>(p);
#endif
    }
};

template <class T, int VEC>
__device__ __forceinline__ typename Packed<T, VEC>::type load_packed(const T* p) {
    return Packed<T, VEC>::load(p);
}

// Element j of a loaded vector, in its accumulation type (float for 2-byte types).
template <class T, int VEC>
__device__ __forceinline__ auto element(const Vec<T, VEC>& v, int j) -> decltype(to_acc(v.v[0])) {
    return to_acc(v.v[j]);
}

template <class T, int VEC>
__device__ __forceinline__ float element(const Words<T, VEC>& v, int j) {
    T e;
    e.bits = (unsigned short)(v.w[j >> 1] >> ((j & 1) * 16));  // little endian: 0 is low
    return to_acc(e);
}

__device__ __forceinline__ float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// Fused multiply-add spelled out wherever a product meets a sum, so the GPU
// (which would contract a*b+c on its own) and the emu build (which would not)
// round every result identically.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// v - v is 0 exactly for finite v, NaN for NaN and +-Inf (no fast-math here)
template <class Acc>
__device__ __forceinline__ bool is_finite(Acc v) {
    return v - v == Acc(0);
}

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------
// Reduction states.  Plain structs (no constructors) so they can live in
// __shared__ arrays and in the partials workspace.
// ---------------------------------------------------------------------------

// hi + lo = a + b exactly, hi the rounded sum (Knuth's TwoSum: no
// assumption on the magnitudes; six additions, used per merge, never per
// element).
template <class Acc>
__device__ __forceinline__ void two_sum(Acc a, Acc b, Acc& hi, Acc& lo) {
    hi = a + b;
    const Acc bv = hi - a;
    lo = (a - (hi - bv)) + (b - bv);
}

// Welford state: exact count, the mean as an unevaluated pair hi + lo, M2
// (sum of squared deviations), and a plain sum, which only decides the mean
// of a channel holding infinities (the Welford mean of {+inf, ...} is
// inf - inf = nan, the true mean is +inf).
//
// A thread keeps hi at the first value it saw (its shift) and accumulates
// lo, the mean of x - hi, and M2 from those small differences, so data far
// from zero (1e4 + N(0, 1) in float) loses nothing to the size of the mean:
// float32 differences of nearby values are exact.  Values come in groups of
// G (the loads of one unrolled step): the group's own mean and M2 (a local
// two-pass over registers), then one Chan merge, so one division per group,
// not per element.  Merges across threads carry hi + lo exactly (TwoSum), so
// the channel mean is known to far better than one float (the apply kernels
// use the pair: y = (x - hi) * scale + (bias - lo * scale)).
template <class Acc>
struct Welford {
    long long n;
    Acc hi;
    Acc lo;
    Acc m2;
    Acc sum;

    __device__ __forceinline__ static Welford identity() {
        Welford w;
        w.n = 0;
        w.hi = Acc(0);
        w.lo = Acc(0);
        w.m2 = Acc(0);
        w.sum = Acc(0);
        return w;
    }
    template <int G>
    __device__ __forceinline__ void push_group(const Acc (&v)[G]) {
        if (n == 0) hi = v[0];
        Acc d[G];
        Acc s = Acc(0);
#pragma unroll
        for (int i = 0; i < G; ++i) {
            d[i] = v[i] - hi;
            s += d[i];
            sum += v[i];
        }
        const Acc gmean = s * (Acc(1) / Acc(G));
        Acc gm2 = Acc(0);
#pragma unroll
        for (int i = 0; i < G; ++i) {
            const Acc e = d[i] - gmean;
            gm2 = fma_acc(e, e, gm2);
        }
        const long long total = n + G;
        const Acc wb = Acc(G) / Acc(total);
        const Acc delta = gmean - lo;
        lo = fma_acc(delta, wb, lo);
        m2 = fma_acc(delta * delta * Acc(n), wb, m2 + gm2);
        n = total;
    }
    __device__ __forceinline__ void push(Acc x) {
        const Acc one[1] = {x};
        push_group<1>(one);
    }
    // Chan's parallel merge; fixed operand order keeps results bitwise stable.
    __device__ __forceinline__ static Welford merge(const Welford& a, const Welford& b) {
        if (b.n == 0) return a;
        if (a.n == 0) return b;
        Welford r;
        r.n = a.n + b.n;
        const Acc wb = Acc(b.n) / Acc(r.n);
        const Acc d = (b.hi - a.hi) + (b.lo - a.lo);
        two_sum(a.hi, fma_acc(d, wb, a.lo), r.hi, r.lo);
        r.m2 = fma_acc(d * d * Acc(a.n), wb, a.m2 + b.m2);
        r.sum = a.sum + b.sum;
        return r;
    }
    // The channel mean rounded to Acc (hi + lo), and what rounding left out
    // (mean_lo): Welford's, except where only infinities (no nan in the data)
    // made it nan.
    __device__ __forceinline__ Acc final_mean() const {
        Acc h, l;
        two_sum(hi, lo, h, l);
        const bool mean_nan = h != h;
        const bool sum_nan = sum != sum;
        return (mean_nan && !sum_nan) ? sum / Acc(n) : h;
    }
    __device__ __forceinline__ Acc final_mean_lo() const {
        Acc h, l;
        two_sum(hi, lo, h, l);
        return h != h ? Acc(0) : l;
    }
    __device__ __forceinline__ Welford shfl_down(unsigned int offset) const {
        Welford r;
        r.n = __shfl_down_sync(0xffffffffu, n, offset);
        r.hi = __shfl_down_sync(0xffffffffu, hi, offset);
        r.lo = __shfl_down_sync(0xffffffffu, lo, offset);
        r.m2 = __shfl_down_sync(0xffffffffu, m2, offset);
        r.sum = __shfl_down_sync(0xffffffffu, sum, offset);
        return r;
    }
    __device__ __forceinline__ static Welford load_volatile(const Welford* p) {
        const volatile Welford* q = p;
        Welford r;
        r.n = q->n;
        r.hi = q->hi;
        r.lo = q->lo;
        r.m2 = q->m2;
        r.sum = q->sum;
        return r;
    }
};

// Backward sums: sum dy and sum dy * (x - mean).
template <class Acc>
struct GradSums {
    Acc sum_dy;
    Acc sum_dy_xmu;

    __device__ __forceinline__ static GradSums identity() {
        GradSums g;
        g.sum_dy = Acc(0);
        g.sum_dy_xmu = Acc(0);
        return g;
    }
    __device__ __forceinline__ static GradSums merge(const GradSums& a, const GradSums& b) {
        GradSums r;
        r.sum_dy = a.sum_dy + b.sum_dy;
        r.sum_dy_xmu = a.sum_dy_xmu + b.sum_dy_xmu;
        return r;
    }
    __device__ __forceinline__ GradSums shfl_down(unsigned int offset) const {
        GradSums r;
        r.sum_dy = __shfl_down_sync(0xffffffffu, sum_dy, offset);
        r.sum_dy_xmu = __shfl_down_sync(0xffffffffu, sum_dy_xmu, offset);
        return r;
    }
    __device__ __forceinline__ static GradSums load_volatile(const GradSums* p) {
        const volatile GradSums* q = p;
        GradSums r;
        r.sum_dy = q->sum_dy;
        r.sum_dy_xmu = q->sum_dy_xmu;
        return r;
    }
};

// Tree reduction across the 32 lanes of a (full) warp; lane 0 holds the result.
template <class S>
__device__ __forceinline__ S warp_reduce(S v) {
#pragma unroll
    for (unsigned int offset = 16; offset > 0; offset >>= 1)
        v = S::merge(v, v.shfl_down(offset));
    return v;
}

// Reduction across a 1-D block (blockDim.x a multiple of 32, at most
// GPUBN_MAX_REDUCE_THREADS).  Thread 0 holds the result.  Ends with a barrier
// so the shared scratch may be reused by a following call.
template <class S>
__device__ __forceinline__ S block_reduce_1d(S v) {
    __shared__ S warp_results[32];
    const unsigned int lane = threadIdx.x & 31u;
    const unsigned int warp = threadIdx.x >> 5;
    const unsigned int warps = blockDim.x >> 5;
    v = warp_reduce(v);
    if (lane == 0) warp_results[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? warp_results[lane] : S::identity();
        v = warp_reduce(v);
    }
    __syncthreads();
    return v;
}

// Reduction along threadIdx.y of a 2-D block (blockDim.y a power of two,
// blockDim.x * blockDim.y at most GPUBN_MAX_REDUCE_THREADS).  Threads with
// threadIdx.y == 0 hold the result of their column.  Ends with a barrier.
template <class S>
__device__ __forceinline__ S block_reduce_columns(S v) {
    __shared__ S tile[GPUBN_MAX_REDUCE_THREADS];
    const unsigned int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
    tile[ty * bx + tx] = v;
    __syncthreads();
    for (unsigned int offset = blockDim.y >> 1; offset > 0; offset >>= 1) {
        if (ty < offset) {
            v = S::merge(v, tile[(ty + offset) * bx + tx]);
            tile[ty * bx + tx] = v;
        }
        __syncthreads();
    }
    return v;
}

// Ghost batch norm: a launch with gridDim.z = G treats G consecutive equal
// slices of the outer extent as independent batches (the group is an extra
// outer index; no copy, one launch).  Block (x, y, g) moves its tensor
// pointers by g slices and its per-group arrays (statistics, reduced sums,
// partial states, arrival counters) by g of their extents, so every other
// line of a kernel is the one-group code; shared per-channel vectors (weight,
// bias) stay.  Null stays null; with G = 1 nothing moves.
template <class P>
__device__ __forceinline__ P* at_group(P* p, long long extent) {
    return p ? p + (long long)blockIdx.z * extent : p;
}

// at_group on several pointers with one extent: at_groups(extent, p, q, ...).
template <class... P>
__device__ __forceinline__ void at_groups(long long extent, P&... p) {
    ((p = at_group(p, extent)), ...);
}

// Two-stage reduction handshake, called by every thread of a block after the
// block wrote its partial(s).  Returns true (in every thread) for the one block
// that arrived last at ``counter``; that block then merges all partials and
// has already reset the counter for the next launch.
__device__ __forceinline__ bool arrive_last(unsigned int* counter, unsigned int blocks) {
    __shared__ int is_last;
    __threadfence();  // publish this thread's partial before the block is counted
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        const unsigned int ticket = atomicAdd(counter, 1u);
        is_last = (ticket == blocks - 1u) ? 1 : 0;
        if (is_last) {
            *counter = 0u;
            __threadfence();  // see every other block's partial
        }
    }
    __syncthreads();
    const bool last = is_last != 0;
    __syncthreads();
    return last;
}

// ---------------------------------------------------------------------------
// Per-channel reductions over the canonical (outer, C, inner) layout.
//
// Both walkers take three functors: load(offset) reads what one position
// contributes (offset in elements, relative to the channel's first element
// for channel axis 1, to the tensor's start for channels last);
// push_group(state, v, off) consumes UNROLL loaded positions at once (v[u]
// loaded from off[u]), push(state, value, offset) one position of the tail.
// Every load of a step is issued before any is consumed, so each thread
// keeps UNROLL (vector) loads in flight, and a reduction state sees a whole
// group at a time (one Welford merge per group).  UNROLL is
// GPUBN_WALK_UNROLL unless a caller loading more per position (three vectors
// instead of two) needs fewer positions at once to stay within its registers.
// ---------------------------------------------------------------------------
#define GPUBN_WALK_UNROLL 4

// The loop both walkers share: positions k, k + step, ... below `end`, whose
// offsets next() returns in that order, UNROLL at a time, then the at most
// UNROLL - 1 left, loaded together too (a tail loop would be unrolled into
// serial load-use pairs).
template <int UNROLL, class State, class Next, class Load, class PushGroup, class Push>
__device__ __forceinline__ void walk_positions(long long k, long long step, long long end,
                                               State& state, Next next, Load load,
                                               PushGroup push_group, Push push) {
    static_assert(UNROLL >= 2, "the tail holds UNROLL - 1 positions");
    for (; k + (UNROLL - 1) * step < end; k += UNROLL * step) {
        long long off[UNROLL];
        decltype(load(0LL)) v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) off[u] = next();
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = load(off[u]);
        push_group(state, v, off);
    }
    long long off[UNROLL - 1];
    decltype(load(0LL)) v[UNROLL - 1];
#pragma unroll
    for (int u = 0; u < UNROLL - 1; ++u)
        if (k + u * step < end) {
            off[u] = next();
            v[u] = load(off[u]);
        }
#pragma unroll
    for (int u = 0; u < UNROLL - 1; ++u)
        if (k + u * step < end) push(state, v[u], off[u]);
}

// Channel axis 1 (inner > 1): grid (C, S), 1-D blocks.  Channel c is `outer`
// runs of `inner` contiguous elements; block (c, s) walks the s-th of S equal
// shares of the channel's outer*inner/VEC vector units, carrying a (row, col)
// pair instead of dividing per element.
template <int VEC, class S, int UNROLL = GPUBN_WALK_UNROLL, class Load, class PushGroup,
          class Push>
__device__ __forceinline__ S channel_walk_nchw(long long outer, int channels, long long inner,
                                               Load load, PushGroup push_group, Push push) {
    const long long inner_v = inner / VEC;
    const long long units = outer * inner_v;
    const long long splits = gridDim.y;
    const long long chunk = (units + splits - 1) / splits;
    const long long begin = (long long)blockIdx.y * chunk;
    const long long end = min_ll(begin + chunk, units);
    const long long row_stride = (long long)channels * inner;
    S state = S::identity();
    const long long k = begin + threadIdx.x;
    if (k < end) {
        long long row = k / inner_v;
        long long col = k - row * inner_v;
        const long long step = blockDim.x;
        const long long drow = step / inner_v;
        const long long dcol = step - drow * inner_v;
        auto next = [&]() {  // advance (row, col) by `step` units
            const long long offset = row * row_stride + col * VEC;
            col += dcol;
            row += drow;
            if (col >= inner_v) {
                col -= inner_v;
                ++row;
            }
            return offset;
        };
        walk_positions<UNROLL>(k, step, end, state, next, load, push_group, push);
    }
    return state;
}

// Block-reduce `state`, then (S > 1) publish it as partial (c, s) and let the
// last block of channel c merge the S partials in index order.  finish(total)
// runs in thread 0 of exactly one block per channel.
template <class S, class Finish>
__device__ __forceinline__ void channel_finish_nchw(S state, S* partials, unsigned int* counters,
                                                    Finish finish) {
    state = block_reduce_1d(state);
    const unsigned int splits = gridDim.y;
    if (splits > 1) {
        S* mine = partials + (long long)blockIdx.x * splits;
        if (threadIdx.x == 0) mine[blockIdx.y] = state;
        if (!arrive_last(counters + blockIdx.x, splits)) return;
        state = S::identity();
        for (unsigned int i = threadIdx.x; i < splits; i += blockDim.x)
            state = S::merge(state, S::load_volatile(mine + i));
        state = block_reduce_1d(state);
    }
    if (threadIdx.x == 0) finish(state);
}

// Channels last (inner == 1): grid (ceil(C / (VEC * bx)), S), blocks (bx, by).
// Thread (tx, ty) owns the VEC adjacent channels from
// (blockIdx.x * bx + tx) * VEC (one 8- or 16-byte load per row; consecutive
// threads read consecutive vectors: coalesced) and every by-th row of the
// block's share of the rows; it keeps one state per channel.
template <int VEC, int UNROLL = GPUBN_WALK_UNROLL, class S, class Load, class PushGroup,
          class Push>
__device__ __forceinline__ void channel_walk_nhwc(long long rows, int channels, Load load,
                                                  PushGroup push_group, Push push,
                                                  S (&state)[VEC]) {
    const long long c0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    const long long splits = gridDim.y;
    const long long chunk = (rows + splits - 1) / splits;
    const long long begin = (long long)blockIdx.y * chunk;
    const long long end = min_ll(begin + chunk, rows);
    const long long step = blockDim.y;
#pragma unroll
    for (int j = 0; j < VEC; ++j) state[j] = S::identity();
    if (c0 < channels) {
        long long r = begin + threadIdx.y;
        auto next = [&]() {  // the next row's offset
            const long long offset = r * channels + c0;
            r += step;
            return offset;
        };
        walk_positions<UNROLL>(begin + threadIdx.y, step, end, state, next, load, push_group,
                               push);
    }
}

// Column-reduce each of a thread's VEC states, then (S > 1) publish them as
// partials (s, c) and let the last block of the channel tile merge the S
// partials in index order.  finish(total, c) runs once per channel.
template <int VEC, class S, class Finish>
__device__ __forceinline__ void channel_finish_nhwc(S (&state)[VEC], int channels, S* partials,
                                                    unsigned int* counters, Finish finish) {
    const long long c0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    const bool owner = c0 < channels;
#pragma unroll
    for (int j = 0; j < VEC; ++j) state[j] = block_reduce_columns(state[j]);
    const unsigned int splits = gridDim.y;
    if (splits > 1) {
        if (threadIdx.y == 0 && owner) {
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                partials[(long long)blockIdx.y * channels + c0 + j] = state[j];
        }
        if (!arrive_last(counters + blockIdx.x, splits)) return;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            S total = S::identity();
            if (owner) {
                for (unsigned int i = threadIdx.y; i < splits; i += blockDim.y)
                    total = S::merge(total,
                                     S::load_volatile(partials + (long long)i * channels + c0 + j));
            }
            state[j] = block_reduce_columns(total);
        }
    }
    if (threadIdx.y == 0 && owner) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) finish(state[j], (int)(c0 + j));
    }
}

// ---------------------------------------------------------------------------
// Elementwise passes with per-channel constants K, computed by make(c, first)
// in each thread for the channels it touches (per-channel vectors are read
// through the read-only path, __ldg: a warp reading one channel's value is a
// broadcast), so there is no shared memory and no barrier.  `first` is true
// for exactly one call per channel (for writing per-channel outputs).
// load(offset) reads the VEC elements at `offset`, apply(k, kstride, v,
// offset) writes their results; element j uses constants k[j * kstride].
// Each thread issues GPUBN_MAP_UNROLL independent vector loads before it
// applies any, so several loads per thread are in flight.
//
// Channel axis 1: 2-D grid; columns (x) stride the runs of `inner`
// elements, y enumerates groups of GPUBN_MAP_UNROLL runs of one channel
// (outer indices n0 .. n0 + 3): a thread computes its constants once per
// group and loads from the group's runs together.
// ---------------------------------------------------------------------------
#define GPUBN_MAP_UNROLL 4
template <class Acc>
__device__ __forceinline__ Acc read_only(const Acc* p) {
    return __ldg(p);
}

// The scale of channel c in the normalization and its gradient:
// weight[c] * invstd, or invstd without a weight.
template <class Acc>
__device__ __forceinline__ Acc channel_scale(const Acc* weight, int c, Acc invstd) {
    return weight ? read_only(weight + c) * invstd : invstd;
}

// The ReLU of the residual-block epilogue keeps a value (and passes its
// gradient) unless it is <= 0: NaN is kept, as torch.relu keeps it.  The
// forward applies it to its output, the backward masks dy with it on y.
template <class Acc>
__device__ __forceinline__ bool relu_keeps(Acc v) {
    return !(v <= Acc(0));
}

template <int VEC, class K, class Make, class Load, class Apply>
__device__ __forceinline__ void channel_map_nchw(long long outer, int channels, long long inner,
                                                 Make make, Load load, Apply apply) {
    const long long inner_v = inner / VEC;
    const long long col_step = (long long)gridDim.x * blockDim.x;
    const long long col0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (col0 >= inner_v) return;
    // groups: (channel c, outer indices n0 .. n0 + GPUBN_MAP_UNROLL - 1)
    const long long groups = (long long)channels * ((outer + GPUBN_MAP_UNROLL - 1) /
                                                    GPUBN_MAP_UNROLL);
    const long long row_stride = (long long)channels * inner;
    for (long long g = (long long)blockIdx.y * blockDim.y + threadIdx.y; g < groups;
         g += (long long)gridDim.y * blockDim.y) {
        const long long q = g / channels;
        const int c = (int)(g - q * channels);
        const long long n0 = q * GPUBN_MAP_UNROLL;
        const K k = make(c, n0 == 0 && col0 == 0);
        const long long base = n0 * row_stride + (long long)c * inner;
        const int count = (int)min_ll(GPUBN_MAP_UNROLL, outer - n0);
        for (long long j = col0 * VEC; j < inner_v * VEC; j += col_step * VEC) {
            decltype(load(0LL)) v[GPUBN_MAP_UNROLL];
#pragma unroll
            for (int u = 0; u < GPUBN_MAP_UNROLL; ++u)
                if (u < count) v[u] = load(base + u * row_stride + j);
#pragma unroll
            for (int u = 0; u < GPUBN_MAP_UNROLL; ++u)
                if (u < count) apply(&k, 0, v[u], base + u * row_stride + j);
        }
    }
}

// Channels last: columns (x) are groups of VEC channels, whose constants
// each thread computes once; rows (y) stride the outer rows,
// GPUBN_MAP_UNROLL at a time.
template <int VEC, class K, class Make, class Load, class Apply>
__device__ __forceinline__ void channel_map_nhwc(long long rows, int channels, Make make,
                                                 Load load, Apply apply) {
    const long long cols_v = channels / VEC;
    const long long row_step = (long long)gridDim.y * blockDim.y;
    const long long col_step = (long long)gridDim.x * blockDim.x;
    const long long row0 = (long long)blockIdx.y * blockDim.y + threadIdx.y;
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < cols_v;
         j += col_step) {
        const int c0 = (int)(j * VEC);
        K k[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) k[v] = make(c0 + v, row0 == 0);
        long long r = row0;
        for (; r + (GPUBN_MAP_UNROLL - 1) * row_step < rows; r += GPUBN_MAP_UNROLL * row_step) {
            decltype(load(0LL)) v[GPUBN_MAP_UNROLL];
#pragma unroll
            for (int u = 0; u < GPUBN_MAP_UNROLL; ++u)
                v[u] = load((r + u * row_step) * channels + c0);
#pragma unroll
            for (int u = 0; u < GPUBN_MAP_UNROLL; ++u)
                apply(k, 1, v[u], (r + u * row_step) * channels + c0);
        }
        // the tail: at most GPUBN_MAP_UNROLL - 1 rows, loaded together
        decltype(load(0LL)) v[GPUBN_MAP_UNROLL - 1];
#pragma unroll
        for (int u = 0; u < GPUBN_MAP_UNROLL - 1; ++u)
            if (r + u * row_step < rows) v[u] = load((r + u * row_step) * channels + c0);
#pragma unroll
        for (int u = 0; u < GPUBN_MAP_UNROLL - 1; ++u)
            if (r + u * row_step < rows) apply(k, 1, v[u], (r + u * row_step) * channels + c0);
    }
}

}  // namespace gpubn
