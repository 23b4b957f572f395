"""CPU benchmark: mconv (NumPy backend) against PyTorch CPU, in the same process.

For a fixed set of layer shapes (ResNet-50, ResNeXt, MobileNet, audio, video, an upsampler),
in float32 and float16 (mconv computes float16 with ``compute_mode='float32'``), it reports
for forward and forward+backward: the best time of each library, GFLOP/s, the time ratio
mconv / torch (lower is better) and its geometric mean, the peak memory of one call, the
share of NumPy's sgemm peak that mconv reaches on dense 3x3 layers, and how both libraries
scale with batch, channels and image size. Results go to JSON and (with matplotlib) a figure.

    python -m benchmarks.conv [--repeat 5] [--threads N] [--dtypes float32 float16]
                              [--shapes SUBSTRING ...] [--quick] [--no-scaling]
                              [--json docs/benchmarks/cpu.json] [--plot docs/benchmarks/cpu.png]
                              [--markdown]

Needs torch (the ``test`` extra); the plot needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ._measure import (LIBRARIES, PASSES, Case, best_times, can_measure_memory, environment,
                       geomean, make_calls, measure_case, sgemm_peak)  # fmt: skip

SHAPES = [
    Case("resnet50 3x3 c64 56x56", "conv", (8, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    Case("resnet50 3x3 c128 28x28", "conv", (8, 128, 28, 28), (128, 128, 3, 3), dict(padding=1)),
    Case("resnet50 3x3 c256 14x14", "conv", (8, 256, 14, 14), (256, 256, 3, 3), dict(padding=1)),
    Case("resnet50 1x1 c256->64 56x56", "conv", (8, 256, 56, 56), (64, 256, 1, 1), {}),
    Case("3x3 s2 c128 56x56", "conv", (8, 128, 56, 56), (128, 128, 3, 3), dict(stride=2, padding=1)),
    Case("stem 7x7 s2 c3->64 224x224", "conv", (8, 3, 224, 224), (64, 3, 7, 7), dict(stride=2, padding=3)),
    Case("resnext50 3x3 g32 c256 28x28", "conv", (8, 256, 28, 28), (256, 8, 3, 3), dict(padding=1, groups=32)),
    Case("mobilenet dw 3x3 c128 56x56", "conv", (8, 128, 56, 56), (128, 1, 3, 3), dict(padding=1, groups=128)),
    Case("audio conv1d k5 c128 L4096", "conv", (8, 128, 4096), (128, 128, 5), dict(padding=2)),
    Case("video conv3d 3x3x3 c32 8x56x56", "conv", (2, 32, 8, 56, 56), (32, 32, 3, 3, 3), dict(padding=1)),
    Case("upsample convT 4x4 s2 c128->64 28x28", "conv_transpose", (8, 128, 28, 28), (128, 64, 4, 4), dict(stride=2, padding=1)),
]  # fmt: skip

# Scaling of the float32 fwd+bwd of the 3x3 layer: one axis varies, the others stay at BASE.
BASE = dict(n=8, c=64, hw=56)
SCALING = {"n": (1, 2, 4, 8, 16), "c": (16, 32, 64, 128, 256), "hw": (14, 28, 56, 112)}
SCALING_LABELS = {"n": "batch N", "c": "channels C = O", "hw": "H = W"}


def is_dense_3x3(case: Case) -> bool:
    return case.op == "conv" and case.w[2:] == (3, 3) and case.kwargs.get("groups", 1) == 1


def bench_case(case: Case, dtype, args, sgemm_gflops: float) -> dict:
    """One shape in one dtype; dense 3x3 layers add mconv's share of the sgemm peak."""
    row = measure_case(case, dtype, args.repeat, args.torch_fp16_repeat)
    if is_dense_3x3(case):
        row["sgemm_fraction"] = {s: row["mconv"][s]["gflops"] / sgemm_gflops for s in PASSES}
    return row


