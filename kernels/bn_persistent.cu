// bn_persistent.cu -- read-once ("persistent") training forward: one
// cooperative launch reads x once, keeps it in registers, and writes y:
// 2 passes over the tensor (3 with a residual) instead of 3 in 2 launches.
//
//   1. every thread loads its GPUBN_ONCE_ITEMS elements of one channel (channel
//      axis 1) or of one channel column (channels last) into registers and
//      accumulates a Welford state; the block merges its threads' states and
//      writes one partial per (channel, split) block;
//   2. a grid barrier (the project's own: an atomic arrival count and
//      fences, no cooperative-groups header; the launch is cooperative, so
//      every block is co-resident);
//   3. every block merges its channel's S partials in index order (so all
//      blocks of a channel agree bitwise, run after run), the split-0 block
//      writes mean / invstd / the running statistics, guarded when
//      `skipped` is non-null (bn_stats.cu's finish_stats), and all normalize from the registers with bn_forward.cu's
//      constants and epilogue (residual add, ReLU).
//
// The launch plan (gpubn/launch.py: once_launch) picks these kernels only
// when the grid holds the whole tensor and is co-resident; otherwise
// bn_stats_* + bn_apply_*.
//
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::bn_forward_once_nchw<T, Acc>   grid (C, S), block (threads)
//   gpubn::bn_forward_once_nhwc<T, Acc>   grid (ceil(C / 32), S), block (32, 8)
#include "bn_stats.cu"
#include "bn_forward.cu"

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

// The channel's S partials merged in index order (the same in every block).
template <class Acc>
__device__ __forceinline__ Welford<Acc> merge_partials(const Welford<Acc>* p, int splits) {
    Welford<Acc> w = Welford<Acc>::identity();
    for (int i = 0; i < splits; ++i)
        w = Welford<Acc>::merge(w, Welford<Acc>::load_volatile(p + i));
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

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
bn_forward_once_nchw(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual,
                     long long outer, int channels, long long inner, Welford<Acc>* partials,
                     unsigned int* bar, const Acc* weight, const Acc* bias, Acc* mean_out,
                     Acc* invstd_out, Acc* running_mean, Acc* running_var, int* skipped,
                     int relu, Acc momentum, Acc eps) {
    const int c = blockIdx.x;
    const int splits = gridDim.y;
    const long long m = outer * inner;
    // split s holds the channel's values [s * chunk, (s + 1) * chunk)
    const long long chunk = (long long)blockDim.x * GPUBN_ONCE_ITEMS;
    const long long first = (long long)blockIdx.y * chunk + threadIdx.x;
    T v[GPUBN_ONCE_ITEMS];
    long long off[GPUBN_ONCE_ITEMS];
#pragma unroll
    for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k) {
        const long long j = first + (long long)k * blockDim.x;
        const long long n = j / inner;
        off[k] = j < m ? (n * channels + c) * inner + (j - n * inner) : -1;
        if (off[k] >= 0) v[k] = x[off[k]];
    }
    Welford<Acc> w = Welford<Acc>::identity();
#pragma unroll
    for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k)
        if (off[k] >= 0) w.push(to_acc(v[k]));
    w = block_reduce_1d(w);
    if (threadIdx.x == 0) partials[(long long)c * splits + blockIdx.y] = w;
    grid_barrier(bar);
    __shared__ Affine<Acc> kc;
    if (threadIdx.x == 0)
        kc = once_constants(partials, c, splits, blockIdx.y == 0, weight, bias, mean_out,
                            invstd_out, running_mean, running_var, skipped, momentum, eps);
    __syncthreads();
    const Affine<Acc> k = kc;
#pragma unroll
    for (int i = 0; i < GPUBN_ONCE_ITEMS; ++i)
        if (off[i] >= 0) once_store<T, Acc>(y, residual, k, v[i], off[i], relu);
}

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS)
bn_forward_once_nhwc(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual,
                     long long rows, int channels, Welford<Acc>* partials, unsigned int* bar,
                     const Acc* weight, const Acc* bias, Acc* mean_out, Acc* invstd_out,
                     Acc* running_mean, Acc* running_var, int* skipped, int relu, Acc momentum,
                     Acc eps) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;  // this thread's column
    const int splits = gridDim.y;
    const long long chunk = (long long)blockDim.y * GPUBN_ONCE_ITEMS;
    const long long first = (long long)blockIdx.y * chunk + threadIdx.y;
    T v[GPUBN_ONCE_ITEMS];
    long long off[GPUBN_ONCE_ITEMS];
#pragma unroll
    for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k) {
        const long long r = first + (long long)k * blockDim.y;
        off[k] = (r < rows && c < channels) ? r * channels + c : -1;
        if (off[k] >= 0) v[k] = x[off[k]];
    }
    Welford<Acc> w = Welford<Acc>::identity();
#pragma unroll
    for (int k = 0; k < GPUBN_ONCE_ITEMS; ++k)
        if (off[k] >= 0) w.push(to_acc(v[k]));
    w = block_reduce_columns(w);
    if (threadIdx.y == 0 && c < channels) partials[(long long)c * splits + blockIdx.y] = w;
    grid_barrier(bar);
    __shared__ Affine<Acc> kc[32];  // per column of the block (blockDim.x <= 32)
    if (threadIdx.y == 0 && c < channels)
        kc[threadIdx.x] = once_constants(partials, c, splits, blockIdx.y == 0, weight, bias,
                                         mean_out, invstd_out, running_mean, running_var,
                                         skipped, momentum, eps);
    __syncthreads();
    if (c >= channels) return;
    const Affine<Acc> k = kc[threadIdx.x];
#pragma unroll
    for (int i = 0; i < GPUBN_ONCE_ITEMS; ++i)
        if (off[i] >= 0) once_store<T, Acc>(y, residual, k, v[i], off[i], relu);
}

}  // namespace gpubn
