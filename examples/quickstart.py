"""mconv in one page: a functional conv, a layer's forward/backward, and a CNN that trains.

Run:  python examples/quickstart.py
"""

import numpy as np

import mconv
from mconv import functional as F, nn
from mconv.demo import train_small_cnn

# 1. Functional: Tripy's worked example. (N, C, H, W) input, PyTorch-layout weight (O, C/groups, kH, kW).
x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
w = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
print("conv2d:\n", F.conv2d(x, w)[0, 0])  # [[24 30 36] [48 54 60] [72 78 84]]

# Every padding form and mode: ints, (before, after) pairs, 'same'/'valid'; zeros/reflect/replicate/circular.
y = F.conv2d(x, w, padding=((1, 0), (0, 1)), padding_mode="reflect", conv_mode="convolution")
print("reflect-padded true convolution:", y.shape)

# 2. A layer: forward caches, backward returns dx and accumulates weight.grad / bias.grad.
mconv.manual_seed(0)
conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
out = conv(x)
dx = conv.backward(np.ones_like(out))
print(conv, "->", out.shape, "| dx", dx.shape, "| dW", conv.weight.grad.shape)

# Transposed conv undoes the shape change; output_size picks among the possible sizes.
up = nn.ConvTranspose2d(4, 1, 3, stride=2, padding=1)
print("upsampled back to", up(out, output_size=x.shape).shape)

# 3. Train a small CNN (conv, grouped reflect-padded conv, max pool, 'same' conv, linear) with Adam.
history = train_small_cnn(steps=40)
print(f"loss: first {history[0]:.3f} -> last {history[-1]:.3f}")
