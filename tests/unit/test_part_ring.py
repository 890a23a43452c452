"""
The page bank of large pieces' parts (L{dragonfly.core.partwrite.PageBank}):
a part's pages, once it is hashed and written, are moved into a few
part-sized slots and moved out again under the next part to arrive, so the
parts keep reusing the same memory instead of faulting fresh pages in;
full, the pages go back to the system; empty, a part faults its own.

Each test has a bank of its own (the process's is replaced).
"""

from __future__ import annotations

import hashlib
import resource
from typing import Any

import pytest

from dragonfly.core import partwrite
from dragonfly.core.partwrite import PART, PageBank, give_pages, take_pages
from dragonfly.peer.pieces import NO_PART, TaskPieces
from dragonfly.protocol.receive import aligned

from .test_piece_parts import DIGESTS, PIECE, PIECES, Conn, arrive, fill_until_held, make

pytestmark = pytest.mark.skipif(not PageBank(2).usable, reason="no mremap(MREMAP_DONTUNMAP) here")


@pytest.fixture()
def bank(monkeypatch: Any) -> PageBank:
    b = PageBank(3)
    monkeypatch.setattr(partwrite, "_bank", b)
    monkeypatch.setattr(partwrite, "RING", 3)
    return b


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def test_a_written_part_s_pages_go_under_the_next_part(bank: PageBank) -> None:
    first = aligned(3 * PART)
    first[PART:2 * PART] = b"\x07" * PART
    give_pages(first, PART, 2 * PART)
    assert bank.held == 1
    assert bytes(first[PART:PART + 4096]) == bytes(4096)  # moved out: the buffer's range is empty
    second = aligned(3 * PART)
    assert take_pages(second, 2 * PART) and bank.held == 0
    # the same pages, not new ones: their old bytes are there, and filling them faults nothing
    assert bytes(second[2 * PART:2 * PART + 4]) == b"\x07" * 4
    ones = b"\x01" * PART
    before = _faults()
    second[2 * PART:3 * PART] = ones
    assert _faults() - before <= 1
    # while a fresh part faults its pages in
    before = _faults()
    second[0:PART] = ones
    assert _faults() - before >= 1


def test_a_full_bank_gives_the_pages_back_and_an_empty_one_gives_none(bank: PageBank) -> None:
    buf = aligned(5 * PART)
    buf[:] = b"\x05" * (5 * PART)
    give_pages(buf, 0, 5 * PART)
    assert bank.held == 3 and bank.counts["full"] == 2
    assert bytes(buf) == bytes(5 * PART)  # moved or dropped, all gone from the buffer
    other = aligned(5 * PART)
    assert [take_pages(other, k * PART) for k in range(4)] == [True, True, True, False]
    assert bank.counts["empty"] == 1 and bank.held == 0


def test_the_bank_lets_its_pages_go(bank: PageBank) -> None:
    buf = aligned(2 * PART)
    buf[:] = b"\x03" * (2 * PART)
    give_pages(buf, 0, 2 * PART)
    assert bank.held == 2
    partwrite.drop_bank()
    assert bank.held == 0
    other = aligned(PART)
    assert not take_pages(other, 0)


def test_what_cannot_take_a_part_s_pages_is_left_alone(bank: PageBank) -> None:
    small = bytearray(3 * PART)
    small[:] = b"\x02" * (3 * PART)
    give_pages(small, 0, PART)  # not a map: kept as it is
    assert small[:PART] == b"\x02" * PART and bank.held == 0
    assert not take_pages(small, 0)
    buf = aligned(2 * PART)
    buf[:PART] = b"\x02" * PART
    give_pages(buf, 0, PART)
    off = memoryview(buf)[4096:]  # a view not on a huge page: no move
    assert not take_pages(off, 0) and bank.held == 1
    assert not take_pages(buf, 2 * PART)  # past the map's end


def test_no_bank_when_off(monkeypatch: Any) -> None:
    monkeypatch.setattr(partwrite, "_bank", None)
    monkeypatch.setattr(partwrite, "RING", 0)
    assert partwrite.bank() is None
    buf = aligned(PART)
    buf[:] = b"\x09" * PART
    give_pages(buf, 0, PART)  # dropped, as before the bank
    assert bytes(buf) == bytes(PART)
    assert not take_pages(buf, 0)


# -- through TaskPieces ------------------------------------------------------------------------


