"""Megatron-LM's training log line, read back (``megatron_bitpipe.megatron_lm.log``): the lm loss
and grad norm of each iteration line, nothing from any other line."""

from __future__ import annotations

from megatron_bitpipe.megatron_lm import log

LOG = """\
 [2025-03-04 10:11:12] iteration        1/       4 | consumed samples:           16 | elapsed time per iteration (ms): 3411.2 | learning rate: 1.000000E-04 | global batch size:    16 | lm loss: 4.851212E+00 | loss scale: 1.0 | grad norm: 2.178 | number of skipped iterations:   0 | number of nan iterations:   0 |
[after training is done] datetime: 2025-03-04 10:11:13
 [2025-03-04 10:11:13] iteration        2/       4 | consumed samples:           32 | elapsed time per iteration (ms): 812.3 | learning rate: 1.000000E-04 | global batch size:    16 | lm loss: 4.849001E+00 | loss scale: 1.0 | grad norm: 12.500 | number of skipped iterations:   0 | number of nan iterations:   0 |
 [2025-03-04 10:11:14] iteration        3/       4 | consumed samples:           48 | elapsed time per iteration (ms): 810.0 | learning rate: 1.000000E-04 | global batch size:    16 | lm loss: NAN | loss scale: 1.0 | number of skipped iterations:   1 | number of nan iterations:   1 |
 [2025-03-04 10:11:15] iteration        4/       4 | consumed samples:           64 | elapsed time per iteration (ms): 809.1 | learning rate: 1.000000E-04 | global batch size:    16 | lm loss: 4.612000E-01 | loss scale: 1.0 | grad norm: 0.031 | number of skipped iterations:   0 | number of nan iterations:   0 |
 validation loss at iteration 4 on validation set | lm loss value: 4.500000E+00 | lm loss PPL: 9.001713E+01 |
"""


def test_losses_are_the_lm_loss_of_every_iteration_line_that_prints_a_number():
    assert log.losses(LOG) == [4.851212, 4.849001, 0.4612]


def test_grad_norms_are_those_of_the_iterations_that_updated():
    assert log.grad_norms(LOG) == [2.178, 12.5, 0.031]


def test_validation_lines_and_other_text_give_nothing():
    others = "\n".join(line for line in LOG.splitlines() if "consumed samples" not in line)
    assert "lm loss value" in others
    assert log.losses(others) == [] and log.grad_norms(others) == []
    assert log.losses("") == [] and log.grad_norms("") == []
