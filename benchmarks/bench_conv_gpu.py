"""GPU benchmark: mconv's CuPy backend against PyTorch cuDNN, in the same process.

For every convolution of ``benchmarks.conv.SHAPES`` it times forward and
forward+backward (dx, dW, db) in fp32 and in fp16 with fp32 accumulation
(mconv ``compute_mode='float32'``; PyTorch's fp16 cuDNN convolutions), checks
that both give the same result, and reports the median times, the ratio
mconv / cuDNN (lower is better) and the geometric means against this
round's targets (geomean <= 1.5x, depthwise <= 1.0x).

TF32 is disabled in PyTorch so that fp32 compares fp32 arithmetic with fp32.
Needs CuPy (``pip install 'mconv[cuda12]'``) and a CUDA build of PyTorch.

    python -m benchmarks.bench_conv_gpu [--repeat 20] [--dtype float32 float16] [--markdown]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import numpy as np

from .conv import SHAPES
from mconv import functional as F

TARGET_GEOMEAN, TARGET_DEPTHWISE = 1.5, 1.0


def _median_time(fn, sync, repeat: int) -> float:
    """Median wall time of ``fn`` between device synchronisations (after 3 warm-ups)."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _max_rel_error(ours, theirs) -> float:
    import cupy

    a = cupy.asnumpy(ours).astype(np.float64)
    b = theirs.detach().float().cpu().numpy().astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def bench_shape(x_shape, w_shape, kw, dtype, repeat):
    """[(mconv fwd, torch fwd), (mconv fwd+bwd, torch fwd+bwd)] seconds, and the max error."""
    import cupy
    import torch

    rng = np.random.default_rng(0)
    x, w = (
        rng.standard_normal(x_shape),
        rng.standard_normal(w_shape) / math.sqrt(math.prod(w_shape[1:])),
    )
    b = rng.standard_normal(w_shape[0])
    mode = "float32" if dtype == np.float16 else "default"
    xd, wd, bd = (cupy.asarray(a.astype(dtype)) for a in (x, w, b))
    y = F.conv(xd, wd, bd, compute_mode=mode, **kw)
    dyd = cupy.asarray(rng.standard_normal(y.shape).astype(dtype))
    tx, tw, tb = (
        torch.tensor(a.astype(dtype), device="cuda", requires_grad=True) for a in (x, w, b)
    )
    tdy = torch.tensor(cupy.asnumpy(dyd), device="cuda")
    tconv = getattr(torch.nn.functional, f"conv{len(w_shape) - 2}d")
    error = _max_rel_error(y, tconv(tx, tw, tb, **kw))

    def ours_fwd():
        F.conv(xd, wd, bd, compute_mode=mode, **kw)

    def ours_fwd_bwd():
        F.conv(xd, wd, bd, compute_mode=mode, **kw)
        F.conv_backward(dyd, xd, wd, has_bias=True, compute_mode=mode, **kw)

    def torch_fwd():
        with torch.no_grad():
            tconv(tx, tw, tb, **kw)

    def torch_fwd_bwd():
        torch.autograd.grad(tconv(tx, tw, tb, **kw), (tx, tw, tb), tdy)

    sync_ours = cupy.cuda.get_current_stream().synchronize
    sync_torch = torch.cuda.synchronize
    times = [
        (_median_time(ours, sync_ours, repeat), _median_time(ref, sync_torch, repeat))
        for ours, ref in ((ours_fwd, torch_fwd), (ours_fwd_bwd, torch_fwd_bwd))
    ]
    return times, error


def environment() -> str:
    """Device, driver and library versions, for the record in docs/benchmarks.md."""
    import cupy
    import torch

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    driver = cupy.cuda.runtime.driverGetVersion()
    return (
        f"{name}; CUDA runtime {runtime // 1000}.{runtime % 1000 // 10}, driver API "
        f"{driver // 1000}.{driver % 1000 // 10}; cupy {cupy.__version__}; torch "
        f"{torch.__version__} (cuDNN {torch.backends.cudnn.version()}); numpy "
        f"{np.__version__}; Python {platform.python_version()}"
    )


def geomean(values) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"],
                        choices=["float32", "float16"])  # fmt: skip
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.bench_conv_gpu needs a CUDA build of PyTorch and a GPU")
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithm per shape
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(environment())
    for dtype_name in args.dtype:
        dtype = np.dtype(dtype_name)
        rows, ratios = [], {"fwd": [], "fwd+bwd": []}
        for case in (c for c in SHAPES if c.op == "conv"):
            name = case.name
            ((of, tf), (ob, tb)), error = bench_shape(
                case.x, case.w, case.kwargs, dtype, args.repeat
            )
            ratios["fwd"].append(of / tf)
            ratios["fwd+bwd"].append(ob / tb)
            rows.append((name, of, tf, ob, tb, error))
        geo = {k: geomean(v) for k, v in ratios.items()}
        depthwise = [r for r in rows if " dw " in r[0]]
        label = "fp16, fp32 accumulation" if dtype == np.float16 else "fp32"
        if args.markdown:
            print(f"\n| shape ({label}) | mconv fwd ms | cuDNN fwd ms | ratio | "
                  "mconv fwd+bwd ms | cuDNN fwd+bwd ms | ratio | max rel err |")  # fmt: skip
            print("|---|---:|---:|---:|---:|---:|---:|---:|")
            for name, of, tf, ob, tb, error in rows:
                print(f"| {name} | {of * 1e3:.3f} | {tf * 1e3:.3f} | {of / tf:.2f} | "
                      f"{ob * 1e3:.3f} | {tb * 1e3:.3f} | {ob / tb:.2f} | {error:.1e} |")  # fmt: skip
            print(f"| **geomean** | | | **{geo['fwd']:.2f}** | | | **{geo['fwd+bwd']:.2f}** | |")
        else:
            print(f"\n{label}")
            for name, of, tf, ob, tb, error in rows:
                print(f"{name:28s} fwd {of * 1e3:8.3f} ms vs {tf * 1e3:8.3f} ms ({of / tf:5.2f}x)"
                      f"   fwd+bwd {ob * 1e3:8.3f} ms vs {tb * 1e3:8.3f} ms ({ob / tb:5.2f}x)"
                      f"   max rel err {error:.1e}")  # fmt: skip
            print(f"geomean ratio: fwd {geo['fwd']:.2f}x  fwd+bwd {geo['fwd+bwd']:.2f}x")
        for what, ratio, target in (
            ("geomean fwd", geo["fwd"], TARGET_GEOMEAN),
            ("geomean fwd+bwd", geo["fwd+bwd"], TARGET_GEOMEAN),
            *((f"{r[0]} fwd", r[1] / r[2], TARGET_DEPTHWISE) for r in depthwise),
            *((f"{r[0]} fwd+bwd", r[3] / r[4], TARGET_DEPTHWISE) for r in depthwise),
        ):
            verdict = "meets" if ratio <= target else "MISSES"
            print(f"target ({label}): {what} {ratio:.2f}x {verdict} <= {target}x")


if __name__ == "__main__":
    main()
