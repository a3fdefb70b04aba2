"""Output paths checked before the work starts: nothing fails after a run for want of a folder.

``prepare_output`` creates the missing parent folders of a file (or the folder itself), refuses a
suffix that does not match the option, and proves the place writable; every error names the flag
and the path (``OutputError``, a ValueError).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class OutputError(ValueError):
    """An output that cannot be written; the text names the flag, the path and the reason."""


def prepare_output(
    path: str | Path, flag: str, *, suffixes: Sequence[str] = (), folder: bool = False
) -> Path:
    """Make ``path`` ready to be written (a file, or a folder with ``folder``); return it."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputError(f"{flag} {path}: the name must end in {' or '.join(suffixes)}")
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        probe = target / f".{path.name}.{os.getpid()}.write-test"  # one per process: no races
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise OutputError(f"{flag} {path}: cannot write there: {error.strerror}") from error
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{flag} {path}: cannot write there: the file is read-only")
    return path
