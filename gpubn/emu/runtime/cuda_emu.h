// gpubn emu: the CUDA C++ prelude force-included before every kernel source.
//
// It maps the CUDA language extensions and device built-ins that the emu runtime
// supports onto C++17 and calls into the SIMT runtime (runtime.cpp) for everything
// that involves other threads: barriers, warp collectives, atomics.  The kernel
// translation unit is compiled with -fsanitize=thread (GCC's instrumentation, emu's
// hooks) so that every load and store goes through the runtime's checker; the
// runtime itself is not.
//
// Defined here: GPUBN_EMU=1.  Not defined: __CUDACC__, __CUDA_ARCH__, __CUDACC_RTC__.
#ifndef GPUBN_EMU_CUDA_EMU_H
#define GPUBN_EMU_CUDA_EMU_H

#ifndef GPUBN_EMU
#define GPUBN_EMU 1
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <limits.h>
#include <float.h>
#include <type_traits>
#include <utility>

#pragma GCC diagnostic ignored "-Wunknown-pragmas"

// ---------------------------------------------------------------- qualifiers
#define __global__ __attribute__((noinline))
#define __device__
#define __host__
#define __forceinline__ __attribute__((always_inline)) inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __constant__ const
// Static shared memory: one copy per module, which the block's threads (fibers)
// share; the runtime swaps its contents when it switches to another running
// block.  It locates it (the module's .bss) for memcheck and racecheck.
#define __shared__ static
namespace gpubn_emu {
// The source rewrite turns `__shared__ T s[N];` into storage named
// gpubn_emu_smem_s plus `static auto& s = shared_ref(&gpubn_emu_smem_s);`, a
// constant reference the compiler sees through: every access to s is an
// instrumented access to the storage (the thread sanitizer's instrumentation
// checks accesses to static variables even at offsets known in bounds).
template <class T> constexpr T& shared_ref(T* p) { return *p; }
}  // namespace gpubn_emu

// ---------------------------------------------------------------- vector types
#define GPUBN_EMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N##2 { T x, y; }; \
    static inline N##2 make_##N##2(T x, T y) { N##2 v; v.x = x; v.y = y; return v; }
#define GPUBN_EMU_VEC3(T, N) struct N##3 { T x, y, z; }; \
    static inline N##3 make_##N##3(T x, T y, T z) { N##3 v; v.x = x; v.y = y; v.z = z; return v; }
#define GPUBN_EMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
    static inline N##4 make_##N##4(T x, T y, T z, T w) { N##4 v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
#define GPUBN_EMU_VEC(T, N, A2, A4) GPUBN_EMU_VEC2(T, N, A2) GPUBN_EMU_VEC3(T, N) GPUBN_EMU_VEC4(T, N, A4)
GPUBN_EMU_VEC(signed char, char, 2, 4)
GPUBN_EMU_VEC(unsigned char, uchar, 2, 4)
GPUBN_EMU_VEC(short, short, 4, 8)
GPUBN_EMU_VEC(unsigned short, ushort, 4, 8)
GPUBN_EMU_VEC(int, int, 8, 16)
GPUBN_EMU_VEC(unsigned int, uint, 8, 16)
GPUBN_EMU_VEC(long long, longlong, 16, 16)
GPUBN_EMU_VEC(unsigned long long, ulonglong, 16, 16)
GPUBN_EMU_VEC(float, float, 8, 16)
GPUBN_EMU_VEC(double, double, 16, 16)
#undef GPUBN_EMU_VEC
#undef GPUBN_EMU_VEC2
#undef GPUBN_EMU_VEC3
#undef GPUBN_EMU_VEC4

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------- runtime calls
namespace gpubn_emu {
// The coordinates of the calling CUDA thread.  A kernel body runs entirely on its
// thread's fiber, so the values never change under it: `const` lets the compiler
// hoist them.
uint3 thread_idx() __attribute__((const));
uint3 block_idx() __attribute__((const));
uint3 block_dim() __attribute__((const));
uint3 grid_dim() __attribute__((const));
// The launch's dynamic shared memory (`extern __shared__` arrays are rewritten to use it).
unsigned char* dynamic_smem() __attribute__((const));
void syncthreads();
int syncthreads_count(int pred);
int syncthreads_and(int pred);
int syncthreads_or(int pred);
void syncwarp(unsigned mask);
unsigned activemask();
enum WarpOp { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNC,
              MATCH_ANY, REDUCE_ADD, REDUCE_MIN, REDUCE_MAX, REDUCE_AND, REDUCE_OR, REDUCE_XOR,
              REDUCE_MIN_S, REDUCE_MAX_S };
unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width, int size);
// Checks an atomic access (memcheck, traffic); atomics never count as races.
void atomic_access(const volatile void* addr, size_t size);
void threadfence();
long long clock64();
[[noreturn]] void trap(const char* what);
}  // namespace gpubn_emu

