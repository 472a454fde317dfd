// gpubn_half_ptx.cuh -- binary16 conversions and loads of packed binary16
// words as PTX instructions.
//
// Included by gpubn_common.cuh only when compiling for the GPU (NVRTC or
// nvcc); the CPU (emu) build uses the bit-manipulation versions there, which
// round identically (to nearest even).
#pragma once

namespace gpubn {

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// N 32-bit words (N = 1, 2, 4: 4, 8 or 16 bytes) in one global load.  The
// compiler's own load of such a struct is rewritten into 16-bit lanes
// (ld.global.v4.u16) when the words are later cut into halves, and ptxas
// then moves every lane into a register of its own right after the load:
// moves that wait for the load, scheduled before the next loads.  An asm
// load keeps the words whole until their elements are used.
__device__ __forceinline__ void load_words(const void* p, unsigned int (&w)[1]) {
    asm("{\n\t.reg .u64 g;\n\tcvta.to.global.u64 g, %1;\n\tld.global.u32 %0, [g];\n\t}"
        : "=r"(w[0])
        : "l"(p));
}

__device__ __forceinline__ void load_words(const void* p, unsigned int (&w)[2]) {
    asm("{\n\t.reg .u64 g;\n\tcvta.to.global.u64 g, %2;\n\tld.global.v2.u32 {%0, %1}, [g];\n\t}"
        : "=r"(w[0]), "=r"(w[1])
        : "l"(p));
}

__device__ __forceinline__ void load_words(const void* p, unsigned int (&w)[4]) {
    asm("{\n\t.reg .u64 g;\n\tcvta.to.global.u64 g, %4;\n\t"
        "ld.global.v4.u32 {%0, %1, %2, %3}, [g];\n\t}"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
        : "l"(p));
}

}  // namespace gpubn
