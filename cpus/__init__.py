"""The emulated hardware: N x86_64 CPUs (one Unicorn instance each) on one shared kernel text.

Only `cpus._unicorn` imports Unicorn; `cpus` never imports `textpoke`.
"""

from .boot import BootImage
from .coherence import SnoopModel
from .config import MAX_CPUS, CostModel, MachineConfig, NmiSource, TimerSource
from .delivery import Gate, NmiArrival, NmiState, Vector
from .errors import AgentStuck, AgentTimeout, ConfigError, SimulatorBug, TextpokeError
from .machine import Agent, Cpu, Crash, Delay, Fine, Instrument, Machine, SendIpi, Serialize, WaitUntil, WriteText
from .trace import Trace, format_record

__all__ = [
    "MAX_CPUS",
    "Agent",
    "AgentStuck",
    "AgentTimeout",
    "BootImage",
    "ConfigError",
    "CostModel",
    "Cpu",
    "Crash",
    "Delay",
    "Fine",
    "Gate",
    "Instrument",
    "Machine",
    "MachineConfig",
    "NmiArrival",
    "NmiSource",
    "NmiState",
    "SendIpi",
    "Serialize",
    "SimulatorBug",
    "SnoopModel",
    "TextpokeError",
    "TimerSource",
    "Trace",
    "Vector",
    "WaitUntil",
    "WriteText",
    "format_record",
]
