"""Each tensor's role, from the best evidence there is, and what a conversion needs of it.

A :class:`ParamSpec` says what one tensor is. Its ``kind``, ``groups`` and ``ndim`` may be
``None``: unknown. Evidence comes in layers, best first (an mconv model; the structure stored
in the file; a user's ``--spec``; certain shape facts, :func:`shape_facts`), and
:func:`merge` fills each unknown field from the next layer, refusing two layers that
disagree. :func:`needs` then says which facts a conversion from one layout to another
still lacks for a tensor; :func:`refusal` turns those into one error naming every tensor.

| role | what | layouts that differ from PyTorch's |
| --- | --- | --- |
| conv_weight | conv / conv_transpose / depthwise; groups; rank | megengine (groups), tensorflow (kind), jax (kind) |
| conv_bias | the bias of a conv; rank | megengine ``(1, O, 1, ...)`` |
| bn_weight, bn_bias, bn_stat | BatchNorm affine and running mean / var | read from megengine's ``(1, C, 1, 1)`` |
| bn_count | BatchNorm ``num_batches_tracked`` | absent from megengine, tensorflow, jax, onnx |
| linear_weight | ``(out, in)`` | tensorflow, jax ``(in, out)`` |
| matrix | a 2-d weight: Linear or Embedding, unknown | refused where the two differ |
| other | kept as it is in every layout | |
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Mapping

import numpy as np

from .errors import CheckpointError

ROLES = ("conv_weight", "conv_bias", "bn_weight", "bn_bias", "bn_stat", "bn_count",
         "linear_weight", "matrix", "other")  # fmt: skip
BN_ROLES = {"weight": "bn_weight", "bias": "bn_bias", "running_mean": "bn_stat",
            "running_var": "bn_stat", "num_batches_tracked": "bn_count"}  # fmt: skip
TORCH_LIKE = ("torch", "tripy", "onnx", "oneflow")
# layouts whose BatchNorm keeps a num_batches_tracked counter (torch's state_dict keys)
WITH_BN_COUNT = ("torch", "oneflow", "tripy")
_KERNELS = ("weight", "kernel")


@dataclass(frozen=True)
class ParamSpec:
    """How one tensor converts. ``kind``/``groups``/``ndim`` None: unknown. ``evidence``
    names where the facts came from (for messages and ``mconv inspect``)."""

    role: str
    kind: str | None = None
    groups: int | None = None
    ndim: int | None = None
    evidence: str = field(default="", compare=False)

    def facts(self) -> dict:
        """The fields that travel in metadata and spec files (evidence excluded)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "evidence"}


def bn_prefixes(names: Iterable[str]) -> set[str]:
    """Module prefixes ('' or 'layer1.0.bn1.') whose tensors are a BatchNorm's: the
    sibling names ``running_mean`` and ``running_var``, as every BatchNorm saves them."""
    names = set(names)
    return {n[: -len("running_mean")] for n in names if n.rpartition(".")[2] == "running_mean"
            and n[: -len("running_mean")] + "running_var" in names}  # fmt: skip


def _split(name: str) -> tuple[str, str]:
    head, dot, last = name.rpartition(".")
    return head + dot, last


def _megengine_grouped(w: np.ndarray, ndim: int | None) -> tuple[int | None, int | None]:
    """(groups, spatial rank) of a MegEngine conv weight where its shape alone is certain:
    3-d is an ungrouped 1-d conv, 6-d a grouped 3-d conv; 4-d and 5-d need the rank."""
    if ndim is None:
        ndim = {3: 1, 6: 3}.get(w.ndim)
    if ndim is None:
        return None, None
    if w.ndim == ndim + 3:
        return int(w.shape[0]), ndim
    return (1, ndim) if w.ndim == ndim + 2 else (None, None)


