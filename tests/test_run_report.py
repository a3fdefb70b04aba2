"""The trainer's ``--report`` (``megatron_bitpipe.run_report``): one strict-JSON object, rewritten
whole after every iteration, read back by schedule; the writer of a rank without a path writes
nothing."""

from __future__ import annotations

import json

import pytest

from megatron_bitpipe import run_report
from megatron_bitpipe.run_report import ReportError, ReportWriter

SETTINGS = {"world_size": 2, "pipeline_model_parallel_size": 2, "schedules": ["bitpipe", "1f1b"]}


def iteration(number: int, loss: float, **changes: object) -> dict[str, object]:
    record = {"iteration": number, "lm_loss": loss, "grad_norm": 1.5, "elapsed_ms": 10.0 + number,
              "learning_rate": 1e-4, "loss_scale": 1.0, "skipped": False, "nan": False}
    return {**record, **changes}


def test_every_iteration_is_on_disk_as_soon_as_it_is_logged(tmp_path):
    path = tmp_path / "report.json"
    writer = ReportWriter(str(path), SETTINGS)
    writer.start_schedule("bitpipe", {})
    writer.add_iteration(iteration(1, 4.2))
    partial = run_report.read(path)
    assert not partial["complete"] and not partial["schedules"][0]["complete"]
    assert run_report.losses(partial["schedules"][0]) == [4.2]
    assert partial["settings"] == SETTINGS
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file is left


def test_a_run_of_two_schedules_holds_one_finished_entry_each(tmp_path):
    path = tmp_path / "report.json"
    writer = ReportWriter(str(path), SETTINGS)
    for schedule, losses in (("bitpipe", [4.2, 4.1]), ("1f1b", [4.2, 4.0])):
        writer.start_schedule(schedule, {"vp": 2} if schedule == "1f1b" else {})
        for number, loss in enumerate(losses, start=1):
            writer.add_iteration(iteration(number, loss))
        writer.update(peak_memory_bytes=[100, None], trace=f"/tmp/{schedule}.json")
        writer.finish_schedule()
    writer.finish()
    report = run_report.read(path)
    entries = run_report.by_schedule(report)
    assert report["complete"] and list(entries) == ["bitpipe", "1f1b"]
    assert entries["1f1b"]["options"] == {"vp": 2} and entries["1f1b"]["complete"]
    assert run_report.losses(entries["1f1b"]) == [4.2, 4.0]
    assert run_report.step_ms(entries["bitpipe"]) == [11.0, 12.0]
    assert run_report.grad_norms(entries["bitpipe"]) == [1.5, 1.5]
    assert entries["bitpipe"]["peak_memory_bytes"] == [100, None]
    assert entries["bitpipe"]["trace"] == "/tmp/bitpipe.json"
    assert entries["bitpipe"]["validation_lm_loss"] is None  # a field not set stays null


def test_a_loss_that_is_not_finite_is_null_and_the_file_stays_strict_json(tmp_path):
    path = tmp_path / "report.json"
    writer = ReportWriter(str(path), SETTINGS)
    writer.start_schedule("bitpipe", {})
    writer.add_iteration(iteration(1, 4.2))
    writer.add_iteration(iteration(2, float("nan"), grad_norm=None, skipped=True, nan=True))
    writer.update(validation_lm_loss=float("inf"))
    writer.finish_schedule()
    json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the file"))
    entry = run_report.read(path)["schedules"][0]
    assert run_report.losses(entry) == [4.2]
    assert run_report.by_iteration(entry, "lm_loss") == {1: 4.2}
    assert run_report.values(entry, "skipped") == [False, True]
    assert entry["validation_lm_loss"] is None


def test_without_a_path_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    writer = ReportWriter(None, SETTINGS)
    writer.start_schedule("bitpipe", {})
    writer.add_iteration(iteration(1, 4.2))
    writer.finish_schedule()
    writer.finish()
    assert list(tmp_path.iterdir()) == []


def test_only_the_documented_fields_can_be_set():
    writer = ReportWriter(None, SETTINGS)
    with pytest.raises(RuntimeError, match="start_schedule"):
        writer.update(trace="t.json")
    writer.start_schedule("bitpipe", {})
    with pytest.raises(KeyError, match="peak_memory"):
        writer.update(peak_memory=[1])


def test_a_missing_or_foreign_file_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="no readable run report"):
        run_report.read(tmp_path / "absent.json")
    (tmp_path / "garbled.json").write_text('{"version": 1, "sched')
    with pytest.raises(ReportError, match="no readable run report"):
        run_report.read(tmp_path / "garbled.json")
    (tmp_path / "costs.json").write_text('{"version": 7}')
    with pytest.raises(ReportError, match="not a run report of version 1"):
        run_report.read(tmp_path / "costs.json")
