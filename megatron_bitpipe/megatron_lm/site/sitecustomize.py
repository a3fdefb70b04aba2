"""Put on PYTHONPATH by the Megatron-LM launcher on CPU: every interpreter, the checkpoint writers
megatron-core spawns included, gets the triton stub before it imports megatron.training."""

from megatron_bitpipe.megatron_lm.cpu import stub_triton_kernels

stub_triton_kernels()
