"""A small CNN trained end to end on a synthetic task (``mconv demo``).

The task: 8x8 images holding one bright bar, horizontal (class 0),
vertical (class 1) or diagonal (class 2), plus noise.

>>> losses = train_small_cnn(steps=5, seed=0)
>>> len(losses)
5
"""

from __future__ import annotations

import numpy as np

from . import losses, nn, optim
from .nn.module import to_device


def make_bars(count: int, rng: np.random.Generator, size: int = 8):
    """Images (count, 1, size, size) float32 and labels (count,) in {0, 1, 2}."""
    labels = rng.integers(0, 3, size=count)
    images = 0.3 * rng.standard_normal((count, 1, size, size)).astype(np.float32)
    where = rng.integers(1, size - 1, size=count)
    for i, (label, pos) in enumerate(zip(labels, where)):
        if label == 0:
            images[i, 0, pos, :] += 1.0
        elif label == 1:
            images[i, 0, :, pos] += 1.0
        else:
            images[i, 0, np.arange(size), (np.arange(size) + pos) % size] += 1.0
    return images, labels


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2, padding_mode="reflect"),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding="same"),
        nn.ReLU(),
        nn.GlobalAvgPool(),
        nn.Linear(16, 3),
    )


def train_small_cnn(
    steps: int = 60, seed: int = 0, batch: int = 32, lr: float = 0.01, device: str = "cpu"
) -> list[float]:
    """Train with Adam on ``device`` ('cpu', 'cuda' or 'cuda:i'); return every step's loss."""
    nn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = small_cnn().to(device)
    opt = optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        x, y = make_bars(batch, rng)
        loss, dlogits = losses.cross_entropy(model(to_device(x, device)), y)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        history.append(float(loss))
    return history


def main(steps: int = 60, device: str = "cpu") -> int:
    print(small_cnn())
    history = train_small_cnn(steps, device=device)
    for step in range(0, steps, max(steps // 6, 1)):
        print(f"step {step:3d}  loss {history[step]:.4f}")
    print(f"step {steps - 1:3d}  loss {history[-1]:.4f}")
    return 0
