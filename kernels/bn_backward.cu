// bn_backward.cu -- the fused batch-norm backward.
//
// bn_backward_reduce_*: one read of dy and x per channel, reduced (two-stage
// when the launch splits channels) to
//   sum_dy_out[c]      = sum dy                      (= dbias)
//   sum_dy_xhat_out[c] = invstd * sum dy * (x - mean) (= dweight)
// With dx_eval non-null (statistics held fixed, eval-mode backward) the same
// pass also writes dx = dy * weight * invstd, so that backward is one launch.
// The ReLU of the residual-block epilogue: with y_mask non-null (the forward's
// output y = relu(...)) dy is replaced by g = (y <= 0 ? 0 : dy), the
// gradient at the ReLU's input, before everything else; g_out, when non-null,
// receives g (it is dresidual, and dx_* reads it in place of dy).
//
// bn_backward_dx_*: training-mode dx from the reduced sums,
//   dx = a * (dy - b - (x - mean) * k)
//   a = weight * invstd, b = sum_dy / m, k = invstd * sum_dy_xhat / m,
// and (training == 0) dx = weight * invstd * dy without reading x.
//
// gridDim.z > 1: ghost batch norm, sums and dx per group (see at_group).
//
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::bn_backward_reduce_nchw<T, Acc, VEC>, gpubn::bn_backward_reduce_nhwc<T, Acc, VEC>
//   gpubn::bn_backward_dx_nchw<T, Acc, VEC>,     gpubn::bn_backward_dx_nhwc<T, Acc, VEC>
#include "gpubn_common.cuh"

namespace gpubn {

template <class T, int VEC>
struct VecPair {  // VEC elements of dy and of x
    typename Packed<T, VEC>::type dy;
    typename Packed<T, VEC>::type x;
};

template <class Acc>
__device__ __forceinline__ void finish_grad(const GradSums<Acc>& g, int c, const Acc* invstd,
                                            Acc* sum_dy_out, Acc* sum_dy_xhat_out) {
    sum_dy_out[c] = g.sum_dy;
    sum_dy_xhat_out[c] = g.sum_dy_xmu * invstd[c];
}

template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, GPUBN_REDUCE_MIN_BLOCKS)
bn_backward_reduce_nchw(const T* __restrict__ dy, const T* __restrict__ x, const Acc* mean,
                        const Acc* invstd, const Acc* weight, T* __restrict__ dx_eval,
                        const T* __restrict__ y_mask, T* __restrict__ g_out,
                        long long outer, int channels, long long inner,
                        GradSums<Acc>* partials, unsigned int* counters, Acc* sum_dy_out,
                        Acc* sum_dy_xhat_out) {
    // the group's offset folded into `base`: one 64-bit index for the five
    // tensors (a pointer each spills at the declared occupancy)
    mean = at_group(mean, channels);
    invstd = at_group(invstd, channels);
    const int c = blockIdx.x;
    const long long base = ((long long)blockIdx.z * outer * channels + c) * inner;
    __shared__ Acc consts[2];  // the channel's mean and weight * invstd, read once per block
    if (threadIdx.x == 0) {
        consts[0] = mean[c];
        consts[1] = weight ? weight[c] * invstd[c] : invstd[c];
    }
    __syncthreads();
    const Acc m = consts[0];
    const Acc a = consts[1];
    auto push = [&](GradSums<Acc>& s, const VecPair<T, VEC>& p, long long offset) {
        // the ReLU's mask is read here, one element at a time, not with the
        // unrolled dy and x vectors: a third vector per unrolled step spills
        // at the declared occupancy
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            Acc d = element(p.dy, j);
            if (y_mask) {
                if (Acc(to_acc(y_mask[base + offset + j])) <= Acc(0)) d = Acc(0);
                if (g_out) store_acc(g_out[base + offset + j], d);
            }
            s.sum_dy += d;
            s.sum_dy_xmu = fma_acc(d, Acc(element(p.x, j)) - m, s.sum_dy_xmu);
            store_acc(out.v[j], a * d);
        }
        if (dx_eval) store_vec<T, VEC>(dx_eval + base + offset, out);
    };
    GradSums<Acc> g = channel_walk_nchw<VEC, GradSums<Acc>>(
        outer, channels, inner,
        [&](long long offset) {
            VecPair<T, VEC> p;
            p.dy = load_packed<T, VEC>(dy + base + offset);
            p.x = load_packed<T, VEC>(x + base + offset);
            return p;
        },
        [&](GradSums<Acc>& s, const VecPair<T, VEC>* p, const long long* offset) {
#pragma unroll
            for (int u = 0; u < GPUBN_WALK_UNROLL; ++u) push(s, p[u], offset[u]);
        },
        push);
    // the group's reduction buffers offset here, after the walk (no
    // registers held across it)
    partials = at_group(partials, (long long)channels * gridDim.y);
    counters = at_group(counters, channels);
    sum_dy_out = at_group(sum_dy_out, channels);
    sum_dy_xhat_out = at_group(sum_dy_xhat_out, channels);
    channel_finish_nchw(g, partials, counters, [&](const GradSums<Acc>& total) {
        finish_grad(total, c, invstd, sum_dy_out, sum_dy_xhat_out);
    });
}

