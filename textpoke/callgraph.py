"""The call graph of the emulated kernel text, from its capstone disassembly.

Nodes are the kernel's functions (assembly units); an edge A -> B means A calls or jumps to B
directly (a `call`, `jmp` or conditional jump with an immediate target), or -- when a site is
enabled in the text given -- that the traced function's ftrace site calls a trampoline ("ftrace"
edges). Indirect calls are not followed: the workloads pick traced functions through a computed
call, which is why only they call most traced functions, while the NMI handler calls its traced
functions directly.

`reachable_sites(graph, root)` answers which traced functions' sites can run from an entry: the
NMI entry and the #BP handler are the ones that matter, because a protocol that is not NMI-safe
must not patch a site an NMI can reach.
"""

from __future__ import annotations

import bisect

import networkx as nx
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from cpus.disasm import DIRECT_BRANCHES
from cpus.layout import TEXT_VA

from .image import BP_ENTRIES, NMI_ENTRIES, KernelImage

__all__ = ["bp_reachable_sites", "build_callgraph", "nmi_reachable_sites", "reachable_sites"]

_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_CS.detail = True


def build_callgraph(kernel: KernelImage, text: bytes | None = None) -> nx.DiGraph:
    """The call graph of `kernel`, with ftrace edges for the sites enabled in `text` (default: the
    image as built, every site a nop)."""
    text = kernel.text if text is None else text
    units = sorted((kernel.symbols[n], n) for n in kernel.sizes)
    starts = [a for a, _ in units]
    site_set = set(kernel.sites.values())

    def owner(addr: int) -> str | None:
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            return None
        start, name = units[i]
        return name if addr < start + kernel.sizes[name] else None

    g = nx.DiGraph()
    for start, name in units:
        size = kernel.sizes[name]
        site = kernel.sites.get(name)
        traced = site is not None and start <= site < start + size
        g.add_node(name, address=site if traced else start, traced=traced)
        code = text[start - TEXT_VA : start - TEXT_VA + size]
        for insn in _CS.disasm(code, start):
            if insn.mnemonic not in DIRECT_BRANCHES or not insn.operands or insn.operands[0].type != 2:
                continue
            target = insn.operands[0].imm & (2**64 - 1)
            callee = owner(target)
            if callee is None or callee == name:
                continue
            if insn.address in site_set and insn.mnemonic == "call":
                kind = "ftrace"  # the site itself, enabled in this text
            else:
                kind = "call" if insn.mnemonic == "call" else "jump"
            g.add_edge(name, callee, kind=kind, at=insn.address)
    return g


def reachable_sites(g: nx.DiGraph, root: str) -> dict[str, int]:
    """Traced functions (name -> site address) whose site can execute from `root`."""
    if root not in g:
        raise KeyError(f"{root!r} is not a function of this kernel")
    names = {root} | nx.descendants(g, root)
    return {n: g.nodes[n]["address"] for n in sorted(names) if g.nodes[n]["traced"]}


_GRAPHS: dict[int, tuple[KernelImage, nx.DiGraph]] = {}


def _graph(kernel: KernelImage) -> nx.DiGraph:
    """The built image's graph, computed once per image."""
    hit = _GRAPHS.get(id(kernel))
    if hit is None or hit[0] is not kernel:
        hit = _GRAPHS[id(kernel)] = (kernel, build_callgraph(kernel))
    return hit[1]


def nmi_reachable_sites(kernel: KernelImage, entry: str = "nested-safe") -> dict[str, int]:
    return reachable_sites(_graph(kernel), NMI_ENTRIES[entry][0])


def bp_reachable_sites(kernel: KernelImage, mode: str = "emulate") -> dict[str, int]:
    return reachable_sites(_graph(kernel), BP_ENTRIES[mode])
