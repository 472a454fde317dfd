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
// receives g (it is dresidual, and dx_* reads it in place of dy).  y is read
// as a third vector with dy and x, in a walk of its own that holds
// GPUBN_RELU_WALK_UNROLL positions at once (three vectors each) where the
// plain walk holds GPUBN_WALK_UNROLL (two each): the same loads in flight,
// within the registers of the declared occupancy.
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

#define GPUBN_RELU_WALK_UNROLL 2

// What the backward reads at one position: VEC elements of dy, of x (unless
// with_x is false: the eval-mode dx) and, with the ReLU (RELU), of the
// forward's output y, loaded together.
template <class T, int VEC, bool RELU>
struct GradIn {
    static constexpr int unroll = RELU ? GPUBN_RELU_WALK_UNROLL : GPUBN_WALK_UNROLL;
    typename Packed<T, VEC>::type dy;
    typename Packed<T, VEC>::type x;
    typename Packed<T, VEC>::type y;

    __device__ __forceinline__ static GradIn load(const T* dy_, const T* x_, const T* y_,
                                                  long long off, bool with_x = true) {
        GradIn p;
        p.dy = load_packed<T, VEC>(dy_ + off);
        if (with_x) p.x = load_packed<T, VEC>(x_ + off);
        if (RELU) p.y = load_packed<T, VEC>(y_ + off);
        return p;
    }
};

// One position of the reduction: g = dy (zero where the ReLU's output y is
// <= 0; NaN stays in), element j's sums into s[j * sstride] around the mean
// m[j * kstride], and, when asked, g into g_out and a[j * kstride] * g (the
// eval-mode dx) into dx_eval, all at element offset `off`.
template <class T, class Acc, int VEC, bool RELU>
__device__ __forceinline__ void push_grad(GradSums<Acc>* s, int sstride,
                                          const GradIn<T, VEC, RELU>& p, const Acc* m,
                                          const Acc* a, int kstride, T* __restrict__ g_out,
                                          T* __restrict__ dx_eval, long long off) {
    Acc d[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        d[j] = element(p.dy, j);
        if (RELU && !relu_keeps(Acc(element(p.y, j)))) d[j] = Acc(0);
        GradSums<Acc>& sj = s[j * sstride];
        sj.sum_dy += d[j];
        sj.sum_dy_xmu = fma_acc(d[j], Acc(element(p.x, j)) - m[j * kstride], sj.sum_dy_xmu);
    }
    // rounded only where stored
    if (RELU && g_out) {
        Vec<T, VEC> g;
#pragma unroll
        for (int j = 0; j < VEC; ++j) store_acc(g.v[j], d[j]);
        store_vec<T, VEC>(g_out + off, g);
    }
    if (dx_eval) {
        Vec<T, VEC> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) store_acc(out.v[j], a[j * kstride] * d[j]);
        store_vec<T, VEC>(dx_eval + off, out);
    }
}

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
    at_groups(channels, mean, invstd);
    const int c = blockIdx.x;
    const long long base = ((long long)blockIdx.z * outer * channels + c) * inner;
    __shared__ Acc consts[2];  // the channel's mean and weight * invstd, read once per block
    if (threadIdx.x == 0) {
        consts[0] = mean[c];
        consts[1] = channel_scale(weight, c, invstd[c]);
    }
    __syncthreads();
    const Acc m = consts[0];
    const Acc a = consts[1];
    // `in` only names the position type (with or without the ReLU's y)
    auto walk = [&](auto in) {
        typedef decltype(in) In;
        return channel_walk_nchw<VEC, GradSums<Acc>, In::unroll>(
            outer, channels, inner,
            [&](long long offset) { return In::load(dy, x, y_mask, base + offset); },
            [&](GradSums<Acc>& s, const In* p, const long long* offset) {
#pragma unroll
                for (int u = 0; u < In::unroll; ++u)
                    push_grad(&s, 0, p[u], &m, &a, 0, g_out, dx_eval, base + offset[u]);
            },
            [&](GradSums<Acc>& s, const In& p, long long offset) {
                push_grad(&s, 0, p, &m, &a, 0, g_out, dx_eval, base + offset);
            });
    };
    const GradSums<Acc> g = y_mask ? walk(GradIn<T, VEC, true>()) : walk(GradIn<T, VEC, false>());
    // the group's reduction buffers offset here, after the walk (no
    // registers held across it)
    partials = at_group(partials, (long long)channels * gridDim.y);
    at_groups(channels, counters, sum_dy_out, sum_dy_xhat_out);
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
    at_groups(rows * channels, dy, x, dx_eval, y_mask, g_out);
    at_groups(channels, mean, invstd);
    partials = at_group(partials, (long long)channels * gridDim.y);
    counters = at_group(counters, gridDim.x);
    at_groups(channels, sum_dy_out, sum_dy_xhat_out);
    const long long c0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC;
    Acc m[VEC], a[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const int c = c0 + j < channels ? (int)(c0 + j) : 0;  // columns past the end: unused
        m[j] = read_only(mean + c);
        a[j] = channel_scale(weight, c, read_only(invstd + c));
    }
    GradSums<Acc> g[VEC];
    auto walk = [&](auto in) {  // as in the NCHW reduction
        typedef decltype(in) In;
        channel_walk_nhwc<VEC, In::unroll>(
            rows, channels,
            [&](long long offset) { return In::load(dy, x, y_mask, offset); },
            [&](GradSums<Acc>(&s)[VEC], const In* p, const long long* offset) {
#pragma unroll
                for (int u = 0; u < In::unroll; ++u)
                    push_grad(s, 1, p[u], m, a, 1, g_out, dx_eval, offset[u]);
            },
            [&](GradSums<Acc>(&s)[VEC], const In& p, long long offset) {
                push_grad(s, 1, p, m, a, 1, g_out, dx_eval, offset);
            },
            g);
    };
    if (y_mask)
        walk(GradIn<T, VEC, true>());
    else
        walk(GradIn<T, VEC, false>());
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
    q.a = channel_scale(weight, c, is);
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