def shape_facts(tensors: Mapping[str, np.ndarray], framework: str) -> dict[str, ParamSpec]:
    """What names and shapes alone make certain: BatchNorm by its sibling names; a conv
    weight (>= 3-d ``weight``/``kernel``) with its rank (MegEngine: from the bias rank or
    a 3-d/6-d shape, and then its groups); Keras' ``depthwise_kernel``; a Flax/Keras 2-d
    ``kernel`` is a Dense kernel; a 2-d ``weight`` is Linear or Embedding (unknown)."""
    specs: dict[str, ParamSpec] = {}
    bns = bn_prefixes(tensors)
    for name, w in tensors.items():
        prefix, last = _split(name)
        if prefix in bns and last in BN_ROLES:
            specs[name] = ParamSpec(BN_ROLES[last], evidence="BatchNorm sibling names")
        elif last == "depthwise_kernel" and w.ndim >= 3:  # Keras DepthwiseConv: (*k, C, M)
            specs[name] = ParamSpec("conv_weight", "depthwise", int(w.shape[-2]), w.ndim - 2,
                                    "Keras depthwise_kernel")  # fmt: skip
        elif last in _KERNELS and w.ndim >= 3:
            rank = None if framework == "megengine" else w.ndim - 2
            specs[name] = ParamSpec("conv_weight", ndim=rank, evidence="shape")
        elif last == "kernel" and w.ndim == 2 and framework in ("tensorflow", "jax"):
            specs[name] = ParamSpec("linear_weight", evidence="Dense kernel")
        elif last == "weight" and w.ndim == 2:
            specs[name] = ParamSpec("matrix", evidence="shape")
    for name, b in tensors.items():
        prefix, last = _split(name)
        if last != "bias" or name in specs:
            continue
        weight = next((prefix + k for k in ("weight", "kernel") if prefix + k in specs), None)
        if weight is None or specs[weight].role != "conv_weight":
            specs[name] = ParamSpec("other", evidence="shape")
            continue
        w, spec = tensors[weight], specs[weight]
        if framework == "megengine":
            rank = b.ndim - 2 if b.ndim >= 3 else None  # (1, O, 1, ...): the bias rank
            groups, rank = _megengine_grouped(w, rank)
            if groups is not None:
                specs[weight] = replace(spec, groups=groups, ndim=rank,
                                        evidence="MegEngine weight and bias ranks")  # fmt: skip
            specs[name] = ParamSpec("conv_bias", ndim=rank, evidence="bias rank")
        else:
            specs[name] = ParamSpec("conv_bias", ndim=spec.ndim, evidence="next to a conv weight")
    for name, w in tensors.items():
        spec = specs.get(name)
        if framework == "megengine" and spec and spec.role == "conv_weight" and spec.ndim is None:
            groups, rank = _megengine_grouped(w, None)
            if rank is not None:
                specs[name] = replace(spec, groups=groups, ndim=rank, evidence="MegEngine shape")
        specs.setdefault(name, ParamSpec("other", evidence="shape"))
    return specs


def merge(layers: Iterable[tuple[str, Mapping[str, ParamSpec]]],
          names: Iterable[str]) -> dict[str, ParamSpec]:  # fmt: skip
    """One spec per name from ``(evidence name, specs)`` layers, best first: a later layer
    only fills what the earlier ones left unknown; a known fact contradicted by a later layer
    is a :class:`CheckpointError` naming both."""
    merged: dict[str, ParamSpec] = {}
    conflicts = []
    for source, specs in layers:
        for name, spec in specs.items():
            spec = replace(spec, evidence=spec.evidence or source)
            have = merged.get(name)
            if have is None or have.role == "matrix" and spec.role != "matrix":
                merged[name] = spec  # a 2-d weight's role was the one thing unknown
                continue
            if spec.role != have.role and "other" not in (spec.role, have.role) \
                    and spec.role != "matrix":  # fmt: skip
                conflicts.append(f"{name}: {have.evidence} says {describe(have)}, "
                                 f"{spec.evidence} says {describe(spec)}")  # fmt: skip
                continue
            for key in ("kind", "groups", "ndim"):
                mine, theirs = getattr(have, key), getattr(spec, key)
                if mine is not None and theirs is not None and mine != theirs:
                    conflicts.append(f"{name}: {have.evidence} says {key}={mine}, "
                                     f"{spec.evidence} says {key}={theirs}")  # fmt: skip
            merged[name] = _fill(have, spec)
    if conflicts:
        raise CheckpointError("contradictory facts about tensors (fix the --spec / --groups / "
                              "--kind given):\n  " + "\n  ".join(conflicts))  # fmt: skip
    return {name: merged.get(name, ParamSpec("other", evidence="shape")) for name in names}


