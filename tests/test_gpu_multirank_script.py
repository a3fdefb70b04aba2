"""scripts/gpu_multirank_check.sh and .py on a machine without a GPU.

What a GPU run would check cannot be checked here. These tests cover what can: the script passes
``bash -n`` and shellcheck; its NCCL decision (torch's NCCL, a source tree, a build, a reuse, a
preload torch ignores) with a fake Python, ``make`` and ``nvcc``; the launches its dry run prints;
that ``torchrun --no-python env LOCAL_RANK=0`` gives every rank device 0, which is the device the
trainer picks (``torch.cuda.set_device(LOCAL_RANK)``, checked by monkeypatching); the PASS/FAIL
verdicts; and one real two-rank launch on CPU/gloo through the harness.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_multirank_check.sh"
USAGE_SOURCE = "git -C MIRROR archive v2.30.3-1 | tar -x -C .nccl-src"


@pytest.fixture(scope="module")
def check():
    """scripts/gpu_multirank_check.py as a module (it imports gpu_check from its own folder)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        yield importlib.import_module("gpu_multirank_check")
    finally:
        sys.path.remove(str(REPO / "scripts"))


def run_script(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, env=environment,
                          timeout=120, cwd=REPO)


def nccl_source(folder: Path, version: tuple[int, int, int]) -> Path:
    """A stand-in NCCL source tree: only makefiles/version.mk, as the script reads it."""
    major, minor, patch = version
    (folder / "makefiles").mkdir(parents=True)
    (folder / "makefiles" / "version.mk").write_text(
        f"##### version\nNCCL_MAJOR   := {major}\nNCCL_MINOR   := {minor}\nNCCL_PATCH   := {patch}\n"
        "NCCL_SUFFIX  :=\nPKG_REVISION := 1\n"
    )
    return folder


def test_the_script_passes_bash_n_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-S", "style", str(SCRIPT)]).returncode == 0


def test_help_says_how_to_provide_the_nccl_source():
    result = run_script("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: scripts/gpu_multirank_check.sh")
    assert USAGE_SOURCE in result.stdout and "NCCL_SRC" in result.stdout and "#" not in result.stdout


def test_dry_run_without_a_source_skips_with_the_usage(tmp_path):
    result = run_script("--dry-run", env={"NCCL_SRC": str(tmp_path / "absent"), "TORCH_NCCL": "none"})
    assert result.returncode == 0, result.stderr
    assert "ships NCCL none" in result.stdout
    assert f"SKIP 2 ranks on one GPU under NCCL: torch has no NCCL and there is no NCCL source at {tmp_path}" in (
        result.stdout)
    assert USAGE_SOURCE in result.stderr


def test_dry_run_with_a_torch_shipping_nccl_2_30_builds_nothing(tmp_path):
    """torch 2.15.0's CUDA build from the package index ships NCCL 2.30.7."""
    result = run_script("--dry-run", env={"NCCL_SRC": str(tmp_path / "absent"), "TORCH_NCCL": "2.30.7"})
    assert result.returncode == 0, result.stderr
    assert "torch's NCCL 2.30.7 is >= 2.30: no build needed" in result.stdout
    assert "would build" not in result.stdout and "SKIP" not in result.stdout


