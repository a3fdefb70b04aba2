"""megatron-bitpipe: BitPipe and other pipeline-parallel schedules for megatron-core."""

__version__ = "0.1.0"
