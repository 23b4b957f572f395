"""mconv in one page: a functional conv, a layer's forward/backward, a CNN that trains,
and a MegEngine checkpoint imported into an mconv model.

Run:  python examples/quickstart.py
"""

import os
import pickle
import tempfile

import numpy as np

import layouts
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

# 4. Import a foreign checkpoint: a MegEngine-style .pkl with a grouped 5-d weight (G, O/G, I/G, kH, kW)
#    and a (1, O, 1, 1) bias; load_into converts it to the model's PyTorch layout, then export for Keras.
folder = tempfile.mkdtemp()
rng = np.random.default_rng(0)
megengine_state = {"0.weight": rng.standard_normal((2, 4, 1, 3, 3)).astype(np.float32),
                   "0.bias": np.zeros((1, 8, 1, 1), np.float32)}  # fmt: skip
with open(os.path.join(folder, "model.pkl"), "wb") as f:
    pickle.dump(megengine_state, f)
model = nn.Sequential(nn.Conv2d(2, 8, 3, groups=2), nn.ReLU())
layouts.load_into(model, os.path.join(folder, "model.pkl"))
print("loaded MegEngine weights:", {k: v.shape for k, v in model.state_dict().items()})
layouts.save_safetensors(model, os.path.join(folder, "keras.safetensors"), layout="tensorflow")
keras = layouts.load_checkpoint(os.path.join(folder, "keras.safetensors"))
print("exported for Keras:", {k: v.shape for k, v in keras.tensors.items()})
