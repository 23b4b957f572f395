"""A dry run of a pickle's opcodes, before anything is unpickled.

CPython's unpickler trusts the stream for three things a hostile file can abuse:
memo indices (``LONG_BINPUT 2**26`` grows the memo table to 1 GiB), the nesting of
what it builds (a tuple nested 10**6 deep used as a dict key overflows the C stack
while hashing) and the number of nodes a hash has to visit (``t = (t, t)`` repeated
through ``DUP`` doubles it at every 3-byte step). :func:`scan` walks the opcodes
without building anything, simulating only the stack, and refuses a pickle that

- declares a record (bytes, string, long) longer than the bytes that follow;
- stores a memo entry at an index larger than the number of opcodes read so far
  (the memo is then bounded by the file size), or fetches one never stored;
- nests objects deeper than :data:`MAX_DEPTH`;
- builds a tuple or frozenset (what gets hashed) of more than ``len(pickle) + 2**20``
  nodes, shared references counted each time;
- modifies an allowlisted global itself (BUILD, APPEND, SETITEM on a class or a
  stand-in: that would change it for every later load), or calls (REDUCE, NEWOBJ,
  OBJ) anything but a global.

The stack itself holds at most one entry per opcode, so it is bounded by the size.
"""

from __future__ import annotations

import pickletools

from .errors import CheckpointError

MAX_DEPTH = 256
_OPS = {
    ord(op.code): (op.name, op.arg.n if op.arg else 0, op.arg.name if op.arg else "")
    for op in pickletools.opcodes
}
_LENGTH_PREFIX = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False),
}  # fmt: skip
_ATOMS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE",
    "NEWTRUE", "NEWFALSE", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "FLOAT",
    "BINFLOAT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT", "EMPTY_SET", "NEXT_BUFFER",
}  # fmt: skip
_IMMUTABLE = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"}
_FIXED_POP = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}

# a stack entry: (depth, weight, is_global); weight counts the nodes a hash visits
_ATOM = (0, 1, False)
_GLOBAL = (0, 1, True)


class _Refused(Exception):
    """A reason to refuse; becomes a CheckpointError naming the file and the offset."""


def scan(data, start: int, source: str) -> int:
    """Check the pickle at ``data[start:]`` (bytes, mmap or uint8 array bytes); returns the
    offset just past its STOP opcode. Raises CheckpointError naming ``source``."""
    try:
        return _scan(data, start)
    except _Refused as error:
        raise CheckpointError(
            f"{source}: corrupted pickle, refused before unpickling (the pickle at byte {start}): "
            f"{error}"
        ) from None
    except (IndexError, ValueError) as error:  # a stack underflow or a malformed number
        raise CheckpointError(
            f"{source}: corrupted pickle at byte {start} ({type(error).__name__}: {error})"
        ) from None


def _line(data, pos: int, end: int) -> int:
    newline = data.find(b"\n", pos, end)
    if newline < 0:
        raise _Refused("a text argument runs past the end of the file")
    return newline + 1


