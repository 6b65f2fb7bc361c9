"""Run on the cores other programs leave free (CPU, Linux).

Every matrix product is split over the threads (the integer ones hand out their blocks as threads
come free) and waits for the slowest part. When another program holds a core, the thread that shares
it gets half a core and every product waits for it: on 2 cores with a busy loop pinned to one, int4
decode (8 of ChatGLM3-6B's layers) ran at 0.30× its quiet speed with 2 threads and at 0.72× with 1.
So before a forward pass, at most every `interval` seconds, the governor reads how much CPU time
other processes took since its last look (the busy time of this process's CPUs in /proc/stat, less
this process's own CPU time) and sets PyTorch's thread count, which the C kernels follow too, to the
cores left: at most the count it found (or the count a caller set since), at least one. While a
thread of ours runs on every CPU, a program that wants a whole core only gets a share of one, so
then any share of note gives a core up, and the next look (with a core to spare) sees what the
program really takes. A model whose decode step is compiled (--compile) is left alone: compiled code
is built for one thread count.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch

enabled = os.environ.get("GLMCHAT_FIXED_THREADS", "") in ("", "0")  # 1: keep PyTorch's thread count as it is
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal ("guest" is inside user)
# Others' busy share, in cores, that means they wait for one while we run a thread on every CPU. A
# busy loop pinned to one of 2 cores showed as 0.20-0.35 next to 2 threads of int4/int8 decode (which
# fell to 0.24-0.46x its quiet speed, the governor keeping both threads); quiet, 0.00-0.09.
CONTENDED = 0.15


def cpu_busy_seconds(cpus: set[int], stat: str | None = None) -> float | None:
    """Seconds the given CPUs spent busy since boot (by anyone), from /proc/stat; None where unreadable."""
    try:
        stat = Path("/proc/stat").read_text() if stat is None else stat
    except OSError:
        return None
    ticks = 0
    for line in stat.splitlines():
        name, _, values = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            fields = values.split()
            ticks += sum(int(fields[i]) for i in _BUSY_FIELDS if i < len(fields))
    return ticks / _TICK


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def threads_for(max_threads: int, cpus: int, others: float, running: int | None = None) -> int:
    """Threads to run when other processes kept `others` of our `cpus` CPUs busy while we ran
    `running` threads (None: not known)."""
    if running is not None and running >= cpus and others >= CONTENDED:  # their share, not their want
        return max(1, min(max_threads, running - max(1, round(others))))
    return max(1, min(max_threads, round(cpus - others)))


class ThreadGovernor:
    """Call before each forward pass (it is a forward pre-hook): adjusts torch's thread count."""

    def __init__(self, interval: float = 0.5):
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        self.interval = interval
        self.max_threads: int | None = None  # read in the thread that runs the model (counts are per thread)
        self._set: int | None = None
        self._last: tuple[float, float, float] | None = None
        self.others = 0.0  # cores other processes kept busy over the last interval

    def __call__(self, model=None, *_hook_args) -> None:
        if getattr(model, "decode_is_compiled", False):  # code compiled for one thread count: leave it
            return
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return
        busy = cpu_busy_seconds(self.cpus)
        if busy is None:
            return
        if torch.get_num_threads() != self._set:  # first call, or a caller chose a count: that is the most
            self.max_threads = self._set = torch.get_num_threads()
        sample = (now, busy, own_cpu_seconds())
        if self._last is not None:
            (_, busy0, own0), elapsed = self._last, now - self._last[0]
            self.others = max(0.0, (busy - busy0) - (sample[2] - own0)) / elapsed
            self._set = threads_for(self.max_threads, len(self.cpus), self.others, torch.get_num_threads())
            if self._set != torch.get_num_threads():
                torch.set_num_threads(self._set)
        self._last = sample


def govern(model: torch.nn.Module, wanted: bool = True) -> None:
    """Attach a governor to a CPU model's forward passes (replacing one attached before); none on
    other devices, where /proc/stat is missing, or when switched off."""
    handle = getattr(model, "_thread_governor", None)
    if handle is not None:
        handle.remove()
        model._thread_governor = None
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    on_cpu = tensor is not None and tensor.device.type == "cpu"
    if wanted and enabled and on_cpu and cpu_busy_seconds({0}) is not None:
        model._thread_governor = model.register_forward_pre_hook(ThreadGovernor())
