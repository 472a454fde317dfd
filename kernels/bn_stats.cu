// bn_stats.cu -- per-channel statistics in one launch.
//
// Welford per thread (groups of loaded values merged once each, around a
// per-thread shift, see Welford in gpubn_common.cuh), Chan merges across the
// block, and (when the launch splits a channel over S blocks) partial states
// merged in index order by the last block of each channel.  The finishing
// thread writes whichever outputs are non-null:
//   mean_out, m2_out      the channel's mean (rounded) and M2,
//   mean_lo_out           what rounding the mean to Acc left out (the apply
//                         kernels subtract it too: accuracy far from zero),
//   invstd_out            1 / sqrt(M2 / n + eps) (training forward),
//   running_mean/_var     running = (1 - momentum) * running + momentum * batch,
//                         with the unbiased batch variance M2 / (n - 1).
//   skipped               guarded running statistics (non-null: the guard is on):
//                         a channel whose batch mean or unbiased variance is not
//                         finite keeps both running statistics and gets
//                         skipped[c] = 1, every other channel updates and gets 0.
//
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::bn_stats_nchw<T, Acc, VEC>   channel axis with inner > 1
//   gpubn::bn_stats_nhwc<T, Acc, VEC>   channels last (inner == 1), VEC channels
//                                       per thread
// gridDim.z > 1: ghost batch norm, statistics per group (see at_group); the
// running statistics and `skipped` are then null (the host averages the groups).
#include "gpubn_common.cuh"

namespace gpubn {

template <class Acc>
__device__ __forceinline__ void finish_stats(const Welford<Acc>& w, int c, Acc* mean_out,
                                             Acc* mean_lo_out, Acc* m2_out, Acc* invstd_out,
                                             Acc* running_mean, Acc* running_var, int* skipped,
                                             Acc momentum, Acc eps) {
    const Acc mean = w.final_mean();
    if (mean_out) mean_out[c] = mean;
    if (mean_lo_out) mean_lo_out[c] = w.final_mean_lo();
    if (m2_out) m2_out[c] = w.m2;
    if (invstd_out) invstd_out[c] = inv_sqrt(w.m2 / Acc(w.n) + eps);
    const Acc unbiased = w.n > 1 ? w.m2 / Acc(w.n - 1) : w.m2 / Acc(w.n);
    if (skipped) {
        const bool skip = !(is_finite(mean) && is_finite(unbiased));
        skipped[c] = skip ? 1 : 0;
        if (skip) return;
    }
    if (running_mean)
        running_mean[c] = fma_acc(momentum, mean, (Acc(1) - momentum) * running_mean[c]);
    if (running_var)
        running_var[c] = fma_acc(momentum, unbiased, (Acc(1) - momentum) * running_var[c]);
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, GPUBN_REDUCE_MIN_BLOCKS)
bn_stats_nchw(const T* __restrict__ x, long long outer, int channels, long long inner,
              Welford<Acc>* partials, unsigned int* counters, Acc* mean_out, Acc* mean_lo_out,
              Acc* m2_out, Acc* invstd_out, Acc* running_mean, Acc* running_var, int* skipped,
              Acc momentum, Acc eps) {
    const int c = blockIdx.x;
    const T* xc = at_group(x, outer * channels * inner) + (long long)c * inner;
    partials = at_group(partials, (long long)channels * gridDim.y);
    counters = at_group(counters, channels);
    mean_out = at_group(mean_out, channels);
    mean_lo_out = at_group(mean_lo_out, channels);
    m2_out = at_group(m2_out, channels);
    invstd_out = at_group(invstd_out, channels);
    Welford<Acc> w = channel_walk_nchw<VEC, Welford<Acc>>(
        outer, channels, inner, [&](long long offset) { return load_vec<T, VEC>(xc + offset); },
        [&](Welford<Acc>& s, const Vec<T, VEC>* v, const long long*) {
            Acc a[GPUBN_WALK_UNROLL * VEC];
#pragma unroll
            for (int u = 0; u < GPUBN_WALK_UNROLL; ++u)
#pragma unroll
                for (int j = 0; j < VEC; ++j) a[u * VEC + j] = to_acc(v[u].v[j]);
            s.push_group(a);
        },
        [&](Welford<Acc>& s, const Vec<T, VEC>& v, long long) {
            Acc a[VEC];
#pragma unroll
            for (int j = 0; j < VEC; ++j) a[j] = to_acc(v.v[j]);
            s.push_group(a);
        });
    channel_finish_nchw(w, partials, counters, [&](const Welford<Acc>& total) {
        finish_stats(total, c, mean_out, mean_lo_out, m2_out, invstd_out, running_mean,
                     running_var, skipped, momentum, eps);
    });
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, GPUBN_REDUCE_MIN_BLOCKS)
bn_stats_nhwc(const T* __restrict__ x, long long rows, int channels, Welford<Acc>* partials,
              unsigned int* counters, Acc* mean_out, Acc* mean_lo_out, Acc* m2_out,
              Acc* invstd_out, Acc* running_mean, Acc* running_var, int* skipped, Acc momentum,
              Acc eps) {
    x = at_group(x, rows * channels);
    partials = at_group(partials, (long long)channels * gridDim.y);
    counters = at_group(counters, gridDim.x);
    mean_out = at_group(mean_out, channels);
    mean_lo_out = at_group(mean_lo_out, channels);
    m2_out = at_group(m2_out, channels);
    invstd_out = at_group(invstd_out, channels);
    Welford<Acc> w[VEC];
    channel_walk_nhwc<VEC>(
        rows, channels, [&](long long offset) { return load_vec<T, VEC>(x + offset); },
        [&](Welford<Acc>(&s)[VEC], const Vec<T, VEC>* v, const long long*) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                Acc a[GPUBN_WALK_UNROLL];
#pragma unroll
                for (int u = 0; u < GPUBN_WALK_UNROLL; ++u) a[u] = to_acc(v[u].v[j]);
                s[j].push_group(a);
            }
        },
        [&](Welford<Acc>(&s)[VEC], const Vec<T, VEC>& v, long long) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) s[j].push(to_acc(v.v[j]));
        },
        w);
    channel_finish_nhwc(w, channels, partials, counters, [&](const Welford<Acc>& total, int c) {
        finish_stats(total, c, mean_out, mean_lo_out, m2_out, invstd_out, running_mean,
                     running_var, skipped, momentum, eps);
    });
}

}  // namespace gpubn
