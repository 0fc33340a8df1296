"""Errors of the emulated machine, grouped by who is at fault.

A misbehaving *guest* never raises: its faults become `Crash` records (see `cpus.events`).
These exceptions are for the people and programs driving the simulator.
"""

from __future__ import annotations

__all__ = ["AgentStuck", "AgentTimeout", "ConfigError", "SimulatorBug", "TextpokeError"]


class TextpokeError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(TextpokeError, ValueError):
    """The configuration asks for something the machine cannot be: fix the input and retry."""


class SimulatorBug(TextpokeError, RuntimeError):
    """Should never happen: the model's own invariants broke. All bets about the run are off."""


class AgentTimeout(TextpokeError):
    """An agent (the patcher) did not finish in the cycles it was given: it waits for something
    that never happens, as a kernel would hang. The agent has been abandoned."""

    def __init__(self, cpu: int, start: int, limit: int, waiting_for: str) -> None:
        super().__init__(
            f"the agent on cpu{cpu} did not finish within {limit} cycles of t={start}"
            + (f" (waiting for {waiting_for})" if waiting_for else "")
        )
        self.cpu = cpu
        self.waiting_for = waiting_for


class AgentStuck(TextpokeError):
    """An agent's own CPU can no longer run it: the CPU crashed, or it never came back from an
    interrupt handler to the idle loop the agent runs in. As in a kernel whose patching CPU died
    or hung, the operation is lost; unlike `AgentTimeout`, no amount of cycles would finish it."""

    def __init__(self, cpu: int, why: str) -> None:
        super().__init__(f"the agent's cpu{cpu} {why}")
        self.cpu = cpu
        self.why = why
