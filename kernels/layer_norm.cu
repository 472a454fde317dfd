// layer_norm.cu -- layer normalization over the rows of a (rows, n) array.
//
// Forward: per row, Welford over the row (vector loads, Chan merges across
// lanes), then y = (x - hi - lo) * rstd * weight + bias (hi + lo: the row
// mean as a float pair, so rows far from zero keep their accuracy) in a
// second sweep over
// the row held in registers (rows of up to GPUBN_LN_CACHE_UNITS vector units
// per thread: x is read once) or read again (longer rows: an L2 hit for most).
// Per-row mean and rstd = 1 / sqrt(var + eps) are written for the backward.
//
// Backward, dx per row: with g = dy * weight and xhat = (x - mean) * rstd,
//   dx = rstd * (g - sum(g) / n - xhat * sum(g * xhat) / n),
// the two row sums reduced like the statistics, then a second sweep (dy and x
// held in registers like x in the forward, or read again).
//
// Two shapes of the row kernels, picked by the launch configuration:
//   *_warp   block (32, R): one warp per row, R rows per block, shuffles only
//            (short rows: up to a few hundred vector units);
//   *_block  block (T, 1): one block per row, warp shuffles + shared memory.
// Both walk rows grid-stride, so any number of rows fits any grid, and read
// weight / bias from shared memory when the launch stages them there.
//
// dweight / dbias: ln_backward_wgrad, a column reduction over the rows,
//   dweight[j] = sum_rows dy * xhat,  dbias[j] = sum_rows dy,
// in two stages within one launch (grid (column tiles, row splits); partial
// sums per split, merged in split order by the last block of each tile), so
// results are deterministic: no floating-point atomics.
//
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::ln_forward_warp<T, Acc, VEC>,     gpubn::ln_forward_block<T, Acc, VEC>
//   gpubn::ln_backward_dx_warp<T, Acc, VEC>, gpubn::ln_backward_dx_block<T, Acc, VEC>
//   gpubn::ln_backward_wgrad<T, Acc>
#include "gpubn_common.cuh"

