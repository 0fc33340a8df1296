"""The structured trace of a run and its stable hash.

Every record is a flat tuple `(time, cpu, kind, *fields)` of ints, strings and bytes. The hash is a
BLAKE2b digest over the `repr` of every record in order (ints, strings, bools and bytes only, whose
reprs are stable across runs and machines), so the same configuration and seed
give the same hash byte for byte, on any machine, whether or not the records are kept in memory.
A bounded per-CPU tail is always kept for crash reports.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterator

__all__ = ["Record", "Trace", "format_record"]

Record = tuple


class Trace:
    def __init__(self, ncpus: int, keep: bool = False, tail: int = 48) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._pending: list[str] = []  # reprs not hashed yet: hashed in batches (same digest)
        self.keep = keep
        self.records: list[Record] = []
        self.tails: list[deque[Record]] = [deque(maxlen=tail) for _ in range(ncpus)]
        self.count = 0

    def add(self, rec: Record) -> None:
        pending = self._pending
        pending.append(repr(rec))
        if len(pending) >= 512:
            self._flush()
        self.count += 1
        if self.keep:
            self.records.append(rec)
        cpu = rec[1]
        if 0 <= cpu < len(self.tails):
            self.tails[cpu].append(rec)

    def _flush(self) -> None:
        self._h.update("".join(self._pending).encode())
        self._pending.clear()

    @property
    def hash(self) -> str:
        self._flush()
        return self._h.hexdigest()

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def of_kind(self, *kinds: str) -> list[Record]:
        return [r for r in self.records if r[2] in kinds]


def format_record(rec: Record) -> str:
    t, cpu, kind, *fields = rec
    shown = []
    for f in fields:
        if isinstance(f, bytes):
            shown.append(f.hex(" "))
        elif isinstance(f, int) and not isinstance(f, bool) and f > 0xFFFF:
            shown.append(hex(f))
        else:
            shown.append(str(f))
    return f"{t:>10} cpu{cpu:<3} {kind:<12} {' '.join(shown)}"