def scaling_case(axis: str, value: int) -> Case:
    """The 3x3 layer at BASE, with one of n, c, hw set to ``value``."""
    n, c, hw = dict(BASE, **{axis: value}).values()
    return Case(f"3x3 N{n} C{c} {hw}x{hw}", "conv", (n, c, hw, hw), (c, c, 3, 3), dict(padding=1))


def run_scaling(args) -> dict:
    """``{axis: [{value, mconv_ms, torch_ms, ratio}]}`` for the float32 fwd+bwd of the 3x3 layer."""
    result = {}
    for axis, values in SCALING.items():
        for value in values[:2] if args.quick else values:
            case = scaling_case(axis, value)
            progress(f"scaling {case.name}")
            calls, _ = make_calls(case, np.float32)
            fns = {lib: calls[lib, "fwd+bwd"] for lib in LIBRARIES}
            best = best_times(fns, dict.fromkeys(LIBRARIES, args.repeat))
            mconv, ref = (best[lib] * 1e3 for lib in LIBRARIES)
            point = dict(value=value, mconv_ms=mconv, torch_ms=ref, ratio=mconv / ref)
            result.setdefault(axis, []).append(point)
            if not args.markdown:
                print(f"{case.name:38s} float32  fwd+bwd {mconv:8.1f} vs {ref:8.1f} ms ({mconv / ref:5.2f}x)")  # fmt: skip
    return result


def summarize(rows: list) -> dict:
    """Geometric means of the time and memory ratios, per dtype and pass; for float16, also
    of mconv's float16 time over its own float32 time (``vs_float32``, per shape in the rows)."""
    summary = {}
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        mine = [r for r in rows if r["dtype"] == dtype]
        mem = {s: [r["mem_ratio"][s] for r in mine if r["mem_ratio"][s]] for s in PASSES}
        summary[dtype] = {
            "ratio": {s: geomean(r["ratio"][s] for r in mine) for s in PASSES},
            "mem_ratio": {s: geomean(mem[s]) if mem[s] else None for s in PASSES},
        }
    single = {r["shape"]: r for r in rows if r["dtype"] == "float32"}
    half = [r for r in rows if r["dtype"] == "float16" and r["shape"] in single]
    for r in half:
        r["vs_float32"] = {
            s: r["mconv"][s]["ms"] / single[r["shape"]]["mconv"][s]["ms"] for s in PASSES
        }
    if half:
        summary["float16"]["vs_float32"] = {
            s: geomean(r["vs_float32"][s] for r in half) for s in PASSES
        }
    return summary


# -- reporting ---------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _num(value, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def print_row(row: dict) -> None:
    m, t, r = row["mconv"], row["torch"], row["ratio"]
    peaks = (_num(lib["fwd+bwd"]["peak_mib"], ".0f") for lib in (m, t))
    print(
        f"{row['shape']:38s} {row['dtype']:8s} "
        f"fwd {m['fwd']['ms']:8.1f} vs {t['fwd']['ms']:8.1f} ms ({r['fwd']:5.2f}x)  "
        f"fwd+bwd {m['fwd+bwd']['ms']:8.1f} vs {t['fwd+bwd']['ms']:8.1f} ms ({r['fwd+bwd']:5.2f}x)  "
        "peak {} vs {} MiB".format(*peaks)
    )


