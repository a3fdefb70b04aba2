"""The suite's tiers (``tiers.py``): which tests start processes or need a Megatron-LM checkout.

The fast lane, ``pytest -m "not multiprocess and not megatron_lm"``, is every other test; the
markers come from reading the tests' code, so a new test is placed without anyone marking it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import tiers
import torch.multiprocessing as mp


def test_both_markers_are_registered(request):
    registered = [line.split(":")[0] for line in request.config.getini("markers")]
    assert "multiprocess" in registered and "megatron_lm" in registered


# The rule reads what a test names, so the tests below look their subjects up by name: naming
# them would put these tests in the tiers they check.


def subject(name: str, module: str | None = None):
    """The function ``name`` of this module, or of the test module ``module``."""
    if module is None:
        return globals()[name]
    pytest.importorskip("megatron.core")  # test_reliability and test_megatron_lm need it
    return getattr(importlib.import_module(module), name)


def runs_a_command():
    subprocess.run(["true"], check=True)


def spawns_ranks():
    mp.start_processes(print, nprocs=2, start_method="spawn")


def trains_through_runs():
    from runs import run

    return run(2, ["-m", "megatron_bitpipe.train"])


def handles_a_timeout(error):
    return isinstance(error, subprocess.TimeoutExpired) and sys.executable


def test_a_test_that_runs_a_command_starts_processes():
    assert tiers.starts_processes(subject("runs_a_command"))


def test_a_test_that_spawns_ranks_with_torch_multiprocessing_starts_processes():
    assert tiers.starts_processes(subject("spawns_ranks"))


def test_a_helper_of_this_folder_is_followed_to_the_process_it_starts():
    assert tiers.starts_processes(subject("trains_through_runs"))


def test_naming_subprocess_without_starting_one_is_not_starting_processes():
    assert not tiers.starts_processes(subject("handles_a_timeout"))


def test_a_known_launching_test_starts_processes_through_its_helpers():
    """test_reliability's ``train`` -> runs.train -> runs.run -> subprocess.run."""
    assert tiers.starts_processes(
        subject("test_exit_on_nan_stops_with_the_iteration_and_the_loss", "test_reliability")
    )


def test_the_bad_settings_table_is_checked_in_process():
    assert not tiers.starts_processes(
        subject("test_every_bad_setting_is_one_line_naming_it_before_any_process_group", "test_reliability")
    )


def test_a_test_reading_the_checkout_through_a_helper_needs_megatron_lm():
    assert tiers.reads_the_checkout(
        subject("test_megatron_lm_has_no_flag_for_variable_sequence_lengths", "test_megatron_lm")
    )


def test_a_test_in_the_first_part_of_test_megatron_lm_needs_no_checkout():
    assert not tiers.reads_the_checkout(
        subject("test_our_options_join_megatron_lms_parser_as_an_extra_args_provider", "test_megatron_lm")
    )


def test_a_pure_test_is_in_neither_tier(request):
    assert request.node.get_closest_marker("multiprocess") is None
    assert request.node.get_closest_marker("megatron_lm") is None


@pytest.fixture
def rank_spawner():
    """Spawns ranks when called (never called here)."""
    return lambda: mp.start_processes(print, nprocs=2, start_method="spawn")


def test_a_test_whose_fixture_spawns_ranks_is_marked_multiprocess(request, rank_spawner):
    assert request.node.get_closest_marker("multiprocess") is not None
    assert request.node.get_closest_marker("megatron_lm") is None


@pytest.mark.skipif(False, reason="MEGATRON_LM_PATH is unset: point it at a Megatron-LM checkout")
def test_a_test_that_skips_without_a_checkout_is_marked_megatron_lm(request):
    assert request.node.get_closest_marker("megatron_lm") is not None
    assert request.node.get_closest_marker("multiprocess") is None


def unmarked(nodeid: str = "tests/test_x.py::test_y") -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, get_closest_marker=lambda name: None)


def test_a_process_the_code_does_not_show_fails_an_unmarked_test():
    """The audit event a process start raises, without starting one."""
    with pytest.raises(pytest.fail.Exception, match="started a process .* not marked multiprocess"):
        with tiers.watching_processes(unmarked()):
            sys.audit("subprocess.Popen", "sbatch", ["sbatch", "job.sbatch"], None, None)


def test_a_marked_test_may_start_processes():
    marked = SimpleNamespace(nodeid="t", get_closest_marker=lambda name: object())
    with tiers.watching_processes(marked):
        sys.audit("subprocess.Popen", "sbatch", ["sbatch", "job.sbatch"], None, None)


def test_a_test_that_starts_no_process_passes_the_watch():
    with tiers.watching_processes(unmarked()):
        sys.audit("open", "file.txt", "r", 0)
