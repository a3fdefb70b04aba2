"""Shared pytest set-up: the tests folder is importable for the hand-written fixtures; ``works``
replaces p2p sends and receives by FakeWorks."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import torch.distributed as dist  # noqa: E402

from fake_works import FakeWork  # noqa: E402


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
