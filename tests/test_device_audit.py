"""Audit: device code calls NumPy only where NumPy is meant.

Every ``np.<function>(...)`` call in the modules a layer's forward/backward can reach on a
GPU (layers, functional ops, losses, optimizers, the CuPy backend, ``parallel``) must be
a dtype query or carry a ``# host:`` comment (on its lines or the line above) saying why
it runs on the host. Everything else takes the input's array module (``xp = array_module(x)``
or an array's own methods), so a CuPy array never meets a NumPy one. The strict CuPy
stand-in (tests/cupy_stand_in) checks the same at run time over the whole device surface.
The NumPy backend is left out: it only ever receives NumPy arrays.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_CODE = sorted(
    [*(ROOT / "mconv" / "nn").glob("*.py"), *(ROOT / "parallel").glob("*.py")]
    + [ROOT / "mconv" / name for name in ("functional.py", "conv_ops.py", "padding.py",
                                          "losses.py", "optim.py", "geometry.py", "_args.py")]
    + [ROOT / "mconv" / "kernels" / name for name in ("ops.py", "plan.py")]
    + [ROOT / "mconv" / "backends" / name for name in ("__init__.py", "cupy_backend.py")]
)  # fmt: skip
#: NumPy functions that only describe dtypes: no array data is touched.
DTYPE_QUERIES = {"dtype", "issubdtype", "result_type", "promote_types", "finfo", "iinfo",
                 "can_cast"}  # fmt: skip


def numpy_calls(path: Path):
    """(line, function, source lines with the line above) of every ``np.f(...)`` call."""
    text = path.read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        func = getattr(node, "func", None)
        if (
            isinstance(node, ast.Call)
            and isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == "np"
        ):
            context = lines[max(node.lineno - 2, 0) : node.end_lineno]
            yield node.lineno, func.attr, context


def test_the_audited_files_exist():
    assert all(path.is_file() for path in DEVICE_CODE), DEVICE_CODE


@pytest.mark.parametrize("path", DEVICE_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_numpy_calls_in_device_code_are_dtype_queries_or_marked_host(path):
    unmarked = [
        f"{path.relative_to(ROOT)}:{line}: np.{name}"
        for line, name, context in numpy_calls(path)
        if name not in DTYPE_QUERIES and not any("# host" in text for text in context)
    ]
    assert not unmarked, "NumPy calls in device code, neither xp nor '# host:':\n" + "\n".join(
        unmarked
    )


def test_the_audit_finds_an_unmarked_call(tmp_path):
    bad = tmp_path / "layer.py"
    bad.write_text(
        "import numpy as np\n"
        "def forward(x):\n"
        "    return np.where(x > 0, x, np.zeros((), x.dtype))\n"
        "def ok(x):\n"
        "    # host: a host index\n"
        "    return np.arange(3), np.dtype(x.dtype)\n"
    )
    found = [(line, name) for line, name, context in numpy_calls(bad)
             if name not in DTYPE_QUERIES and not any("# host" in t for t in context)]  # fmt: skip
    assert sorted(found) == [(3, "where"), (3, "zeros")]
