// Host build of mconv's CUDA kernels: included before common.cuh and the .cu
// sources, so that g++ compiles the SAME kernel text as ordinary C++.
//
// `__global__` / `__device__` become plain (inline) functions, `half` becomes
// _Float16, and a "launch" runs every (block, thread) of a 1-d grid one after
// the other, in forward or reverse order. The kernels use no shared memory,
// __syncthreads, warp intrinsics or atomics, so this sequential schedule
// computes exactly what any GPU schedule computes; running the grid in both
// orders (and with different grid shapes) checks that no thread depends on
// another's writes.
#pragma once

#define MCONV_HOST 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

typedef _Float16 half;

inline float __half2float(half v) { return static_cast<float>(v); }
inline half __float2half_rn(float v) { return static_cast<half>(v); }

struct mconv_dim3 {
  unsigned x, y, z;
};

// One host "device": the launch coordinates the running kernel reads.
static mconv_dim3 blockIdx, threadIdx, blockDim, gridDim;
static bool mconv_host_reverse = false;

extern "C" void mconv_host_set_reverse(int reverse) { mconv_host_reverse = reverse != 0; }

namespace mconv_host {

// Runs body() once per thread of a grid of `grid` blocks of `block` threads.
template <typename Body>
void launch(unsigned grid, unsigned block, Body body) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {mconv_host_reverse ? grid - 1 - b : b, 0, 0};
    for (unsigned t = 0; t < block; ++t) {
      threadIdx = {mconv_host_reverse ? block - 1 - t : t, 0, 0};
      body();
    }
  }
}

}  // namespace mconv_host
