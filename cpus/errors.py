"""Errors of the emulated machine, grouped by who is at fault.

A misbehaving *guest* never raises: its faults become `Crash` records (see `cpus.events`).
These exceptions are for the people and programs driving the simulator.
"""

from __future__ import annotations

__all__ = ["ConfigError", "SimulatorBug", "TextpokeError"]


class TextpokeError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(TextpokeError, ValueError):
    """The configuration asks for something the machine cannot be: fix the input and retry."""


class SimulatorBug(TextpokeError, RuntimeError):
    """Should never happen: the model's own invariants broke. All bets about the run are off."""