#define threadIdx (::gpubn_emu::thread_idx())
#define blockIdx (::gpubn_emu::block_idx())
#define blockDim (::gpubn_emu::block_dim())
#define gridDim (::gpubn_emu::grid_dim())
#define warpSize 32

static inline void __syncthreads() { ::gpubn_emu::syncthreads(); }
static inline int __syncthreads_count(int p) { return ::gpubn_emu::syncthreads_count(p); }
static inline int __syncthreads_and(int p) { return ::gpubn_emu::syncthreads_and(p); }
static inline int __syncthreads_or(int p) { return ::gpubn_emu::syncthreads_or(p); }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { ::gpubn_emu::syncwarp(mask); }
static inline unsigned __activemask() { return ::gpubn_emu::activemask(); }
static inline void __threadfence() { ::gpubn_emu::threadfence(); }
static inline void __threadfence_block() { ::gpubn_emu::threadfence(); }
static inline void __threadfence_system() { ::gpubn_emu::threadfence(); }
static inline long long clock64() { return ::gpubn_emu::clock64(); }
static inline void __nanosleep(unsigned) {}
static inline void __trap() { ::gpubn_emu::trap("__trap()"); }
static inline void __brkpt() { ::gpubn_emu::trap("__brkpt()"); }

// ---------------------------------------------------------------- warp collectives
namespace gpubn_emu {
template <class T> static inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "emu: warp shuffles support trivially copyable types of at most 8 bytes");
    unsigned long long b = 0;
    __builtin_memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> static inline T from_bits(unsigned long long b) {
    T v;
    __builtin_memcpy(&v, &b, sizeof(T));
    return v;
}
template <class T> static inline T shfl(int op, unsigned mask, T v, int arg, int width) {
    return from_bits<T>(warp_op(op, mask, to_bits(v), arg, width, (int)sizeof(T)));
}
}  // namespace gpubn_emu

template <class T> static inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    return ::gpubn_emu::shfl(::gpubn_emu::SHFL_IDX, mask, var, srcLane, width);
}
template <class T> static inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::gpubn_emu::shfl(::gpubn_emu::SHFL_UP, mask, var, (int)delta, width);
}
template <class T> static inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::gpubn_emu::shfl(::gpubn_emu::SHFL_DOWN, mask, var, (int)delta, width);
}
template <class T> static inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    return ::gpubn_emu::shfl(::gpubn_emu::SHFL_XOR, mask, var, laneMask, width);
}
static inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::BALLOT, mask, pred != 0, 0, 32, 4);
}
static inline int __any_sync(unsigned mask, int pred) {
    return (int)::gpubn_emu::warp_op(::gpubn_emu::ANY, mask, pred != 0, 0, 32, 4);
}
static inline int __all_sync(unsigned mask, int pred) {
    return (int)::gpubn_emu::warp_op(::gpubn_emu::ALL, mask, pred != 0, 0, 32, 4);
}
template <class T> static inline unsigned __match_any_sync(unsigned mask, T value) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::MATCH_ANY, mask, ::gpubn_emu::to_bits(value), 0, 32,
                                          (int)sizeof(T));
}
static inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_ADD, mask, v, 0, 32, 4);
}
static inline int __reduce_add_sync(unsigned mask, int v) {
    return (int)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_ADD, mask, (unsigned)v, 0, 32, 4);
}
static inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_MIN, mask, v, 0, 32, 4);
}
static inline int __reduce_min_sync(unsigned mask, int v) {
    return (int)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_MIN_S, mask, (unsigned)v, 0, 32, 4);
}
static inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_MAX, mask, v, 0, 32, 4);
}
static inline int __reduce_max_sync(unsigned mask, int v) {
    return (int)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_MAX_S, mask, (unsigned)v, 0, 32, 4);
}
static inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_AND, mask, v, 0, 32, 4);
}
static inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_OR, mask, v, 0, 32, 4);
}
static inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
    return (unsigned)::gpubn_emu::warp_op(::gpubn_emu::REDUCE_XOR, mask, v, 0, 32, 4);
}

