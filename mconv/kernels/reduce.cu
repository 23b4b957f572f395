// Deterministic two-stage reductions in Acc (no atomics, no shared memory):
// a first stage writes `lanes` partial sums per output row, reduce_rows adds
// them in lane order. Used for the bias gradient and the depthwise dW.

namespace mconv {

// First stage of db[o] = sum over (b, p) of dy[b, o, p]: thread (o, lane) sums
// t = lane, lane + L, ... of the B*P flat positions into partial[o * L + lane].
template <typename T, typename Acc>
__global__ void bias_grad(const T* __restrict__ dy, Acc* __restrict__ partial, index_t batch,
                          index_t channels, index_t numel, index_t lanes) {
  const index_t terms = batch * numel, total = channels * lanes;
  MCONV_GRID_LOOP(i, total) {
    const index_t lane = i % lanes, o = i / lanes;
    Acc acc = zero<Acc>();
    for (index_t t = lane; t < terms; t += lanes) {
      acc += convert<Acc>(dy[((t / numel) * channels + o) * numel + t % numel]);
    }
    partial[i] = acc;
  }
}

// out[r] = sum over l < lanes of partial[r * lanes + l], in increasing l.
template <typename Acc, typename Out>
__global__ void reduce_rows(const Acc* __restrict__ partial, Out* __restrict__ out, index_t rows,
                            index_t lanes) {
  MCONV_GRID_LOOP(r, rows) {
    Acc acc = zero<Acc>();
    for (index_t l = 0; l < lanes; ++l) acc += partial[r * lanes + l];
    out[r] = convert<Out>(acc);
  }
}

}  // namespace mconv
