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
from collections.abc import Callable, Iterator

__all__ = ["Record", "Trace", "format_record"]

Record = tuple


class Trace:
    """Records are appended as they come and handled in batches (hashed, kept, put in the tails):
    `add` is on the machine's hottest path, and the digest is the same whatever the batch size.

    `add` is the pending list's own `append`; whoever adds records in a loop calls `settle` now and
    then (the schedulers: once a quantum), which handles a full batch."""

    _BATCH = 512
    add: Callable[[Record], None]

    def __init__(self, ncpus: int, keep: bool = False, tail: int = 48) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._pending: list[Record] = []  # records not handled yet
        self.keep = keep
        self._records: list[Record] = []
        self._tails: list[deque[Record]] = [deque(maxlen=tail) for _ in range(ncpus)]
        self._done = 0  # records handled
        self.add = self._pending.append

    def settle(self) -> None:
        """Handle the pending records if they fill a batch (keeps memory bounded in a long run)."""
        if len(self._pending) >= self._BATCH:
            self._flush()

    def _flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._h.update("".join(map(repr, pending)).encode())
        if self.keep:
            self._records.extend(pending)
        tails = self._tails
        n = len(tails)
        for rec in pending:
            cpu = rec[1]
            if 0 <= cpu < n:
                tails[cpu].append(rec)
        self._done += len(pending)
        pending.clear()

    @property
    def hash(self) -> str:
        self._flush()
        return self._h.hexdigest()

    @property
    def count(self) -> int:
        return self._done + len(self._pending)

    @property
    def records(self) -> list[Record]:
        """Every record (with `keep`; empty otherwise)."""
        self._flush()
        return self._records

    @property
    def tails(self) -> list[deque[Record]]:
        """The last records of each CPU (for crash reports)."""
        self._flush()
        return self._tails

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