namespace gpubn {

// ---------------------------------------------------------------------------
// Row helpers.  A row is n_v = n / VEC vector units; a thread handles units
// start, start + step, ...  When a thread's share is at most
// GPUBN_LN_CACHE_UNITS units (the launch configuration sizes blocks for it
// whenever the row allows) the row is kept in registers between the
// reduction and the elementwise sweep, so it is read from memory once;
// longer rows are read again in the second sweep.
// ---------------------------------------------------------------------------
#define GPUBN_LN_CACHE_UNITS 8

template <class T, int VEC>
struct RowCache {
    Vec<T, VEC> v[GPUBN_LN_CACHE_UNITS];
};

__device__ __forceinline__ bool row_fits_cache(long long n_v, long long step) {
    return n_v <= GPUBN_LN_CACHE_UNITS * step;
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void push_vec(Welford<Acc>& w, const Vec<T, VEC>& v) {
    Acc a[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = to_acc(v.v[k]);
    w.push_group(a);
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ Welford<Acc> row_welford(const T* __restrict__ xr, long long n_v,
                                                    long long start, long long step, bool cached,
                                                    RowCache<T, VEC>& cache) {
    Welford<Acc> w = Welford<Acc>::identity();
    if (cached) {
#pragma unroll
        for (int u = 0; u < GPUBN_LN_CACHE_UNITS; ++u)
            if (start + u * step < n_v) cache.v[u] = load_vec<T, VEC>(xr + (start + u * step) * VEC);
#pragma unroll
        for (int u = 0; u < GPUBN_LN_CACHE_UNITS; ++u)
            if (start + u * step < n_v) push_vec<T, Acc, VEC>(w, cache.v[u]);
    } else {
        for (long long j = start; j < n_v; j += step)
            push_vec<T, Acc, VEC>(w, load_vec<T, VEC>(xr + j * VEC));
    }
    return w;
}

template <class Acc>
__device__ __forceinline__ Acc row_rstd(const Welford<Acc>& w, Acc eps) {
    return inv_sqrt(w.m2 / Acc(w.n) + eps);
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void normalize_unit(const Vec<T, VEC>& in, T* __restrict__ yr,
                                               long long j, Acc mean, Acc mean_lo, Acc rstd,
                                               const Acc* weight, const Acc* bias) {
    Vec<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const long long col = j * VEC + k;
        const Acc xhat = ((Acc(to_acc(in.v[k])) - mean) - mean_lo) * rstd;
        const Acc w = weight ? weight[col] : Acc(1);
        const Acc b = bias ? bias[col] : Acc(0);
        store_acc(out.v[k], fma_acc(xhat, w, b));
    }
    store_vec<T, VEC>(yr + j * VEC, out);
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void row_normalize(const T* __restrict__ xr, T* __restrict__ yr,
                                              long long n_v, long long start, long long step,
                                              bool cached, const RowCache<T, VEC>& cache,
                                              Acc mean, Acc mean_lo, Acc rstd, const Acc* weight,
                                              const Acc* bias) {
    if (cached) {
#pragma unroll
        for (int u = 0; u < GPUBN_LN_CACHE_UNITS; ++u) {
            const long long j = start + u * step;
            if (j < n_v)
                normalize_unit<T, Acc, VEC>(cache.v[u], yr, j, mean, mean_lo, rstd, weight, bias);
        }
    } else {
        for (long long j = start; j < n_v; j += step)
            normalize_unit<T, Acc, VEC>(load_vec<T, VEC>(xr + j * VEC), yr, j, mean, mean_lo, rstd,
                                        weight, bias);
    }
}

// sum g and sum g * xhat over one vector unit; g = dy * weight.
template <class T, class Acc, int VEC>
__device__ __forceinline__ void grad_unit(GradSums<Acc>& s, const Vec<T, VEC>& gv,
                                          const Vec<T, VEC>& xv, long long j, Acc mean,
                                          Acc rstd, const Acc* weight) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const Acc w = weight ? weight[j * VEC + k] : Acc(1);
        const Acc g = Acc(to_acc(gv.v[k])) * w;
        const Acc xhat = (Acc(to_acc(xv.v[k])) - mean) * rstd;
        s.sum_dy += g;
        s.sum_dy_xmu = fma_acc(g, xhat, s.sum_dy_xmu);
    }
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ GradSums<Acc> row_grad_sums(const T* __restrict__ dyr,
                                                       const T* __restrict__ xr, long long n_v,
                                                       long long start, long long step,
                                                       bool cached, RowCache<T, VEC>& gcache,
                                                       RowCache<T, VEC>& xcache, Acc mean,
                                                       Acc rstd, const Acc* weight) {
    GradSums<Acc> s = GradSums<Acc>::identity();
    if (cached) {
#pragma unroll
        for (int u = 0; u < GPUBN_LN_CACHE_UNITS; ++u) {
            const long long j = start + u * step;
            if (j < n_v) {
                gcache.v[u] = load_vec<T, VEC>(dyr + j * VEC);
                xcache.v[u] = load_vec<T, VEC>(xr + j * VEC);
                grad_unit<T, Acc, VEC>(s, gcache.v[u], xcache.v[u], j, mean, rstd, weight);
            }
        }
    } else {
        for (long long j = start; j < n_v; j += step)
            grad_unit<T, Acc, VEC>(s, load_vec<T, VEC>(dyr + j * VEC),
                                   load_vec<T, VEC>(xr + j * VEC), j, mean, rstd, weight);
    }
    return s;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over one vector unit.
template <class T, class Acc, int VEC>
__device__ __forceinline__ void dx_unit(const Vec<T, VEC>& gv, const Vec<T, VEC>& xv,
                                        T* __restrict__ dxr, long long j, Acc mean, Acc rstd,
                                        const Acc* weight, Acc mean_g, Acc mean_gx) {
    Vec<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const Acc w = weight ? weight[j * VEC + k] : Acc(1);
        const Acc g = Acc(to_acc(gv.v[k])) * w;
        const Acc xhat = (Acc(to_acc(xv.v[k])) - mean) * rstd;
        store_acc(out.v[k], rstd * fma_acc(-xhat, mean_gx, g - mean_g));
    }
    store_vec<T, VEC>(dxr + j * VEC, out);
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void row_dx(const T* __restrict__ dyr, const T* __restrict__ xr,
                                       T* __restrict__ dxr, long long n_v, long long start,
                                       long long step, bool cached,
                                       const RowCache<T, VEC>& gcache,
                                       const RowCache<T, VEC>& xcache, Acc mean, Acc rstd,
                                       const Acc* weight, Acc mean_g, Acc mean_gx) {
    if (cached) {
#pragma unroll
        for (int u = 0; u < GPUBN_LN_CACHE_UNITS; ++u) {
            const long long j = start + u * step;
            if (j < n_v)
                dx_unit<T, Acc, VEC>(gcache.v[u], xcache.v[u], dxr, j, mean, rstd, weight, mean_g,
                                     mean_gx);
        }
    } else {
        for (long long j = start; j < n_v; j += step)
            dx_unit<T, Acc, VEC>(load_vec<T, VEC>(dyr + j * VEC), load_vec<T, VEC>(xr + j * VEC),
                                 dxr, j, mean, rstd, weight, mean_g, mean_gx);
    }
}

template <class Acc>
__device__ __forceinline__ Acc shfl0(Acc v) {
    return __shfl_sync(0xffffffffu, v, 0);
}

// weight / bias are the same n values for every row: with `stage` set the
// block copies them once into dynamic shared memory (weight first, then bias,
// n Acc each, only those that are non-null; the launch sizes it) and reads
// them from there.  Every thread must call this (it has a barrier).
template <class Acc>
__device__ __forceinline__ void stage_params(const Acc*& weight, const Acc*& bias, long long n,
                                             int stage) {
    extern __shared__ __align__(16) unsigned char ln_params[];
    if (!stage) return;
    Acc* sw = reinterpret_cast<Acc*>(ln_params);
    Acc* sb = sw + (weight ? n : 0);
    const int threads = blockDim.x * blockDim.y;
    for (long long i = threadIdx.y * blockDim.x + threadIdx.x; i < n; i += threads) {
        if (weight) sw[i] = weight[i];
        if (bias) sb[i] = bias[i];
    }
    __syncthreads();
    if (weight) weight = sw;
    if (bias) bias = sb;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_forward_warp(const T* __restrict__ x, T* __restrict__ y, const Acc* weight, const Acc* bias,
                Acc* mean_out, Acc* rstd_out, long long rows, long long n, Acc eps, int stage) {
    stage_params(weight, bias, n, stage);
    const long long n_v = n / VEC;
    const bool cached = row_fits_cache(n_v, 32);
    const long long row_step = (long long)gridDim.x * blockDim.y;
    RowCache<T, VEC> cache;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += row_step) {
        const T* xr = x + r * n;
        Welford<Acc> w = row_welford<T, Acc, VEC>(xr, n_v, threadIdx.x, 32, cached, cache);
        w = warp_reduce(w);
        Acc mean = Acc(0), mean_lo = Acc(0), rstd = Acc(0);
        if (threadIdx.x == 0) {
            mean = w.final_mean();
            mean_lo = w.final_mean_lo();
            rstd = row_rstd(w, eps);
            mean_out[r] = mean;
            rstd_out[r] = rstd;
        }
        mean = shfl0(mean);
        mean_lo = shfl0(mean_lo);
        rstd = shfl0(rstd);
        row_normalize<T, Acc, VEC>(xr, y + r * n, n_v, threadIdx.x, 32, cached, cache, mean,
                                   mean_lo, rstd, weight, bias);
    }
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_forward_block(const T* __restrict__ x, T* __restrict__ y, const Acc* weight, const Acc* bias,
                 Acc* mean_out, Acc* rstd_out, long long rows, long long n, Acc eps, int stage) {
    __shared__ Acc row_stats[3];  // mean (hi, lo), rstd
    stage_params(weight, bias, n, stage);
    const long long n_v = n / VEC;
    const bool cached = row_fits_cache(n_v, blockDim.x);
    RowCache<T, VEC> cache;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * n;
        Welford<Acc> w = row_welford<T, Acc, VEC>(xr, n_v, threadIdx.x, blockDim.x, cached, cache);
        w = block_reduce_1d(w);  // ends with a barrier: row_stats of the last row were read
        if (threadIdx.x == 0) {
            const Acc mean = w.final_mean();
            const Acc rstd = row_rstd(w, eps);
            mean_out[r] = mean;
            rstd_out[r] = rstd;
            row_stats[0] = mean;
            row_stats[1] = w.final_mean_lo();
            row_stats[2] = rstd;
        }
        __syncthreads();
        row_normalize<T, Acc, VEC>(xr, y + r * n, n_v, threadIdx.x, blockDim.x, cached, cache,
                                   row_stats[0], row_stats[1], row_stats[2], weight, bias);
    }
}

// ---------------------------------------------------------------------------
// Backward: dx
// ---------------------------------------------------------------------------
template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_backward_dx_warp(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                    const Acc* mean, const Acc* rstd, const Acc* weight, long long rows,
                    long long n, int stage) {
    const Acc* no_bias = nullptr;
    stage_params(weight, no_bias, n, stage);
    const long long n_v = n / VEC;
    const bool cached = row_fits_cache(n_v, 32);
    const Acc inv_n = Acc(1) / Acc(n);
    const long long row_step = (long long)gridDim.x * blockDim.y;
    RowCache<T, VEC> gcache, xcache;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += row_step) {
        const long long off = r * n;
        const Acc m = mean[r], rs = rstd[r];
        GradSums<Acc> s = row_grad_sums<T, Acc, VEC>(dy + off, x + off, n_v, threadIdx.x, 32,
                                                     cached, gcache, xcache, m, rs, weight);
        s = warp_reduce(s);
        const Acc mean_g = shfl0(s.sum_dy) * inv_n;
        const Acc mean_gx = shfl0(s.sum_dy_xmu) * inv_n;
        row_dx<T, Acc, VEC>(dy + off, x + off, dx + off, n_v, threadIdx.x, 32, cached, gcache,
                            xcache, m, rs, weight, mean_g, mean_gx);
    }
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_backward_dx_block(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                     const Acc* mean, const Acc* rstd, const Acc* weight, long long rows,
                     long long n, int stage) {
    __shared__ Acc row_sums[2];
    const Acc* no_bias = nullptr;
    stage_params(weight, no_bias, n, stage);
    const long long n_v = n / VEC;
    const bool cached = row_fits_cache(n_v, blockDim.x);
    const Acc inv_n = Acc(1) / Acc(n);
    RowCache<T, VEC> gcache, xcache;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long off = r * n;
        const Acc m = mean[r], rs = rstd[r];
        GradSums<Acc> s = row_grad_sums<T, Acc, VEC>(dy + off, x + off, n_v, threadIdx.x,
                                                     blockDim.x, cached, gcache, xcache, m, rs,
                                                     weight);
        s = block_reduce_1d(s);  // ends with a barrier: row_sums of the last row were read
        if (threadIdx.x == 0) {
            row_sums[0] = s.sum_dy * inv_n;
            row_sums[1] = s.sum_dy_xmu * inv_n;
        }
        __syncthreads();
        row_dx<T, Acc, VEC>(dy + off, x + off, dx + off, n_v, threadIdx.x, blockDim.x, cached,
                            gcache, xcache, m, rs, weight, row_sums[0], row_sums[1]);
    }
}

// ---------------------------------------------------------------------------
// Backward: dweight, dbias.  Grid (ceil(n / bx), S), blocks (bx, by): thread
// (tx, ty) owns column blockIdx.x * bx + tx (coalesced across tx) and every
// by-th row of the block's share of the rows.  GradSums fields hold
// (sum dy, sum dy * xhat).
// ---------------------------------------------------------------------------
template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, GPUBN_REDUCE_MIN_BLOCKS)
ln_backward_wgrad(const T* __restrict__ dy, const T* __restrict__ x, const Acc* mean,
                  const Acc* rstd, long long rows, int n, GradSums<Acc>* partials,
                  unsigned int* counters, Acc* dweight_out, Acc* dbias_out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const long long splits = gridDim.y;
    const long long chunk = (rows + splits - 1) / splits;
    const long long begin = (long long)blockIdx.y * chunk;
    const long long end = min_ll(begin + chunk, rows);
    GradSums<Acc> s[1] = {GradSums<Acc>::identity()};
    if (c < n) {
        for (long long r = begin + threadIdx.y; r < end; r += blockDim.y) {
            const long long off = r * n + c;
            const Acc g = to_acc(dy[off]);
            const Acc xhat = (Acc(to_acc(x[off])) - mean[r]) * rstd[r];
            s[0].sum_dy += g;
            s[0].sum_dy_xmu = fma_acc(g, xhat, s[0].sum_dy_xmu);
        }
    }
    channel_finish_nhwc(s, n, partials, counters, [&](const GradSums<Acc>& total, int col) {
        if (dweight_out) dweight_out[col] = total.sum_dy_xmu;
        if (dbias_out) dbias_out[col] = total.sum_dy;
    });
}

}  // namespace gpubn
