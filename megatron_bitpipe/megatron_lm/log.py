"""Megatron-LM's training log line, read back: the only log text this package parses.

``pretrain_gpt.py`` (Megatron-LM's ``training_log``) prints one line per log interval::

     [2025-01-01 12:00:00] iteration        2/       4 | consumed samples: ... |
     elapsed time per iteration (ms): 812.3 | ... | lm loss: 4.158310E+00 | loss scale: 1.0 |
     grad norm: 1.523 | number of skipped iterations:   0 | number of nan iterations:   0 |

(one line). Our own trainer prints the same line but writes its figures to ``--report``
(``megatron_bitpipe.run_report``); read that instead.
"""

from __future__ import annotations

import re

_ITERATION = r"iteration\s+(\d+)/\s*\d+ \|"
_NUMBER = r"([0-9.E+-]+)"
_LOSS = re.compile(rf"{_ITERATION}.* lm loss: {_NUMBER} \|")
_GRAD_NORM = re.compile(rf"{_ITERATION}.* grad norm: {_NUMBER} \|")


def losses(text: str) -> list[float]:
    """The ``lm loss`` of every iteration line of ``text`` that prints a number (not NAN)."""
    return [float(value) for _, value in _LOSS.findall(text)]


def grad_norms(text: str) -> list[float]:
    """The ``grad norm`` of every iteration line of ``text`` that prints one (an update)."""
    return [float(value) for _, value in _GRAD_NORM.findall(text)]
