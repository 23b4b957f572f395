"""Whole conv nets: eval forward of mconv's models against the same nets in torch.

Each model is built in both libraries (torch's from ``tests/torch_models.py``, written as
torchvision defines them), torch's random weights and BatchNorm statistics are loaded into
mconv's (``load_state_dict``: the same names), and one 224x224 float32 batch is timed in
each, best of ``--repeat`` runs in two rounds of blocks (``_measure.best_times``), torch on
as many threads as mconv. The largest difference between the two outputs is shown beside
the times: the nets compute the same thing.

    python -m benchmarks.bench_models [--batches 1 8] [--models resnet18 ...] [--repeat 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from mconv import models
from mconv.backends import numpy_threads

from ._measure import best_times, geomean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch_models as tm  # noqa: E402 - the tests' torchvision-style nets

NETS = {
    "resnet18": lambda: tm.ResNet(tm.BasicBlock, [2, 2, 2, 2], 1000),
    "resnet50": lambda: tm.ResNet(tm.Bottleneck, [3, 4, 6, 3], 1000),
    "resnext50_32x4d": lambda: tm.ResNet(tm.Bottleneck, [3, 4, 6, 3], 1000, 32, 4),
    "mobilenet_v2": lambda: tm.MobileNetV2(1000),
}


def measure(name: str, batch: int, repeat: int) -> dict:
    theirs = NETS[name]().float().eval()
    tm.randomize_batch_norms(theirs)
    ours = getattr(models, name)(num_classes=1000).eval()
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    tx = torch.from_numpy(x)

    def torch_forward():
        with torch.no_grad():
            return theirs(tx)

    times = best_times({"mconv": lambda: ours(x), "torch": torch_forward},
                       {"mconv": repeat, "torch": repeat})  # fmt: skip
    diff = float(np.abs(ours(x) - torch_forward().numpy()).max())
    return {"model": name, "batch": batch, "mconv_ms": times["mconv"] * 1e3,
            "torch_ms": times["torch"] * 1e3, "ratio": times["mconv"] / times["torch"],
            "max_abs_diff": diff}  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(numpy_threads.get_num_threads())
    rows = [measure(m, b, args.repeat) for m in args.models for b in args.batches]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads each; float32, eval")
    print("| model | batch | mconv ms | torch ms | ratio | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['mconv_ms']:.1f} | {r['torch_ms']:.1f} | "
              f"{r['ratio']:.2f} | {r['max_abs_diff']:.1e} |")  # fmt: skip
    print(f"| geomean | | | | {geomean(r['ratio'] for r in rows):.2f} | |")


if __name__ == "__main__":
    main()
