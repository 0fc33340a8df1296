"""Where sweeps run: a local process pool by default, or a dask.distributed cluster.

Every task is a pure function of its arguments (a scenario or a latency configuration and a seed), so
results are identical whatever runs them; callers sort them by their inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager

from cpus import ConfigError

__all__ = ["executor"]


@contextmanager
def executor(jobs: int | None = None, scheduler: str | None = None) -> Iterator[Executor | None]:
    """A concurrent.futures executor: `scheduler` is a dask.distributed scheduler address
    ("tcp://host:8786"); otherwise a process pool of `jobs` workers (default: all cores), or None
    (run in this process) when that is one."""
    if scheduler:
        try:
            from dask.distributed import Client
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError("--scheduler needs dask.distributed: pip install 'textpoke[dask]'") from None
        try:
            client = Client(scheduler, timeout=10)
        except OSError as err:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler}: {err}") from None
        try:
            yield client.get_executor()
        finally:
            client.close()
        return
    n = jobs or os.cpu_count() or 1
    if n <= 1:
        yield None
        return
    with ProcessPoolExecutor(max_workers=n) as pool:
        yield pool
