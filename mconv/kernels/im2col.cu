// N-d im2col and its adjoint col2im (as a gather), for any spatial rank.
//
// Columns hold, for image b, channel c, kernel tap k and output position p,
//     cols[b * batch_stride + (c * K + k) * row_stride + p] = xpad[b, c, p * stride + k * dilation]
// Two layouts are used (mconv.kernels.plan):
//     per image  (B, C*K, P): batch_stride = C*K*P, row_stride = P
//     per group  (C*K, B, P): batch_stride = P,     row_stride = B*P
// (with C = G * C/G both equal (B, G, C/G*K, P) and (G, C/G*K, B*P): the GEMM operands).

namespace mconv {

// One thread per column element; zero padding is read as zeros.
template <typename T>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, const index_t* geo,
                       index_t batch_stride, index_t row_stride) {
  const ConvGeo g{geo};
  const index_t C = g.in_channels(), K = g.taps(), P = g.out_numel(), S = g.in_numel();
  const index_t total = g.batch() * C * K * P;
  MCONV_GRID_LOOP(i, total) {
    const index_t p = i % P, k = (i / P) % K, c = (i / (P * K)) % C, b = i / (P * K * C);
    const index_t offset = input_offset(g, p, k);
    cols[b * batch_stride + (c * K + k) * row_stride + p] =
        offset < 0 ? zero<T>() : x[(b * C + c) * S + offset];
  }
}

// dx = col2im(cols): one thread per input element, summing in Acc the column
// entries that read it, in increasing kernel-tap order (deterministic, no atomics).
template <typename T, typename Acc, typename Out>
__global__ void col2im(const T* __restrict__ cols, Out* __restrict__ dx, const index_t* geo,
                       index_t batch_stride, index_t row_stride) {
  const ConvGeo g{geo};
  const index_t C = g.in_channels(), K = g.taps(), S = g.in_numel();
  const index_t total = g.batch() * C * S;
  MCONV_GRID_LOOP(i, total) {
    const index_t s = i % S, c = (i / S) % C, b = i / (S * C);
    const T* base = cols + b * batch_stride + c * K * row_stride;
    Acc acc = zero<Acc>();
    for (index_t k = 0; k < K; ++k) {
      const index_t p = output_offset(g, s, k);
      if (p >= 0) acc += convert<Acc>(base[k * row_stride + p]);
    }
    dx[i] = convert<Out>(acc);
  }
}

}  // namespace mconv