// ---------------------------------------------------------------- atomics
// All blocks run on one OS thread and fibers switch only inside runtime calls,
// so a read-modify-write is atomic by construction; the access is checked (and counted) by the runtime, and the
// memory operation itself is not instrumented so that racecheck ignores it.
#define GPUBN_EMU_ATOMIC __attribute__((no_sanitize_thread)) static inline
namespace gpubn_emu {
template <class T, class F> GPUBN_EMU_ATOMIC T rmw(T* p, F f) {
    atomic_access(p, sizeof(T));
    T old = *(volatile T*)p;
    *(volatile T*)p = f(old);
    return old;
}
}  // namespace gpubn_emu
#define GPUBN_EMU_ATOMIC_OP(NAME, T, EXPR) \
    GPUBN_EMU_ATOMIC T NAME(T* address, T val) { return ::gpubn_emu::rmw(address, [val](T old) -> T { return EXPR; }); }
#define GPUBN_EMU_ATOMIC_ALL(NAME, EXPR) \
    GPUBN_EMU_ATOMIC_OP(NAME, int, EXPR) GPUBN_EMU_ATOMIC_OP(NAME, unsigned int, EXPR) \
    GPUBN_EMU_ATOMIC_OP(NAME, long long, EXPR) GPUBN_EMU_ATOMIC_OP(NAME, unsigned long long, EXPR)
