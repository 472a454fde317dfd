// layer_norm.cu -- layer normalization over the rows of a (rows, n) array.
//
// Forward: per row, Welford over the row (vector loads, Chan merges across
// lanes), then y = (x - mean) * rstd * weight + bias in a second sweep of the
// row (which a block has just read: an L2 hit for all but the longest rows).
// Per-row mean and rstd = 1 / sqrt(var + eps) are written for the backward.
//
// Backward, dx per row: with g = dy * weight and xhat = (x - mean) * rstd,
//   dx = rstd * (g - sum(g) / n - xhat * sum(g * xhat) / n),
// the two row sums reduced like the statistics, then a second sweep.
//
// Two shapes of the row kernels, picked by the launch configuration:
//   *_warp   block (32, R): one warp per row, R rows per block, shuffles only
//            (short rows: up to a few hundred vector units);
//   *_block  block (T, 1): one block per row, warp shuffles + shared memory.
// Both walk rows grid-stride, so any number of rows fits any grid.
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
// start, start + step, ...
// ---------------------------------------------------------------------------
template <class T, class Acc, int VEC>
__device__ __forceinline__ Welford<Acc> row_welford(const T* __restrict__ xr, long long n_v,
                                                    long long start, long long step) {
    Welford<Acc> w = Welford<Acc>::identity();
    for (long long j = start; j < n_v; j += step) {
        const Vec<T, VEC> v = load_vec<T, VEC>(xr + j * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) w.push(to_acc(v.v[k]));
    }
    return w;
}

template <class Acc>
__device__ __forceinline__ Acc row_rstd(const Welford<Acc>& w, Acc eps) {
    return inv_sqrt(w.m2 / Acc(w.n) + eps);
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void row_normalize(const T* __restrict__ xr, T* __restrict__ yr,
                                              long long n_v, long long start, long long step,
                                              Acc mean, Acc rstd, const Acc* weight,
                                              const Acc* bias) {
    for (long long j = start; j < n_v; j += step) {
        const Vec<T, VEC> in = load_vec<T, VEC>(xr + j * VEC);
        Vec<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const long long col = j * VEC + k;
            const Acc xhat = (Acc(to_acc(in.v[k])) - mean) * rstd;
            const Acc w = weight ? weight[col] : Acc(1);
            const Acc b = bias ? bias[col] : Acc(0);
            store_acc(out.v[k], fma_acc(xhat, w, b));
        }
        store_vec<T, VEC>(yr + j * VEC, out);
    }
}