// Channels last: each thread reads VEC adjacent channels of dy and x with one
// load each per row, keeps sums per channel, and reads its channels' mean
// and weight * invstd itself (no shared memory, no barrier before the walk).
template <class T, class Acc, int VEC>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, GPUBN_REDUCE_MIN_BLOCKS)
bn_backward_reduce_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const Acc* mean,
                        const Acc* invstd, const Acc* weight, T* __restrict__ dx_eval,
                        const T* __restrict__ y_mask, T* __restrict__ g_out,
                        long long rows, int channels, GradSums<Acc>* partials,
                        unsigned int* counters, Acc* sum_dy_out, Acc* sum_dy_xhat_out) {
    dy = at_group(dy, rows * channels);
    x = at_group(x, rows * channels);
    dx_eval = at_group(dx_eval, rows * channels);
    y_mask = at_group(y_mask, rows * channels);
    g_out = at_group(g_out, rows * channels);
    mean = at_group(mean, channels);
    invstd = at_group(invstd, channels);
    partials = at_group(partials, (long long)channels * gridDim.y);
    counters = at_group(counters, gridDim.x);
    sum_dy_out = at_group(sum_dy_out, channels);
    sum_dy_xhat_out = at_group(sum_dy_xhat_out, channels);
    const long long c0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    Acc m[VEC], a[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = c0 + j < channels ? (int)(c0 + j) : 0;  // columns past the end: unused
        m[j] = read_only(mean + c);
        a[j] = weight ? read_only(weight + c) * read_only(invstd + c) : read_only(invstd + c);
    }
    auto push = [&](GradSums<Acc>(&s)[VEC], const VecPair<T, VEC>& p, long long offset) {
        // the ReLU's mask read one element at a time, as in the NCHW walk
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            Acc d = element(p.dy, j);
            if (y_mask) {
                if (Acc(to_acc(y_mask[offset + j])) <= Acc(0)) d = Acc(0);
                if (g_out) store_acc(g_out[offset + j], d);
            }
            s[j].sum_dy += d;
            s[j].sum_dy_xmu = fma_acc(d, Acc(element(p.x, j)) - m[j], s[j].sum_dy_xmu);
            store_acc(out.v[j], a[j] * d);
        }
        if (dx_eval) store_vec<T, VEC>(dx_eval + offset, out);
    };
    GradSums<Acc> g[VEC];
    channel_walk_nhwc<VEC>(
        rows, channels,
        [&](long long offset) {
            VecPair<T, VEC> p;
            p.dy = load_packed<T, VEC>(dy + offset);
            p.x = load_packed<T, VEC>(x + offset);
            return p;
        },
        [&](GradSums<Acc>(&s)[VEC], const VecPair<T, VEC>* v, const long long* offset) {
#pragma unroll
            for (int u = 0; u < GPUBN_WALK_UNROLL; ++u) push(s, v[u], offset[u]);
        },
        push, g);
    channel_finish_nhwc(g, channels, partials, counters, [&](const GradSums<Acc>& total, int ch) {
        finish_grad(total, ch, invstd, sum_dy_out, sum_dy_xhat_out);
    });
}

template <class Acc>
struct DxConsts {
    Acc a;     // weight * invstd
    Acc b;     // sum_dy / m
    Acc k;     // invstd * sum_dy_xhat / m
    Acc mean;
};

