"""examples/train_digits.py under mpiexec: any grid trains the serial model's curve.

float64 runs of 2 epochs on 1 rank, 2 ranks (group-parallel, the default),
2 ranks data-parallel and 4 ranks as a 2x2 grid (both with --sync-bn: BatchNorm
statistics over the whole batch), and with --device cuda on the
strict CuPy stand-in at 1 to 4 ranks give the same loss curve and test accuracies; the
default run on 2 ranks reaches >= 97% and its saved safetensors reload to
the same accuracy.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from mpi_launch import HERE, ROOT, launch

from mconv.kernels import host

SCRIPT = ROOT / "examples" / "train_digits.py"


def run(tmp_path, ranks, *flags, stand_in=False):
    """The example on ``ranks`` ranks (``stand_in``: on the CuPy stand-in)."""
    curve = tmp_path / f"curve-{ranks}-{'-'.join(map(str, flags)).replace('/', '_')}.json"
    script = [HERE / "stand_in_run.py", SCRIPT] if stand_in else [SCRIPT]
    job = launch(ranks, [*script, *flags, "--curve", curve], timeout=240)
    assert job.returncode == 0 and not job.timed_out, job.tail()
    return job, json.loads(curve.read_text())


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return run(tmp_path_factory.mktemp("serial"), 1, "--epochs", "2", "--dtype", "float64")[1]


@pytest.mark.parametrize(
    "ranks,flags,group_parallel",
    [
        (2, (), 2),
        (2, ("--data-parallel", "--sync-bn"), 1),
        (4, ("--group-parallel", "2", "--sync-bn"), 2),
    ],
    ids=["2-ranks-group-parallel", "2-ranks-data-parallel-sync-bn", "4-ranks-2x2-sync-bn"],
)
def test_same_curve_as_one_rank(tmp_path, one_rank, ranks, flags, group_parallel):
    _, found = run(tmp_path, ranks, "--epochs", "2", "--dtype", "float64", *flags)
    assert (found["ranks"], found["group_parallel"]) == (ranks, group_parallel)
    np.testing.assert_allclose(found["loss"], one_rank["loss"], rtol=1e-9, atol=1e-12)
    assert found["accuracy"] == one_rank["accuracy"]


def test_default_run_on_two_ranks_reaches_97_percent(tmp_path):
    job, found = run(tmp_path, 2, "--out", tmp_path / "ckpt")
    accuracy = float(re.search(r"final test accuracy ([\d.]+)%", job.stdout).group(1))
    assert accuracy >= 97.0, job.stdout[-2000:]
    assert "(same)" in job.stdout and "merged shards equal it: True" in job.stdout
    assert (tmp_path / "ckpt" / "digits.safetensors").exists()
    assert found["accuracy"][-1] * 100 == pytest.approx(accuracy, abs=0.01)
    print(f"train_digits.py on 2 ranks: {accuracy:.2f}% in {found['seconds']:.1f} s of training")


@pytest.mark.parametrize(
    "ranks,flags",
    [
        (1, ()),
        (2, ()),
        (3, ("--data-parallel", "--sync-bn")),
        (4, ("--group-parallel", "2", "--sync-bn")),
    ],
    ids=["1-rank", "2-ranks-group-parallel", "3-ranks-data-parallel", "4-ranks-2x2"],
)
def test_gpus_train_the_same_curve(tmp_path, one_rank, ranks, flags):
    """--device cuda on the CuPy stand-in: the model, batches and collectives on device arrays
    (mconv's CuPy backend over the host-built kernels, NCCL's stand-in)."""
    host.build()
    job, found = run(tmp_path, ranks, "--epochs", "2", "--dtype", "float64", "--device", "cuda",
                     *flags, stand_in=True)  # fmt: skip
    assert found["device"] == "cuda" and "on cuda" in job.stdout
    if ranks > 1:
        assert "collectives on cuda arrays went through: nccl" in job.stdout, job.stdout[-2000:]
    np.testing.assert_allclose(found["loss"], one_rank["loss"], rtol=1e-9, atol=1e-12)
    assert found["accuracy"] == one_rank["accuracy"]
    assert "(same)" in job.stdout and "merged shards equal it: True" in job.stdout
