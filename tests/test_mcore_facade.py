"""``mcore.pipeline``: one call gives megatron-core's own loop a pipeline that trains like one process.

One launch (``facade_check.py``, two processes on CPU/gloo, ~15 s): BitPipe at PP=2 through the
facade against megatron's no-pipelining loop on one process, three Adam steps clipped at 1.
"""

from __future__ import annotations

import json

import pytest
from runs import REPO, run, succeeded

pytest.importorskip("torch")
pytest.importorskip("megatron.core")


def test_one_call_builds_wraps_installs_and_trains_like_one_process():
    log = succeeded(run(2, [str(REPO / "tests" / "facade_check.py")], pythonpath=[str(REPO / "tests")]))
    lines = [line for line in log.splitlines() if line.startswith("facade ")]
    assert len(lines) == 1, log[-3000:]
    found = json.loads(lines[0].removeprefix("facade "))
    assert found["checks"] == {
        "refused before building": True,
        "installed": True,
        "communicators set up": True,
        "four DDP chunks": True,
        "virtual size completed": True,
        "finalize completed": True,
        "replicas identical": True,
    }
    assert found["losses"] == pytest.approx(found["reference_losses"], rel=1e-5)
    assert found["grad_norms"] == pytest.approx(found["reference_grad_norms"], rel=1e-5)
    assert found["reference_losses"][-1] < found["reference_losses"][0]
