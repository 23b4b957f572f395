"""Atomic writes: a temporary file in the target's directory, then ``os.replace``.
A failure at any point leaves the old file (if any) untouched.

- The temporary file is created with mode 0o666 minus the umask (as ``open`` would) and,
  when the target exists, gets the target's mode before the rename.
- SIGTERM, SIGINT and SIGHUP with their default action (terminate) remove the temporary
  files of live writes first, then terminate the process as the signal would have. A
  Python handler (SIGINT's KeyboardInterrupt, or one of the program's) is left alone: the
  exception it raises removes the file on its way out. Handlers can only be installed by
  the main thread; a write from another thread relies on the next point.
- A SIGKILLed writer cannot clean up: temporary files are named
  ``.mconv-<host>-<pid>-<random>.tmp``, and the next write to the same folder removes those
  of this host whose process is gone, and warns about other ``.mconv-*.tmp`` files.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import stat
import threading
import warnings
from typing import BinaryIO, Iterator

_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                 if hasattr(signal, name))  # fmt: skip
_live: set[str] = set()  # temporary files of writes in progress in this process
_previous: dict[int, object] = {}
_lock = threading.Lock()
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_TEMP = re.compile(r"\.mconv-(?:(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-)?[A-Za-z0-9_]+\.tmp\Z")


def _on_signal(signum: int, frame) -> None:
    """Remove the live temporary files, then die of the signal as the default action does."""
    for tmp in list(_live):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            _previous[signum] = signal.signal(signum, _on_signal)


def _restore() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in list(_previous.items()):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, handler)
        del _previous[signum]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(directory: str) -> list[str]:
    """Remove the temporary files dead writers of this host left in ``directory``; warn
    about others (older names, other hosts). Returns the removed paths."""
    removed, unknown = [], []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        path = os.path.join(directory, name)
        if not match or path in _live:
            continue
        if match["host"] == _HOST and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
        elif match["host"] is None or match["host"] != _HOST:
            unknown.append(name)
    if unknown:
        warnings.warn(f"{directory}: temporary files of other or older mconv writers: "
                      f"{', '.join(sorted(unknown)[:5])}{' ...' if len(unknown) > 5 else ''} "
                      "(remove them if no write is in progress)", stacklevel=3)  # fmt: skip
    return removed


def _create(directory: str) -> tuple[int, str]:
    for _ in range(100):
        tmp = os.path.join(directory, f".mconv-{_HOST}-{os.getpid()}-{secrets.token_hex(6)}.tmp")
        try:  # mode 0o666: the umask applies, as for any new file
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                           0o666), tmp  # fmt: skip
        except FileExistsError:
            continue
    raise FileExistsError(f"{directory}: cannot create a unique temporary file")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_write(p) as f: f.write(...)`` -- ``p`` appears only when the block succeeds."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: no such directory {directory!r}")
    clean_stale(directory)
    with _lock:
        fd, tmp = _create(directory)
        if not _live:
            _install()
        _live.add(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with _lock:
            _live.discard(tmp)
            if not _live:
                _restore()
