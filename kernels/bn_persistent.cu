// bn_persistent.cu -- read-once ("persistent") training forward: one
// cooperative launch reads x once, keeps it on chip, and writes y:
// 2 passes over the tensor (3 with a residual) instead of 3 in 2 launches.
//
//   1. every thread loads its values of one channel (channel axis 1) or of
//      one channel column (channels last): GPUBN_ONCE_ITEMS into registers
//      and, when the launch stages, `staged` more into dynamic shared memory
//      (the launch plan sizes it: gpubn/launch.py once_launch), and forms
//      their Welford state (two passes over them); the block
//      merges its threads' states and writes one partial per (channel,
//      split) block;
//   2. a grid barrier (the project's own: an atomic arrival count and
//      fences, no cooperative-groups header; the launch is cooperative, so
//      every block is co-resident);
//   3. every block merges its channel's S partials in index order (so all
//      blocks of a channel agree bitwise, run after run), the split-0 block
//      writes mean / invstd / the running statistics, guarded when
//      `skipped` is non-null (bn_stats.cu's finish_stats), and all
//      normalize from the copies on chip with bn_forward.cu's constants and
//      epilogue (residual add, ReLU).
//
// Both layouts share one body (forward_once), written against OnceNchw /
// OnceNhwc: where a thread's values lie and how its block shares a channel.
//
// Staged values: item k of thread t (t the thread's index in its block) at
// stage[k * threads + t] of each staged array, so a warp's accesses are
// consecutive words (no bank conflicts), and a thread reads back only the
// items it wrote itself: no barrier is needed between the staging stores
// and their loads.  The backward stages two arrays (the masked dy, then x).
//
// The launch plan (gpubn/launch.py: once_launch) picks these kernels only
// when the grid holds the whole tensor and is co-resident (staging as few
// values per thread as that takes); otherwise bn_stats_* + bn_apply_*.
//
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::bn_forward_once_nchw<T, Acc>    grid (C, S), block (threads)
//   gpubn::bn_forward_once_nhwc<T, Acc>    grid (ceil(C / 32), S), block (32, 8)
//   gpubn::bn_backward_once_nchw<T, Acc>   as the forward's
//   gpubn::bn_backward_once_nhwc<T, Acc>
#include "bn_stats.cu"
#include "bn_forward.cu"
#include "bn_backward.cu"

// Elements each thread keeps in registers (gpubn/launch.py: ONCE_ITEMS).
#define GPUBN_ONCE_ITEMS 16

namespace gpubn {

// All blocks of the grid wait here until every block arrived.  bar[0] counts
// arrivals, bar[1] departures; the last block to leave resets both, so the
// launch's workspace is zero again afterwards.  Correct only when every block
// is co-resident (a cooperative launch).
__device__ __forceinline__ void grid_barrier(unsigned int* bar) {
    const unsigned int blocks = gridDim.x * gridDim.y * gridDim.z;
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        __threadfence();  // publish this block's partials before it is counted
        atomicAdd(bar, 1u);
        while (*(volatile unsigned int*)bar < blocks) {
        }
        __threadfence();  // see every other block's partials
        if (atomicAdd(bar + 1, 1u) == blocks - 1u) {
            atomicExch(bar, 0u);
            atomicExch(bar + 1, 0u);
        }
    }
    __syncthreads();
}

// The channel's S partials (Welford triples or gradient sums) merged in
// index order: the same in every block, so all agree bitwise, run after run.
template <class S>
__device__ __forceinline__ S merge_partials(const S* p, int splits) {
    S w = S::identity();
    for (int i = 0; i < splits; ++i) w = S::merge(w, S::load_volatile(p + i));
    return w;
}

// Of a thread's `staged` items after its registers', how many are in range,
// when `rest` values of its channel lie from its first one on, `step` apart:
// items GPUBN_ONCE_ITEMS + k with GPUBN_ONCE_ITEMS + k < ceil(rest / step).
__device__ __forceinline__ int staged_in_range(long long rest, int step, int staged) {
    rest -= (long long)GPUBN_ONCE_ITEMS * step;
    if (rest <= 0) return 0;
    if (rest >= (long long)staged * step) return staged;
    return ((int)rest + step - 1) / step;  // < staged * step: a 32-bit division
}

// Staged item k of the calling thread in a staged array (see the top).
__device__ __forceinline__ int stage_at(int k) {
    return k * (int)(blockDim.x * blockDim.y) + (int)(threadIdx.y * blockDim.x + threadIdx.x);
}

