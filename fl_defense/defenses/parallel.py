"""Column-parallel CPU work: pieces of the round's matrix, taken by column, on every core.

The two costs that bound the distance- and order-based defenses on the CPU do not use a second
core by themselves: OpenBLAS threads the Gram product ``x x^T`` over its n output rows, not its
long inner dimension (at n = 100, d = 1.2M two BLAS threads are no faster than one), and numpy's
row sort is single-threaded. Both release the GIL, so Python threads over column pieces use every
core (docs/results/aggregation.md). ``parallel_map`` runs them on ``torch.get_num_threads()``
threads, with BLAS held to one thread per call meanwhile so the workers do not oversubscribe.

Whatever is summed across pieces is cut by shape alone (``column_chunks``, fixed column blocks)
and combined in column order; pieces are handed to threads in groups by the thread count
(``split_evenly``) only where each piece's result is independent of the grouping. So a result
does not depend on how many threads computed it (tested).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_lock = threading.Lock()  # one parallel section at a time (the BLAS limit is process-wide)
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_controller = None
_controller_modules = 0  # len(sys.modules) when the controller was built
_spawn_lock = threading.Lock()
_spawned = 0  # worker threads initialised so far


def workers() -> int:
    """Threads a parallel section uses: torch's intra-op thread count (``--threads`` in the
    benchmarks, one per core by default)."""
    return max(1, torch.get_num_threads())


def column_chunks(d: int, width: int) -> list[slice]:
    """[0, d) cut into pieces of ``width`` columns (the last one shorter)."""
    return [slice(s, min(d, s + width)) for s in range(0, d, max(1, width))]


def split_evenly(items: list[T], k: int) -> list[list[T]]:
    """``items`` in at most ``k`` contiguous groups of nearly equal length (no empty group)."""
    k = max(1, min(k, len(items)))
    return [items[i * len(items) // k:(i + 1) * len(items) // k] for i in range(k)] if items else []


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, on up to ``workers()`` threads when there is more than one
    item and more than one thread; in order. Serial inside a worker (no nested sections). If
    ``fn`` raises, every item still runs to its end, then the error of the first failed item is
    raised (no work is left running behind the caller)."""
    items = list(items)
    k = workers()
    if k <= 1 or len(items) <= 1 or getattr(_local, "worker", False):
        return [fn(x) for x in items]
    with _lock:
        spawned = _spawned
        pool = _executor(k)
        with _blas_one_thread():
            futures = [pool.submit(fn, x) for x in items]
            wait(futures)
        if _spawned != spawned:  # new workers set the process-wide torch count to 1: restore it
            torch.set_num_threads(k)
        return [f.result() for f in futures]


def on_worker(fn: Callable[[], R]) -> R:
    """``fn()`` on one worker thread, in the conditions ``parallel_map``'s items run in (torch on
    one thread, BLAS held to one); in the caller when it is itself a worker. For timing a kernel
    where it will run (``cpu_kernels``)."""
    if getattr(_local, "worker", False):
        return fn()
    k = workers()
    with _lock:
        spawned = _spawned
        pool = _executor(k)
        with _blas_one_thread():
            result = pool.submit(fn).result()
        if _spawned != spawned:  # as in parallel_map
            torch.set_num_threads(k)
        return result


def map_in_groups(fn: Callable[[T], R], items: Iterable[T], k: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, the items handed to the threads in ``k`` contiguous groups
    (default ``workers()``; 1 runs them in the caller), one task per group rather than per item;
    in order. ``fn(x)`` must not depend on which group ``x`` falls in."""
    groups = split_evenly(list(items), workers() if k is None else k)
    return [r for part in parallel_map(lambda group: [fn(x) for x in group], groups) for r in part]


def _mark_worker() -> None:
    """A worker runs torch ops on one thread (its own OpenMP setting; two workers each starting
    their own OpenMP threads would oversubscribe the cores). ``torch.set_num_threads``
    also stores a process-wide count that threads started later inherit: ``parallel_map`` puts
    the caller's back once its section has started new workers."""
    global _spawned
    _local.worker = True
    torch.get_num_threads()  # torch's lazy per-thread setup first: run later, it would reset the count
    torch.set_num_threads(1)
    with _spawn_lock:
        _spawned += 1


def _executor(k: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != k:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="fl-defense-columns",
                                   initializer=_mark_worker)
        _pool_size = k
    return _pool


def _blas_one_thread():
    """BLAS held to one thread while the section runs (numpy's OpenBLAS would otherwise start
    its own threads inside every worker's call: measured 2x slower). The controller (4 ms to
    build: it scans the loaded libraries) is rebuilt only when modules were imported since, as
    a library loaded later (scipy's own OpenBLAS, with scikit-learn) would escape its limit."""
    global _controller, _controller_modules
    try:
        if _controller is None or _controller_modules != len(sys.modules):
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
            _controller_modules = len(sys.modules)
        return _controller.limit(limits=1, user_api="blas")
    except Exception:  # threadpoolctl missing or unable to inspect the loaded libraries
        return nullcontext()