def _table(header: list, rows: list) -> None:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    print("\n| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for cells in rows:
        print("| " + " | ".join(map(str, cells)) + " |")


SHAPE_COLUMNS = [  # header, library or None (the row itself), pass, field, format
    ("mconv fwd ms", "mconv", "fwd", "ms", ".1f"),
    ("torch fwd ms", "torch", "fwd", "ms", ".1f"),
    ("fwd ratio", None, "fwd", "ratio", ".2f"),
    ("mconv fwd+bwd ms", "mconv", "fwd+bwd", "ms", ".1f"),
    ("torch fwd+bwd ms", "torch", "fwd+bwd", "ms", ".1f"),
    ("fwd+bwd ratio", None, "fwd+bwd", "ratio", ".2f"),
    ("mconv GFLOP/s (fwd+bwd)", "mconv", "fwd+bwd", "gflops", ".1f"),
    ("mconv peak MiB (fwd+bwd)", "mconv", "fwd+bwd", "peak_mib", ".0f"),
    ("torch peak MiB (fwd+bwd)", "torch", "fwd+bwd", "peak_mib", ".0f"),
    ("mem ratio (fwd+bwd)", None, "fwd+bwd", "mem_ratio", ".2f"),
]


def _cell(row: dict, lib, step: str, field: str, fmt: str) -> str:
    return _num(row[field][step] if lib is None else row[lib][step][field], fmt)


def print_markdown(result: dict) -> None:
    rows = result["shapes"]
    for dtype, geo in result["summary"].items():
        body = [
            [row["shape"]] + [_cell(row, *column[1:]) for column in SHAPE_COLUMNS]
            for row in rows
            if row["dtype"] == dtype
        ]
        body.append(["**geomean**"] + [
            f"**{_cell(geo, None, step, field, fmt)}**" if lib is None else ""
            for _, lib, step, field, fmt in SHAPE_COLUMNS
        ])  # fmt: skip
        _table([f"shape ({dtype})"] + [column[0] for column in SHAPE_COLUMNS], body)
    if any("vs_float32" in r for r in rows):
        vs = [
            [r["shape"]] + [f"{r['vs_float32'][s]:.2f}" for s in PASSES]
            for r in rows
            if "vs_float32" in r
        ]
        geo = result["summary"]["float16"]["vs_float32"]
        vs.append(["**geomean**"] + [f"**{geo[s]:.2f}**" for s in PASSES])
        _table(["mconv float16 / its float32 time", "fwd", "fwd+bwd"], vs)
    print(f"\nsgemm peak (NumPy, 2048^3 float32 matmul): {result['sgemm_gflops']:.1f} GFLOP/s")
    _table(
        ["dense 3x3 shape", "dtype", "mconv fwd, share of sgemm peak", "mconv fwd+bwd, share"],
        [
            [r["shape"], r["dtype"]] + [f"{r['sgemm_fraction'][s]:.0%}" for s in PASSES]
            for r in rows
            if "sgemm_fraction" in r
        ],
    )
    scaling = [(axis, p) for axis, points in (result["scaling"] or {}).items() for p in points]
    if scaling:
        _table(
            ["scaling (3x3, float32, fwd+bwd)", "mconv ms", "torch ms", "ratio"],
            [
                [f"{axis} = {p['value']}", f"{p['mconv_ms']:.1f}", f"{p['torch_ms']:.1f}", f"{p['ratio']:.2f}"]
                for axis, p in scaling
            ],
        )  # fmt: skip


def plot(result: dict, path: Path) -> None:
    """(a) the time ratio per shape, dtype and pass on a log axis; (b) the scaling curves."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("matplotlib is not installed, so no plot (pip install -e '.[bench]')")
        return
    axes = list(result["scaling"] or ())
    layout = [["ratio"] * len(axes), axes] if axes else [["ratio"]]
    fig, ax = plt.subplot_mosaic(layout, figsize=(15, 10))
    _plot_ratios(ax["ratio"], result)
    for axis in axes:
        _plot_scaling(ax[axis], axis, result["scaling"][axis])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    progress(f"wrote {path}")


def _log_y(ax) -> None:
    """A log y axis with ticks at 1, 2 and 5 times powers of ten, written plainly."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_ratios(ax, result: dict) -> None:
    names = list(dict.fromkeys(r["shape"] for r in result["shapes"]))
    series = [(dtype, step) for dtype in result["summary"] for step in PASSES]
    width = 0.8 / len(series)
    for i, (dtype, step) in enumerate(series):
        ratios = {r["shape"]: r["ratio"][step] for r in result["shapes"] if r["dtype"] == dtype}
        offset = (i - (len(series) - 1) / 2) * width
        xs = [j + offset for j in range(len(names))]
        ax.bar(xs, [ratios.get(n, np.nan) for n in names], width, label=f"{dtype} {step}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.5, color="black", linewidth=0.8, linestyle="--")
    _log_y(ax)
    ax.set_ylabel("mconv / torch time (lower is better)")
    ax.set_title("(a) time ratio", pad=24)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    # one row between the title and the bars, clear of the data
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), frameon=False)


