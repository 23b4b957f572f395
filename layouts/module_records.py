"""Whole models pickled as objects (``torch.save(model)``, ``megengine.save(module)``,
TorchScript's ``data.pkl``) read as inert data: each class becomes a plain record of the
attributes the pickle gives it, and the module tree yields the state dict and each
tensor's role.

A pickle builds an object by NEWOBJ (``cls.__new__(cls, *args)``) and BUILD (its
``__dict__``). :func:`with_records` extends an allowlist so that any *other* global
resolves to a fresh :class:`Record` class: NEWOBJ makes an empty record, BUILD hands it the
state; nothing of the real class exists or runs. Calling such a class (REDUCE, the way a
pickle calls ``posix.system``) is refused exactly as an unlisted global always was.

Module trees, both conventions:
- torch / OneFlow (``torch.nn.Module``): ``_parameters``, ``_buffers`` (minus
  ``_non_persistent_buffers_set``), then ``_modules``, in their order;
- MegEngine and TorchScript: tensor attributes (lists and dicts expanded as
  ``name.0``), then sub-modules; MegEngine sorts the attribute names, and its
  ``state_dict()`` returns BatchNorm/GroupNorm/LayerNorm/InstanceNorm tensors flattened.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from .errors import UnsafePickleError
from .pickle_scan import MAX_DEPTH
from .roles import BN_ROLES, ParamSpec

MAX_RECORD_CLASSES = 100_000
_FRAMEWORK_MODULES = (b"torch.nn.modules", b"megengine.module", b"oneflow.nn.modules",
                      b"__torch__")  # fmt: skip
_XNORM = ("BatchNorm", "GroupNorm", "LayerNorm", "InstanceNorm")


class _RecordType(type):
    """The class of record classes: NEWOBJ may create instances, a call may not."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(f"refusing to load the global {cls.qualname}: it is not on the "
                                "allowlist (a checkpoint must not run code)")  # fmt: skip


