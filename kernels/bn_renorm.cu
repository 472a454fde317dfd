// bn_renorm.cu -- the per-channel "finish" of a batch renorm training step.
//
// Runs between the statistics kernel (bn_stats_*, which wrote the batch mean,
// M2 and invstd) and the normalize kernel (bn_apply_*), one thread per channel:
//   sigma_B = sqrt(M2 / count + eps)
//   r = clip(sigma_B / running_std, 1 / rmax, rmax)
//   d = clip((mean - running_mean) / running_std, -dmax, dmax)
//   weight_out = weight * r,  bias_out = bias + weight * d
// so that bn_apply with (mean, invstd, weight_out, bias_out) computes
// y = weight * (xhat * r + d) + bias with one FMA per element; then the moving
// statistics move towards the batch's:
//   running_mean = (1 - momentum) * running_mean + momentum * mean
//   running_std  = (1 - momentum) * running_std  + momentum * sigma_B.
// skipped (non-null: guarded running statistics) gets 1 for a channel whose
// mu_B or sigma_B is not finite, which then keeps both moving statistics, and
// 0 for every other channel (the rule of bn_stats.cu's finish_stats).
// Clipping propagates NaN (a NaN channel stays NaN, as in batch norm).
// weight / bias may be null (1 and 0).  T is the storage type of the data (the
// catalog instantiates every kernel per storage dtype); only Acc is used.
//
// Exported kernel (name expression, see gpubn/kernels.py):
//   gpubn::bn_renorm_finish<T, Acc>
#include "gpubn_common.cuh"

namespace gpubn {

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

template <class Acc>
__device__ __forceinline__ Acc clip_nan(Acc v, Acc lo, Acc hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

template <class T, class Acc>
__global__ void bn_renorm_finish(const Acc* mean, const Acc* m2, long long count, int channels,
                                 const Acc* weight, const Acc* bias, Acc* running_mean,
                                 Acc* running_std, Acc* r_out, Acc* d_out, Acc* weight_out,
                                 Acc* bias_out, int* skipped, Acc rmax, Acc dmax, Acc momentum,
                                 Acc eps) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels) return;
    const Acc mu_b = mean[c];
    const Acc sigma_b = sqrt_acc(m2[c] / Acc(count) + eps);
    const Acc mu = running_mean[c];
    const Acc sigma = running_std[c];
    const Acc r = clip_nan(sigma_b / sigma, Acc(1) / rmax, rmax);
    const Acc d = clip_nan((mu_b - mu) / sigma, -dmax, dmax);
    const Acc w = weight ? weight[c] : Acc(1);
    r_out[c] = r;
    d_out[c] = d;
    weight_out[c] = w * r;
    bias_out[c] = fma_acc(w, d, bias ? bias[c] : Acc(0));
    if (skipped) {
        const bool skip = !(is_finite(mu_b) && is_finite(sigma_b));
        skipped[c] = skip ? 1 : 0;
        if (skip) return;
    }
    running_mean[c] = fma_acc(momentum, mu_b, (Acc(1) - momentum) * mu);
    running_std[c] = fma_acc(momentum, sigma_b, (Acc(1) - momentum) * sigma);
}

}  // namespace gpubn
