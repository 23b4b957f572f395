"""Atomic writes against real signals: a writer killed mid-write leaves the old file, and
no temporary file once the signal is handled (SIGTERM, SIGINT) or once the next write to
the folder runs (SIGKILL). The target keeps its mode; a new file follows the umask."""

import os
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from layouts.atomic import atomic_write, clean_stale

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WRITER = textwrap.dedent("""
    import sys, time
    from layouts.atomic import atomic_write
    with atomic_write(sys.argv[1]) as f:
        f.write(b"x" * (1 << 20))
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
        f.write(b"never")
""")


def _temps(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith(".mconv-"))


def _kill_mid_write(tmp_path, signum):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env)  # fmt: skip
    assert child.stdout.readline() == b"writing\n", child.stderr.read()
    assert len(_temps(tmp_path)) == 1  # the write is in progress
    child.send_signal(signum)
    child.wait(timeout=30)
    assert target.read_bytes() == b"old"
    return child


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_writer_removes_its_temporary_file(tmp_path, signum):
    child = _kill_mid_write(tmp_path, signum)
    assert child.returncode == -signum  # it still dies of the signal
    assert _temps(tmp_path) == []


def test_an_interrupted_writer_removes_its_temporary_file(tmp_path):
    child = _kill_mid_write(tmp_path, signal.SIGINT)  # KeyboardInterrupt unwinds the write
    assert child.returncode != 0 and b"KeyboardInterrupt" in child.stderr.read()
    assert _temps(tmp_path) == []


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    _kill_mid_write(tmp_path, signal.SIGKILL)
    assert len(_temps(tmp_path)) == 1  # SIGKILL cannot be handled
    with atomic_write(tmp_path / "other.bin") as f:
        f.write(b"new")
    assert _temps(tmp_path) == [] and (tmp_path / "other.bin").read_bytes() == b"new"


def test_temporary_files_of_unknown_writers_are_reported_not_removed(tmp_path):
    old_style = tmp_path / ".mconv-k2j4h5g6.tmp"  # a name from before pids were recorded
    old_style.write_bytes(b"")
    with pytest.warns(UserWarning, match=r"temporary files of other or older mconv writers: "
                                         r"\.mconv-k2j4h5g6\.tmp"):  # fmt: skip
        assert clean_stale(str(tmp_path)) == []
    assert old_style.exists()


def test_live_writers_files_are_kept(tmp_path):
    with atomic_write(tmp_path / "a.bin") as f:
        f.write(b"a")
        assert clean_stale(str(tmp_path)) == [] and len(_temps(tmp_path)) == 1
    assert _temps(tmp_path) == []


def test_the_target_keeps_its_mode_and_a_new_file_follows_the_umask(tmp_path):
    target = tmp_path / "w.pkl"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    with atomic_write(target) as f:
        f.write(b"new")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640 and target.read_bytes() == b"new"
    previous = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "fresh.pkl") as f:
            f.write(b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.pkl").st_mode) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "w.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write(np.zeros(10).tobytes())
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again
