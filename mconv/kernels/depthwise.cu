// Direct depthwise convolution (groups == C, one input channel per group,
// O = M * C outputs: channel multiplier M), forward and both gradients.
// A GEMM would multiply a 1 x K row by a K x P im2col copy per channel: all
// memory traffic, no reuse. Here each thread reads its K taps directly.
//
//     y[b, o, q] = sum_k w[o, k] * xpad[b, o / M, q * stride + k * dilation]

namespace mconv {

// One thread per output element; taps summed in Acc in increasing k.
template <typename T, typename Acc, typename Out>
__global__ void depthwise_forward(const T* __restrict__ x, const T* __restrict__ w,
                                  Out* __restrict__ y, const index_t* geo) {
  const ConvGeo g{geo};
  const index_t C = g.in_channels(), O = g.out_channels(), K = g.taps();
  const index_t P = g.out_numel(), S = g.in_numel(), M = O / C;
  const index_t total = g.batch() * O * P;
  MCONV_GRID_LOOP(i, total) {
    const index_t q = i % P, o = (i / P) % O, b = i / (P * O);
    const T* image = x + (b * C + o / M) * S;
    const T* taps = w + o * K;
    Acc acc = zero<Acc>();
    for (index_t k = 0; k < K; ++k) {
      const index_t offset = input_offset(g, q, k);
      if (offset >= 0) acc += convert<Acc>(taps[k]) * convert<Acc>(image[offset]);
    }
    y[i] = convert<Out>(acc);
  }
}

// dx[b, c, s] = sum over m < M and taps k of w[c*M + m, k] * dy[b, c*M + m, q(s, k)]:
// one thread per input element (a gather; m outer, k inner).
template <typename T, typename Acc, typename Out>
__global__ void depthwise_backward_data(const T* __restrict__ dy, const T* __restrict__ w,
                                        Out* __restrict__ dx, const index_t* geo) {
  const ConvGeo g{geo};
  const index_t C = g.in_channels(), O = g.out_channels(), K = g.taps();
  const index_t P = g.out_numel(), S = g.in_numel(), M = O / C;
  const index_t total = g.batch() * C * S;
  MCONV_GRID_LOOP(i, total) {
    const index_t s = i % S, c = (i / S) % C, b = i / (S * C);
    Acc acc = zero<Acc>();
    for (index_t m = 0; m < M; ++m) {
      const index_t o = c * M + m;
      const T* grad = dy + (b * O + o) * P;
      for (index_t k = 0; k < K; ++k) {
        const index_t q = output_offset(g, s, k);
        if (q >= 0) acc += convert<Acc>(w[o * K + k]) * convert<Acc>(grad[q]);
      }
    }
    dx[i] = convert<Out>(acc);
  }
}

// First stage of dw[o, k] = sum over (b, q) of dy[b, o, q] * xpad[b, o / M, q, k]:
// thread (o, k, lane) sums the terms t = lane, lane + L, ... of the B*P flat
// (b, q) positions into partial[(o * K + k) * L + lane] (adjacent lanes read
// adjacent q). reduce_rows then sums the L partials of each row in order.
template <typename T, typename Acc>
__global__ void depthwise_backward_filter(const T* __restrict__ dy, const T* __restrict__ x,
                                          Acc* __restrict__ partial, const index_t* geo,
                                          index_t lanes) {
  const ConvGeo g{geo};
  const index_t C = g.in_channels(), O = g.out_channels(), K = g.taps();
  const index_t P = g.out_numel(), S = g.in_numel(), M = O / C;
  const index_t terms = g.batch() * P, total = O * K * lanes;
  MCONV_GRID_LOOP(i, total) {
    const index_t lane = i % lanes, k = (i / lanes) % K, o = i / (lanes * K);
    Acc acc = zero<Acc>();
    for (index_t t = lane; t < terms; t += lanes) {
      const index_t q = t % P, b = t / P;
      const index_t offset = input_offset(g, q, k);
      if (offset >= 0) {
        acc += convert<Acc>(dy[(b * O + o) * P + q]) *
               convert<Acc>(x[(b * C + o / M) * S + offset]);
      }
    }
    partial[i] = acc;
  }
}

}  // namespace mconv
