"""The real-GPU suite (tests/gpu: the parity grid, fp16 accumulation, modules, a second
GPU) run on the strict CuPy stand-in, in a pytest of its own (the stand-in is installed as
``cupy`` at its start). What it cannot show: real CUDA timing, memory and numerics."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_suite_passes_on_the_stand_in():
    env = dict(os.environ, MCONV_TEST_CUPY_STAND_IN="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
         str(ROOT / "tests" / "gpu")],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200,
    )  # fmt: skip
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 1000, summary
    assert "skipped" not in summary and "failed" not in summary, summary
