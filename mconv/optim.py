"""SGD and Adam with PyTorch's update rules, on ``nn.Parameter`` lists.

>>> import numpy as np
>>> from mconv import nn
>>> p = nn.Parameter(np.ones(2))
>>> p.grad = np.array([1.0, -1.0])
>>> SGD([p], lr=0.5).step()
>>> p.data
array([0.5, 1.5])
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from ._args import array_module
from .nn.module import Parameter


def _check_number(value: Any, name: str, minimum: float = 0.0, below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, but got {name}={value!r}")
    if not math.isfinite(value) or value < minimum or (below is not None and value >= below):
        bound = f"in [{minimum}, {below})" if below is not None else f">= {minimum}"
        raise ValueError(f"Invalid {name}: must be {bound}, but got {name}={value!r}")
    return float(value)


class Optimizer:
    """Holds a list of Parameters and per-parameter state."""

    def __init__(self, params: Iterable[Parameter]):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for index, param in enumerate(self.params):
            if not isinstance(param, Parameter):
                raise TypeError(
                    f"optimizer params must be nn.Parameter, but item {index} is "
                    f"{type(param).__name__}"
                )
        self.state: dict[int, dict[str, Any]] = {}

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def step(self) -> None:
        for param in self.params:
            if param.grad is not None:
                self._update(param, self.state.setdefault(id(param), {}))

    def _update(self, param: Parameter, state: dict[str, Any]) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """p -= lr * (momentum buffer of grad + weight_decay * p), as ``torch.optim.SGD``."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        super().__init__(params)
        self.lr = _check_number(lr, "lr")
        self.momentum = _check_number(momentum, "momentum")
        self.dampening = _check_number(dampening, "dampening")
        self.weight_decay = _check_number(weight_decay, "weight_decay")
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum and zero dampening, but got "
                f"momentum={momentum}, dampening={dampening}"
            )
        self.nesterov = bool(nesterov)

    def _update(self, param, state):
        grad = param.grad
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        if self.momentum:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = grad.copy()
            else:
                buf = state["momentum_buffer"]
                buf *= self.momentum
                buf += (1.0 - self.dampening) * grad
            buf = state["momentum_buffer"]
            grad = grad + self.momentum * buf if self.nesterov else buf
        param.data -= (self.lr * grad).astype(param.data.dtype, copy=False)


class Adam(Optimizer):
    """Adam with bias correction and L2 weight decay, as ``torch.optim.Adam``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        super().__init__(params)
        self.lr = _check_number(lr, "lr")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas must be a pair of numbers, but got betas={betas!r}")
        self.betas = (
            _check_number(betas[0], "beta1", below=1.0),
            _check_number(betas[1], "beta2", below=1.0),
        )
        self.eps = _check_number(eps, "eps")
        self.weight_decay = _check_number(weight_decay, "weight_decay")

    def _update(self, param, state):
        beta1, beta2 = self.betas
        grad = param.grad
        if self.weight_decay:
            grad = grad + self.weight_decay * param.data
        xp = array_module(param.data)
        if not state:
            state.update(
                step=0, exp_avg=xp.zeros_like(param.data), exp_avg_sq=xp.zeros_like(param.data)
            )
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m *= beta1
        m += (1.0 - beta1) * grad
        v *= beta2
        v += (1.0 - beta2) * grad * grad
        step_size = self.lr / (1.0 - beta1**t)
        denom = xp.sqrt(v) / math.sqrt(1.0 - beta2**t) + self.eps
        param.data -= (step_size * m / denom).astype(param.data.dtype, copy=False)