// Where a thread's values lie and how its block shares a channel: the
// read-once kernels are written once against these two.  A thread holds
// GPUBN_ONCE_ITEMS + staged items, item k of the block's split at position
// k * (threads per channel) + the thread's; items 0 .. GPUBN_ONCE_ITEMS - 1
// are in registers, the others in shared memory.
//
//   each(f)     calls f(k, offset) for the thread's register items k in
//               range (unrolled; offsets recomputed per call, nothing kept);
//   each_staged(f)  f(k, offset) for its staged items k < n_staged, in order;
//   n_staged    how many staged items are in range (0 unless every register
//               item is);
//   any()       item 0 is in range (then items 0 .. n - 1 are);
//   reduce(s)   the block's merge of its threads' states (leaders hold it);
//   leader()    the thread holding the block's state of its channel;
//   active()    the thread has a channel (channels last: a column < C);
//   slot()      its channel's index in the block's shared constants.
//
// Channel axis 1: block (c, s) of 1-D threads holds the channel's values
// [s * chunk, (s + 1) * chunk), chunk = blockDim.x * (GPUBN_ONCE_ITEMS +
// staged); value j lies in run j / inner at position j % inner, and a
// thread's values are blockDim.x apart, so its offsets follow from one
// division each way.
struct OnceNchw {
    long long first;   // the thread's first value of the channel
    long long m;       // values per channel
    long long inner;
    long long stride;  // channels * inner
    long long off0;    // offset of the first value
    long long r0;      // its position in its run
    long long dn, dr;  // runs and positions from one value to the next
    int c;
    int n_staged;

    // the 64-bit divisions (called subroutines) happen here, once, before
    // any value is held
    __device__ __forceinline__ OnceNchw(long long outer, int channels, long long inner_,
                                        int staged)
        : first((long long)blockIdx.y * blockDim.x * (GPUBN_ONCE_ITEMS + staged) + threadIdx.x),
          m(outer * inner_), inner(inner_), stride((long long)channels * inner_),
          c(blockIdx.x),
          n_staged(staged_in_range(m - first, blockDim.x, staged)) {
        const long long n = first / inner;
        r0 = first - n * inner;
        off0 = n * stride + (long long)c * inner + r0;
        dn = (long long)blockDim.x / inner;
        dr = (long long)blockDim.x - dn * inner;
    }
    // from one of the thread's values (offset, position in its run) to the next
    __device__ __forceinline__ void next(long long& off, long long& r) const {
        off += dn * stride + dr;
        r += dr;
        const bool wrap = r >= inner;
        r -= wrap ? inner : 0;
        off += wrap ? stride - inner : 0;
    }
    // the offsets first, then the calls: loads issued back to back
    template <class F>
    __device__ __forceinline__ void each(F f) const {
        const long long step = blockDim.x;
        long long offs[GPUBN_ONCE_ITEMS];
        long long r = r0, off = off0;
#pragma unroll
        for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k) {
            offs[k] = off;
            next(off, r);
        }
#pragma unroll
        for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k)
            if (first + k * step < m) f(k, offs[k]);
    }
    template <class F>
    __device__ __forceinline__ void each_staged(F f) const {
        long long r = r0, off = off0;
#pragma unroll
        for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k) next(off, r);
#pragma unroll 4
        for (int k = 0; k < n_staged; ++k) {
            f(k, off);
            next(off, r);
        }
    }
    template <class S>
    __device__ __forceinline__ static S reduce(S v) { return block_reduce_1d(v); }
    __device__ __forceinline__ bool any() const { return first < m; }
    __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
    __device__ __forceinline__ bool active() const { return true; }
    __device__ __forceinline__ int channel() const { return c; }
    __device__ __forceinline__ int slot() const { return 0; }
};

// Channels last: block (t, s) of (bx, by) threads, thread column x holding
// channel t * bx + x of rows [s * by * (GPUBN_ONCE_ITEMS + staged), ...), by
// rows apart.
struct OnceNhwc {
    long long first;  // the thread's first row
    long long rows;
    int channels;
    int c;
    int n_staged;

