"""Piece buffers (dragonfly.protocol.receive.aligned): page-aligned, and their pages made when mapped."""

from __future__ import annotations

import mmap
import resource

import pytest

from dragonfly.protocol import receive


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not receive._POPULATE, reason="no MAP_POPULATE here, or DRAGONFLY_POPULATE=0")
def test_a_new_buffer_does_not_fault_page_by_page_when_filled():
    size = 1 << 20
    data = b"\xa5" * size
    before = _faults()
    buf = receive.aligned(size)
    after_map = _faults()
    buf[:] = data
    filled = _faults()
    assert bytes(buf[:8]) == b"\xa5" * 8 and len(buf) == size
    # a fault per 4 KiB page would be 256; populated, the fill takes (nearly) none
    assert filled - after_map < 32, (before, after_map, filled)


def test_without_populate_the_buffer_is_the_same(monkeypatch):
    monkeypatch.setattr(receive, "_POPULATE", 0)
    buf = receive.aligned(3 * mmap.PAGESIZE)
    buf[:] = b"\1" * len(buf)
    assert len(buf) == 3 * mmap.PAGESIZE and bytes(buf[-1:]) == b"\1"
    assert isinstance(receive.aligned(100), bytearray)
