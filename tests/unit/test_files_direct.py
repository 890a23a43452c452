"""
Writing pieces (dragonfly/core/files.py): the page-aligned part with O_DIRECT,
the rest through the page cache; the bytes read back are the bytes written,
wherever each part went.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from dragonfly.core import files
from dragonfly.core.files import DIRECT_ALIGN, DIRECT_CHUNK, write_piece


def sparse(tmp_path: Any, size: int) -> str:
    path = str(tmp_path / "task.data")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize("length, offset", [
    (2 * DIRECT_CHUNK + 3 * DIRECT_ALIGN, 0),  # chunks and a part of one, all aligned
    (DIRECT_CHUNK + 100, DIRECT_ALIGN * 5),  # an unaligned tail goes through the page cache
    (DIRECT_ALIGN * 2, 100),  # an unaligned offset: all through the page cache
    (DIRECT_ALIGN - 1, 0),  # smaller than a block
])
def test_write_piece_reads_back(tmp_path: Any, length: int, offset: int) -> None:
    path = sparse(tmp_path, offset + length + DIRECT_ALIGN)
    data = bytearray(os.urandom(length))
    write_piece(path, data, offset)
    with open(path, "rb") as f:
        whole = f.read()
    assert whole[offset:offset + length] == data
    assert whole[:offset] == b"\0" * offset and whole[offset + length:] == b"\0" * DIRECT_ALIGN


def test_a_file_system_without_direct_io_gets_buffered_writes(tmp_path: Any, monkeypatch: Any) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "no O_DIRECT here")
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.os, "open", no_direct)
    path = sparse(tmp_path, DIRECT_CHUNK * 2)
    data = os.urandom(DIRECT_CHUNK + DIRECT_ALIGN)
    assert files.write_direct(path, memoryview(data), 0) == 0
    write_piece(path, data, DIRECT_ALIGN)
    with open(path, "rb") as f:
        assert f.read()[DIRECT_ALIGN:DIRECT_ALIGN + len(data)] == data


def test_other_errors_are_raised(tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError):
        write_piece(str(tmp_path / "missing.data"), os.urandom(DIRECT_ALIGN * 2), 0)


def test_direct_writes_can_be_turned_off(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(files, "DIRECT_WRITES", False)
    calls = []
    monkeypatch.setattr(files, "write_direct", lambda *a: calls.append(a) or 0)
    path = sparse(tmp_path, DIRECT_CHUNK)
    data = os.urandom(DIRECT_CHUNK)
    write_piece(path, data, 0)
    assert calls == []
    with open(path, "rb") as f:
        assert f.read() == data


def test_a_pool_buffer_is_written_as_it_is(tmp_path: Any, monkeypatch: Any) -> None:
    from dragonfly.protocol.receive import BufferPool

    buf = BufferPool().take(DIRECT_CHUNK * 3)
    assert files._page_aligned(memoryview(buf))
    assert not files._page_aligned(memoryview(bytes(DIRECT_ALIGN)))  # read-only: through the aligned copy
    data = os.urandom(len(buf))
    buf[:] = data
    monkeypatch.setattr(files, "DIRECT_CHUNK", 1)  # the copy's buffer would be useless: it must not be used
    path = sparse(tmp_path, len(buf))
    assert files.write_direct(path, memoryview(buf), 0) == len(buf)
    with open(path, "rb") as f:
        assert f.read() == data


def test_small_pool_buffers_are_bytearrays() -> None:
    from dragonfly.protocol.receive import BufferPool

    small = BufferPool().take(100)
    assert isinstance(small, bytearray) and len(small) == 100


def test_a_refusal_part_way_leaves_the_rest_to_the_page_cache(tmp_path: Any, monkeypatch: Any) -> None:
    real_pwrite = os.pwrite
    calls = []

    def refuse_second(fd: int, data: Any, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "not today")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(files.os, "pwrite", refuse_second)
    path = sparse(tmp_path, 3 * DIRECT_CHUNK)
    data = os.urandom(3 * DIRECT_CHUNK)  # bytes: through the aligned buffer, a chunk at a time
    write_piece(path, data, 0)
    with open(path, "rb") as f:
        assert f.read() == data
    assert calls[:3] == [0, DIRECT_CHUNK, DIRECT_CHUNK]  # the refused chunk again, through the page cache


@pytest.mark.parametrize("readback", [True, False])
def test_direct_writes_are_read_back_into_the_page_cache(tmp_path: Any, monkeypatch: Any, readback: bool) -> None:
    """After a direct write the written range is handed to the kernel's readahead (WILLNEED), unless switched off."""
    asked: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def record(fd: int, offset: int, size: int, advice: int) -> None:
        asked.append((offset, size, advice))
        real(fd, offset, size, advice)

    monkeypatch.setattr(files.os, "posix_fadvise", record)
    monkeypatch.setattr(files, "DIRECT_READBACK", readback)
    length = DIRECT_CHUNK + 3 * DIRECT_ALIGN + 10
    path = sparse(tmp_path, DIRECT_ALIGN + length)
    data = bytearray(os.urandom(length))
    write_piece(path, data, DIRECT_ALIGN)
    with open(path, "rb") as f:
        assert f.read()[DIRECT_ALIGN:] == data
    if readback:
        assert asked == [(DIRECT_ALIGN, length - 10, os.POSIX_FADV_WILLNEED)]
    else:
        assert asked == []
