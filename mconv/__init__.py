"""mconv: N-d convolution layers for NumPy, forward and backward.

>>> import numpy as np, mconv
>>> conv = mconv.nn.Conv2d(1, 1, 2, bias=False)
>>> conv.weight.data[...] = 1.0
>>> conv(np.ones((1, 1, 3, 3), dtype=np.float32)).shape
(1, 1, 2, 2)

Submodules and the names below are imported on first use (PEP 562), so that
``python -m mconv convert`` and ``import layouts`` do not pay for the layers.
"""

import importlib

__version__ = "0.1.0"
_NAMES = {
    "ConvGeometry": ("geometry", "ConvGeometry"),
    "manual_seed": ("nn.init", "manual_seed"),
    "get_num_threads": ("backends.numpy_threads", "get_num_threads"),
    "set_num_threads": ("backends.numpy_threads", "set_num_threads"),
    "get_algorithm": ("precision", "get_algorithm"),
    "set_algorithm": ("precision", "set_algorithm"),
}
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


def __getattr__(name: str):
    if name in _NAMES:
        module, attribute = _NAMES[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    elif not name.startswith("__"):
        try:  # any submodule: mconv.nn, mconv.functional, mconv.backends, ...
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
