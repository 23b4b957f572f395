"""How an axis is split across the ranks of a communicator.

Blocks are contiguous and in rank order; ``shard_sizes`` gives the larger
blocks to the lower ranks (as ``numpy.array_split``). The parallel layers
only ever split evenly, so their shards are ``shard_range(n, comm)``.

>>> shard_sizes(7, 3)
[3, 2, 2]
>>> shard_range(8, rank=1, size=4)
range(2, 4)
"""

from __future__ import annotations

from typing import Any

from mconv import _args


def shard_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous blocks of ``n`` items, as equal as possible."""
    n = _args.check_int(n, "n", minimum=0)
    parts = _args.check_int(parts, "parts", minimum=1)
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def shard_range(n: int, comm: Any = None, *, rank: int | None = None, size: int | None = None):
    """The items of block ``rank`` of ``n`` (``comm``'s rank and size unless given)."""
    if (size is None or rank is None) and not (hasattr(comm, "rank") and hasattr(comm, "size")):
        raise TypeError("shard_range: comm must be a communicator (with .rank and .size) unless "
                        f"rank= and size= are both given, but got comm={comm!r}")  # fmt: skip
    size = _args.check_int(comm.size if size is None else size, "size", minimum=1)
    rank = _args.check_int(comm.rank if rank is None else rank, "rank", minimum=0)
    if rank >= size:
        raise ValueError(f"shard_range: rank must lie in [0, {size}), but got rank={rank}")
    sizes = shard_sizes(n, size)
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def shard(x: Any, comm: Any, axis: int = 1):
    """This rank's block of ``x`` along ``axis`` (a view): the channel shard by default.

    Use it to feed a layer built with ``input_is_sharded=True``; for
    unbatched ``(C, *S)`` input pass ``axis=0``.
    """
    if not _args.is_ndarray(x):
        raise TypeError(f"shard: x must be a numpy or cupy array, but got {type(x).__name__}")
    axis = _args.check_int(axis, "axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(
            f"shard: axis must lie in [-{x.ndim}, {x.ndim}) for a {x.ndim}-D array, but got "
            f"axis={axis}"
        )
    block = shard_range(x.shape[axis], comm)
    index = [slice(None)] * x.ndim
    index[axis] = slice(block.start, block.stop)
    return x[tuple(index)]
