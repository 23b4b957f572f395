"""TorchScript archives (``torch.jit.save``): the class constants of ``code/``, read as
literals, never run.

``<archive>/code/__torch__/torch/nn/modules/conv.py`` declares each scripted class with its
``Final`` constants, which are not in ``data.pkl``::

    class Conv2d(Module):
      __parameters__ = ["weight", "bias", ]
      groups : Final[int] = 4
      kernel_size : Final[Tuple[int, int]] = (3, 3)

The source is parsed with :func:`ast.parse` (which builds a tree and runs nothing) and each
value with :func:`ast.literal_eval` (literals only); anything else is skipped. The classes
are named as ``data.pkl`` names them: the file's module path, then the class name
(``__torch__.torch.nn.modules.conv.___torch_mangle_3.Conv2d`` for a mangled one).
"""

from __future__ import annotations

import ast
import warnings

import numpy as np

from . import zip_records
from .errors import CheckpointError

MAX_CODE_BYTES = 16 << 20  # per file
MAX_CODE_TOTAL = 256 << 20


def _constants(body: list) -> dict:
    out = {}
    for node in body:
        target, value = None, None
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        if not isinstance(target, ast.Name):
            continue
        try:
            out[target.id] = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue  # not a literal: not a constant we need
    return out


def parse_code(source: str, module: str, where: str) -> dict[str, dict]:
    """qualified class name -> its literal constants, for one code file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings of odd literals
            tree = ast.parse(source, filename=where)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as error:
        raise CheckpointError(f"{where}: TorchScript code that does not parse "
                              f"({type(error).__name__})") from None  # fmt: skip
    classes = {}
    todo = [(node, module) for node in tree.body]
    while todo:
        node, prefix = todo.pop()
        if isinstance(node, ast.ClassDef):
            name = f"{prefix}.{node.name}"
            classes[name] = _constants(node.body)
            todo.extend((child, name) for child in node.body if isinstance(child, ast.ClassDef))
    return classes


def read_code(mm: np.ndarray, infos: dict, prefix: str, source: str) -> dict[str, dict]:
    """Every class constant of the archive's ``code/`` folder (empty when there is none)."""
    classes: dict[str, dict] = {}
    total = 0
    root = f"{prefix}code/"
    for name, info in infos.items():
        if not (name.startswith(root) and name.endswith(".py")):
            continue
        total += info.file_size
        if total > MAX_CODE_TOTAL:
            raise CheckpointError(f"{source}: more than {MAX_CODE_TOTAL} bytes of TorchScript code")
        text = zip_records.read_record(mm, info, source, MAX_CODE_BYTES).decode("utf-8", "replace")
        module = name[len(root) : -len(".py")].replace("/", ".")
        classes.update(parse_code(text, module, f"{source}:{name}"))
    return classes


def is_torchscript(infos: dict, prefix: str) -> bool:
    return f"{prefix}constants.pkl" in infos or any(n.startswith(f"{prefix}code/") for n in infos)


def _same(value, type_tag=None):
    return value


# what data.pkl of a TorchScript archive calls besides torch.save's globals: list builders
# that return their argument, and a type tag that is dropped
TORCHSCRIPT_GLOBALS = {
    ("torch.jit._pickle", name): _same
    for name in ("build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                 "restore_type_tag")  # fmt: skip
}
