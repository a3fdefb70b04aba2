"""Pure-Python schedule planning: IR, placements, generators, validation, lowering, simulation.

Imports only the standard library, so planning works on a laptop without torch or megatron.
"""

from megatron_bitpipe.schedules.errors import ScheduleConfigError, ScheduleError
from megatron_bitpipe.schedules.ir import Action, Kind, Schedule
from megatron_bitpipe.schedules.lower import lower
from megatron_bitpipe.schedules.placement import Placement
from megatron_bitpipe.schedules.registry import build, get, names
from megatron_bitpipe.schedules.validate import validate

__all__ = [
    "Action",
    "Kind",
    "Placement",
    "Schedule",
    "ScheduleConfigError",
    "ScheduleError",
    "build",
    "get",
    "lower",
    "names",
    "validate",
]
