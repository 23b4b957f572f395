"""Independent references: PyTorch float64 with autograd, and plain N-d loops.

Nothing here calls mconv.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as TF

TORCH_PAD_MODE = {
    "zeros": "constant",
    "reflect": "reflect",
    "replicate": "replicate",
    "circular": "circular",
}


def assert_close(actual, expected, tol=1e-10):
    """max |actual - expected| <= tol * max(|expected|, 1e-300): relative to the array's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(actual.astype(np.float64) - expected).max(initial=0.0))
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.0e} * {scale:.3e}"


def _torch_flat_pad(pairs):
    """[(lo0, hi0), (lo1, hi1)] -> torch's last-dim-first flat tuple."""
    return [v for pair in reversed(pairs) for v in pair]


def _results(y, dy, tx, tw, tb):
    """y alone when dy is None, else (y, dx, dw, db) by autograd from dy."""
    if dy is None:
        return y.detach().numpy()
    y.backward(torch.tensor(dy))
    grads = (t.grad.numpy() if t is not None else None for t in (tx, tw, tb))
    return (y.detach().numpy(), *grads)


def torch_conv(
    x,
    w,
    b,
    dy,
    *,
    stride,
    padding,
    dilation,
    groups,
    padding_mode="zeros",
    conv_mode="cross_correlation",
):
    """(y, dx, dw, db) from torch autograd. ``padding``: pairs, or 'same'/'valid'."""
    n = w.ndim - 2
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    kernel = tw.flip(list(range(2, 2 + n))) if conv_mode == "convolution" else tw
    conv = getattr(TF, f"conv{n}d")
    if isinstance(padding, str) and padding_mode == "zeros":
        inp, pad_arg = tx, padding
    elif isinstance(padding, str):  # torch's module resolves 'same' for other modes
        module = getattr(torch.nn, f"Conv{n}d")(
            1, 1, w.shape[2:], padding=padding, dilation=dilation, padding_mode=padding_mode
        )
        inp = TF.pad(tx, module._reversed_padding_repeated_twice, mode=TORCH_PAD_MODE[padding_mode])
        pad_arg = 0
    elif padding_mode == "zeros" and all(lo == hi for lo, hi in padding):
        inp, pad_arg = tx, [lo for lo, _ in padding]
    else:
        inp, pad_arg = TF.pad(tx, _torch_flat_pad(padding), mode=TORCH_PAD_MODE[padding_mode]), 0
    y = conv(inp, kernel, tb, stride=stride, padding=pad_arg, dilation=dilation, groups=groups)
    return _results(y, dy, tx, tw, tb)


def torch_conv_transpose(
    x, w, b, dy, *, stride, padding, output_padding, dilation, groups, conv_mode="cross_correlation"
):
    """(y, dx, dw, db) from torch autograd; symmetric int padding only."""
    n = w.ndim - 2
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w, requires_grad=True)
    tb = None if b is None else torch.tensor(b, requires_grad=True)
    kernel = tw.flip(list(range(2, 2 + n))) if conv_mode == "convolution" else tw
    y = getattr(TF, f"conv_transpose{n}d")(
        tx,
        kernel,
        tb,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
    return _results(y, dy, tx, tw, tb)


# -- plain loops -----------------------------------------------------------------------------


def _positions(sizes):
    return itertools.product(*(range(s) for s in sizes))


def loop_conv(x, w, b, stride, pairs, dilation, groups):
    """Batched cross-correlation straight from the definition (zero padding)."""
    n = w.ndim - 2
    batch, channels, *size = x.shape
    out_ch, cg, *kernel = w.shape
    og = out_ch // groups
    xp = np.zeros((batch, channels, *(s + lo + hi for s, (lo, hi) in zip(size, pairs))))
    xp[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(size, pairs)))] = x
    out = [
        (s + lo + hi - d * (k - 1) - 1) // st + 1
        for s, (lo, hi), d, k, st in zip(size, pairs, dilation, kernel, stride)
    ]
    y = np.zeros((batch, out_ch, *out))
    for q in _positions(out):
        for k in _positions(kernel):
            src = tuple(qi * st + ki * d for qi, ki, st, d in zip(q, k, stride, dilation))
            for g in range(groups):
                patch = xp[(slice(None), slice(g * cg, (g + 1) * cg), *src)]  # (B, Cg)
                y[(slice(None), slice(g * og, (g + 1) * og), *q)] += (
                    patch @ w[(slice(g * og, (g + 1) * og), slice(None), *k)].T
                )
    if b is not None:
        y += b.reshape(1, -1, *(1,) * n)
    return y


def loop_conv_grads(x, w, dy, stride, pairs, dilation, groups):
    """(dx, dw) of loop_conv from the chain rule, element by element."""
    batch, channels, *size = x.shape
    out_ch, cg, *kernel = w.shape
    og = out_ch // groups
    xp = np.zeros((batch, channels, *(s + lo + hi for s, (lo, hi) in zip(size, pairs))))
    xp[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(size, pairs)))] = x
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for q in _positions(dy.shape[2:]):
        for k in _positions(kernel):
            src = tuple(qi * st + ki * d for qi, ki, st, d in zip(q, k, stride, dilation))
            for g in range(groups):
                cs, os_ = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
                g_out = dy[(slice(None), os_, *q)]  # (B, Og)
                dw[(os_, slice(None), *k)] += g_out.T @ xp[(slice(None), cs, *src)]
                dxp[(slice(None), cs, *src)] += g_out @ w[(os_, slice(None), *k)]
    dx = dxp[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(size, pairs)))]
    return dx, dw


def loop_conv_transpose(x, w, b, stride, pairs, dilation, groups, output_padding):
    """Transposed conv as its own definition: every input element scatters w into the output."""
    n = w.ndim - 2
    batch, in_ch, *size = x.shape
    _, og, *kernel = w.shape
    ig = in_ch // groups
    out = [
        (s - 1) * st - lo - hi + d * (k - 1) + op + 1
        for s, st, (lo, hi), d, k, op in zip(size, stride, pairs, dilation, kernel, output_padding)
    ]
    full = [o + lo + hi for o, (lo, hi) in zip(out, pairs)]
    y = np.zeros((batch, og * groups, *full))
    for i in _positions(size):
        for k in _positions(kernel):
            dst = tuple(ii * st + ki * d for ii, ki, st, d in zip(i, k, stride, dilation))
            for g in range(groups):
                value = x[(slice(None), slice(g * ig, (g + 1) * ig), *i)]  # (B, Ig)
                y[(slice(None), slice(g * og, (g + 1) * og), *dst)] += (
                    value @ w[(slice(g * ig, (g + 1) * ig), slice(None), *k)]
                )
    y = y[(Ellipsis, *(slice(lo, lo + o) for o, (lo, _) in zip(out, pairs)))]
    if b is not None:
        y = y + b.reshape(1, -1, *(1,) * n)
    return y
