"""Independent trainings side by side: a process pool with one torch thread per worker.

On a small CPU machine one SAE step at the book's shapes is fastest on one thread
(the matrices are too small to split well), so a sweep of independent SAEs or
language models keeps every core busy by training several at once, each in its own
process. :func:`map_processes` is the one place that does it, on the standard
library's ``concurrent.futures.ProcessPoolExecutor`` with the ``spawn`` start
method (no fork of a process whose OpenMP / torch threads are running). Callers
(:func:`saelib.sweep.sweep`, :func:`saelib.lm.train_many`) make their work items
write their results into the cache, so a finished item stays cached even when a
later one fails, and then load the results in the parent.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from .utils import progress


def default_workers() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count()``
    where that is missing); 1 on a one-core machine."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                        # not on Linux
        n = os.cpu_count() or 1
    return max(1, n)


def resolve_workers(workers) -> int:
    """``None`` -> :func:`default_workers`; else a positive int (ValueError otherwise)."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None (= the machine's cores), got {workers!r}")
    return workers


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["SAELIB_IN_WORKER"] = "1"


ENV_KEYS = ("SAELIB_CACHE", "SAELIB_QUIET", "CI")   # read at each call: the pool outlives changes to them


def _call(fn, item, env: dict):
    for k in ENV_KEYS:
        if env.get(k) is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = env[k]
    return fn(item)


class WorkerError(RuntimeError):
    """A work item failed in a worker process; the message names the item."""


def map_processes(fn, items: list, *, workers: int | None = None, threads: int = 1, labels=None,
                  desc: str = "train", unit: str = "run") -> list:
    """``[fn(item) for item in items]``, computed in ``workers`` processes with
    ``threads`` torch threads each, results in the order of ``items``.

    ``fn`` must be importable (a module-level function) and ``items`` picklable
    (tensors travel through shared memory). With ``workers == 1`` nothing is spawned:
    ``fn`` runs here, with the torch thread count set to ``threads`` for the call.
    One progress bar, advanced as items finish. When an item raises, the pending
    items are cancelled, the running ones finish, and a :class:`WorkerError` names
    the failed item (``labels[i]`` or its index) and the error.

    Raises ValueError for bad ``workers`` / ``threads`` before anything runs."""
    workers = resolve_workers(workers)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    items = list(items)
    labels = [str(i) for i in range(len(items))] if labels is None else [str(x) for x in labels]
    if len(labels) != len(items):
        raise ValueError(f"labels has {len(labels)} entries for {len(items)} items")
    if not items:
        return []
    bar = progress(total=len(items), desc=desc, unit=unit)
    results = [None] * len(items)
    if workers == 1 or len(items) == 1 and os.environ.get("SAELIB_IN_WORKER"):
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for i, item in enumerate(items):
                try:
                    results[i] = fn(item)
                except Exception as e:
                    raise WorkerError(f"{desc}: item {labels[i]!r} failed: {type(e).__name__}: {e}") from e
                bar.update(1)
        finally:
            torch.set_num_threads(before)
            bar.close()
        return results
    ex = _executor(workers, threads)
    env = {k: os.environ.get(k) for k in ENV_KEYS}
    futures = {ex.submit(_call, fn, item, env): i for i, item in enumerate(items)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                i = futures[f]
                err = f.exception()
                if err is not None:
                    for p in pending:
                        p.cancel()
                    wait(pending)
                    if isinstance(err, BrokenProcessPool):
                        shutdown()
                    raise WorkerError(f"{desc}: item {labels[i]!r} failed: {type(err).__name__}: {err}") from err
                results[i] = f.result()
                bar.update(1)
    finally:
        bar.close()
    return results


_EXECUTORS: dict = {}


def _executor(workers: int, threads: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes with ``threads`` torch threads each, kept
    for the next call (starting a worker imports torch and saelib: seconds, paid once per
    notebook rather than once per sweep); closed at exit or by :func:`shutdown`."""
    key = (workers, threads)
    ex = _EXECUTORS.get(key)
    if ex is None or getattr(ex, "_broken", False) or getattr(ex, "_shutdown_thread", False):
        ex = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,))
        _EXECUTORS[key] = ex
    return ex


def _ready(_):
    import saelib.sweep  # noqa: F401  (what a sweep item imports anyway)
    return os.getpid()


def warm(workers: int | None = None, threads: int = 1) -> float:
    """Start the pool of ``workers`` processes now (each imports torch and saelib) and
    return the seconds it took; later :func:`map_processes` calls with the same
    ``workers``/``threads`` find it running. With one worker nothing starts (0.0)."""
    import time

    workers = resolve_workers(workers)
    if workers == 1:
        return 0.0
    t0 = time.perf_counter()
    ex = _executor(workers, threads)
    list(ex.map(_ready, range(workers)))
    return time.perf_counter() - t0


def shutdown() -> None:
    """Stop every worker pool this process started (they restart on the next call)."""
    while _EXECUTORS:
        _, ex = _EXECUTORS.popitem()
        ex.shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown)
