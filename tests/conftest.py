"""Shared pytest set-up: the tests folder is importable for the hand-written fixtures; every test
gets its tiers (``tiers.py``: ``multiprocess``, ``megatron_lm``; the fast lane is
``-m "not multiprocess and not megatron_lm"``) and fails if it starts a process unmarked; each
starts with the objects alive before it frozen (garbage collection); ``works`` replaces p2p sends
and receives by FakeWorks."""

import gc
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402

import tiers  # noqa: E402
from fake_works import FakeWork  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    for name, description in tiers.MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    tiers.watch_processes()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in tiers.tiers(item):
            item.add_marker(marker)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> object:
    """Each test starts with what is alive by then (torch, megatron, the collected cases, earlier
    tests' module fixtures) frozen out of the garbage collector's full passes, which would walk it
    again and again while the planning tests allocate (the fast lane spent a fifth of its time
    there; test_scale's recommend tests, two thirds)."""
    gc.collect()
    gc.freeze()
    with tiers.watching_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    with tiers.watching_processes(item):
        return (yield)


@pytest.fixture
def works(monkeypatch: pytest.MonkeyPatch) -> list[FakeWork]:
    """dist.isend / dist.irecv replaced by FakeWork makers; the works made, in order."""
    made: list[FakeWork] = []

    def start(*args: object, **kwargs: object) -> FakeWork:
        made.append(FakeWork())
        return made[-1]

    monkeypatch.setattr(dist, "irecv", start)
    monkeypatch.setattr(dist, "isend", start)
    return made
