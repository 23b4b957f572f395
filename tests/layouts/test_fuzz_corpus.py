"""Replays tests/layouts/corpus (seeds, crafted hostile files, fuzzer finds) through every
reader in a child process, as benchmarks/fuzz_readers.py feeds the fuzzer: each file
loads or gives CheckpointError, within (file size + 64 MiB) of peak RSS. atheris is not
needed; long campaigns: ``python benchmarks/fuzz_readers.py run FORMAT`` (docs/checkpoints.md)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_corpus_replays_cleanly():
    corpus = os.path.join(ROOT, "tests", "layouts", "corpus")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "fuzz_readers.py"),
                           "replay", corpus], capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if r["failed"]]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-3000:])
    count = sum(len(files) for _, _, files in os.walk(corpus))
    assert len(results) == count  # every file replayed, the child did not die midway
    assert {r["format"] for r in results} == set(os.listdir(corpus))
    assert any(r["outcome"] == "ok" for r in results) and any(r["outcome"] == "refused" for r in results)