GPUBN_EMU_ATOMIC_ALL(atomicAdd, (decltype(old))(old + val))
GPUBN_EMU_ATOMIC_OP(atomicAdd, float, old + val)
GPUBN_EMU_ATOMIC_OP(atomicAdd, double, old + val)
GPUBN_EMU_ATOMIC_ALL(atomicSub, (decltype(old))(old - val))
GPUBN_EMU_ATOMIC_OP(atomicSub, float, old - val)
GPUBN_EMU_ATOMIC_OP(atomicSub, double, old - val)
GPUBN_EMU_ATOMIC_ALL(atomicExch, val)
GPUBN_EMU_ATOMIC_OP(atomicExch, float, val)
GPUBN_EMU_ATOMIC_OP(atomicExch, double, val)
GPUBN_EMU_ATOMIC_ALL(atomicMax, old < val ? val : old)
GPUBN_EMU_ATOMIC_ALL(atomicMin, val < old ? val : old)
GPUBN_EMU_ATOMIC_ALL(atomicAnd, old & val)
GPUBN_EMU_ATOMIC_ALL(atomicOr, old | val)
GPUBN_EMU_ATOMIC_ALL(atomicXor, old ^ val)
GPUBN_EMU_ATOMIC_OP(atomicInc, unsigned int, (old >= val) ? 0u : old + 1u)
GPUBN_EMU_ATOMIC_OP(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#define GPUBN_EMU_ATOMIC_CAS(T) \
    GPUBN_EMU_ATOMIC T atomicCAS(T* address, T compare, T val) { \
        return ::gpubn_emu::rmw(address, [compare, val](T old) -> T { return old == compare ? val : old; }); }
GPUBN_EMU_ATOMIC_CAS(int)
GPUBN_EMU_ATOMIC_CAS(unsigned int)
GPUBN_EMU_ATOMIC_CAS(unsigned long long)
GPUBN_EMU_ATOMIC_CAS(unsigned short)
#undef GPUBN_EMU_ATOMIC_CAS
#undef GPUBN_EMU_ATOMIC_ALL
#undef GPUBN_EMU_ATOMIC_OP
#define atomicAdd_block atomicAdd
#define atomicAdd_system atomicAdd
#define atomicCAS_block atomicCAS
#define atomicExch_block atomicExch
#define atomicMax_block atomicMax
#define atomicMin_block atomicMin

// ---------------------------------------------------------------- loads
template <class T> static inline T __ldg(const T* p) { return *p; }
template <class T> static inline T __ldca(const T* p) { return *p; }
template <class T> static inline T __ldcg(const T* p) { return *p; }
template <class T> static inline T __ldcs(const T* p) { return *p; }
template <class T> static inline T __ldlu(const T* p) { return *p; }
template <class T> static inline T __ldcv(const T* p) { return *p; }
template <class T> static inline void __stcg(T* p, T v) { *p = v; }
template <class T> static inline void __stcs(T* p, T v) { *p = v; }
template <class T> static inline void __stwb(T* p, T v) { *p = v; }
template <class T> static inline void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------- math
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
static inline double rsqrt(double x) { return 1.0 / sqrt(x); }
static inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
static inline float __fdividef(float a, float b) { return a / b; }
static inline float fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline double __drcp_rn(double x) { return 1.0 / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline double __dsqrt_rn(double x) { return sqrt(x); }
static inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
#define __expf expf
#define __exp10f exp10f
#define __logf logf
#define __log2f log2f
#define __log10f log10f
#define __powf powf
#define __sinf sinf
#define __cosf cosf
#define __tanf tanf
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float saturatef(float x) { return __saturatef(x); }
static inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
static inline int __float2int_rz(float x) { return (int)x; }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
static inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
static inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
static inline long long __float2ll_rz(float x) { return (long long)x; }
static inline long long __double2ll_rn(double x) { return (long long)nearbyint(x); }
static inline int __double2int_rn(double x) { return (int)nearbyint(x); }
static inline int __double2int_rz(double x) { return (int)x; }
static inline float __double2float_rn(double x) { return (float)x; }
static inline float __int2float_rn(int x) { return (float)x; }
static inline float __uint2float_rn(unsigned x) { return (float)x; }
static inline float __ll2float_rn(long long x) { return (float)x; }
static inline float __ull2float_rn(unsigned long long x) { return (float)x; }
static inline double __int2double_rn(int x) { return (double)x; }
static inline double __ll2double_rn(long long x) { return (double)x; }
static inline double __ull2double_rn(unsigned long long x) { return (double)x; }

#define GPUBN_EMU_MINMAX(T) \
    static inline T min(T a, T b) { return b < a ? b : a; } \
    static inline T max(T a, T b) { return a < b ? b : a; }
GPUBN_EMU_MINMAX(int)
GPUBN_EMU_MINMAX(unsigned int)
GPUBN_EMU_MINMAX(long)
GPUBN_EMU_MINMAX(unsigned long)
GPUBN_EMU_MINMAX(long long)
GPUBN_EMU_MINMAX(unsigned long long)
#undef GPUBN_EMU_MINMAX
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
static inline long long min(long long a, int b) { return min(a, (long long)b); }
static inline long long min(int a, long long b) { return min((long long)a, b); }
static inline long long max(long long a, int b) { return max(a, (long long)b); }
static inline long long max(int a, long long b) { return max((long long)a, b); }
static inline double min(float a, double b) { return fmin(a, b); }
static inline double min(double a, float b) { return fmin(a, b); }
static inline double max(float a, double b) { return fmax(a, b); }
static inline double max(double a, float b) { return fmax(a, b); }

// ---------------------------------------------------------------- bits
static inline int __float_as_int(float x) { int r; __builtin_memcpy(&r, &x, 4); return r; }
static inline unsigned __float_as_uint(float x) { unsigned r; __builtin_memcpy(&r, &x, 4); return r; }
static inline float __int_as_float(int x) { float r; __builtin_memcpy(&r, &x, 4); return r; }
static inline float __uint_as_float(unsigned x) { float r; __builtin_memcpy(&r, &x, 4); return r; }
static inline long long __double_as_longlong(double x) { long long r; __builtin_memcpy(&r, &x, 8); return r; }
static inline double __longlong_as_double(long long x) { double r; __builtin_memcpy(&r, &x, 8); return r; }
static inline int __double2hiint(double x) { return (int)((unsigned long long)__double_as_longlong(x) >> 32); }
static inline int __double2loint(double x) { return (int)(unsigned)(unsigned long long)__double_as_longlong(x); }
static inline double __hiloint2double(int hi, int lo) {
    return __longlong_as_double((long long)(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo));
}
static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
static inline unsigned long long __brevll(unsigned long long x) {
    unsigned long long r = 0;
    for (int i = 0; i < 64; ++i) r |= ((x >> i) & 1ull) << (63 - i);
    return r;
}
static inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
static inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
static inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
static inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
static inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)((v << (s & 31)) >> 32);
}
static inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
    unsigned long long v = ((unsigned long long)hi << 32) | lo;
    return (unsigned)(v >> (s & 31));
}

#endif  // GPUBN_EMU_CUDA_EMU_H
