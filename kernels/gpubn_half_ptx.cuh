// gpubn_half_ptx.cuh -- binary16 conversions as PTX instructions.
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

}  // namespace gpubn
