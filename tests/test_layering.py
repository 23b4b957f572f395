"""The shape of the tree: calls go downward (mconv <- layouts <- parallel), and the backend
contract is one Protocol both backends implement."""

import ast
import inspect
from pathlib import Path

import pytest

from mconv.backends import base, numpy_backend
from mconv.kernels.ops import KernelBackend

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    "package,forbidden", [("mconv", {"layouts", "parallel"}), ("layouts", {"parallel"})]
)
def test_no_module_imports_a_package_above_it(package, forbidden):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & forbidden)
        for path in (ROOT / package).rglob("*.py")
        if imported_packages(path) & forbidden
    }
    assert not offenders, offenders


PRIMITIVES = ("forward", "backward_data", "backward_filter", "bias_grad", "pad", "pad_backward")


def _parameters(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("name", PRIMITIVES)
def test_both_backends_implement_the_contract(name):
    """The NumPy module and the kernel backend behind CuPy take the Protocol's arguments."""
    assert isinstance(numpy_backend, base.Backend)
    contract = _parameters(getattr(base.Backend, name))
    assert _parameters(getattr(numpy_backend, name)) == contract
    assert _parameters(getattr(KernelBackend, name)) == contract
