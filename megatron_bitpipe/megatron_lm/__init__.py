"""Megatron-LM's ``pretrain_gpt.py`` with our schedules: a launcher, hooks, CPU workarounds.

    torchrun ... -m megatron_bitpipe.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py \\
        <Megatron-LM arguments> --pipeline-schedule bitpipe

or, in a checkout patched with ``patches/``, ``pretrain_gpt.py`` calls ``enable()`` itself. The
hooks (``hooks``) name every Megatron-LM line they replace. This sub-package uses ``mcore``;
``mcore`` never imports it.
"""


def enable() -> list[str]:
    """Patch Megatron-LM for ``--pipeline-schedule`` in ``sys.argv`` (no-op without it)."""
    from megatron_bitpipe.megatron_lm.launcher import enable as enable_schedules

    return enable_schedules()