template <class Acc>
__device__ __forceinline__ DxConsts<Acc> dx_consts(int c, const Acc* mean, const Acc* invstd,
                                                   const Acc* weight, const Acc* sum_dy,
                                                   const Acc* sum_dy_xhat, Acc inv_count,
                                                   int training) {
    DxConsts<Acc> q;
    const Acc is = read_only(invstd + c);
    q.a = weight ? read_only(weight + c) * is : is;
    if (training) {
        q.b = read_only(sum_dy + c) * inv_count;
        q.k = is * read_only(sum_dy_xhat + c) * inv_count;
        q.mean = read_only(mean + c);
    } else {
        q.b = Acc(0);
        q.k = Acc(0);
        q.mean = Acc(0);
    }
    return q;
}

// dy and (training) x of VEC elements, loaded together
template <class T, int VEC>
__device__ __forceinline__ VecPair<T, VEC> load_dy_x(const T* __restrict__ dy,
                                                     const T* __restrict__ x, long long off,
                                                     int training) {
    VecPair<T, VEC> p;
    p.dy = load_packed<T, VEC>(dy + off);
    if (training) p.x = load_packed<T, VEC>(x + off);
    return p;
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void dx_body(T* __restrict__ dx, const DxConsts<Acc>* q, int qstride,
                                        const VecPair<T, VEC>& in, long long off, int training) {
    Vec<T, VEC> out;
    if (training) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const DxConsts<Acc>& p = q[j * qstride];
            const Acc xmu = Acc(element(in.x, j)) - p.mean;
            store_acc(out.v[j], p.a * fma_acc(-xmu, p.k, Acc(element(in.dy, j)) - p.b));
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) store_acc(out.v[j], q[j * qstride].a * Acc(element(in.dy, j)));
    }
    store_vec<T, VEC>(dx + off, out);
}

template <class T, class Acc, int VEC>
__global__ void bn_backward_dx_nchw(const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ dx, const Acc* mean, const Acc* invstd,
                                    const Acc* weight, const Acc* sum_dy, const Acc* sum_dy_xhat,
                                    long long outer, int channels, long long inner,
                                    Acc inv_count, int training) {
    dy = at_group(dy, outer * channels * inner);
    x = at_group(x, outer * channels * inner);
    dx = at_group(dx, outer * channels * inner);
    mean = at_group(mean, channels);
    invstd = at_group(invstd, channels);
    sum_dy = at_group(sum_dy, channels);
    sum_dy_xhat = at_group(sum_dy_xhat, channels);
    channel_map_nchw<VEC, DxConsts<Acc>>(
        outer, channels, inner,
        [&](int c, bool) {
            return dx_consts(c, mean, invstd, weight, sum_dy, sum_dy_xhat, inv_count, training);
        },
        [&](long long off) { return load_dy_x<T, VEC>(dy, x, off, training); },
        [&](const DxConsts<Acc>* q, int qstride, const VecPair<T, VEC>& v, long long off) {
            dx_body<T, Acc, VEC>(dx, q, qstride, v, off, training);
        });
}

template <class T, class Acc, int VEC>
__global__ void bn_backward_dx_nhwc(const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ dx, const Acc* mean, const Acc* invstd,
                                    const Acc* weight, const Acc* sum_dy, const Acc* sum_dy_xhat,
                                    long long rows, int channels, Acc inv_count, int training) {
    dy = at_group(dy, rows * channels);
    x = at_group(x, rows * channels);
    dx = at_group(dx, rows * channels);
    mean = at_group(mean, channels);
    invstd = at_group(invstd, channels);
    sum_dy = at_group(sum_dy, channels);
    sum_dy_xhat = at_group(sum_dy_xhat, channels);
    channel_map_nhwc<VEC, DxConsts<Acc>>(
        rows, channels,
        [&](int c, bool) {
            return dx_consts(c, mean, invstd, weight, sum_dy, sum_dy_xhat, inv_count, training);
        },
        [&](long long off) { return load_dy_x<T, VEC>(dy, x, off, training); },
        [&](const DxConsts<Acc>* q, int qstride, const VecPair<T, VEC>& v, long long off) {
            dx_body<T, Acc, VEC>(dx, q, qstride, v, off, training);
        });
}

}  // namespace gpubn
