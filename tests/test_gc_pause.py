"""``schedules.gc_pause.paused``: the collector is off inside and back as it was after."""

import gc

import pytest

from megatron_bitpipe.schedules.gc_pause import paused


def test_collector_is_off_inside_and_on_again_after():
    assert gc.isenabled()
    with paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collector_left_off_stays_off():
    gc.disable()
    try:
        with paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collector_comes_back_after_an_error():
    with pytest.raises(ValueError):
        with paused():
            raise ValueError("plan failed")
    assert gc.isenabled()
