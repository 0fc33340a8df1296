"""pytest fixtures for your own suites (registered through the `pytest11` entry point).

    def test_my_protocol_is_safe(textpoke_scenario, assert_safe):
        outcome = textpoke_scenario(protocol="bp-batch", nmi="nested-safe", nmi_rate=300, seed=7)
        assert_safe(outcome)

Fixtures
--------
textpoke_kernel     the assembled kernel (session-wide)
textpoke_machine    factory: a booted machine with the safety oracle attached (machine.oracle)
textpoke_patcher    factory: a Patcher for a machine from `textpoke_machine`
textpoke_scenario   runner: keyword arguments of `textpoke.scenario.Scenario` plus `seed` (among them
                    `xmc_rule="linux"|"sdm"` and `nmi_cpus="all"|"workers"`); returns the Outcome
                    (verdict, operation reports)
assert_safe         fails with the verdict, the first violations, the replay command and the annotated
                    trace around the first violation when an outcome has any violation
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from cpus import Machine, MachineConfig

from .image import KernelImage, build_kernel
from .oracle import SafetyOracle
from .patcher import Patcher
from .scenario import Outcome, Scenario, replay_command, run_scenario

__all__ = ["replay_command"]


@pytest.fixture(scope="session")
def textpoke_kernel() -> KernelImage:
    return build_kernel()


@pytest.fixture
def textpoke_machine(textpoke_kernel: KernelImage) -> Callable[..., Machine]:
    def make(bp_mode: str = "emulate", nmi_entry: str = "nested-safe", watch: bool = True, **config: Any) -> Machine:
        cfg = MachineConfig(**config)
        oracle = SafetyOracle(textpoke_kernel, cfg.cpus)
        m = Machine(cfg, textpoke_kernel.boot_image(bp_mode, nmi_entry), [oracle])
        oracle.attach(m)
        if watch:
            m.watch(textpoke_kernel.sites.values())
        m.oracle = oracle  # type: ignore[attr-defined]
        return m

    return make


@pytest.fixture
def textpoke_patcher(textpoke_kernel: KernelImage) -> Callable[[Machine], Patcher]:
    def make(machine: Machine, skip_mode: bool = False) -> Patcher:
        p = Patcher(machine, textpoke_kernel, skip_mode=skip_mode)
        oracle = getattr(machine, "oracle", None)
        if oracle is not None:
            p.listeners.append(oracle)
        return p

    return make


@pytest.fixture
def textpoke_scenario() -> Callable[..., Outcome]:
    def run(seed: int = 0, **kwargs: Any) -> Outcome:
        return run_scenario(Scenario(**kwargs), seed)

    return run


@pytest.fixture
def assert_safe() -> Callable[[Outcome], None]:
    def check(outcome: Outcome, context_lines: int = 25) -> None:
        v = outcome.verdict
        if v.ok:
            return
        from io import StringIO

        from rich.console import Console

        from .replay import replay

        lines = [f"textpoke found violations: {v.summary()}"]
        for viol in v.violations[:8]:
            site = f" site {viol.site:#x}" if viol.site is not None else ""
            lines.append(
                f"  {viol.kind}: cpu{viol.cpu} t={viol.time}{site} {viol.code.hex(' ')} {viol.disassembly} "
                f"-- {viol.detail}"
            )
        cmd = replay_command(outcome.scenario, v.seed)
        lines.append(f"replay: {cmd}")
        buf = StringIO()
        replay(outcome.scenario, v.seed, Console(file=buf, width=160), limit=0)
        listing = buf.getvalue().splitlines()
        hit = next((i for i, line in enumerate(listing) if "!!" in line or "CRASH" in line), len(listing))
        lines.append("trace around the first violation:")
        lines += listing[max(0, hit - context_lines) : hit + 5]
        pytest.fail("\n".join(lines), pytrace=False)

    return check
