// The explicit padding modes (mconv.padding) and their adjoint, as gathers.
//
// Modes: 0 zeros, 1 reflect, 2 replicate, 3 circular. Padded position j of an
// axis of size n (-before <= j < n + after) reads source(j):
//     reflect    -j for j < 0, 2(n-1) - j for j >= n
//     replicate  clamp(j, 0, n-1)
//     circular   j mod n
// The adjoint adds every padded position back onto its source; as a gather,
// each source element sums its preimages: itself first, then the preimages in
// the `before` border, then those in the `after` border, each in increasing j
// (the order of mconv.padding.pad_backward_unchecked).

namespace mconv {

__device__ inline index_t pad_source(index_t j, index_t n, index_t mode) {
  if (j >= 0 && j < n) return j;
  if (mode == 1) return j < 0 ? -j : 2 * (n - 1) - j;
  if (mode == 2) return j < 0 ? 0 : n - 1;
  if (mode == 3) return ((j % n) + n) % n;
  return -1;  // zeros
}

// Pads the last N axes of x (lead = product of the other axes).
// pp = [N, lead, mode, in_size[N], before[N], after[N]].
template <typename T>
__global__ void pad(const T* __restrict__ x, T* __restrict__ y, const index_t* pp) {
  const int n = static_cast<int>(pp[0]);
  const index_t* size = pp + 3;
  const index_t* before = pp + 3 + n;
  const index_t* after = pp + 3 + 2 * n;
  index_t in_numel = 1, out_numel = 1;
  for (int d = 0; d < n; ++d) {
    in_numel *= size[d];
    out_numel *= size[d] + before[d] + after[d];
  }
  const index_t total = pp[1] * out_numel;
  MCONV_GRID_LOOP(i, total) {
    index_t r = i % out_numel, offset = 0, scale = 1;
    for (int d = n - 1; d >= 0; --d) {
      const index_t width = size[d] + before[d] + after[d];
      const index_t source = pad_source(r % width - before[d], size[d], pp[2]);
      r /= width;
      if (source < 0) {
        offset = -1;
        break;
      }
      offset += source * scale;
      scale *= size[d];
    }
    y[i] = offset < 0 ? zero<T>() : x[(i / out_numel) * in_numel + offset];
  }
}

// The preimages of source s in [lo, lo + count) among the border positions
// [first, last) of one side.
__device__ inline void border_preimages(index_t s, index_t n, index_t mode, bool before_side,
                                        index_t first, index_t last, index_t* lo,
                                        index_t* count) {
  index_t a = 0, b = 0;  // [a, b), empty by default
  if (mode == 1) {
    a = before_side ? -s : 2 * (n - 1) - s;
    b = a + 1;
  } else if (mode == 2) {
    if (before_side && s == 0) {
      a = first;
      b = last;
    } else if (!before_side && s == n - 1) {
      a = first;
      b = last;
    }
  } else if (mode == 3) {
    a = before_side ? s - n : s + n;
    b = a + 1;
  }
  if (a < first) a = first;
  if (b > last) b = last;
  *lo = a;
  *count = b > a ? b - a : 0;
}

// Adjoint of `pad` along one axis: dy (outer, before + n + after, inner) -> dx (outer, n, inner).
template <typename T, typename Acc, typename Out>
__global__ void pad_backward_axis(const T* __restrict__ dy, Out* __restrict__ dx, index_t outer,
                                  index_t n, index_t inner, index_t before, index_t after,
                                  index_t mode) {
  const index_t width = before + n + after, total = outer * n * inner;
  MCONV_GRID_LOOP(i, total) {
    const index_t in = i % inner, s = (i / inner) % n, o = i / (inner * n);
    const T* row = dy + o * width * inner + in;
    Acc acc = convert<Acc>(row[(before + s) * inner]);
    for (int side = 0; side < 2; ++side) {
      index_t lo, count;
      if (side == 0) {
        border_preimages(s, n, mode, true, -before, 0, &lo, &count);
      } else {
        border_preimages(s, n, mode, false, n, n + after, &lo, &count);
      }
      for (index_t j = lo; j < lo + count; ++j) acc += convert<Acc>(row[(before + j) * inner]);
    }
    dx[i] = convert<Out>(acc);
  }
}

}  // namespace mconv