    __device__ __forceinline__ OnceNhwc(long long rows_, int channels_, int staged)
        : first((long long)blockIdx.y * blockDim.y * (GPUBN_ONCE_ITEMS + staged) + threadIdx.y),
          rows(rows_), channels(channels_), c(blockIdx.x * blockDim.x + threadIdx.x),
          n_staged(c < channels ? staged_in_range(rows - first, blockDim.y, staged) : 0) {}
    template <class F>
    __device__ __forceinline__ void each(F f) const {
        if (c >= channels) return;
#pragma unroll
        for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k) {
            const long long r = first + (long long)k * blockDim.y;
            if (r < rows) f(k, r * channels + c);
        }
    }
    template <class F>
    __device__ __forceinline__ void each_staged(F f) const {
#pragma unroll 4
        for (int k = 0; k < n_staged; ++k)
            f(k, (first + (long long)(GPUBN_ONCE_ITEMS + k) * blockDim.y) * channels + c);
    }
    template <class S>
    __device__ __forceinline__ static S reduce(S v) { return block_reduce_columns(v); }
    __device__ __forceinline__ bool any() const { return c < channels && first < rows; }
    __device__ __forceinline__ bool leader() const { return threadIdx.y == 0 && c < channels; }
    __device__ __forceinline__ bool active() const { return c < channels; }
    __device__ __forceinline__ int channel() const { return c; }
    __device__ __forceinline__ int slot() const { return threadIdx.x; }
};

// The Welford state of a thread's values, as Welford::push_group leaves it
// for one group of all of them (shift hi: the first value, lo: the mean of
// the differences, m2 around it): two passes over registers and staged
// values (in item order) and one division, where a push per value costs a
// division each (in float64 a called subroutine, whose register convention
// made ptxas spill).
template <class Acc, class T, class Tile>
__device__ __forceinline__ Welford<Acc> items_welford(const Tile& t,
                                                      const T (&v)[GPUBN_ONCE_ITEMS],
                                                      const T* stage) {
    Welford<Acc> w = Welford<Acc>::identity();
    if (!t.any()) return w;
    w.hi = to_acc(v[0]);  // item 0 is in range whenever any is
    const auto sum = [&](T value) {
        const Acc a = to_acc(value);
        w.lo += a - w.hi;
        w.sum += a;
        ++w.n;
    };
    t.each([&](int k, long long) { sum(v[k]); });
    for (int k = 0; k < t.n_staged; ++k) sum(stage[stage_at(k)]);
    w.lo = w.lo * (Acc(1) / Acc(w.n));
    const auto square = [&](T value) {
        const Acc e = (Acc(to_acc(value)) - w.hi) - w.lo;
        w.m2 = fma_acc(e, e, w.m2);
    };
    t.each([&](int k, long long) { square(v[k]); });
    for (int k = 0; k < t.n_staged; ++k) square(stage[stage_at(k)]);
    return w;
}

// Statistics of channel c from its partials; the split-0 block writes the
// saved statistics and the running update; returns the normalize constants.
template <class Acc>
__device__ __forceinline__ Affine<Acc> once_constants(const Welford<Acc>* partials, int c,
                                                      int splits, bool writer, const Acc* weight,
                                                      const Acc* bias, Acc* mean_out,
                                                      Acc* invstd_out, Acc* running_mean,
                                                      Acc* running_var, int* skipped,
                                                      Acc momentum, Acc eps) {
    const Welford<Acc> w = merge_partials(partials + (long long)c * splits, splits);
    if (writer)
        finish_stats(w, c, mean_out, (Acc*)nullptr, (Acc*)nullptr, invstd_out, running_mean,
                     running_var, skipped, momentum, eps);
    return affine_from(w.final_mean(), w.final_mean_lo(), inv_sqrt(w.m2 / Acc(w.n) + eps),
                       weight ? weight[c] : Acc(1), bias ? bias[c] : Acc(0));
}

template <class T, class Acc>
__device__ __forceinline__ void once_store(T* __restrict__ y, const T* __restrict__ residual,
                                           const Affine<Acc>& k, T v, long long off, int relu) {
    XRes<T, 1> in;
    in.x.v[0] = v;
    if (residual) in.z = load_vec<T, 1>(residual + off);
    affine_body<T, Acc, 1>(y, &k, 0, in, residual != nullptr, relu, off);
}

