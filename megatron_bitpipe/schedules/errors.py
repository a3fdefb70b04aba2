"""The two errors the planning layer raises."""

from __future__ import annotations


class ScheduleConfigError(ValueError):
    """A setting a schedule cannot take (odd D for BitPipe, N not a multiple, ...).

    The message names the schedule, the setting and the rule, so a CLI can print it as is.
    """


class ScheduleError(ValueError):
    """A schedule that breaks a rule; the message names the rank, the action and the rule."""
