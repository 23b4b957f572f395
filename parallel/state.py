"""Sharded state: full state dicts from shards and back, and per-rank safetensors files.

A model's ``state_dict()`` holds what this rank owns: for a parallel layer
its shard, for everything else the (replicated) full array. The full state
dict is the serial model's: same names, full shapes.

- ``gather_state_dict(model, comm, root=0)``: the full state dict on
  ``root`` (every rank with ``root=None``; an empty dict elsewhere).
- ``scatter_state_dict(model, full_state_dict, comm, root=0)``: every rank
  loads its shard of ``root``'s full state dict (``root=None``: every rank
  passes the full state dict and nothing is sent).
- ``save_shard(model, prefix, comm)``: each rank writes
  ``{prefix}-rank{r:05d}-of-{P:05d}.safetensors`` with its shard and how
  it was cut; ``load_shard`` reads it back into the same layout;
  ``merge_shards(paths, out)`` joins such files into one full safetensors
  file (written with ``layouts.save_safetensors``).

>>> import numpy as np, mconv, parallel
>>> comm = parallel.init()
>>> mconv.manual_seed(0)
>>> model = mconv.nn.Sequential(parallel.GroupParallelConv1d(12, 12, 3, groups=12, comm=comm))
>>> full = parallel.gather_state_dict(model, comm, root=None)
>>> full["0.weight"].shape, model.state_dict()["0.weight"].shape == (12 // comm.size, 1, 3)
((12, 1, 3), True)
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from layouts import save_safetensors
from layouts.safetensors_format import read_safetensors, write_safetensors
from mconv import _args
from mconv.nn.module import IncompatibleKeys, Module, key_errors, to_device

from . import timeout
from .comm import Communicator
from .sharded import Sharded

SHARD_FORMAT = "mconv.parallel.shard/1"


def _check(model: Any, comm: Any, op: str) -> None:
    if not isinstance(model, Module):
        raise TypeError(f"{op}: model must be an nn.Module, but got {type(model).__name__}")
    if not isinstance(comm, Communicator):
        raise TypeError(
            f"{op}: comm must be a parallel.Communicator, but got {type(comm).__name__}"
        )


def _root(root: Any, comm: Communicator, op: str) -> int | None:
    if root is None:
        return None
    if not _args.is_int(root) or not 0 <= root < comm.size:
        raise ValueError(
            f"{op}: root must be None or a rank in [0, {comm.size}), but got root={root!r}"
        )
    return int(root)


def shard_specs(model: Module) -> dict[str, tuple[Sharded, str, int | None]]:
    """State-dict name -> (parallel layer, its state name, split axis or None)."""
    return {
        name: (owner, key, owner.shard_axes.get(key))
        for name, owner, key, _ in model._state_items()
        if isinstance(owner, Sharded)
    }


def _block(array, layer: Sharded, axis: int | None):
    """This rank's block of a full array (a copy)."""
    return layer._take(array, axis)


def gather_state_dict(model: Module, comm: Communicator, root: int | None = 0) -> OrderedDict:
    """The serial model's state dict (full arrays) on ``root``; collective over ``comm``."""
    _check(model, comm, "gather_state_dict")
    root = _root(root, comm, "gather_state_dict")
    local = model.state_dict()
    comm.check_same(list(local), "gather_state_dict: the model's parameter names")
    specs = shard_specs(model)
    keep = root is None or comm.rank == root
    full = OrderedDict()
    for name, array in local.items():
        layer, _, axis = specs.get(name, (None, None, None))
        if axis is not None and layer.comm.size > 1:
            array = layer.comm.allgather(array, axis=axis, check=False)
        elif keep:
            array = array.copy()
        if keep:
            full[name] = array
    return full


def _full_shapes(model: Module, specs) -> OrderedDict:
    shapes = OrderedDict()
    for name, array in model.state_dict().items():
        layer, pname, _ = specs.get(name, (None, None, None))
        shapes[name] = tuple(layer.full_shapes[pname]) if layer else tuple(array.shape)
    return shapes


def _problems(full_state_dict: Any, shapes: OrderedDict, strict: bool):
    """(exception class name, message) for what is wrong with a full state dict, or None."""
    if not hasattr(full_state_dict, "keys") or not hasattr(full_state_dict, "__getitem__"):
        got = type(full_state_dict).__name__
        return (
            "TypeError",
            f"scatter_state_dict: full_state_dict must be a mapping of names to arrays, but got {got}",
        )
    errors = []
    missing = [k for k in shapes if k not in full_state_dict]
    unexpected = [k for k in full_state_dict.keys() if k not in shapes]
    if strict:
        errors.extend(key_errors(missing, unexpected))
    for name, shape in shapes.items():
        if name not in full_state_dict:
            continue
        value = full_state_dict[name]
        if not _args.is_ndarray(value):
            return (
                "TypeError",
                f"scatter_state_dict: full_state_dict[{name!r}] must be an ndarray, but got {type(value).__name__}",
            )
        if tuple(value.shape) != shape:
            errors.append(
                f"size mismatch for {name}: copying a param with shape "
                f"{_args.shape_str(value.shape)} from checkpoint, the shape in the full model is "
                f"{_args.shape_str(shape)}."
            )
    if errors:
        return "ValueError", "Error(s) in scatter_state_dict:\n\t" + "\n\t".join(errors)
    return None