def _fill(best: ParamSpec, other: ParamSpec) -> ParamSpec:
    if other.role != best.role:
        return best
    return replace(best, **{k: getattr(other, k) for k in ("kind", "groups", "ndim")
                            if getattr(best, k) is None})  # fmt: skip


def needs(spec: ParamSpec, src: str, dst: str) -> list[str]:
    """The facts still unknown that converting this tensor from ``src``'s layout to
    ``dst``'s depends on (empty: it converts exactly)."""
    missing: list[str] = []
    foreign = {src, dst} - set(TORCH_LIKE)
    if spec.role == "matrix" and foreign & {"tensorflow", "jax"}:
        return ["role (Linear weight, transposed in Keras/Flax, or Embedding, kept)"]
    if spec.role == "conv_bias" and dst == "megengine" and spec.ndim is None:
        return ["spatial rank (MegEngine stores the bias as (1, O, 1, ...))"]
    if spec.role != "conv_weight":
        return missing
    if src == "megengine" and spec.ndim is None and spec.groups is None:
        missing.append("spatial rank or groups (a 4-d or 5-d MegEngine weight is a grouped "
                       "conv of one rank or an ungrouped conv of the next)")  # fmt: skip
    if dst == "megengine" and spec.groups is None:
        missing.append("groups (MegEngine stores (G, O/G, I/G, *k))")
    if foreign & {"tensorflow", "jax"}:
        if spec.kind is None:
            missing.append("kind: conv, conv_transpose or depthwise (Keras/Flax store them "
                           "differently)")  # fmt: skip
        elif spec.kind == "conv_transpose" and spec.groups is None:
            missing.append("groups (Keras/Flax have no grouped transposed conv)")
        elif spec.kind == "depthwise" and dst == "tensorflow" and spec.groups is None:
            missing.append("groups (Keras' depthwise kernel is (*k, C, M) with C = groups)")
    return missing


RESOLVE = ("say what they are with --spec FILE (`mconv inspect SRC --spec-out FILE` writes one "
           "to edit; names may be patterns like 'layer*.conv*.weight'), or --groups NAME=G / "
           "--kind NAME=KIND; or convert a file that carries the structure: a whole model "
           "(torch.save(model), megengine.save(module)), TorchScript or ONNX")  # fmt: skip


def refusal(what: str, problems: Mapping[str, str], limit: int = 200) -> CheckpointError:
    """One error naming every tensor (up to ``limit``) and how to resolve it."""
    lines = [f"{name}: {why}" for name, why in problems.items()]
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return CheckpointError(f"{what}: {len(lines)} tensor(s) cannot be converted exactly:\n  "
                           + "\n  ".join(lines[:limit]) + more + f"\nTo resolve: {RESOLVE}")  # fmt: skip


def describe(spec: ParamSpec | None) -> str:
    """'conv_transpose 2d groups=4', 'conv 2d (kind? groups?)', 'bn stat', 'linear weight'."""
    if spec is None or spec.role == "other":
        return "other"
    if spec.role == "conv_weight":
        rank = "?" if spec.ndim is None else spec.ndim
        text = f"{spec.kind or 'conv'} {rank}d"
        if spec.groups is not None and spec.groups > 1:
            text += f" groups={spec.groups}"
        unknown = [k for k in ("kind", "groups") if getattr(spec, k) is None]
        return text + (f" ({' '.join(k + '?' for k in unknown)})" if unknown else "")
    if spec.role == "matrix":
        return "2-d weight (Linear or Embedding?)"
    return spec.role.replace("_", " ")