template <class T, class Acc, int VEC>
__device__ __forceinline__ void dx_body(T* __restrict__ dx, const DxConsts<Acc>* q, int qstride,
                                        const GradIn<T, VEC, false>& in, long long off,
                                        int training) {
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
    at_groups(outer * channels * inner, dy, x, dx);
    at_groups(channels, mean, invstd, sum_dy, sum_dy_xhat);
    channel_map_nchw<VEC, DxConsts<Acc>>(
        outer, channels, inner,
        [&](int c, bool) {
            return dx_consts(c, mean, invstd, weight, sum_dy, sum_dy_xhat, inv_count, training);
        },
        [&](long long off) {
            return GradIn<T, VEC, false>::load(dy, x, nullptr, off, training);
        },
        [&](const DxConsts<Acc>* q, int qstride, const GradIn<T, VEC, false>& v,
            long long off) {
            dx_body<T, Acc, VEC>(dx, q, qstride, v, off, training);
        });
}

template <class T, class Acc, int VEC>
__global__ void bn_backward_dx_nhwc(const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ dx, const Acc* mean, const Acc* invstd,
                                    const Acc* weight, const Acc* sum_dy, const Acc* sum_dy_xhat,
                                    long long rows, int channels, Acc inv_count, int training) {
    at_groups(rows * channels, dy, x, dx);
    at_groups(channels, mean, invstd, sum_dy, sum_dy_xhat);
    channel_map_nhwc<VEC, DxConsts<Acc>>(
        rows, channels,
        [&](int c, bool) {
            return dx_consts(c, mean, invstd, weight, sum_dy, sum_dy_xhat, inv_count, training);
        },
        [&](long long off) {
            return GradIn<T, VEC, false>::load(dy, x, nullptr, off, training);
        },
        [&](const DxConsts<Acc>* q, int qstride, const GradIn<T, VEC, false>& v,
            long long off) {
            dx_body<T, Acc, VEC>(dx, q, qstride, v, off, training);
        });
}

}  // namespace gpubn