def test_dry_run_prints_the_build_and_every_launch(tmp_path):
    source = nccl_source(tmp_path / "nccl", (2, 30, 3))
    result = run_script(
        "--dry-run",
        env={"NCCL_SRC": str(source), "NCCL_CACHE": str(tmp_path / "cache"), "TORCH_NCCL": "none"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    build = next(line for line in lines if "would build NCCL 2.30.3" in line)
    assert f"make -C {source} -j" in build and " src.build " in build
    assert f"BUILDDIR={tmp_path}/cache/2.30.3-sm90.partial" in build
    assert "NVCC_GENCODE=-gencode=arch=compute_90,code=sm_90" in build
    assert f"would preload LD_PRELOAD={tmp_path}/cache/2.30.3-sm90/lib/libnccl.so.2" in result.stdout
    assert "each pipeline message 262144 bytes = 4 x NCCL_BUFFSIZE=65536" in result.stdout
    dry = [line for line in lines if line.startswith("DRY ")]
    assert len(dry) == 1 + 4 * 2
    assert "--pipeline-schedule none" in dry[0] and "torch.distributed.run" not in dry[0]
    for schedule in ("bitpipe", "chimera", "v-zb", "interleaved-1f1b"):
        runs = [line for line in dry[1:] if line.endswith(f"--pipeline-schedule {schedule}")]
        assert len(runs) == 2, schedule
        for line in runs:
            assert "timeout -k 30 300 env " in line and "--nproc-per-node=2 --no-python env LOCAL_RANK=0 " in line
            assert "NCCL_MULTI_RANK_GPU_ENABLE=1" in line and "NCCL_MAX_CTAS=2" in line
            assert "NCCL_BUFFSIZE=65536" in line and "--pipeline-model-parallel-size 2" in line
        assert sum("CUDA_DEVICE_MAX_CONNECTIONS=1 " in line for line in runs) == 1
        assert sum(" -u CUDA_DEVICE_MAX_CONNECTIONS " in line for line in runs) == 1
    assert all(("--virtual-pipeline-model-parallel-size 2" in line) == ("interleaved-1f1b" in line)
               for line in dry[1:])


def stand_in_library() -> str:
    """A shared library harmless to preload into every process (this Python's libm), else /dev/null."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if line.rstrip().endswith(".so.6")}
    return next((path for path in sorted(paths) if os.path.basename(path) == "libm.so.6"), "/dev/null")


@pytest.fixture
def fake_gpu_machine(tmp_path) -> dict[str, str]:
    """PYTHON answering the probe as a CUDA torch would, a ``make`` that builds a stand-in
    libnccl.so.2 (or fails), an nvcc, and a source tree of NCCL 2.30.3.

    The fake torch reports FAKE_TORCH_NCCL, or FAKE_BUILT_NCCL once LD_PRELOAD names a
    libnccl.so.2 (unless FAKE_PRELOAD_IGNORED). Running the checks prints ``RAN`` and the arguments.
    """
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    python = bin_folder / "python"
    python.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = - ]; then\n'
        "  cat >/dev/null\n"
        '  nccl=$FAKE_TORCH_NCCL\n'
        '  case "${LD_PRELOAD:-}" in *libnccl.so.2*) [ -n "${FAKE_PRELOAD_IGNORED:-}" ] || nccl=$FAKE_BUILT_NCCL ;; esac\n'
        '  echo "2.11.0+cu130 $nccl 90"\n'
        "  exit 0\n"
        "fi\n"
        '[ "$1" = -c ] && exit 0\n'
        'echo "RAN $* LD_PRELOAD=${LD_PRELOAD:-}"\n'
    )
    make = bin_folder / "make"
    make.write_text(
        "#!/bin/bash\n"
        'echo "make $*" >> "$FAKE_MAKE_RECORD"\n'
        '[ -n "${FAKE_MAKE_FAILS:-}" ] && { echo "nvcc fatal: something broke"; exit 2; }\n'
        'for word in "$@"; do case $word in BUILDDIR=*) builddir=${word#BUILDDIR=} ;; esac; done\n'
        'mkdir -p "$builddir/lib"\n'
        f'ln -sf {stand_in_library()} "$builddir/lib/libnccl.so.2"\n'
    )
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    for tool in (python, make, nvcc):
        tool.chmod(0o755)
    return {
        "PYTHON": str(python),
        "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
        "CUDA_HOME": str(cuda),
        "NCCL_SRC": str(nccl_source(tmp_path / "nccl", (2, 30, 3))),
        "NCCL_CACHE": str(tmp_path / "cache"),
        "FAKE_TORCH_NCCL": "2.27.5",
        "FAKE_BUILT_NCCL": "2.30.3",
        "FAKE_MAKE_RECORD": str(tmp_path / "make.txt"),
        "LD_PRELOAD": "",
    }


def fake_run(machine: dict[str, str], *arguments: str, **overrides: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **machine, **overrides}
    return subprocess.run(["bash", str(SCRIPT), *arguments], capture_output=True, text=True, env=environment,
                          timeout=60, cwd=REPO)


def test_an_old_torch_nccl_is_built_once_then_reused_and_preloaded(fake_gpu_machine, tmp_path):
    built = tmp_path / "cache" / "2.30.3-sm90" / "lib" / "libnccl.so.2"
    first = fake_run(fake_gpu_machine, "--schedules", "bitpipe")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "torch 2.11.0+cu130 ships NCCL 2.27.5" in first.stdout
    assert f"building NCCL 2.30.3 for sm_90 into {tmp_path}/cache/2.30.3-sm90" in first.stdout
    assert f"torch now runs NCCL 2.30.3 from {built}" in first.stdout
    assert f"RAN scripts/gpu_multirank_check.py --schedules bitpipe LD_PRELOAD={built}" in first.stdout
    make = (tmp_path / "make.txt").read_text().splitlines()
    assert len(make) == 1 and "src.build" in make[0] and "NVCC_GENCODE=-gencode=arch=compute_90,code=sm_90" in make[0]
    assert f"CUDA_HOME={tmp_path}/cuda" in make[0]
    second = fake_run(fake_gpu_machine, "--build-only")
    assert second.returncode == 0 and f"reusing {built} (NCCL 2.30.3)" in second.stdout
    assert "RAN" not in second.stdout and len((tmp_path / "make.txt").read_text().splitlines()) == 1


def test_a_recent_torch_nccl_needs_no_build(fake_gpu_machine, tmp_path):
    result = fake_run(fake_gpu_machine, FAKE_TORCH_NCCL="2.30.4", NCCL_SRC=str(tmp_path / "absent"))
    assert result.returncode == 0 and "torch's NCCL 2.30.4 is >= 2.30: no build needed" in result.stdout
    assert "RAN scripts/gpu_multirank_check.py LD_PRELOAD=" in result.stdout
    assert not (tmp_path / "make.txt").exists()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"FAKE_MAKE_FAILS": "1"}, "building NCCL 2.30.3 from {source} failed or passed 1200 s"),
        ({"FAKE_PRELOAD_IGNORED": "1"}, "preloading {cache}/2.30.3-sm90/lib/libnccl.so.2 left torch on NCCL 2.27.5"),
        ({"CUDA_HOME": "/nonexistent"}, "torch's NCCL 2.27.5 is older than 2.30 and there is no nvcc"),
    ],
)
def test_what_cannot_run_is_one_skip_line(fake_gpu_machine, tmp_path, overrides, reason):
    result = fake_run(fake_gpu_machine, **overrides)
    expected = reason.format(source=fake_gpu_machine["NCCL_SRC"], cache=fake_gpu_machine["NCCL_CACHE"])
    assert result.returncode == 0 and f"SKIP 2 ranks on one GPU under NCCL: {expected}" in result.stdout
    assert "RAN" not in result.stdout


def test_an_old_source_tree_is_a_skip(fake_gpu_machine, tmp_path):
    source = nccl_source(tmp_path / "old", (2, 29, 7))
    result = fake_run(fake_gpu_machine, NCCL_SRC=str(source))
    assert "SKIP 2 ranks on one GPU under NCCL: torch's NCCL 2.27.5 is older than 2.30 and the source at " in (
        result.stdout)
    assert "is NCCL 2.29.7, older too" in result.stdout and not (tmp_path / "make.txt").exists()


def test_every_rank_that_torchrun_starts_through_the_harness_gets_local_rank_0(check):
    """The harness's prefix (``--no-python env LOCAL_RANK=0``) overrides torchrun's LOCAL_RANK."""
    run = check.two_rank_run("bitpipe", "default", cpu=True)
    prefix = list(run.command[: run.command.index("-m", 5)])
    probe = "import os; print('ranks', os.environ['RANK'], os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'])"
    result = subprocess.run([*prefix, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    seen = sorted(line for line in result.stdout.splitlines() if line.startswith("ranks"))
    assert seen == ["ranks 0 0 2", "ranks 1 0 2"]


def test_the_trainer_takes_its_cuda_device_from_local_rank(monkeypatch):
    """So both ranks started with LOCAL_RANK=0 compute on cuda:0 (monkeypatched CUDA)."""
    pytest.importorskip("megatron.core")
    import torch
    import torch.distributed as dist

    from megatron_bitpipe.mcore import training

    class Stop(Exception):
        pass

    devices: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: (_ for _ in ()).throw(Stop()))
    args = SimpleNamespace(check_host_syncs=False, distributed_timeout_minutes=1.0,
                           tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(Stop):
            training._init_distributed(args)
    assert devices == [0, 0]


def test_verdicts_name_a_hang_a_missing_shared_gpu_and_a_loss_mismatch(check):
    run = check.two_rank_run("v-zb", "1", cpu=False)
    reference = [10.0, 9.0, 8.0, 7.0]
    reported = tuple(reference)
    hung = check.Outcome(124, "last words", 300.2, True)
    passed, line = check.verdict(run, hung, reference, 300, cpu=False)
    assert not passed and line.startswith(
        "v-zb PP=2, 2 ranks on GPU 0, CUDA_DEVICE_MAX_CONNECTIONS=1: hang: no exit within 300 s")
    passed, line = check.verdict(run, check.Outcome(0, "", 20.0, False, reported), reference, 300, cpu=False)
    assert not passed and "does not say 'Multiple ranks on the same GPU detected and allowed'" in line
    shared = f"NCCL INFO {check.SHARED_GPU}. Disabling NVLS.\n"
    passed, line = check.verdict(run, check.Outcome(0, shared, 20.0, False, reported), reference, 300, cpu=False)
    assert passed and "worst relative 0.0e+00" in line and "4 of 4 iterations" in line
    off = (10.0, 9.0, 8.001, 7.0)
    passed, line = check.verdict(run, check.Outcome(0, shared, 20.0, False, off), reference, 300, cpu=False)
    assert not passed and "worst relative 1.2e-04" in line
    passed, line = check.verdict(run, check.Outcome(1, "Duplicate GPU detected", 5.0, False), reference, 300,
                                 cpu=False)
    assert not passed and "exit 1: Duplicate GPU detected" in line


@pytest.mark.multiprocess  # the script's launch, which tests/tiers.py does not read, starts it
def test_a_hang_is_stopped_by_timeout_with_its_process_group(check, tmp_path):
    marker = tmp_path / "child.pid"
    command = ("bash", "-c", f"sleep 600 & echo $! > {marker}; wait")
    outcome = check.launch(check.Run("sleeper", command), 2, cpu=True)
    assert outcome.hung and outcome.status == 124 and outcome.seconds < 40
    child = int(marker.read_text())
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_the_harness_trains_two_ranks_on_cpu_and_matches_pp1(tmp_path):
    """One real launch through the harness (gloo: nothing about NCCL): v-zb against PP=1."""
    pytest.importorskip("megatron.core")
    command = [sys.executable, "scripts/gpu_multirank_check.py", "--cpu", "--schedules", "v-zb",
               "--connections", "default", "--logs", str(tmp_path)]
    environment = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=400, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "PASS PP=1 reference (--pipeline-schedule none): 4 losses" in result.stdout
    assert ("PASS v-zb PP=2, 2 ranks on the CPU (gloo), CUDA_DEVICE_MAX_CONNECTIONS=unset: lm loss equals "
            "PP=1's") in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["00.log", "00.report.json", "01.log",
                                                                 "01.report.json"]
