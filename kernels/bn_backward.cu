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
// Exported kernels (name expressions, see gpubn/kernels.py):
//   gpubn::bn_backward_reduce_nchw<T, Acc, VEC>, gpubn::bn_backward_reduce_nhwc<T, Acc>
//   gpubn::bn_backward_dx_nchw<T, Acc, VEC>,     gpubn::bn_backward_dx_nhwc<T, Acc, VEC>
#include "gpubn_common.cuh"

namespace gpubn {

template <class T, int VEC>
struct VecPair {  // VEC elements of dy and of x
    Vec<T, VEC> dy;
    Vec<T, VEC> x;
};

template <class Acc>
struct DyX {  // one element of dy and x, widened
    Acc dy;
    Acc x;
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
    const int c = blockIdx.x;
    const long long base = (long long)c * inner;
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
            Acc d = to_acc(p.dy.v[j]);
            if (y_mask) {
                if (Acc(to_acc(y_mask[base + offset + j])) <= Acc(0)) d = Acc(0);
                if (g_out) store_acc(g_out[base + offset + j], d);
            }
            s.sum_dy += d;
            s.sum_dy_xmu = fma_acc(d, Acc(to_acc(p.x.v[j])) - m, s.sum_dy_xmu);
            store_acc(out.v[j], a * d);
        }
        if (dx_eval) store_vec<T, VEC>(dx_eval + base + offset, out);
    };
    GradSums<Acc> g = channel_walk_nchw<VEC, GradSums<Acc>>(
        outer, channels, inner,
        [&](long long offset) {
            VecPair<T, VEC> p;
            p.dy = load_vec<T, VEC>(dy + base + offset);
            p.x = load_vec<T, VEC>(x + base + offset);
            return p;
        },
        [&](GradSums<Acc>& s, const VecPair<T, VEC>* p, const long long* offset) {
#pragma unroll
            for (int u = 0; u < GPUBN_WALK_UNROLL; ++u) push(s, p[u], offset[u]);
        },
        push);
    channel_finish_nchw(g, partials, counters, [&](const GradSums<Acc>& total) {
        finish_grad(total, c, invstd, sum_dy_out, sum_dy_xhat_out);
    });
}

template <class T, class Acc>
__global__ void __launch_bounds__(GPUBN_MAX_REDUCE_THREADS, GPUBN_REDUCE_MIN_BLOCKS)
bn_backward_reduce_nhwc(const T* __restrict__ dy, const T* __restrict__ x, const Acc* mean,
                        const Acc* invstd, const Acc* weight, T* __restrict__ dx_eval,
                        const T* __restrict__ y_mask, T* __restrict__ g_out,
                        long long rows, int channels, GradSums<Acc>* partials,
                        unsigned int* counters, Acc* sum_dy_out, Acc* sum_dy_xhat_out) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    __shared__ Acc consts[2][32];  // per column: mean and weight * invstd, read once per block
    if (threadIdx.y == 0) {
        const int cc = c < channels ? c : channels - 1;  // columns past the end: unused
        consts[0][threadIdx.x] = mean[cc];
        consts[1][threadIdx.x] = weight ? weight[cc] * invstd[cc] : invstd[cc];
    }
    __syncthreads();
    const Acc m = consts[0][threadIdx.x];
    const Acc a = consts[1][threadIdx.x];
    auto push = [&](GradSums<Acc>(&s)[1], const DyX<Acc>& v, long long offset) {
        s[0].sum_dy += v.dy;
        s[0].sum_dy_xmu = fma_acc(v.dy, v.x - m, s[0].sum_dy_xmu);
        if (dx_eval) store_acc(dx_eval[offset], a * v.dy);
        if (g_out) store_acc(g_out[offset], v.dy);
    };
    GradSums<Acc> g[1];
    channel_walk_nhwc<1>(
        rows, channels,
        [&](long long offset) {
            DyX<Acc> v;
            v.dy = to_acc(dy[offset]);
            v.x = to_acc(x[offset]);
            if (y_mask && Acc(to_acc(y_mask[offset])) <= Acc(0)) v.dy = Acc(0);
            return v;
        },
        [&](GradSums<Acc>(&s)[1], const DyX<Acc>* v, const long long* offset) {
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
    p.dy = load_vec<T, VEC>(dy + off);
    if (training) p.x = load_vec<T, VEC>(x + off);
    return p;
}

template <class T, class Acc, int VEC>
__device__ __forceinline__ void dx_body(T* __restrict__ dx, const DxConsts<Acc>* q, int qstride,
                                        const VecPair<T, VEC>& in, long long off, int training) {
    const Vec<T, VEC>& gv = in.dy;
    Vec<T, VEC> out;
    if (training) {
        const Vec<T, VEC>& xv = in.x;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const DxConsts<Acc>& p = q[j * qstride];
            const Acc xmu = Acc(to_acc(xv.v[j])) - p.mean;
            store_acc(out.v[j], p.a * fma_acc(-xmu, p.k, Acc(to_acc(gv.v[j])) - p.b));
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) store_acc(out.v[j], q[j * qstride].a * Acc(to_acc(gv.v[j])));
    }
    store_vec<T, VEC>(dx + off, out);
}

template <class T, class Acc, int VEC>
__global__ void bn_backward_dx_nchw(const T* __restrict__ dy, const T* __restrict__ x,
                                    T* __restrict__ dx, const Acc* mean, const Acc* invstd,
                                    const Acc* weight, const Acc* sum_dy, const Acc* sum_dy_xhat,
                                    long long outer, int channels, long long inner,
                                    Acc inv_count, int training) {
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