def _scan(data, start: int) -> int:
    end, pos, ops = len(data), start, 0
    weight_limit = end - start + (1 << 20)
    stack: list[tuple[int, int, bool]] = []
    marks: list[int] = []
    memo: dict[int, tuple[int, int, bool]] = {}

    def pop() -> tuple[int, int, bool]:
        if len(stack) <= (marks[-1] if marks else 0):
            raise _Refused("an opcode pops below its MARK or from an empty stack")
        return stack.pop()

    def pop_mark() -> list[tuple[int, int, bool]]:
        if not marks:
            raise _Refused("an opcode needs a MARK that is not there")
        base = marks.pop()
        items = stack[base:]
        del stack[base:]
        return items

    def build(items, immutable: bool, extra: int = 1) -> tuple[int, int, bool]:
        depth = 1 + max((d for d, _, _ in items), default=0)
        weight = extra + sum(w for _, w, _ in items) if immutable else 1
        if depth > MAX_DEPTH:
            raise _Refused(f"objects nested more than {MAX_DEPTH} deep")
        if weight > weight_limit:
            raise _Refused(f"a tuple of more than {weight_limit} nodes (shared references "
                           "counted each time): hashing it would never end")  # fmt: skip
        return depth, weight, False

    def modify(target_index: int, items) -> None:
        depth, weight, is_global = stack[target_index]
        if is_global:
            raise _Refused("it modifies an allowlisted global (BUILD, APPEND or SETITEM on a "
                           "class or stand-in), which would change it for every later load")  # fmt: skip
        new_depth = max([depth] + [1 + d for d, _, _ in items])
        if new_depth > MAX_DEPTH:
            raise _Refused(f"objects nested more than {MAX_DEPTH} deep")
        stack[target_index] = (new_depth, weight, False)

    def call(callable_entry, args) -> tuple[int, int, bool]:
        if not callable_entry[2]:
            raise _Refused("it calls something that is not an allowlisted global")
        return build([callable_entry, *args], immutable=True)

    while True:
        if pos >= end:
            raise _Refused("it ends before its STOP opcode (truncated)")
        code = data[pos]
        if code not in _OPS:
            raise _Refused(f"unknown opcode {bytes([code])!r} at byte {pos}")
        name, n, arg_name = _OPS[code]
        pos += 1
        ops += 1
        value = None
        if n >= 0:
            if pos + n > end:
                raise _Refused(f"{name} at byte {pos - 1} runs past the end of the file")
            if name in ("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"):
                value = int.from_bytes(data[pos : pos + n], "little")
            pos += n
        elif n == pickletools.UP_TO_NEWLINE:
            line_end = _line(data, pos, end)
            if arg_name == "stringnl_noescape_pair":
                line_end = _line(data, line_end, end)
            if name in ("PUT", "GET"):
                text = bytes(data[pos : line_end - 1])
                if len(text) > 20:
                    raise _Refused(f"{name} with a {len(text)}-digit memo index")
                value = int(text)
            pos = line_end
        else:
            width, signed = _LENGTH_PREFIX[n]
            if pos + width > end:
                raise _Refused(f"{name} at byte {pos - 1} runs past the end of the file")
            length = int.from_bytes(data[pos : pos + width], "little", signed=signed)
            pos += width
            if length < 0 or length > end - pos:
                raise _Refused(f"{name} at byte {pos - 1 - width} declares {length} bytes, but "
                               f"{end - pos} remain in the file")  # fmt: skip
            pos += length

        if name in _ATOMS:
            stack.append(_ATOM)
        elif name in ("GLOBAL", "EXT1", "EXT2", "EXT4"):
            stack.append(_GLOBAL)
        elif name == "STACK_GLOBAL":
            pop()
            pop()
            stack.append(_GLOBAL)
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise _Refused("it stops with an unbalanced stack")
            return pos
        elif name in ("PROTO", "FRAME"):
            pass
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            index = len(memo) if name == "MEMOIZE" else value
            if index > ops:
                raise _Refused(f"memo index {index} after only {ops} opcodes (the memo would "
                               "grow far beyond the file)")  # fmt: skip
            memo[index] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            if value not in memo:
                raise _Refused(f"{name} of memo entry {value}, which was never stored")
            stack.append(memo[value])
        elif name == "POP":
            if marks and marks[-1] == len(stack):
                marks.pop()
            else:
                pop()
        elif name == "POP_MARK":
            pop_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        elif name in ("TUPLE", "LIST", "DICT", "FROZENSET"):
            stack.append(build(pop_mark(), name in _IMMUTABLE))
        elif name in _FIXED_POP:
            items = [pop() for _ in range(_FIXED_POP[name])]
            stack.append(build(items, immutable=True))
        elif name in ("APPEND", "BUILD"):
            item = pop()
            modify(-1, [item])
        elif name == "SETITEM":
            key, item = pop(), pop()
            modify(-1, [key, item])
        elif name in ("APPENDS", "SETITEMS", "ADDITEMS"):
            items = pop_mark()
            modify(-1, items)
        elif name in ("BINPERSID", "READONLY_BUFFER"):
            stack.append(build([pop()], immutable=True))
        elif name == "PERSID":
            stack.append(_ATOM)
        elif name == "REDUCE":
            args, func = pop(), pop()
            stack.append(call(func, [args]))
        elif name == "NEWOBJ":
            args, cls = pop(), pop()
            stack.append(call(cls, [args]))
        elif name == "NEWOBJ_EX":
            kwargs, args, cls = pop(), pop(), pop()
            stack.append(call(cls, [args, kwargs]))
        elif name == "OBJ":
            items = pop_mark()
            if not items:
                raise _Refused("OBJ without a class")
            stack.append(call(items[0], items[1:]))
        elif name == "INST":
            stack.append(call(_GLOBAL, pop_mark()))
        else:  # pragma: no cover - every opcode of protocols 0-5 is handled above
            raise _Refused(f"unsupported opcode {name}")
