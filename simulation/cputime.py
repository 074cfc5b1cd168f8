"""CPU time of a process and everything it starts, Ray's workers included.

``getrusage(RUSAGE_CHILDREN)`` counts only descendants that were waited for; Ray's raylet and
workers are not reaped by the process that started the simulation, so a cell's training (done in
Ray's actors) would be missing from it. ``TreeCPU`` instead reads, every ``interval`` seconds,
user + system time of the process and all its descendants from ``/proc`` and keeps each process's
last reading: the total misses at most the last ``interval`` seconds of each process. Where there
is no ``/proc`` it falls back to ``getrusage`` (children waited for only), and says so.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, start time in ticks, user + system seconds) of ``pid``; None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / ticks


def tree_cpu_seconds(root: int) -> dict[tuple[int, int], float]:
    """CPU seconds of ``root`` and its living descendants, keyed by (pid, start time)."""
    stats = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            s = _stat(int(entry.name))
            if s is not None:
                stats[int(entry.name)] = s
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            out[(pid, stats[pid][1])] = stats[pid][2]
            todo += children.get(pid, [])
    return out


class TreeCPU:
    """Samples the CPU time of process ``pid``'s tree in a thread until ``stop()``, which returns
    the total in seconds (module docstring)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.exact = PROC.is_dir()
        self._seen: dict[tuple[int, int], float] = {}
        self._stop = threading.Event()
        self._before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _sample(self) -> None:
        if self.exact:
            self._seen.update(tree_cpu_seconds(self.pid))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> float:
        if not self._stop.is_set():
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        waited = (after.ru_utime - self._before.ru_utime) + (after.ru_stime - self._before.ru_stime)
        if not self.exact:
            return waited
        return sum(self._seen.values())

    @property
    def seconds(self) -> float:
        """The total so far, while the sampling thread runs (it reads a copy: the thread may be
        adding processes)."""
        return sum(self._seen.copy().values())


__all__ = ["TreeCPU", "tree_cpu_seconds"]
