"""The one table of what each front end calls a schedule setting.

Generators name settings by option (``pp``, ``microbatches``, ``vp``, ...); a front end renders
them with ``words(front_end)``: the planning CLI's flags, the trainer's or the Megatron-LM
launcher's (both Megatron-LM argument names).
"""

from __future__ import annotations

from typing import Callable

CLI, TRAINER, MEGATRON_LM = "cli", "trainer", "megatron-lm"

FLAGS: dict[str, dict[str, str]] = {
    "schedule": {
        CLI: "--schedule",
        TRAINER: "--pipeline-schedule",
        MEGATRON_LM: "--pipeline-schedule",
    },
    "pp": {
        CLI: "--pp",
        TRAINER: "--pipeline-model-parallel-size",
        MEGATRON_LM: "--pipeline-model-parallel-size",
    },
    "microbatches": {
        CLI: "--microbatches",
        TRAINER: "{value} microbatches per data-parallel rank",
        MEGATRON_LM: "{value} microbatches per data-parallel rank",
    },
    "vp": {
        CLI: "--vp",
        TRAINER: "--virtual-pipeline-model-parallel-size",
        MEGATRON_LM: "--num-virtual-stages-per-pipeline-rank",
    },
    "microbatch_group_size": {
        CLI: "--microbatch-group-size",
        TRAINER: "--microbatch-group-size-per-virtual-pipeline-stage",
        MEGATRON_LM: "--microbatch-group-size-per-virtual-pipeline-stage",
    },
}
"""option -> front end -> flag; a flag with ``{value}`` is a phrase that carries the value.
Options not listed are spelled ``--option-name`` everywhere."""

BARE = object()
"""The value of a setting named without one (``--pp`` in ``2 * --pp - 1``)."""

Words = Callable[[str, object], str]
"""(option, value or BARE) -> how a front end writes that setting."""


def flag(option: str, front_end: str) -> str:
    """``front_end``'s flag for ``option`` (a phrase template where the table gives one)."""
    return FLAGS.get(option, {}).get(front_end, "--" + option.replace("_", "-"))


def words(front_end: str) -> Words:
    """How ``front_end`` writes a setting: ``--pp 3``, ``3 microbatches per ...``,
    ``--schedule 'x'``; a BARE value leaves the value out."""

    def write(option: str, value: object) -> str:
        spelled = flag(option, front_end)
        if value is BARE:
            return spelled.replace("{value} ", "")
        shown = repr(value) if isinstance(value, str) else str(value)
        if "{value}" in spelled:
            return spelled.replace("{value}", shown)
        return f"{spelled} {shown}"

    return write