// sum g and sum g * xhat over (a thread's share of) a row; g = dy * weight.
template <class T, class Acc, int VEC>
__device__ __forceinline__ GradSums<Acc> row_grad_sums(const T* __restrict__ dyr,
                                                       const T* __restrict__ xr, long long n_v,
                                                       long long start, long long step,
                                                       Acc mean, Acc rstd, const Acc* weight) {
    GradSums<Acc> s = GradSums<Acc>::identity();
    for (long long j = start; j < n_v; j += step) {
        const Vec<T, VEC> gv = load_vec<T, VEC>(dyr + j * VEC);
        const Vec<T, VEC> xv = load_vec<T, VEC>(xr + j * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const Acc w = weight ? weight[j * VEC + k] : Acc(1);
            const Acc g = Acc(to_acc(gv.v[k])) * w;
            const Acc xhat = (Acc(to_acc(xv.v[k])) - mean) * rstd;
            s.sum_dy += g;
            s.sum_dy_xmu = fma_acc(g, xhat, s.sum_dy_xmu);
        }
    }
    return s;
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void row_dx(const T* __restrict__ dyr, const T* __restrict__ xr,
                                       T* __restrict__ dxr, long long n_v, long long start,
                                       long long step, Acc mean, Acc rstd, const Acc* weight,
                                       Acc mean_g, Acc mean_gx) {
    for (long long j = start; j < n_v; j += step) {
        const Vec<T, VEC> gv = load_vec<T, VEC>(dyr + j * VEC);
        const Vec<T, VEC> xv = load_vec<T, VEC>(xr + j * VEC);
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
}

template <class Acc>
__device__ __forceinline__ Acc shfl0(Acc v) {
    return __shfl_sync(0xffffffffu, v, 0);
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------
template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_forward_warp(const T* __restrict__ x, T* __restrict__ y, const Acc* weight, const Acc* bias,
                Acc* mean_out, Acc* rstd_out, long long rows, long long n, Acc eps) {
    const long long n_v = n / VEC;
    const long long row_step = (long long)gridDim.x * blockDim.y;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += row_step) {
        const T* xr = x + r * n;
        Welford<Acc> w = row_welford<T, Acc, VEC>(xr, n_v, threadIdx.x, 32);
        w = warp_reduce(w);
        Acc mean = Acc(0), rstd = Acc(0);
        if (threadIdx.x == 0) {
            mean = w.final_mean();
            rstd = row_rstd(w, eps);
            mean_out[r] = mean;
            rstd_out[r] = rstd;
        }
        mean = shfl0(mean);
        rstd = shfl0(rstd);
        row_normalize<T, Acc, VEC>(xr, y + r * n, n_v, threadIdx.x, 32, mean, rstd, weight, bias);
    }
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_forward_block(const T* __restrict__ x, T* __restrict__ y, const Acc* weight, const Acc* bias,
                 Acc* mean_out, Acc* rstd_out, long long rows, long long n, Acc eps) {
    __shared__ Acc row_stats[2];
    const long long n_v = n / VEC;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * n;
        Welford<Acc> w = row_welford<T, Acc, VEC>(xr, n_v, threadIdx.x, blockDim.x);
        w = block_reduce_1d(w);  // ends with a barrier: row_stats of the last row were read
        if (threadIdx.x == 0) {
            const Acc mean = w.final_mean();
            const Acc rstd = row_rstd(w, eps);
            mean_out[r] = mean;
            rstd_out[r] = rstd;
            row_stats[0] = mean;
            row_stats[1] = rstd;
        }
        __syncthreads();
        row_normalize<T, Acc, VEC>(xr, y + r * n, n_v, threadIdx.x, blockDim.x, row_stats[0],
                                   row_stats[1], weight, bias);
    }
}

// ---------------------------------------------------------------------------
// Backward: dx
// ---------------------------------------------------------------------------
template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_backward_dx_warp(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                    const Acc* mean, const Acc* rstd, const Acc* weight, long long rows,
                    long long n) {
    const long long n_v = n / VEC;
    const Acc inv_n = Acc(1) / Acc(n);
    const long long row_step = (long long)gridDim.x * blockDim.y;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < rows; r += row_step) {
        const long long off = r * n;
        const Acc m = mean[r], rs = rstd[r];
        GradSums<Acc> s = row_grad_sums<T, Acc, VEC>(dy + off, x + off, n_v, threadIdx.x, 32, m,
                                                     rs, weight);
        s = warp_reduce(s);
        const Acc mean_g = shfl0(s.sum_dy) * inv_n;
        const Acc mean_gx = shfl0(s.sum_dy_xmu) * inv_n;
        row_dx<T, Acc, VEC>(dy + off, x + off, dx + off, n_v, threadIdx.x, 32, m, rs, weight,
                            mean_g, mean_gx);
    }
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_backward_dx_block(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                     const Acc* mean, const Acc* rstd, const Acc* weight, long long rows,
                     long long n) {
    __shared__ Acc row_sums[2];
    const long long n_v = n / VEC;
    const Acc inv_n = Acc(1) / Acc(n);
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long off = r * n;
        const Acc m = mean[r], rs = rstd[r];
        GradSums<Acc> s = row_grad_sums<T, Acc, VEC>(dy + off, x + off, n_v, threadIdx.x,
                                                     blockDim.x, m, rs, weight);
        s = block_reduce_1d(s);  // ends with a barrier: row_sums of the last row were read
        if (threadIdx.x == 0) {
            row_sums[0] = s.sum_dy * inv_n;
            row_sums[1] = s.sum_dy_xmu * inv_n;
        }
        __syncthreads();
        row_dx<T, Acc, VEC>(dy + off, x + off, dx + off, n_v, threadIdx.x, blockDim.x, m, rs,
                            weight, row_sums[0], row_sums[1]);
    }
}

// ---------------------------------------------------------------------------
// Backward: dweight, dbias.  Grid (ceil(n / bx), S), blocks (bx, by): thread
// (tx, ty) owns column blockIdx.x * bx + tx (coalesced across tx) and every
// by-th row of the block's share of the rows.  GradSums fields hold
// (sum dy, sum dy * xhat).
// ---------------------------------------------------------------------------
template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
ln_backward_wgrad(const T* __restrict__ dy, const T* __restrict__ x, const Acc* mean,
                  const Acc* rstd, long long rows, int n, GradSums<Acc>* partials,
                  unsigned int* counters, Acc* dweight_out, Acc* dbias_out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const long long splits = gridDim.y;
    const long long chunk = (rows + splits - 1) / splits;
    const long long begin = (long long)blockIdx.y * chunk;
    const long long end = min_ll(begin + chunk, rows);
    GradSums<Acc> s = GradSums<Acc>::identity();
    if (c < n) {
        for (long long r = begin + threadIdx.y; r < end; r += blockDim.y) {
            const long long off = r * n + c;
            const Acc g = to_acc(dy[off]);
            const Acc xhat = (Acc(to_acc(x[off])) - mean[r]) * rstd[r];
            s.sum_dy += g;
            s.sum_dy_xmu = fma_acc(g, xhat, s.sum_dy_xmu);
        }
    }
    channel_finish_nhwc(s, n, partials, counters, [&](const GradSums<Acc>& total, int col) {
        if (dweight_out) dweight_out[col] = total.sum_dy_xmu;
        if (dbias_out) dbias_out[col] = total.sum_dy;
    });
}

}  // namespace gpubn
