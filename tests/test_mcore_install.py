"""install() swaps megatron-core's get_forward_backward_func; cpu.apply() is idempotent."""

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

import megatron.core.pipeline_parallel as pipeline_parallel  # noqa: E402
from megatron.core.pipeline_parallel import schedules  # noqa: E402

from megatron_bitpipe import mcore  # noqa: E402
from megatron_bitpipe.mcore import compat  # noqa: E402
from megatron_bitpipe.schedules import ScheduleConfigError  # noqa: E402


def test_install_routes_every_binding_to_ours_and_uninstall_restores_them():
    original = schedules.get_forward_backward_func
    mcore.install("interleaved-1f1b", vp=2)
    try:
        assert pipeline_parallel.get_forward_backward_func() is mcore.forward_backward_func
        assert schedules.get_forward_backward_func(4, 2) is mcore.forward_backward_func
        assert mcore.installed() == mcore.ScheduleChoice("interleaved-1f1b", (("vp", 2),))
    finally:
        mcore.uninstall()
    assert schedules.get_forward_backward_func is original
    assert pipeline_parallel.get_forward_backward_func is original
    assert mcore.installed() is None


def test_install_refuses_an_unknown_schedule():
    with pytest.raises(ScheduleConfigError, match="not a known schedule"):
        mcore.install("no-such-schedule")
    assert mcore.installed() is None


def test_plans_are_cached_and_lowered():
    choice = mcore.ScheduleChoice("bitpipe")
    schedule, lowered = mcore.plan(choice, 4, 8)
    assert mcore.plan(choice, 4, 8)[1] is lowered
    assert not schedule.is_lowered and lowered.is_lowered


def test_installed_megatron_core_is_supported():
    compat.check_version()
    assert compat.version() >= (0, 16, 0)


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="the workarounds are for machines without CUDA"
)
def test_cpu_workarounds_apply_once_and_keep_cuda_requests_on_the_cpu():
    code = (
        "import torch\n"
        "from megatron_bitpipe.mcore import cpu\n"
        "cpu.apply(); cpu.apply()\n"
        "zeros = torch.zeros\n"
        "cpu.apply()\n"
        "assert torch.zeros is zeros\n"
        "t = torch.zeros(2, device='cuda')\n"
        "assert t.device.type == 'cpu' and t.cuda() is t\n"
        "assert t.type() == 'torch.cuda.FloatTensor' and t.type(torch.int32).dtype == torch.int32\n"
        "assert torch.cuda.current_device() == torch.device('cpu')\n"
        "assert cpu.config_overrides()['batch_p2p_sync'] is False\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]
