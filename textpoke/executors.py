"""Where sweeps run: a local process pool by default, or a dask.distributed cluster.

Every task is a pure function of its arguments (a scenario or a latency configuration and a seed), so
results are identical whatever runs them; callers sort them by their inputs.

Tasks are streamed (`stream`): only a bounded number are in flight at once, so a sweep of a billion
seeds needs no more memory than one of a hundred. Ctrl-C stops a sweep at once: worker processes
ignore SIGINT (the terminal sends it to the whole process group), and the parent, on
KeyboardInterrupt, cancels what is queued and terminates the workers instead of waiting for them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cpus import ConfigError

__all__ = ["MAX_JOBS", "check_scheduler", "executor", "stream"]

#: the most worker processes a local pool may have
MAX_JOBS = 512
#: tasks in flight per worker: enough to keep every worker busy while results are collected
_IN_FLIGHT_PER_WORKER = 4
#: tasks in flight on a dask cluster, whose size the client does not know up front
_IN_FLIGHT_DASK = 256

T = TypeVar("T")
R = TypeVar("R")


def check_scheduler(address: str) -> str:
    """A dask scheduler address ("tcp://host:8786", or "host:8786"), or ConfigError saying what is
    wrong with it; checked before any connection is tried."""
    text = address.strip()
    parts = urlsplit(text if "://" in text else f"tcp://{text}")
    if parts.scheme not in ("tcp", "tls", "ws", "wss", "ucx", "inproc") or not parts.hostname:
        raise ConfigError(f"--scheduler {address!r} is not a scheduler address (write tcp://HOST:PORT)")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--scheduler {address!r}: invalid port (1 to 65535)") from None
    if parts.scheme != "inproc" and port is None:
        raise ConfigError(f"--scheduler {address!r} is not a scheduler address: no port (write tcp://HOST:PORT)")
    if port == 0:
        raise ConfigError(f"--scheduler {address!r}: invalid port (1 to 65535)")
    return text


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's business (it terminates the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def executor(jobs: int | None = None, scheduler: str | None = None) -> Iterator[Executor | None]:
    """A concurrent.futures executor: `scheduler` is a dask.distributed scheduler address
    ("tcp://host:8786"); otherwise a process pool of `jobs` workers (default: all cores), or None
    (run in this process) when that is one."""
    if scheduler:
        check_scheduler(scheduler)
        try:
            from dask.distributed import Client
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("--scheduler needs dask.distributed: pip install 'textpoke[dask]'") from None
        try:
            client = Client(scheduler, timeout=10)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler}: {err}") from None
        try:
            yield client.get_executor()
        finally:
            client.close()
        return
    n = jobs or os.cpu_count() or 1
    if not 1 <= n <= MAX_JOBS:
        raise ConfigError(f"--jobs must be between 1 and {MAX_JOBS}, got {n}")
    if n <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=n, initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException:
        _stop_now(pool)
        raise
    pool.shutdown(wait=True)


def _stop_now(pool: ProcessPoolExecutor) -> None:
    """Drop the queued tasks and end the workers without waiting for the running ones."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2)


def stream(
    ex: Executor | None,
    fn: Callable[..., R],
    items: Iterable[T],
    args: Callable[[T], tuple[Any, ...]] = lambda x: (x,),
    in_flight: int | None = None,
) -> Iterator[tuple[T, R]]:
    """(item, fn(*args(item))) for every item, in the order they finish, with at most `in_flight`
    tasks submitted at a time (default: a few per worker). Items are read lazily. Without an
    executor, runs each in this process, in order."""
    if ex is None:
        for item in items:
            yield item, fn(*args(item))
        return
    if in_flight is None:
        workers = getattr(ex, "_max_workers", None)
        in_flight = _IN_FLIGHT_PER_WORKER * workers if workers else _IN_FLIGHT_DASK
    pending: dict[Future, T] = {}
    it = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and len(pending) < in_flight:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending[ex.submit(fn, *args(item))] = item
            if not pending:
                return
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                item = pending.pop(f)
                yield item, f.result()
    finally:
        for f in pending:
            f.cancel()