def _plot_scaling(ax, axis: str, points: list) -> None:
    values = [p["value"] for p in points]
    for lib in LIBRARIES:
        ax.plot(values, [p[f"{lib}_ms"] for p in points], "o-", label=lib)
    others = ", ".join(f"{k}={v}" for k, v in BASE.items() if k != axis)
    _log_y(ax)
    ax.set(xlabel=SCALING_LABELS[axis], ylabel="float32 fwd+bwd ms")
    ax.set_title(f"(b) 3x3 conv scaling, {others}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.set_xticks([], minor=True)
    ax.legend()


# -- command line ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.conv",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--repeat",
        type=int,
        default=5,
        help="timed runs per block (two blocks per library, taking turns, after a warm-up); the "
        "minimum is kept",
    )
    add("--torch-fp16-repeat", type=int, default=2, help="--repeat for torch in float16 (slow)")
    add("--threads", type=int, default=os.cpu_count(), help="torch threads (BLAS: its default)")
    add("--dtypes", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    add("--shapes", nargs="+", metavar="SUBSTRING", help="only shapes whose name contains one")
    add("--quick", action="store_true", help="1 repeat, two points per scaling axis")
    add("--no-scaling", action="store_true", help="skip the scaling runs")
    add("--json", type=Path, default=Path("docs/benchmarks/cpu.json"), help="results")
    add("--plot", type=Path, default=Path("docs/benchmarks/cpu.png"), help="figure")
    add("--markdown", action="store_true", help="print markdown tables at the end")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat = args.torch_fp16_repeat = 1
    return args


def select_shapes(substrings) -> list:
    if not substrings:
        return SHAPES
    cases = [c for c in SHAPES if any(s.lower() in c.name.lower() for s in substrings)]
    if not cases:
        sys.exit(f"no shape name contains any of {substrings}")
    return cases


def run(args) -> dict:
    """Every measurement: the JSON document."""
    cases = select_shapes(args.shapes)
    torch.set_num_threads(args.threads)
    memory_measured = can_measure_memory()
    if not memory_measured:
        progress("/proc/self/clear_refs is not writable here: peak memory is reported as null")
    env = dict(environment(), peak_memory_measured=memory_measured)
    sgemm = sgemm_peak(args.repeat)
    rows = []
    for dtype in args.dtypes:
        for i, case in enumerate(cases, 1):
            progress(f"[{dtype} {i}/{len(cases)}] {case.name}")
            rows.append(bench_case(case, np.dtype(dtype).type, args, sgemm))
            if not args.markdown:
                print_row(rows[-1])
    scaling = None if args.no_scaling else run_scaling(args)
    repeats = dict(repeat=args.repeat, torch_fp16_repeat=args.torch_fp16_repeat)
    result = dict(environment=env, **repeats, sgemm_gflops=sgemm, shapes=rows, scaling=scaling)
    result["summary"] = summarize(rows)
    return result


def print_summary(result: dict) -> None:
    for dtype, geo in result["summary"].items():
        ratio, mem = geo["ratio"], _num(geo["mem_ratio"]["fwd+bwd"], ".2f")
        print(f"geomean {dtype}: fwd {ratio['fwd']:.2f}x, fwd+bwd {ratio['fwd+bwd']:.2f}x, "
              f"peak memory (fwd+bwd) {mem}x")  # fmt: skip
        if "vs_float32" in geo:
            vs = geo["vs_float32"]
            print(
                f"mconv float16 / its float32: fwd {vs['fwd']:.2f}x, fwd+bwd {vs['fwd+bwd']:.2f}x"
            )
    print(f"sgemm peak (NumPy, 2048^3 float32): {result['sgemm_gflops']:.1f} GFLOP/s")


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    progress(f"wrote {args.json}")
    plot(result, args.plot)
    (print_markdown if args.markdown else print_summary)(result)


if __name__ == "__main__":
    main()
