"""Pure-Python planning of the GPU convolution: kernel parameters, launch
shapes, batch chunks and the cuBLAS calls. No array library is touched here,
so all of it is tested on a CPU.

GEMM shapes (G groups, Og = O/G, Cg = C/G, K = prod(kernel), P = prod(out_size)):

    forward          y_bg  (Og, P)   = W_g (Og, Cg*K)    @ cols_bg (Cg*K, P)
    backward_data    cols_bg (Cg*K, P) = W_g^T (Cg*K, Og) @ dy_bg (Og, P)
    backward_filter  dW_g  (Og, Cg*K) = dy_g (Og, B*P)    @ cols_g^T (B*P, Cg*K)

with per-image columns (B, G, Cg*K, P) for the first two (so y and dx are
written in place, no transposes) and per-group columns (G, Cg*K, B*P) for
the third (one GEMM reduces over the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..geometry import ConvGeometry

PAD_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
INT32_MAX = 2**31 - 1


def conv_params(geom: ConvGeometry, batch: int) -> tuple[int, ...]:
    """The int64 parameter block of ``ConvGeo`` (common.cuh) for ``batch`` images."""
    return (
        geom.ndim,
        batch,
        geom.in_channels,
        geom.out_channels,
        geom.groups,
        math.prod(geom.kernel_size),
        math.prod(geom.out_size),
        math.prod(geom.in_size),
        *geom.in_size,
        *geom.out_size,
        *geom.kernel_size,
        *geom.stride,
        *geom.dilation,
        *(lo for lo, _ in geom.padding),
    )


def pad_params(shape, pairs, mode: str) -> tuple[int, ...]:
    """The parameter block of the ``pad`` kernel: the last ``len(pairs)`` axes of ``shape``."""
    n = len(pairs)
    lead = math.prod(shape[: len(shape) - n])
    return (
        n,
        lead,
        PAD_MODES[mode],
        *shape[len(shape) - n :],
        *(lo for lo, _ in pairs),
        *(hi for _, hi in pairs),
    )


def launch_config(total: int, block: int = 256, max_blocks: int = 1 << 16) -> tuple[int, int]:
    """(grid, block) of a 1-d grid-stride launch over ``total`` items (grid >= 1)."""
    return max(1, min(max_blocks, -(-total // block))), block


def reduction_lanes(terms: int, rows: int, *, threads: int = 1 << 16, per_lane: int = 16) -> int:
    """Partial sums per row of a two-stage reduction of ``terms`` terms per row:
    enough lanes to fill ``threads`` threads, each summing >= ``per_lane`` terms."""
    by_threads = -(-threads // max(rows, 1))
    by_terms = -(-terms // per_lane)
    return max(1, min(1024, by_threads, by_terms))


def is_depthwise(geom: ConvGeometry) -> bool:
    """One input channel per group: the direct depthwise kernels apply."""
    return geom.depthwise


def is_pointwise(geom: ConvGeometry) -> bool:
    """The input already is its column matrix (``ConvGeometry.pointwise``)."""
    return geom.pointwise


def batch_chunks(batch: int, per_image: int, limit: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of images whose columns (``per_image`` bytes each) fit in
    ``limit`` bytes (at least one image per chunk)."""
    step = max(1, limit // max(per_image, 1))
    return [(start, min(start + step, batch)) for start in range(0, batch, step)]


@dataclass(frozen=True)
class GemmCall:
    """One ``cublasGemmStridedBatchedEx``, column-major: for i < batch,
    ``C_i = op(A_i) op(B_i) + beta C_i`` (m x n, inner k) with
    ``X_i = X + offset_x + i * stride_x`` (element offsets)."""

    transa: bool
    transb: bool
    m: int
    n: int
    k: int
    lda: int
    ldb: int
    ldc: int
    offset_a: int
    offset_b: int
    offset_c: int
    stride_a: int
    stride_b: int
    stride_c: int
    batch: int
    beta: float = 0.0

    def check(self) -> "GemmCall":
        """cuBLAS takes 32-bit sizes: refuse what does not fit."""
        sizes = (self.m, self.n, self.k, self.lda, self.ldb, self.ldc, self.batch)
        if max(sizes) > INT32_MAX:
            raise ValueError(
                f"a GEMM of this convolution exceeds cuBLAS's 32-bit sizes (m, n, k, lda, ldb, "
                f"ldc, batch) = {sizes}; split the batch or the channels"
            )
        return self


@dataclass(frozen=True)
class RowGemm:
    """A row-major ``C (M, N) = op(A) (M, K) @ op(B) (K, N)`` with A stored as (M, K)
    (or (K, M) when ``a_t``), B as (K, N) (or (N, K) when ``b_t``), batched by
    element offsets and strides. ``cublas()`` is the same product in cuBLAS's
    column-major terms: C^T = op(B)^T op(A)^T, so A and B swap places."""

    M: int
    N: int
    K: int
    a_t: bool = False
    b_t: bool = False
    offsets: tuple[int, int, int] = (0, 0, 0)
    strides: tuple[int, int, int] = (0, 0, 0)
    batch: int = 1
    beta: float = 0.0

    def cublas(self) -> GemmCall:
        """The column-major call; pass (B, A, C) as its (A, B, C) operands."""
        lda = self.M if self.a_t else self.K
        ldb = self.K if self.b_t else self.N
        (oa, ob, oc), (sa, sb, sc) = self.offsets, self.strides
        return GemmCall(self.b_t, self.a_t, self.N, self.M, self.K, ldb, lda, self.N,
                        ob, oa, oc, sb, sa, sc, self.batch, self.beta).check()  # fmt: skip


def _per_image_batched(base: RowGemm, groups: int, images: int, per_group, per_image):
    """Calls covering every (image, group) pair: loop over the shorter of the two
    axes, batch over the other. ``per_group``/``per_image``: the (A, B, C) element
    offsets of one step along each axis."""
    if images <= groups:
        return [
            replace(base, offsets=tuple(b * s for s in per_image), strides=per_group, batch=groups)
            for b in range(images)
        ]
    return [
        replace(base, offsets=tuple(g * s for s in per_group), strides=per_image, batch=images)
        for g in range(groups)
    ]


def _sizes(geom: ConvGeometry):
    g = geom.groups
    og, cg = geom.out_channels // g, geom.in_channels // g
    return g, og, cg * math.prod(geom.kernel_size), math.prod(geom.out_size)


def forward_gemms(geom: ConvGeometry, images: int) -> list[RowGemm]:
    """y (B, O, P) from W (O, CgK) and per-image cols (B, C*K, P): A = W, B = cols, C = y."""
    g, og, cgk, p = _sizes(geom)
    base = RowGemm(og, p, cgk)
    return _per_image_batched(
        base, g, images, (og * cgk, cgk * p, og * p), (0, g * cgk * p, g * og * p)
    )


def backward_data_gemms(geom: ConvGeometry, images: int) -> list[RowGemm]:
    """Per-image cols (B, C*K, P) from W and dy (B, O, P): A = W (transposed), B = dy, C = cols."""
    g, og, cgk, p = _sizes(geom)
    base = RowGemm(cgk, p, og, a_t=True)
    return _per_image_batched(
        base, g, images, (og * cgk, og * p, cgk * p), (0, g * og * p, g * cgk * p)
    )


def backward_filter_gemms(geom: ConvGeometry, images: int, beta: float) -> list[RowGemm]:
    """dW (O, CgK) from dy transposed to (O, B*P) and per-group cols (C*K, B*P):
    A = dy^T, B = cols (transposed), C = dW; ``beta`` 1 adds to dW (batch chunks)."""
    g, og, cgk, p = _sizes(geom)
    bp = images * p
    return [
        RowGemm(og, cgk, bp, b_t=True, strides=(og * bp, cgk * bp, og * cgk), batch=g, beta=beta)
    ]
