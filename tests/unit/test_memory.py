"""What an engine process really uses (gateway/engine/memory.py): real processes, and an `nvidia-smi` stand-in
script printing what the real one prints on a machine with a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.engine.memory import ProcessMeter, parse_compute_apps, rss_kib, tree
from tests.helpers import wait_for

# A parent that holds 40 MiB and starts a child that holds 30 MiB, then both wait.
PARENT = """
import subprocess, sys, time
held = b"x" * (40 << 20)
child = subprocess.Popen([sys.executable, "-c", "import time; held = b'x' * (30 << 20); time.sleep(60)"])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def family() -> Iterator[tuple[int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    wait_for(lambda: rss_kib(child) > 30 << 10, 30, "the child to hold its memory")
    try:
        yield proc.pid, child
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()


def test_the_tree_and_its_resident_memory(family: tuple[int, int]) -> None:
    parent, child = family
    assert tree(parent) == [parent, child]
    used = ProcessMeter(nvidia_smi="").measure_mb(parent)
    assert used is not None and 70 <= used < 70 + 2 * 64  # both processes' buffers, plus two Python runtimes


def test_gpu_memory_of_the_tree_is_added(family: tuple[int, int], tmp_path: Path) -> None:
    parent, child = family
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{child}, 2048'\necho '999999, 4096'\n")  # another process's memory is not ours
    smi.chmod(0o755)
    cpu_only = ProcessMeter(nvidia_smi="").measure_mb(parent)
    with_gpu = ProcessMeter(nvidia_smi=str(smi)).measure_mb(parent)
    assert cpu_only is not None and with_gpu is not None and 2048 - 16 < with_gpu - cpu_only < 2048 + 16


def test_a_gone_process_measures_nothing_and_a_broken_nvidia_smi_counts_zero(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert ProcessMeter(nvidia_smi="").measure_mb(int(done.stdout)) is None
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    smi.chmod(0o755)
    assert ProcessMeter(nvidia_smi=str(smi)).measure_mb(os.getpid()) is not None  # ours, without a GPU share


def test_parse_compute_apps_sums_per_pid() -> None:
    text = "1234, 2048\n1234, 512\n77, 100\n[Not Supported]\nbad, line\n"
    assert parse_compute_apps(text) == {1234: 2560.0, 77: 100.0}
