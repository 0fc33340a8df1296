"""Instruction-fetch coherence: what each CPU has decoded of the patchable text, and how text writes
reach it, byte by byte.

Theory of operation
-------------------
Text memory is one shared buffer, so a *data* read sees a write at once. Instruction fetch is
different: a CPU may keep executing what it decoded before (prefetch queue, decoded-uop cache) until
it serializes, and the architecture promises nothing about how another CPU's stores reach that copy
in the meantime. We model, for every *watched* site (a patchable site around its patching):

* **Decoded copies.** `copies[cpu][site]` is the bytes that CPU executes at the site. Unicorn's
  translated block at the site *is* that copy: the machine translates it from exactly these bytes
  (`install`), so what the CPU runs and what the model says it runs cannot diverge.
* **Watching** starts just before the first write to a site: every CPU is taken to hold a copy of the
  current bytes (the worst case, as if all had just run it).
* **Writes reach copies one at a time.** A write to a site that a CPU holds a copy of becomes one
  pending *snoop* for that CPU, at a delay drawn from the seed. When it arrives, the bytes that write
  touched are refreshed in the copy from current memory; bytes of other writes whose snoops have not
  arrived keep their old values. So a CPU can see a later write before an earlier one (byte-granular
  visibility): exactly the hazard text_poke_bp's syncs exist for.
* **Serializing** (a serializing instruction: `iretq`, `cpuid`) drops every copy that misses a write:
  the next execution decodes current memory. Event delivery is not serializing (the SDM does not list
  it): a handler executes what its CPU had decoded.
* A CPU holding no copy of a site sees memory as it is when it next executes the site -- possibly
  half written, if the writer stores the bytes one at a time.
* The writer itself serializes after its write (text_poke ends with a serializing CR3 write).

A write is therefore visible to another CPU's fetch no later than its next serializing event, and
possibly earlier at a seeded point (DESIGN.md 1.6).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Copy", "FetchCoherence", "SnoopModel"]


@dataclass(frozen=True, slots=True)
class SnoopModel:
    """When a write reaches another CPU's decoded copy without a serializing event: uniformly in
    [min_delay, max_delay] cycles after the write; `None` bounds mean never (serialization only)."""

    min_delay: int | None = 200
    max_delay: int | None = 10_000

    def draw(self, rng) -> int | None:  # rng: random.Random
        if self.min_delay is None or self.max_delay is None:
            return None
        return rng.randint(self.min_delay, self.max_delay)


@dataclass(slots=True)
class Copy:
    code: bytearray
    missing: set[int] = field(default_factory=set)  # ids of writes whose snoop has not arrived


class FetchCoherence:
    def __init__(
        self,
        ncpus: int,
        sites: Iterable[tuple[int, int]],
        read_text: Callable[[int, int], bytes],
        drop: Callable[[int, int, int], None],
        install: Callable[[int, int, bytes], None],
    ) -> None:
        self.sites: dict[int, int] = dict(sorted(sites))
        self._starts = list(self.sites)
        self._read = read_text
        self._drop = drop
        self._install = install
        self.copies: list[dict[int, Copy]] = [{} for _ in range(ncpus)]
        self.stale_sites: list[set[int]] = [set() for _ in range(ncpus)]
        self.watched: set[int] = set()
        self.stale_count: dict[int, int] = {}  # site -> CPUs whose copy misses a write
        self._writes: dict[int, tuple[int, int, int]] = {}  # write id -> (site, lo, hi)
        self._next_write = 0

    # -- sites ------------------------------------------------------------------------------------
    def sites_overlapping(self, lo: int, hi: int) -> list[int]:
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        out = []
        while i < len(self._starts) and self._starts[i] < hi:
            s = self._starts[i]
            if s + self.sites[s] > lo:
                out.append(s)
            i += 1
        return out

    def watch(self, site: int) -> None:
        """Start watching `site`: every CPU now holds a copy of its current bytes (the machine
        installs them)."""
        code = self._read(site, self.sites[site])
        for cpu, copies in enumerate(self.copies):
            copies[site] = Copy(bytearray(code))
            self._install(cpu, site, code)
        self.watched.add(site)
        self.stale_count[site] = 0

    def unwatch(self, site: int) -> None:
        if self.stale_count.get(site):
            raise ValueError(f"site {site:#x} is still stale on some CPU")
        for copies in self.copies:
            copies.pop(site, None)
        self.watched.discard(site)
        self.stale_count.pop(site, None)

    # -- events -----------------------------------------------------------------------------------
    def fetch(self, cpu: int, site: int) -> bytes:
        """The bytes `cpu` executes at `site` now (its copy, made now from memory if it has none)."""
        c = self.copies[cpu].get(site)
        if c is None:
            code = self._read(site, self.sites[site])
            self.copies[cpu][site] = Copy(bytearray(code))
            return code
        return bytes(c.code)

    def written(self, writer: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """Text [lo, hi) changed. Returns (cpu, site, write id) for every copy the write must still
        reach; the caller schedules those snoops. Copies in no one's hands are discarded here."""
        pending: list[tuple[int, int, int]] = []
        hit = self.sites_overlapping(lo, hi)
        if not hit:
            for cpu in range(len(self.copies)):
                self._drop(cpu, lo, hi)
            return pending
        for site in hit:
            wid = self._next_write
            self._next_write += 1
            self._writes[wid] = (site, max(lo, site), min(hi, site + self.sites[site]))
            for cpu, copies in enumerate(self.copies):
                c = copies.get(site)
                if cpu == writer:
                    if c is not None:
                        self._forget(cpu, site)
                    self._drop(cpu, site, site + self.sites[site])
                elif c is None:
                    self._drop(cpu, site, site + self.sites[site])
                else:
                    if not c.missing:
                        self.stale_count[site] += 1
                        self.stale_sites[cpu].add(site)
                    c.missing.add(wid)
                    pending.append((cpu, site, wid))
        return pending

    def snoop(self, cpu: int, site: int, wid: int) -> bytes | None:
        """Write `wid` reaches `cpu`'s copy of `site`: refresh the bytes it touched from memory.
        Returns the copy's new bytes when it changed, else None."""
        c = self.copies[cpu].get(site)
        if c is None or wid not in c.missing:
            return None  # the copy was dropped (serialized) since: nothing to do
        _, lo, hi = self._writes[wid]
        before = bytes(c.code)
        c.code[lo - site : hi - site] = self._read(lo, hi - lo)
        c.missing.discard(wid)
        if not c.missing:
            self.stale_count[site] -= 1
            self.stale_sites[cpu].discard(site)
        code = bytes(c.code)
        if code != before:
            self._install(cpu, site, code)
            return code
        return None

    def serialize(self, cpu: int) -> int:
        """`cpu` serializes: every copy that misses a write goes. Returns how many."""
        stale = sorted(self.stale_sites[cpu])
        for s in stale:
            self._forget(cpu, s)
            self._drop(cpu, s, s + self.sites[s])
        return len(stale)

    def _forget(self, cpu: int, site: int) -> None:
        c = self.copies[cpu].pop(site)
        if c.missing:
            self.stale_count[site] -= 1
            self.stale_sites[cpu].discard(site)
