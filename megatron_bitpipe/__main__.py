"""``python -m megatron_bitpipe``: the same command line as ``megatron-bitpipe``."""

from megatron_bitpipe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