// The training forward of either layout (Tile: OnceNchw or OnceNhwc).
template <class T, class Acc, class Tile>
__device__ __forceinline__ void forward_once(const Tile& t, const T* __restrict__ x,
                                             T* __restrict__ y, const T* __restrict__ residual,
                                             Welford<Acc>* partials, unsigned int* bar,
                                             const Acc* weight, const Acc* bias, Acc* mean_out,
                                             Acc* invstd_out, Acc* running_mean,
                                             Acc* running_var, int* skipped, int relu,
                                             Acc momentum, Acc eps) {
    const int splits = gridDim.y;
    const int c = t.channel();
    extern __shared__ __align__(16) unsigned char once_stage[];
    T* const stage = reinterpret_cast<T*>(once_stage);
    T v[GPUBN_ONCE_ITEMS];
    t.each([&](int k, long long off) { v[k] = x[off]; });
    t.each_staged([&](int k, long long off) { stage[stage_at(k)] = x[off]; });
    Welford<Acc> w = Tile::reduce(items_welford<Acc>(t, v, stage));
    if (t.leader()) partials[(long long)c * splits + blockIdx.y] = w;
    grid_barrier(bar);
    __shared__ Affine<Acc> kc[32];  // per channel of the block (blockDim.x <= 32 columns)
    if (t.leader())
        kc[t.slot()] = once_constants(partials, c, splits, blockIdx.y == 0, weight, bias,
                                      mean_out, invstd_out, running_mean, running_var, skipped,
                                      momentum, eps);
    __syncthreads();
    if (!t.active()) return;
    const Affine<Acc> k = kc[t.slot()];
    t.each([&](int i, long long off) { once_store<T, Acc>(y, residual, k, v[i], off, relu); });
    t.each_staged([&](int i, long long off) {
        once_store<T, Acc>(y, residual, k, stage[stage_at(i)], off, relu);
    });
}

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, 1)
bn_forward_once_nchw(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual,
                     long long outer, int channels, long long inner, int staged,
                     Welford<Acc>* partials, unsigned int* bar, const Acc* weight,
                     const Acc* bias, Acc* mean_out, Acc* invstd_out, Acc* running_mean,
                     Acc* running_var, int* skipped, int relu, Acc momentum, Acc eps) {
    forward_once<T, Acc>(OnceNchw(outer, channels, inner, staged), x, y, residual, partials, bar,
                         weight, bias, mean_out, invstd_out, running_mean, running_var, skipped,
                         relu, momentum, eps);
}

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, 1)
bn_forward_once_nhwc(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual,
                     long long rows, int channels, int staged, Welford<Acc>* partials,
                     unsigned int* bar, const Acc* weight, const Acc* bias, Acc* mean_out,
                     Acc* invstd_out, Acc* running_mean, Acc* running_var, int* skipped,
                     int relu, Acc momentum, Acc eps) {
    forward_once<T, Acc>(OnceNhwc(rows, channels, staged), x, y, residual, partials, bar, weight,
                         bias, mean_out, invstd_out, running_mean, running_var, skipped, relu,
                         momentum, eps);
}

// ---------------------------------------------------------------------------
// Read-once training backward: dy and x read once and kept on chip (in
// registers and, when the launch stages, shared memory: the masked dy's
// staged array, then x's), (sum dy, sum dy * (x - mean)) reduced across the
// grid, dx written from the copies on chip: 3 passes (dy, x, dx) in one
// launch instead of 5 in 2.  With y_mask (the residual-block epilogue's
// ReLU: the forward's y) dy becomes g = (y <= 0 ? 0 : dy) as it is loaded
// (y is not kept), g_out receives g (= dresidual): 5 passes (dy, y, x; dx,
// g) instead of 7.  The same sums and dx formula as
// bn_backward.cu (finish_grad, DxConsts, dx_body), merged in index order.

// The channel's sums from its partials; the split-0 block writes
// sum_dy_out (dbias) and sum_dy_xhat_out (dweight); returns dx's constants,
// rounded as bn_backward_dx_* forms them from those two.
template <class Acc>
__device__ __forceinline__ DxConsts<Acc> once_dx_constants(const GradSums<Acc>* partials, int c,
                                                           int splits, bool writer,
                                                           const Acc* mean, const Acc* invstd,
                                                           const Acc* weight, Acc* sum_dy_out,
                                                           Acc* sum_dy_xhat_out,
                                                           Acc inv_count) {
    const GradSums<Acc> g = merge_partials(partials + (long long)c * splits, splits);
    if (writer) finish_grad(g, c, invstd, sum_dy_out, sum_dy_xhat_out);
    DxConsts<Acc> q;
    const Acc is = invstd[c];
    q.a = weight ? weight[c] * is : is;
    q.b = g.sum_dy * inv_count;
    q.k = is * (g.sum_dy_xmu * is) * inv_count;
    q.mean = mean[c];
    return q;
}

