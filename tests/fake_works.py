"""A ``dist.Work`` stand-in for P2P and watchdog tests that run no backend."""

from __future__ import annotations

from datetime import timedelta


class FakeWork:
    """Records how it was waited on; completes when told to (``done``)."""

    def __init__(self, done: bool = False) -> None:
        self.done = done
        self.waits: list[object] = []

    def wait(self, timeout: timedelta | None = None) -> bool:
        self.waits.append(timeout)
        return True

    def is_completed(self) -> bool:
        return self.done
