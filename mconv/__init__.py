"""mconv: N-d convolution layers for NumPy, forward and backward.

>>> import numpy as np, mconv
>>> conv = mconv.nn.Conv2d(1, 1, 2, bias=False)
>>> conv.weight.data[...] = 1.0
>>> conv(np.ones((1, 1, 3, 3), dtype=np.float32)).shape
(1, 1, 2, 2)
"""

from . import functional, losses, models, nn, optim
from .nn.init import manual_seed
from .backends.numpy_threads import get_num_threads, set_num_threads
from .geometry import ConvGeometry
from .precision import get_algorithm, set_algorithm

__version__ = "0.1.0"
__all__ = [
    "ConvGeometry",
    "functional",
    "nn",
    "losses",
    "optim",
    "models",
    "manual_seed",
    "get_num_threads",
    "set_num_threads",
    "get_algorithm",
    "set_algorithm",
    "__version__",
]