def test_pieces_in_parts_reuse_the_bank_s_pages(tmp_path: Any, bank: PageBank) -> None:
    pieces, store, task, released = make(tmp_path)
    conn = Conn()
    arrive(pieces, conn, 0, PIECES[0], step=PART // 2)
    # five parts (four whole and a short one): the first two fault their pages in, the
    # next ones take those of the parts written before them
    assert bank.counts["empty"] == 2 and bank.counts["got"] == 3
    arrive(pieces, conn, 1, PIECES[1], step=PART // 2)
    assert bank.counts["empty"] == 2 and bank.counts["got"] == 8  # the next piece: no fault at all
    assert [e[0] for e in task.events] == ["stored", "stored"]
    assert store.content() == PIECES[0] + PIECES[1]
    assert bank.held == 2 and len(released) == 2


def test_the_hash_runs_across_parts_on_reused_pages(tmp_path: Any, bank: PageBank) -> None:
    pieces, store, task, released = make(tmp_path)
    conn = Conn()
    # old bytes in the bank's pages (the other piece's) never count: a piece is hashed on what arrived
    arrive(pieces, conn, 1, PIECES[1], step=PART)
    bad = bytearray(PIECES[0])
    bad[3 * PART + 1] ^= 0xFF
    arrive(pieces, conn, 0, bytes(bad), step=PART)
    assert task.events[-1] == ("corrupt", conn, 0, PIECE)
    assert pieces.have is not None and 0 not in pieces.have
    assert pieces.picker is not None
    pieces.picker.add(conn)
    pieces.picker.corrupt(conn, 0)
    arrive(pieces, conn, 0, PIECES[0], step=3 * PART // 4)
    assert task.events[-1] == ("stored", conn, 0, PIECE)
    assert store.content()[:PIECE] == PIECES[0] and DIGESTS[0] == hashlib.sha256(PIECES[0]).digest()


def test_the_reads_are_held_and_the_pages_bounded_while_parts_wait(tmp_path: Any, bank: PageBank) -> None:
    pieces, store, task, released = make(tmp_path)
    store.hold = True
    conn = Conn()
    buf = aligned(PIECE)
    filled = fill_until_held(pieces, conn, buf)
    assert filled <= TaskPieces.PARTS_AHEAD + PART
    store.flush()  # the parts written: their pages into the bank, reading again
    assert not conn.held and bank.held == filled // PART
    buf[filled:] = PIECES[0][filled:]
    pieces.arrived(conn, 0, buf, "remote_peer")
    store.flush()
    assert task.events == [("stored", conn, 0, PIECE)] and released == [buf]
    assert bank.held <= bank.slots


def test_a_part_begun_by_the_framer_keeps_its_own_pages(tmp_path: Any, bank: PageBank) -> None:
    # the bytes of a Twisted read may pass a mark before the side hears of it:
    # that part has bytes in already, so nothing is moved under it
    pieces, store, task, released = make(tmp_path)
    filler = aligned(PART)
    filler[:] = b"\x01" * PART
    give_pages(filler, 0, PART)
    conn = Conn()
    buf = aligned(PIECE)
    assert pieces.part(conn, 0, buf, 0) == PART and bank.held == 0  # taken under part 0
    give_pages(filler, 0, PART)
    buf[:PART + 100] = PIECES[0][:PART + 100]
    assert pieces.part(conn, 0, buf, PART + 100) == 2 * PART
    assert bank.counts["got"] == 1
    assert bytes(buf[PART:PART + 100]) == PIECES[0][PART:PART + 100]


def test_a_piece_cut_off_mid_way_returns_its_buffer_and_its_parts_pages(tmp_path: Any, bank: PageBank) -> None:
    pieces, store, task, released = make(tmp_path)
    store.hold = True
    conn = Conn()
    buf = aligned(PIECE)
    assert pieces.part(conn, 0, buf, 0) == PART
    buf[:2 * PART] = PIECES[0][:2 * PART]
    pieces.part(conn, 0, buf, 2 * PART)  # a job is out, reading parts 0 and 1
    pieces.dropped(conn, buf)  # the connection closed mid-piece
    assert released == [] and bank.held == 0
    store.flush()
    assert released == [buf] and bank.held == 2
    assert pieces.have is not None and 0 not in pieces.have and task.events == []
    # another copy takes the piece (and the pages) and is stored
    store.hold = False
    arrive(pieces, Conn(), 0, PIECES[0])
    assert task.events[-1][0] == "stored" and store.content()[:PIECE] == PIECES[0]
    assert bank.counts["got"] >= 2


def test_whole_pieces_take_no_pages(tmp_path: Any, bank: PageBank) -> None:
    pieces, store, task, released = make(tmp_path)
    buf = aligned(TaskPieces.PARTS_ABOVE)
    give_pages(aligned(PART), 0, PART)
    assert pieces.part(Conn(), 0, buf, 0) == NO_PART
    assert bank.held == 1 and bank.counts["got"] == 0
