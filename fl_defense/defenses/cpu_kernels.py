"""Kernels chosen by what this CPU does: each candidate timed once per process on a small block.

Some CPU kernels are fast on one machine and slow on another. ``torch._int_mm`` runs on oneDNN's
VNNI kernels, several times faster than a float32 product, only where torch finds AVX-512 VNNI
in the hardware (and oneDNN is on); elsewhere it is a plain loop ten times slower than the float32
product (docs/results/aggregation.md, issue 23). The capability torch and numpy report does not
settle it (an AVX-512 CPU without VNNI, oneDNN switched off, a later torch), so the choice is
measured where it is made: the first time a task runs, each of its candidates is timed on a small
block on a worker thread (where the real blocks run: torch on one thread, BLAS held to one; in
that thread's CPU time, so a busy machine does not decide it), and
the plain candidate (the first) is kept unless another takes at most ``MARGIN`` of its time.
The answer is kept for the process. Candidates of a task give identical results (tested), so the
choice changes time, never numbers.

``FL_DEFENSE_KERNELS="task=candidate,..."`` in the environment, or ``forced`` in code, sets a
choice without timing (tests run every branch this way).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from time import thread_time

from .parallel import on_worker

MARGIN = 0.8  # a special kernel is taken only when it needs at most 80% of the plain one's time
ENV = "FL_DEFENSE_KERNELS"


@dataclass(frozen=True)
class Task:
    """Interchangeable kernels for one job: ``candidates`` name -> function, the plain one first;
    ``probe()`` builds the small input (a tuple of arguments) they are timed on."""

    candidates: dict[str, Callable]
    probe: Callable[[], tuple]


_tasks: dict[str, Task] = {}
_chosen: dict[str, str] = {}
_timings: dict[str, dict[str, float]] = {}
_forced: dict[str, str] = {}
_lock = threading.Lock()


def register(name: str, candidates: dict[str, Callable], probe: Callable[[], tuple]) -> None:
    """Declare a task (at import of the module that owns its kernels)."""
    _tasks[name] = Task(dict(candidates), probe)


def kernel(name: str) -> Callable:
    """The function to use for task ``name`` on this CPU (``choice``)."""
    return _tasks[name].candidates[choice(name)]


def choice(name: str) -> str:
    """The candidate chosen for ``name``: forced in code, else set in ``FL_DEFENSE_KERNELS``, else
    measured on the first call and cached for the process."""
    task = _tasks[name]
    if name in _forced:
        return _forced[name]
    env = _from_environment().get(name)
    if env is not None:
        if env not in task.candidates:
            raise ValueError(f"{ENV}: {name} must be one of {sorted(task.candidates)}, got {env!r}")
        return env
    if name not in _chosen:  # measured outside the lock (which a worker might otherwise wait on)
        seconds = on_worker(lambda: _time_candidates(task))
        with _lock:
            if name not in _chosen:  # two first calls at once: the first answer stands
                _timings[name], _chosen[name] = seconds, pick(seconds)
    return _chosen[name]


def pick(seconds: dict[str, float]) -> str:
    """The plain (first) candidate unless another needs at most ``MARGIN`` of its time; then
    the fastest."""
    plain = next(iter(seconds))
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] <= MARGIN * seconds[plain] else plain


@contextmanager
def forced(name: str, candidate: str) -> Iterator[None]:
    """Use ``candidate`` for ``name`` inside the block, whatever was measured."""
    if candidate not in _tasks[name].candidates:
        raise ValueError(f"{name} has no candidate {candidate!r}; it has {sorted(_tasks[name].candidates)}")
    before = _forced.get(name)
    _forced[name] = candidate
    try:
        yield
    finally:
        if before is None:
            del _forced[name]
        else:
            _forced[name] = before


def forget() -> None:
    """Drop the cached choices (the next call of each task measures again)."""
    with _lock:
        _chosen.clear()
        _timings.clear()


def summary() -> dict[str, str]:
    """Each task's choice so far and how it was made, for benchmark tables."""
    out = {}
    for name in _tasks:
        if name in _forced:
            out[name] = f"{_forced[name]} (forced)"
        elif name in _from_environment():
            out[name] = f"{_from_environment()[name]} ({ENV})"
        elif name in _chosen:
            times = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in _timings[name].items())
            out[name] = f"{_chosen[name]} (measured: {times})"
    return out


def _time_candidates(task: Task, repeats: int = 3) -> dict[str, float]:
    """Best of ``repeats`` calls of each candidate on one probe, after a first call each (lazy
    initialisation, code paths warmed), the calls alternating between candidates. Timed in the
    thread's CPU time, not wall time: on a busy machine a call can wait for a core for longer
    than it computes (a wall-clock probe there once kept float32 on a VNNI CPU, int8 measuring
    1.48 ms against its idle 0.2 ms); the kernels run on the timing thread alone (torch and BLAS
    held to one thread on the worker), so its CPU time is their cost."""
    args = task.probe()
    for fn in task.candidates.values():
        fn(*args)
    best = dict.fromkeys(task.candidates, float("inf"))
    for _ in range(repeats):
        for name, fn in task.candidates.items():
            start = thread_time()
            fn(*args)
            best[name] = min(best[name], thread_time() - start)
    return best


def _from_environment() -> dict[str, str]:
    out = {}
    for pair in filter(str.strip, os.environ.get(ENV, "").split(",")):
        task, sep, candidate = pair.partition("=")
        if not sep:
            raise ValueError(f"{ENV} takes task=candidate pairs separated by commas, got {pair!r}")
        out[task.strip()] = candidate.strip()
    return out