class Record(metaclass=_RecordType):
    """An object of a class this reader does not know: its pickled ``args`` and ``state``."""

    __slots__ = ("args", "state")
    qualname = "?"

    def __new__(cls, *args: Any) -> "Record":
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "state", None)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to set {name} on a record of {type(self).qualname}")

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise UnsafePickleError(f"refusing a second state for a {type(self).qualname}")
        object.__setattr__(self, "state", state)

    def attrs(self) -> dict:
        """The pickled ``__dict__`` (also from a ``(dict, slots)`` pair); {} for anything else."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else {}


class _WithRecords(dict):
    """An allowlist whose missing entries become record classes (made once per name)."""

    def __missing__(self, key: tuple[str, str]) -> type:
        if len(self) >= MAX_RECORD_CLASSES:
            raise UnsafePickleError(f"a pickle naming more than {MAX_RECORD_CLASSES} classes")
        module, name = key
        made = _RecordType(str(name)[:100], (Record,), {"__slots__": (),
                           "qualname": f"{module}.{name}"[:300]})  # fmt: skip
        self[key] = made
        return made


STATE_DICT_HINT = ("; this file saves a whole model, and what it refuses cannot be read as data: "
                   "save the model's state_dict() instead (torch.save(model.state_dict(), path), "
                   "megengine.save(module.state_dict(), path)) and convert that, with --spec "
                   "where a layout needs to know its convs")  # fmt: skip


def load_modules(load, data, allowed: Mapping[tuple[str, str], Any]):
    """``load(allowlist)``, in record mode when ``data`` names framework modules; a refusal
    of such a pickle says how to get a file that can be read."""
    if not holds_modules(data):
        return load(allowed), False
    try:
        return load(with_records(allowed)), True
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{error}{STATE_DICT_HINT}") from None


def with_records(allowed: Mapping[tuple[str, str], Any]) -> dict:
    return _WithRecords(allowed)


def holds_modules(data) -> bool:
    """Whether a pickle names framework module classes (worth reading as records)."""
    return any(data.find(marker) >= 0 for marker in _FRAMEWORK_MODULES)


# -- module trees ---------------------------------------------------------------------------


def _is_module(item: Any) -> bool:
    return isinstance(item, Record) and bool(item.attrs()) and "Storage" not in type(item).qualname


def _int(value: Any) -> int | None:
    return value if type(value) is int and value >= 1 else None


def _rank(attrs: dict, qualname: str) -> int | None:
    kernel = attrs.get("kernel_size")
    if isinstance(kernel, (tuple, list)) and 1 <= len(kernel) <= 3:
        return len(kernel)
    for n in (1, 2, 3):
        if f"{n}d" in qualname.rpartition(".")[2]:
            return n
    return None


def module_roles(qualname: str, attrs: Mapping[str, Any]) -> dict[str, ParamSpec] | None:
    """Role of each tensor attribute name of one module (by its class and attributes);
    None for a module that is not a conv, BatchNorm or Linear (a class read as a record is
    never trusted to be "other": its tensors' roles then come from the shape facts)."""
    short = qualname.rpartition(".")[2]
    evidence = f"pickled {short} module"
    if "BatchNorm" in short:
        return {k: ParamSpec(v, evidence=evidence) for k, v in BN_ROLES.items()}
    if "kernel_size" in attrs and "groups" in attrs:  # OneFlow's ConvTranspose: no in_channels
        groups, in_channels = _int(attrs.get("groups")), _int(attrs.get("in_channels"))
        transposed = attrs.get("transposed")
        if not isinstance(transposed, bool):
            transposed = "Transpose" in short
        if transposed:
            kind = "conv_transpose"
        elif groups is not None and in_channels is not None:
            kind = "depthwise" if 1 < groups == in_channels else "conv"
        else:
            kind = None
        rank = _rank(attrs, qualname)
        return {"weight": ParamSpec("conv_weight", kind, groups, rank, evidence),
                "bias": ParamSpec("conv_bias", ndim=rank, evidence=evidence)}  # fmt: skip
    if "in_features" in attrs and "out_features" in attrs:
        return {"weight": ParamSpec("linear_weight", evidence=evidence),
                "bias": ParamSpec("other", evidence=evidence)}  # fmt: skip
    return None  # no claim: shape facts decide (and refuse where they must)


def _expand(key: str, value: Any, is_tensor: Callable[[Any], bool], depth: int):
    """MegEngine's ``_expand_structure``: (dotted key, tensor or module) leaves."""
    todo, out = [(key, value, depth)], []
    while todo:
        name, item, level = todo.pop()
        if level > MAX_DEPTH:
            raise UnsafePickleError(f"module attributes nested more than {MAX_DEPTH} deep")
        if is_tensor(item) or _is_module(item):
            out.append((name, item))
        elif isinstance(item, dict):
            todo.extend((f"{name}.{k}", item[k], level + 1) for k in reversed(
                sorted((k for k in item if isinstance(k, str)))))  # fmt: skip
        elif isinstance(item, (list, tuple)):
            todo.extend((f"{name}.{i}", v, level + 1) for i, v in reversed(list(enumerate(item))))
    return out


def module_state(root: Record, is_tensor: Callable[[Any], bool],
                 code: Mapping[str, dict] | None = None) -> tuple[dict, dict, set]:  # fmt: skip
    """(name -> raw tensor leaf, name -> ParamSpec, names MegEngine's state_dict() flattens)
    of the module tree under ``root``, in ``state_dict()`` order. ``code`` gives TorchScript
    classes' constants (``groups``, ...) by qualified name."""
    state, specs, flatten = {}, {}, set()
    seen: set[int] = set()
    todo: list[tuple[Record, str, int]] = [(root, "", 0)]
    while todo:
        module, prefix, depth = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if depth > MAX_DEPTH:
            raise UnsafePickleError(f"modules nested more than {MAX_DEPTH} deep")
        attrs = module.attrs()
        qualname = type(module).qualname
        constants = dict(code.get(qualname, {})) if code else {}
        roles = module_roles(qualname, {**constants, **attrs}) if qualname != "?" else None
        own, children = [], []
        if isinstance(attrs.get("_parameters"), dict) and isinstance(attrs.get("_modules"), dict):
            skip = attrs.get("_non_persistent_buffers_set")
            skip = skip if isinstance(skip, (set, frozenset)) else set()
            own = [(k, v) for k, v in attrs["_parameters"].items() if is_tensor(v)]
            buffers = attrs.get("_buffers") if isinstance(attrs.get("_buffers"), dict) else {}
            own += [(k, v) for k, v in buffers.items() if is_tensor(v) and k not in skip]
            children = [(k, v) for k, v in attrs["_modules"].items() if _is_module(v)]
        else:
            keys = [k for k in attrs if isinstance(k, str)]
            if qualname.startswith("megengine."):
                keys.sort()
            for key in keys:
                for name, leaf in _expand(key, attrs[key], is_tensor, depth):
                    (children if _is_module(leaf) else own).append((name, leaf))
        megengine_norm = qualname.startswith("megengine.") and any(x in qualname for x in _XNORM)
        for name, leaf in own:
            if id(leaf) in seen:
                continue
            seen.add(id(leaf))
            full = prefix + name
            state[full] = leaf
            if roles is not None and name in roles:
                specs[full] = roles[name]
            if megengine_norm:
                flatten.add(full)
        todo.extend((child, f"{prefix}{name}.", depth + 1) for name, child in reversed(children))
    return state, specs, flatten


def replace_modules(obj: Any, is_tensor: Callable[[Any], bool],
                    code: Mapping[str, dict] | None = None) -> tuple[Any, dict, set]:  # fmt: skip
    """``obj`` with each outermost module record replaced by its state dict (a plain dict);
    the specs and flattened names are keyed by the dotted path from ``obj``."""
    if _is_module(obj):
        return module_state(obj, is_tensor, code)
    specs, flatten = {}, set()
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if _is_module(value) and isinstance(key, str):
                value, sub, flat = module_state(value, is_tensor, code)
                specs.update({f"{key}.{k}": v for k, v in sub.items()})
                flatten.update(f"{key}.{k}" for k in flat)
            out[key] = value
        return out, specs, flatten
    return obj, specs, flatten