template <class T, class Acc, class Tile>
__device__ __forceinline__ void backward_once(const Tile& t, const T* __restrict__ dy,
                                              const T* __restrict__ x, T* __restrict__ dx,
                                              const T* __restrict__ y_mask,
                                              T* __restrict__ g_out, int staged,
                                              GradSums<Acc>* partials,
                                              unsigned int* bar, const Acc* mean,
                                              const Acc* invstd, const Acc* weight,
                                              Acc* sum_dy_out, Acc* sum_dy_xhat_out,
                                              Acc inv_count) {
    const int splits = gridDim.y;
    const int c = t.channel();
    extern __shared__ __align__(16) unsigned char once_stage[];
    T* const sg = reinterpret_cast<T*>(once_stage);
    T* const sx = sg + staged * (int)(blockDim.x * blockDim.y);
    T g[GPUBN_ONCE_ITEMS], xv[GPUBN_ONCE_ITEMS], yv[GPUBN_ONCE_ITEMS];
    t.each([&](int k, long long off) {
        g[k] = dy[off];
        xv[k] = x[off];
        if (y_mask) yv[k] = y_mask[off];
    });
    t.each_staged([&](int k, long long off) {
        T gk = dy[off];
        if (y_mask) {
            if (!relu_keeps(Acc(to_acc(y_mask[off])))) store_acc(gk, Acc(0));
            if (g_out) g_out[off] = gk;
        }
        sg[stage_at(k)] = gk;
        sx[stage_at(k)] = x[off];
    });
    __shared__ Acc means[32];  // per channel of the block, read while the loads fly
    if (t.leader()) means[t.slot()] = mean[c];
    __syncthreads();
    const Acc mu = t.active() ? means[t.slot()] : Acc(0);
    GradSums<Acc> s = GradSums<Acc>::identity();
    t.each([&](int k, long long off) {
        if (y_mask) {
            if (!relu_keeps(Acc(to_acc(yv[k])))) store_acc(g[k], Acc(0));
            if (g_out) g_out[off] = g[k];
        }
        const Acc d = to_acc(g[k]);
        s.sum_dy += d;
        s.sum_dy_xmu = fma_acc(d, Acc(to_acc(xv[k])) - mu, s.sum_dy_xmu);
    });
    for (int k = 0; k < t.n_staged; ++k) {
        const Acc d = to_acc(sg[stage_at(k)]);
        s.sum_dy += d;
        s.sum_dy_xmu = fma_acc(d, Acc(to_acc(sx[stage_at(k)])) - mu, s.sum_dy_xmu);
    }
    s = Tile::reduce(s);
    if (t.leader()) partials[(long long)c * splits + blockIdx.y] = s;
    grid_barrier(bar);
    __shared__ DxConsts<Acc> kq[32];
    if (t.leader())
        kq[t.slot()] = once_dx_constants(partials, c, splits, blockIdx.y == 0, mean, invstd,
                                         weight, sum_dy_out, sum_dy_xhat_out, inv_count);
    __syncthreads();
    if (!t.active()) return;
    const DxConsts<Acc> q = kq[t.slot()];
    const auto store_dx = [&](T gk, T xk, long long off) {
        GradIn<T, 1, false> p;  // the two-pass dx's inputs at one position
        p.dy.v[0] = gk;
        p.x.v[0] = xk;
        dx_body<T, Acc, 1>(dx, &q, 0, p, off, 1);
    };
    t.each([&](int k, long long off) { store_dx(g[k], xv[k], off); });
    t.each_staged([&](int k, long long off) {
        store_dx(sg[stage_at(k)], sx[stage_at(k)], off);
    });
}

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, 1)
bn_backward_once_nchw(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                      const T* __restrict__ y_mask, T* __restrict__ g_out, long long outer,
                      int channels, long long inner, int staged, GradSums<Acc>* partials,
                      unsigned int* bar, const Acc* mean, const Acc* invstd, const Acc* weight,
                      Acc* sum_dy_out, Acc* sum_dy_xhat_out, Acc inv_count) {
    backward_once<T, Acc>(OnceNchw(outer, channels, inner, staged), dy, x, dx, y_mask, g_out,
                          staged, partials, bar, mean, invstd, weight, sum_dy_out,
                          sum_dy_xhat_out, inv_count);
}

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, 1)
bn_backward_once_nhwc(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                      const T* __restrict__ y_mask, T* __restrict__ g_out, long long rows,
                      int channels, int staged, GradSums<Acc>* partials, unsigned int* bar,
                      const Acc* mean, const Acc* invstd, const Acc* weight, Acc* sum_dy_out,
                      Acc* sum_dy_xhat_out, Acc inv_count) {
    backward_once<T, Acc>(OnceNhwc(rows, channels, staged), dy, x, dx, y_mask, g_out, staged,
                          partials, bar,
                          mean, invstd, weight, sum_dy_out, sum_dy_xhat_out, inv_count);
}

}  // namespace gpubn
