// bn_forward.cu -- normalize, scale and shift, with the per-channel constants
// folded once per run: scale = weight * invstd, shift = bias - lo * scale and
//   y = (x - hi) * scale + shift        (one FSUB and one FMA per element)
// where hi + lo is the channel mean (hi: `mean`, lo: `mean_lo` from bn_stats,
// or 0 when null).  Subtracting the mean before scaling keeps float32 output
// accurate far from zero (x = 1e4 + N(0, 1): x - hi is exact), where
// x * scale + (bias - mean * scale) would lose |mean * scale| ulps.
//
//   from_var == 0: `spread` holds invstd (training forward, bn_apply).
//   from_var != 0: `spread` holds the running variance; invstd is
//                  1 / sqrt(var + eps) (inference, one launch).
// weight / bias may be null (1 and 0).  When mean_out / invstd_out are non-null
// one thread per channel also writes the mean and invstd it used.
//
// The residual-block epilogue, in the same pass: with `residual` non-null the
// value is bn(x) + residual, and with relu != 0 it goes through max(v, 0)
// (NaN stays NaN, as torch.relu); both in Acc, rounded once on the store.
//
// gridDim.z > 1: ghost batch norm, statistics per group (see at_group); the
// residual is offset with x.
//
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::bn_apply_nchw<T, Acc, VEC>   channel axis with inner > 1
//   gpubn::bn_apply_nhwc<T, Acc, VEC>   channels last (inner == 1)
#include "gpubn_common.cuh"

namespace gpubn {

template <class Acc>
struct Affine {
    Acc mean;   // hi
    Acc scale;
    Acc shift;  // bias - lo * scale
};

// The constants of a channel with mean hi + lo, inverse std, weight and bias.
template <class Acc>
__device__ __forceinline__ Affine<Acc> affine_from(Acc hi, Acc lo, Acc invstd, Acc weight,
                                                   Acc bias) {
    Affine<Acc> k;
    k.mean = hi;
    k.scale = weight * invstd;
    k.shift = fma_acc(-lo, k.scale, bias);
    return k;
}

template <class Acc>
__device__ __forceinline__ Affine<Acc> affine_of(int c, bool first, const Acc* mean,
                                                 const Acc* mean_lo, const Acc* spread,
                                                 const Acc* weight, const Acc* bias,
                                                 Acc* mean_out, Acc* invstd_out, int from_var,
                                                 Acc eps) {
    const Acc m = read_only(mean + c);
    const Acc sp = read_only(spread + c);
    const Acc invstd = from_var ? inv_sqrt(sp + eps) : sp;
    if (first) {
        if (mean_out) mean_out[c] = m;
        if (invstd_out) invstd_out[c] = invstd;
    }
    return affine_from(m, mean_lo ? read_only(mean_lo + c) : Acc(0), invstd,
                       weight ? read_only(weight + c) : Acc(1),
                       bias ? read_only(bias + c) : Acc(0));
}

template <class T, int VEC>
struct XRes {  // VEC elements of x and (when there is one) of the residual
    typename Packed<T, VEC>::type x;
    typename Packed<T, VEC>::type z;
};

template <class T, int VEC>
__device__ __forceinline__ XRes<T, VEC> load_x_res(const T* x,
                                                   const T* residual,
                                                   long long off) {
    XRes<T, VEC> p;
    p.x = load_packed<T, VEC>(x + off);
    if (residual) p.z = load_packed<T, VEC>(residual + off);
    return p;
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void affine_body(T* y, const Affine<Acc>* k, int kstride,
                                            const XRes<T, VEC>& in, bool residual, int relu,
                                            long long off) {
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        Acc v = fma_acc(Acc(element(in.x, j)) - k[j * kstride].mean, k[j * kstride].scale,
                        k[j * kstride].shift);
        if (residual) v += Acc(element(in.z, j));
        if (relu && !relu_keeps(v)) v = Acc(0);
        store_acc(out.v[j], v);
    }
    store_vec<T, VEC>(y + off, out);
}

// x, y and the residual are not __restrict__: with it, x is read through the
// non-coherent path, which the assembler lets sink below the stores of y, and
// it schedules only two of a thread's GPUBN_MAP_UNROLL loads before the first
// store.  Plain loads stay ahead of the stores, so all of them are in flight.
template <class T, class Acc, int VEC>
__global__ void bn_apply_nchw(const T* x, T* y, const T* residual, const Acc* mean,
                              const Acc* mean_lo, const Acc* spread, const Acc* weight,
                              const Acc* bias,
                              Acc* mean_out, Acc* invstd_out, long long outer, int channels,
                              long long inner, int from_var, int relu, Acc eps) {
    at_groups(outer * channels * inner, x, y, residual);
    at_groups(channels, mean, mean_lo, spread, mean_out, invstd_out);
    channel_map_nchw<VEC, Affine<Acc>>(
        outer, channels, inner,
        [&](int c, bool first) {
            return affine_of(c, first, mean, mean_lo, spread, weight, bias, mean_out, invstd_out,
                             from_var, eps);
        },
        [&](long long off) { return load_x_res<T, VEC>(x, residual, off); },
        [&](const Affine<Acc>* k, int kstride, const XRes<T, VEC>& v, long long off) {
            affine_body<T, Acc, VEC>(y, k, kstride, v, residual != nullptr, relu, off);
        });
}

template <class T, class Acc, int VEC>
__global__ void bn_apply_nhwc(const T* x, T* y, const T* residual, const Acc* mean,
                              const Acc* mean_lo, const Acc* spread, const Acc* weight,
                              const Acc* bias,
                              Acc* mean_out, Acc* invstd_out, long long rows, int channels,
                              int from_var, int relu, Acc eps) {
    at_groups(rows * channels, x, y, residual);
    at_groups(channels, mean, mean_lo, spread, mean_out, invstd_out);
    channel_map_nhwc<VEC, Affine<Acc>>(
        rows, channels,
        [&](int c, bool first) {
            return affine_of(c, first, mean, mean_lo, spread, weight, bias, mean_out, invstd_out,
                             from_var, eps);
        },
        [&](long long off) { return load_x_res<T, VEC>(x, residual, off); },
        [&](const Affine<Acc>* k, int kstride, const XRes<T, VEC>& v, long long off) {
            affine_body<T, Acc, VEC>(y, k, kstride, v, residual != nullptr, relu, off);
        });
}

}  // namespace gpubn
