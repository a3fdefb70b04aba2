"""The two errors the planning layer raises."""

from __future__ import annotations

from megatron_bitpipe.schedules.flags import BARE, CLI, Words, words


class ScheduleConfigError(ValueError):
    """A setting a schedule cannot take (odd D for BitPipe, N not a multiple, ...).

    Structured as (schedule, option, value, rule): ``option`` at ``value`` breaks ``rule``. The
    rule names other settings as ``{option}``, their values in ``mentions`` (absent: the bare
    flag). ``str()`` is in the planning CLI's flags; ``in_words`` renders another front end's.
    """

    def __init__(
        self,
        schedule: str | None,
        option: str | None,
        value: object,
        rule: str,
        **mentions: object,
    ) -> None:
        self.schedule, self.option, self.value, self.rule = schedule, option, value, rule
        self.mentions = mentions
        super().__init__(self.in_words(words(CLI)))

    def in_words(self, write: Words) -> str:
        """The message with every setting written by ``write`` (``flags.words(front_end)``)."""
        named = _Named(write, self.mentions)
        text = self.rule.format_map(named)
        if self.option is not None:
            text = f"{write(self.option, self.value)} {text}"
        return text if self.schedule is None else f"{self.schedule}: {text}"

    def __reduce__(self) -> tuple:
        return _rebuilt, (self.schedule, self.option, self.value, self.rule, self.mentions)


def _rebuilt(
    schedule: str | None, option: str | None, value: object, rule: str, mentions: dict[str, object]
) -> ScheduleConfigError:
    return ScheduleConfigError(schedule, option, value, rule, **mentions)


class _Named(dict):
    """``{option}`` in a rule: the mentioned setting as the front end writes it."""

    def __init__(self, write: Words, mentions: dict[str, object]) -> None:
        super().__init__()
        self.write, self.values = write, mentions

    def __missing__(self, option: str) -> str:
        return self.write(option, self.values.get(option, BARE))


class ScheduleError(ValueError):
    """A schedule that breaks a rule; the message names the rank, the action and the rule."""
