"""``python -m megatron_bitpipe.megatron_lm /path/to/Megatron-LM/pretrain_gpt.py ...``"""

from megatron_bitpipe.megatron_lm.launcher import main

main()
