"""What an engine process really uses: resident memory of its process tree, and GPU memory where nvidia-smi says.

The pool replaces a model's estimated footprint with this once its engine has loaded (unless the models file
declares one). Resident memory counts the weights the engine has read in; GPU memory is added for the process's
own pids as ``nvidia-smi --query-compute-apps`` reports them (absent on machines without an NVIDIA GPU: 0).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

GPU_CACHE_SECONDS = 5.0  # nvidia-smi takes tens of milliseconds: its answer is reused this long


class Meter(Protocol):
    def measure_mb(self, pid: int) -> float | None: ...


def tree(pid: int) -> list[int]:
    """The process and all its descendants (through /proc/<pid>/task/*/children)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError, ValueError):
                    todo.extend(int(p) for p in Path(f"/proc/{current}/task/{task}/children").read_text().split())
    return pids


def rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def parse_compute_apps(text: str) -> dict[int, float]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits``: MiB used per pid."""
    used: dict[int, float] = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            with contextlib.suppress(ValueError):
                used[int(parts[0])] = used.get(int(parts[0]), 0.0) + float(parts[1])
    return used


class ProcessMeter:
    """Resident memory of a process tree from /proc, plus its GPU memory from nvidia-smi when there is one."""

    def __init__(self, *, nvidia_smi: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._nvidia_smi = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
        self._clock = clock
        self._gpu: dict[int, float] = {}
        self._gpu_at = float("-inf")

    def measure_mb(self, pid: int) -> float | None:
        pids = tree(pid)
        rss = sum(rss_kib(p) for p in pids)
        if rss == 0:
            return None  # gone, or not ours to read
        gpu = self._gpu_use()
        return round(rss / 1024 + sum(gpu.get(p, 0.0) for p in pids), 1)

    def _gpu_use(self) -> dict[int, float]:
        if not self._nvidia_smi:
            return {}
        if self._clock() - self._gpu_at < GPU_CACHE_SECONDS:
            return self._gpu
        command = [self._nvidia_smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        self._gpu = parse_compute_apps(done.stdout) if done is not None and done.returncode == 0 else {}
        self._gpu_at = self._clock()
        return self._gpu
