"""Engines kept from one machine to the next: a sweep builds thousands of machines of one shape.

A new engine costs its set-up (a code buffer, the memory mappings, the long-mode registers) and,
above all, translating again every block its CPU runs. A machine that ends with `Machine.recycle`
hands its engines and memories here; the next machine of the same shape (CPU count, memory sizes,
text bytes) takes them, clears the memories, and boots as on new ones (`Engine.recycle` says what is
kept: only translated blocks of unchanged bytes). Traces are the same as with new engines
(tests/test_machine.py). One set is kept: a sweep runs one shape after another.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable

from ._unicorn import Engine, HostMemory

__all__ = ["POOL", "EnginePool"]


class EnginePool:
    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._kept: tuple[tuple[HostMemory, ...], list[Engine]] | None = None
        self._lock = threading.Lock()  # machines built on several threads share the pool

    def take(self, key: Hashable) -> tuple[tuple[HostMemory, ...], list[Engine]] | None:
        """The memories and engines kept for `key` (they leave the pool), or None."""
        with self._lock:
            if self._kept is None or self._key != key:
                return None
            kept, self._kept, self._key = self._kept, None, None
            return kept

    def give(self, key: Hashable, memories: tuple[HostMemory, ...], engines: list[Engine]) -> None:
        """Keep these for the next machine of `key`; what was kept before is freed."""
        with self._lock:
            old, self._kept, self._key = self._kept, (memories, engines), key
        _close(old)

    def clear(self) -> None:
        with self._lock:
            old, self._kept, self._key = self._kept, None, None
        _close(old)

    def forget(self) -> None:
        """Drop what is kept without touching it: in a child made by `fork`, the kept memories are
        shared with the parent (anonymous shared mappings), so the child must not reuse them."""
        self._kept = self._key = None
        self._lock = threading.Lock()  # another thread of the parent may have held it


def _close(kept: tuple[tuple[HostMemory, ...], list[Engine]] | None) -> None:
    if kept is not None:
        for eng in kept[1]:
            eng.close()


#: the process's pool (sweep workers are processes: each has its own, a forked one starts empty)
POOL = EnginePool()
os.register_at_fork(after_in_child=POOL.forget)
