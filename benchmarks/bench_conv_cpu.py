"""CPU benchmark: mconv (NumPy) against PyTorch CPU, in the same process.

Reports the median time of each and the ratio mconv / torch (lower is
better) for forward and forward+backward, per shape, plus the geometric
mean. Needs the test extra (torch).

    python benchmarks/bench_conv_cpu.py [--repeat 7] [--threads 2] [--dtype float32] [--markdown]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from mconv import functional as F

# name, input (B, C, *S), weight (O, C/g, *k), kwargs
SHAPES = [
    ("resnet 3x3 c64 56x56", (8, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    ("resnet 3x3 s2 c128 28x28", (8, 128, 28, 28), (128, 128, 3, 3), dict(stride=2, padding=1)),
    ("1x1 c256->64 28x28", (8, 256, 28, 28), (64, 256, 1, 1), {}),
    ("depthwise 3x3 c128 56x56", (8, 128, 56, 56), (128, 1, 3, 3), dict(padding=1, groups=128)),
    ("grouped g8 3x3 c128 28x28", (8, 128, 28, 28), (128, 16, 3, 3), dict(padding=1, groups=8)),
    ("dilated 3x3 d2 c64 56x56", (8, 64, 56, 56), (64, 64, 3, 3), dict(padding=2, dilation=2)),
    ("conv1d k5 c128 L1024", (8, 128, 1024), (128, 128, 5), dict(padding=2)),
    ("conv3d 3x3x3 c32 16^3", (2, 32, 16, 16, 16), (32, 32, 3, 3, 3), dict(padding=1)),
]


def _median_time(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_shape(x_shape, w_shape, kw, dtype, repeat):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    y = F.conv(x, w, b, **kw)
    dy = rng.standard_normal(y.shape).astype(dtype)
    tconv = getattr(torch.nn.functional, f"conv{len(w_shape) - 2}d")
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tdy = torch.tensor(dy)

    def ours_fwd():
        F.conv(x, w, b, **kw)

    def ours_fwd_bwd():
        F.conv(x, w, b, **kw)
        F.conv_backward(dy, x, w, has_bias=True, **kw)

    def torch_fwd():
        with torch.no_grad():
            tconv(tx, tw, tb, **kw)

    def torch_fwd_bwd():
        torch.autograd.grad(tconv(tx, tw, tb, **kw), (tx, tw, tb), tdy)

    return [
        (_median_time(ours, repeat), _median_time(ref, repeat))
        for ours, ref in ((ours_fwd, torch_fwd), (ours_fwd_bwd, torch_fwd_bwd))
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (BLAS uses its own default)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, ratios = [], {"fwd": [], "fwd+bwd": []}
    for name, x_shape, w_shape, kw in SHAPES:
        (of, tf), (ob, tb) = bench_shape(x_shape, w_shape, kw, np.dtype(args.dtype), args.repeat)
        ratios["fwd"].append(of / tf)
        ratios["fwd+bwd"].append(ob / tb)
        rows.append((name, of, tf, ob, tb))
    geo = {k: math.exp(sum(map(math.log, v)) / len(v)) for k, v in ratios.items()}
    if args.markdown:
        print(
            f"| shape ({args.dtype}) | mconv fwd ms | torch fwd ms | ratio | mconv fwd+bwd ms | torch fwd+bwd ms | ratio |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, of, tf, ob, tb in rows:
            print(
                f"| {name} | {of * 1e3:.1f} | {tf * 1e3:.1f} | {of / tf:.2f} | {ob * 1e3:.1f} | {tb * 1e3:.1f} | {ob / tb:.2f} |"
            )
        print(f"| **geomean** | | | **{geo['fwd']:.2f}** | | | **{geo['fwd+bwd']:.2f}** |")
    else:
        for name, of, tf, ob, tb in rows:
            print(
                f"{name:28s} fwd {of * 1e3:8.1f} ms vs {tf * 1e3:8.1f} ms ({of / tf:5.2f}x)   "
                f"fwd+bwd {ob * 1e3:8.1f} ms vs {tb * 1e3:8.1f} ms ({ob / tb:5.2f}x)"
            )
        print(f"geomean ratio: fwd {geo['fwd']:.2f}x  fwd+bwd {geo['fwd+bwd']:.2f}x")


if __name__ == "__main__":
    main()
