"""Hypothesis strategies shared by the property tests."""

import numpy as np
from hypothesis import strategies as st


@st.composite
def conv_cases(draw, max_rank=3, modes=("zeros", "reflect", "replicate", "circular"), crops=False):
    """(x, w, b, kw, rng) of a valid conv; ``crops``: zero padding may be negative (a crop)."""
    n = draw(st.integers(1, max_rank))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    mode = draw(st.sampled_from(modes))
    kernel, stride, dilation, pairs, size = [], [], [], [], []
    for _ in range(n):
        k, d = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        least = -2 if crops and mode == "zeros" else 0
        lo, hi = draw(st.integers(least, 2)), draw(st.integers(least, 2))
        effective = d * (k - 1) + 1
        kept = 1 + max(-lo, 0) + max(-hi, 0)  # a crop leaves something
        smallest = max(kept, effective - lo - hi, lo + 1, hi + 1)  # also fits every mode
        kernel.append(k), dilation.append(d), pairs.append((lo, hi))
        stride.append(draw(st.integers(1, 3)))
        size.append(draw(st.integers(smallest, smallest + 4)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = draw(st.integers(1, 2))
    x = rng.standard_normal((batch, cin, *size))
    w = rng.standard_normal((cout, cin // groups, *kernel))
    kw = dict(
        stride=tuple(stride),
        padding=tuple(pairs),
        dilation=tuple(dilation),
        groups=groups,
        padding_mode=mode,
        conv_mode=draw(st.sampled_from(["cross_correlation", "convolution"])),
    )
    return x, w, rng.standard_normal(cout), kw, rng