def scatter_state_dict(
    model: Module,
    full_state_dict: Any,
    comm: Communicator,
    root: int | None = 0,
    strict: bool = True,
):
    """Load this rank's shard of the full (serial) state dict; collective over ``comm``.

    Only ``root`` needs ``full_state_dict`` (others may pass None); errors
    (missing, unexpected keys, wrong shapes) raise on every rank.
    Returns ``model.load_state_dict``'s ``(missing_keys, unexpected_keys)``.
    """
    _check(model, comm, "scatter_state_dict")
    root = _root(root, comm, "scatter_state_dict")
    specs = shard_specs(model)
    shapes = _full_shapes(model, specs)
    problem, present, unexpected = None, None, None
    if root is None or comm.rank == root:
        problem = _problems(full_state_dict, shapes, strict)
        if problem is None:
            present = [name for name in shapes if name in full_state_dict]
            unexpected = [name for name in full_state_dict.keys() if name not in shapes]
    mine = (problem, present, unexpected)
    header = (
        mine if root is None else comm.broadcast_object(mine if comm.rank == root else None, root)
    )
    if header[0] is not None:
        kind, message = header[0]
        raise timeout.reported_error(kind, message)
    local = OrderedDict()
    for name in header[1]:
        if root is None:
            array = full_state_dict[name]
        else:
            array = comm.broadcast(full_state_dict[name] if comm.rank == root else None, root)
        layer, _, axis = specs.get(name, (None, None, None))
        local[name] = _block(array, layer, axis) if layer else array.copy()
    missing, _ = model.load_state_dict(local, strict=strict)
    return IncompatibleKeys(missing, header[2])


# -- per-rank safetensors files -------------------------------------------------------------


def shard_path(prefix: str, comm: Communicator) -> str:
    """``{prefix}-rank{r:05d}-of-{P:05d}.safetensors`` for this rank."""
    return f"{os.fspath(prefix)}-rank{comm.rank:05d}-of-{comm.size:05d}.safetensors"


def save_shard(model: Module, prefix: str, comm: Communicator) -> str:
    """Write this rank's state (its shards and replicated arrays) with how it was cut; the path."""
    _check(model, comm, "save_shard")
    specs = shard_specs(model)
    local = model.state_dict()
    layout = OrderedDict()
    for name, array in local.items():
        layer, pname, axis = specs.get(name, (None, None, None))
        if layer is None or axis is None:
            layout[name] = {"axis": None, "index": 0, "parts": 1, "shape": list(array.shape)}
        else:
            layout[name] = {
                "axis": axis,
                "index": layer.comm.rank,
                "parts": layer.comm.size,
                "shape": list(layer.full_shapes[pname]),
            }
    path = shard_path(prefix, comm)
    host = {name: to_device(array, "cpu") for name, array in local.items()}  # GPU -> host
    write_safetensors(host, path, {"format": SHARD_FORMAT, "layout": json.dumps(layout)})
    return path


def load_shard(model: Module, prefix: str, comm: Communicator):
    """Load the file ``save_shard`` wrote for this rank (same ranks, same layout)."""
    _check(model, comm, "load_shard")
    path = shard_path(prefix, comm)
    return model.load_state_dict(read_safetensors(path, os.path.getsize(path))[0])


def merge_shards(paths: list, out: str | None = None) -> OrderedDict:
    """Join per-rank shard files into the full state dict; write it to ``out`` if given.

    Duplicate shards (data-parallel replicas) are read once; a missing one raises.
    """
    if isinstance(paths, (str, os.PathLike)) or not paths:
        raise TypeError(f"merge_shards: paths must be a non-empty list of files, but got {paths!r}")
    pieces: dict[str, dict[int, np.ndarray]] = OrderedDict()
    layouts: dict[str, dict] = {}
    for path in paths:
        tensors, meta = read_safetensors(os.fspath(path), os.path.getsize(path))
        if meta.get("format") != SHARD_FORMAT:
            raise ValueError(
                f"merge_shards: {path} is not a parallel.save_shard file, but has metadata format={meta.get('format')!r}"
            )
        for name, spec in json.loads(meta["layout"]).items():
            layouts.setdefault(name, spec)
            pieces.setdefault(name, {}).setdefault(spec["index"], tensors[name])
    full = OrderedDict()
    for name, spec in layouts.items():
        found = sorted(pieces[name])
        if found != list(range(spec["parts"])):
            raise ValueError(
                f"merge_shards: {name} needs shards 0..{spec['parts'] - 1}, but got shards {found}"
            )
        blocks = [pieces[name][i] for i in found]
        full[name] = (  # host: shards read from files
            blocks[0] if spec["axis"] is None else np.concatenate(blocks, spec["axis"])
        )
        if list(full[name].shape) != spec["shape"]:
            raise ValueError(
                f"merge_shards: {name} joins to shape {list(full[name].shape)}, but its files say {spec['shape']}"
            )
    if out is not None:
        save_full(full, out)
    return full


def save_full(state_dict: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file of a full state dict (torch layout), via ``layouts.save_safetensors``."""
    save_safetensors(dict(state_dict), path, metadata=metadata)
