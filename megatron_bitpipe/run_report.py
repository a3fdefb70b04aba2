"""The trainer's ``--report FILE.json``: one JSON object that says what a run did, for programs.

``megatron_bitpipe.train --report FILE.json`` writes it from the rank that prints Megatron-LM's
log line (the last global rank, which holds the reduced loss), atomically (a temporary file
renamed over FILE) after every iteration and when each schedule ends, so a run that is killed
leaves the iterations it logged. Readers use ``read`` and the helpers below, never the log text.
Format, version 1 (``//`` comments added here; the file is strict JSON, so a number that is not
finite is written as null)::

    {
      "version": 1,
      "complete": true,               // false until every schedule has finished
      "settings": {                   // the run's, shared by every schedule
        "world_size": 4, "pipeline_model_parallel_size": 4, "tensor_model_parallel_size": 1,
        "data_parallel_size": 1, "virtual_pipeline_model_parallel_size": null,
        "num_microbatches": 8, "micro_batch_size": 2, "global_batch_size": 16,
        "seq_length": 16, "train_iters": 5, "eval_iters": 0, "precision": "fp32",
        "schedules": ["bitpipe", "1f1b"]
      },
      "schedules": [                  // one entry per schedule, in the order they trained
        {
          "schedule": "bitpipe", "options": {}, "complete": true,
          "iterations": [             // one per logged iteration (after --load: from the next)
            {"iteration": 1, "lm_loss": 4.159, "grad_norm": 1.52, "elapsed_ms": 41.7,
             "learning_rate": 0.0001, "loss_scale": 1.0, "skipped": false, "nan": false}
          ],
          "validation_lm_loss": null, // --eval-iters: the mean loss of the forward-only steps
          "peak_memory_bytes": null,  // --measure-memory: per global rank, the last iteration
          "held_send_bytes": null,    // --measure-memory, registry schedules: of which sends
                                      //   not yet known complete, per global rank
          "stashed_activations": null,// registry schedules: {"measured": [...], "simulated":
                                      //   [...]}, the peak per pipeline rank of the last step
          "host_syncs": null,         // --check-host-syncs: 0 (a host sync stops the run)
          "replicas_identical": null, // two pipelines: true (a difference stops the run)
          "trace": null               // --trace (registry schedules): the Chrome trace's path
        }
      ]
    }

``lm_loss`` is null when the loss was not finite (``nan`` is then true); ``grad_norm`` is null
when the update was skipped. Step times are the trainer's own (the log line rounds them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

VERSION = 1
SCHEDULE_FIELDS = (
    "validation_lm_loss",
    "peak_memory_bytes",
    "held_send_bytes",
    "stashed_activations",
    "host_syncs",
    "replicas_identical",
    "trace",
)
"""The fields of a schedule's entry that ``ReportWriter.update`` sets (null until then)."""


class ReportError(ValueError):
    """A report that cannot be read: missing, not JSON, or of another version."""


class ReportWriter:
    """Builds the report of one run and writes it to ``path``; writes nothing when ``path`` is
    None (no ``--report``, or a rank that does not log)."""

    def __init__(self, path: str | None, settings: Mapping[str, Any]) -> None:
        self.path = path
        self.report: dict[str, Any] = {
            "version": VERSION,
            "complete": False,
            "settings": dict(settings),
            "schedules": [],
        }

    def start_schedule(self, schedule: str, options: Mapping[str, Any]) -> None:
        """A new entry, which later calls fill, for the schedule that trains next."""
        entry = {"schedule": schedule, "options": dict(options), "complete": False, "iterations": []}
        self.report["schedules"].append({**entry, **dict.fromkeys(SCHEDULE_FIELDS)})

    def add_iteration(self, record: Mapping[str, Any]) -> None:
        """One logged iteration of the current schedule; the file is rewritten."""
        self._current()["iterations"].append(_finite(dict(record)))
        self.write()

    def update(self, **fields: Any) -> None:
        """Set ``SCHEDULE_FIELDS`` of the current schedule (written with the next write)."""
        unknown = sorted(set(fields) - set(SCHEDULE_FIELDS))
        if unknown:
            raise KeyError(f"not a field of a schedule's report: {', '.join(unknown)}")
        self._current().update(_finite(fields))

    def finish_schedule(self) -> None:
        """The current schedule ended normally; the file is rewritten."""
        self._current()["complete"] = True
        self.write()

    def finish(self) -> None:
        """Every schedule ended normally; the file is rewritten."""
        self.report["complete"] = True
        self.write()

    def write(self) -> None:
        """Replace the file with the report as it stands, atomically."""
        if self.path is None:
            return
        text = json.dumps(self.report, indent=1, allow_nan=False, default=str)
        temporary = f"{self.path}.{os.getpid()}.tmp"  # one writer per path: no clash
        try:
            with open(temporary, "w") as stream:
                stream.write(text + "\n")
            os.replace(temporary, self.path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)

    def _current(self) -> dict[str, Any]:
        if not self.report["schedules"]:
            raise RuntimeError("no schedule started: call start_schedule first")
        return self.report["schedules"][-1]


def _finite(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The report at ``path`` (complete or not); ReportError if there is none of this version."""
    try:
        with open(path) as stream:
            report = json.load(stream)
    except (OSError, ValueError) as error:
        raise ReportError(f"{path}: no readable run report: {error}") from None
    if not isinstance(report, dict) or report.get("version") != VERSION:
        found = report.get("version") if isinstance(report, dict) else None
        raise ReportError(f"{path}: not a run report of version {VERSION} (version {found})")
    return report


def by_schedule(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each schedule's entry by its name, in the order they trained."""
    return {entry["schedule"]: entry for entry in report["schedules"]}


def values(entry: Mapping[str, Any], field: str) -> list[Any]:
    """``field`` of every iteration of ``entry`` where it is not null, in order."""
    return [record[field] for record in entry["iterations"] if record.get(field) is not None]


def by_iteration(entry: Mapping[str, Any], field: str) -> dict[int, Any]:
    """``field`` of every iteration of ``entry`` where it is not null, by iteration number."""
    return {
        record["iteration"]: record[field]
        for record in entry["iterations"]
        if record.get(field) is not None
    }


def losses(entry: Mapping[str, Any]) -> list[float]:
    """The finite lm loss of every iteration, in order (as the log line prints them)."""
    return values(entry, "lm_loss")


def grad_norms(entry: Mapping[str, Any]) -> list[float]:
    """megatron's gradient norm of every iteration that updated."""
    return values(entry, "grad_norm")


def step_ms(entry: Mapping[str, Any]) -> list[float]:
    """The wall time of every iteration, in milliseconds."""
    return values(entry, "elapsed_ms")
