"""Run Megatron-LM's own ``pretrain_gpt.py`` with ``--pipeline-schedule``, no file edited.

    torchrun --nproc-per-node 4 -m megatron_bitpipe.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py \\
        <any Megatron-LM arguments> --pipeline-schedule bitpipe

``enable(argv)`` does everything but run the script, for a ``pretrain_gpt.py`` that calls it
itself (``patches/``): it checks the schedule settings before any process group exists (one line,
exit 2, on a bad one), applies the CPU workarounds when there is no GPU, and installs the hooks of
``hooks``. ``main`` then runs the script as ``__main__``.
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Sequence

from megatron_bitpipe.run_plan import ArgumentsError
from megatron_bitpipe.runtime import rank_order

USAGE = (
    "usage: python -m megatron_bitpipe.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py "
    "<Megatron-LM arguments> --pipeline-schedule NAME"
)


def enable(argv: Sequence[str] | None = None, script: str | None = None) -> list[str]:
    """Validate, patch Megatron-LM for the schedule, and return the arguments to run with.

    Without ``--pipeline-schedule`` (a patched ``pretrain_gpt.py`` run as usual) nothing changes.
    ``argv`` defaults to ``sys.argv[1:]``, which is updated in place; ``script`` (the
    ``pretrain_gpt.py`` to run) to ``sys.argv[0]``, and must be of the installed megatron-core's
    release.
    """
    from megatron_bitpipe.megatron_lm import arguments, hooks

    given = list(sys.argv[1:] if argv is None else argv)
    if argv is None and "--pipeline-schedule" not in given:
        return given
    try:
        run, given = arguments.plan(given, int(os.environ.get("WORLD_SIZE", "1")))
        hooks.check_version(script or (sys.argv[0] if argv is None else None))
    except (ArgumentsError, hooks.UnsupportedMegatronLM) as error:
        print(f"megatron_bitpipe: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    from megatron_bitpipe.megatron_lm import cpu

    order, pipeline_parallel = arguments.pipeline_rank_order(given)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank_order.apply_to_environment(pipeline_parallel, world_size // pipeline_parallel, order)
    given = cpu.apply(given, megatron_schedule=not run.uses_registry)
    hooks.install(run, tied_embeddings="--untie-embeddings-and-output-weights" not in given)
    if argv is None:
        sys.argv[1:] = given
    return given


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m megatron_bitpipe.megatron_lm SCRIPT [arguments]``."""
    given = list(sys.argv[1:] if argv is None else argv)
    if not given or not given[0].endswith(".py") or not os.path.isfile(given[0]):
        print(USAGE, file=sys.stderr)
        print(
            "megatron_bitpipe: error: the first argument must be Megatron-LM's pretrain_gpt.py",
            file=sys.stderr,
        )
        raise SystemExit(2)
    script, rest = os.path.abspath(given[0]), given[1:]
    # the checkout that holds the script provides megatron.training, as `python pretrain_gpt.py`
    # finds it; first on the path before anything (the CPU set-up, the hooks) imports it
    sys.path.insert(0, os.path.dirname(script))
    rest = enable(rest, script)
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
