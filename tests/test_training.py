"""Losses and optimisers against torch, and a small CNN that learns."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mconv import losses, nn, optim
from mconv.demo import train_small_cnn

from reference import assert_close

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_matches_torch(rng, reduction):
    logits = rng.standard_normal((6, 5)) * 3
    target = rng.integers(0, 5, 6)
    loss, grad = losses.cross_entropy(logits, target, reduction)
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(target), reduction=reduction)
    ref.backward()
    assert_close(loss, ref.item())
    assert_close(grad, t.grad.numpy())


@pytest.mark.parametrize(
    "make,make_ref",
    [
        (lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (
            lambda p: optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.1),
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2, dampening=0.1),
        ),
        (
            lambda p: optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
            lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
        ),
        (lambda p: optim.Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
        (
            lambda p: optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
            lambda p: torch.optim.Adam(p, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        ),
    ],
)
def test_optimizers_match_torch(rng, make, make_ref):
    start = rng.standard_normal((3, 4))
    ours = nn.Parameter(start.copy())
    theirs = torch.nn.Parameter(torch.tensor(start))
    opt, ref = make([ours]), make_ref([theirs])
    for _ in range(6):
        grad = rng.standard_normal(start.shape)
        ours.grad = grad.copy()
        theirs.grad = torch.tensor(grad)
        opt.step()
        ref.step()
    assert_close(ours.data, theirs.detach().numpy(), 1e-12)


def test_optimizer_skips_parameters_without_grad():
    p = nn.Parameter(np.ones(2))
    optim.Adam([p]).step()
    assert np.array_equal(p.data, np.ones(2))


def test_small_cnn_loss_drops():
    history = train_small_cnn(steps=60, seed=0)
    assert np.mean(history[-10:]) < 0.3 * np.mean(history[:10])


def test_cli_demo_and_version():
    run = [sys.executable, "-m", "mconv"]
    demo = subprocess.run(
        run + ["demo", "--steps", "3"], capture_output=True, text=True, timeout=120
    )
    assert demo.returncode == 0, demo.stderr
    assert "loss" in demo.stdout
    version = subprocess.run(run + ["version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip()
    bad = subprocess.run(run + ["demo", "--steps", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--steps must be >= 1" in bad.stderr
    gpu = subprocess.run(run + ["demo", "--device", "gpu"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert gpu.returncode == 2 and "but got device='gpu'" in gpu.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(script):
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
