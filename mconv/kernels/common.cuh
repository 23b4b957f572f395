// Shared by every mconv kernel: types, conversions, the grid-stride loop and
// the layout of the int64 parameter block that describes a convolution.
//
// Compiled twice from the same text: by NVRTC for the GPU (cuda_fp16.h gives
// `half`), and by g++ for the host after host_shim.h (which defines
// MCONV_HOST, maps `half` to _Float16 and runs the grid as loops). So: no
// shared memory, no __syncthreads, no warp intrinsics, no atomics; every
// thread writes only its own output elements, and every index that can
// exceed 2^31 is a `long long`.
#pragma once

#ifndef MCONV_HOST
#include <cuda_fp16.h>
#endif

namespace mconv {

typedef long long index_t;

// Conversions between storage (T, Out) and accumulator (Acc) types.
template <typename To, typename From>
struct Convert {
  __device__ static To run(From v) { return static_cast<To>(v); }
};
template <>
struct Convert<float, half> {
  __device__ static float run(half v) { return __half2float(v); }
};
template <>
struct Convert<half, float> {
  __device__ static half run(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<half, half> {
  __device__ static half run(half v) { return v; }
};
template <typename To, typename From>
__device__ inline To convert(From v) {
  return Convert<To, From>::run(v);
}
template <typename T>
__device__ inline T zero() {
  return Convert<T, float>::run(0.0f);
}

// Every thread of a 1-d grid visits i = its global id, + the grid size, ...
#define MCONV_GRID_LOOP(i, n)                                                     \
  for (::mconv::index_t i = static_cast<::mconv::index_t>(blockIdx.x) * blockDim.x + \
                            threadIdx.x;                                          \
       i < (n); i += static_cast<::mconv::index_t>(blockDim.x) * gridDim.x)

// The parameter block of a zero-padding cross-correlation (mconv.kernels.plan.conv_params):
//   [0] N (spatial rank)  [1] B  [2] C  [3] O  [4] G  [5] K = prod(kernel)
//   [6] P = prod(out_size)  [7] S = prod(in_size)
//   then N values each of: in_size, out_size, kernel_size, stride, dilation, pad_before.
struct ConvGeo {
  const index_t* p;
  __device__ int ndim() const { return static_cast<int>(p[0]); }
  __device__ index_t batch() const { return p[1]; }
  __device__ index_t in_channels() const { return p[2]; }
  __device__ index_t out_channels() const { return p[3]; }
  __device__ index_t groups() const { return p[4]; }
  __device__ index_t taps() const { return p[5]; }
  __device__ index_t out_numel() const { return p[6]; }
  __device__ index_t in_numel() const { return p[7]; }
  __device__ index_t in_size(int d) const { return p[8 + d]; }
  __device__ index_t out_size(int d) const { return p[8 + p[0] + d]; }
  __device__ index_t kernel(int d) const { return p[8 + 2 * p[0] + d]; }
  __device__ index_t stride(int d) const { return p[8 + 3 * p[0] + d]; }
  __device__ index_t dilation(int d) const { return p[8 + 4 * p[0] + d]; }
  __device__ index_t pad(int d) const { return p[8 + 5 * p[0] + d]; }
};

// Offset into one (unpadded) input channel of the element that output position
// `q` (flat, over out_size) reads through kernel tap `k` (flat, over kernel_size),
// or -1 when that element lies in the zero padding.
__device__ inline index_t input_offset(const ConvGeo& g, index_t q, index_t k) {
  index_t offset = 0, scale = 1;
  for (int d = g.ndim() - 1; d >= 0; --d) {
    const index_t qd = q % g.out_size(d), kd = k % g.kernel(d);
    q /= g.out_size(d);
    k /= g.kernel(d);
    const index_t pos = qd * g.stride(d) + kd * g.dilation(d) - g.pad(d);
    if (pos < 0 || pos >= g.in_size(d)) return -1;
    offset += pos * scale;
    scale *= g.in_size(d);
  }
  return offset;
}

// Flat output position that reads input position `s` (flat, over in_size) through
// kernel tap `k`, or -1 when there is none (stride skips it, or it is out of range).
__device__ inline index_t output_offset(const ConvGeo& g, index_t s, index_t k) {
  index_t offset = 0, scale = 1;
  for (int d = g.ndim() - 1; d >= 0; --d) {
    const index_t sd = s % g.in_size(d), kd = k % g.kernel(d);
    s /= g.in_size(d);
    k /= g.kernel(d);
    const index_t t = sd + g.pad(d) - kd * g.dilation(d);
    if (t < 0 || t % g.stride(d) != 0 || t / g.stride(d) >= g.out_size(d)) return -1;
    offset += (t / g.stride(d)) * scale;
    scale *= g.out_size(d);
  }
  return offset;
}

}  // namespace mconv
