"""A fixed-size set of piece indices backed by a bytearray.

The on-the-wire and in-memory layout is MSB-first: bit 7 (``0x80``) of byte
0 is piece 0, bit 6 of byte 0 is piece 1, ..., bit 7 of byte 1 is piece 8.
Spare bits in the last byte (past ``count``) are always zero.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["Bitmap", "MAX_COUNT"]

#: Largest number of pieces a bitmap may describe.
MAX_COUNT = 1 << 20

# _BITS[b] is the tuple of bit offsets (0 = MSB) set in byte value b.
_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(j for j in range(8) if b & (0x80 >> j)) for b in range(256)
)


def _nbytes(count: int) -> int:
    """Return the number of bytes needed to hold ``count`` bits."""
    return (count + 7) >> 3


class Bitmap:
    """A set of piece indices in ``range(count)``.

    ``len(bitmap)`` is the number of set bits and is O(1) (a running
    counter is kept); ``bitmap.count`` is the size of the universe.
    """

    __slots__ = ("count", "_bits", "_set")

    count: int
    _bits: bytearray
    _set: int

    def __init__(self, count: int) -> None:
        """Create an empty bitmap able to hold ``count`` pieces."""
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError(f"bitmap count must be an int, not {type(count).__name__}")
        if count < 0 or count > MAX_COUNT:
            raise ValueError(f"bitmap count {count} is outside 0..{MAX_COUNT}")
        self.count = count
        self._bits = bytearray(_nbytes(count))
        self._set = 0

    @classmethod
    def from_bytes(cls, count: int, data: bytes | bytearray | memoryview) -> Bitmap:
        """Build a bitmap of ``count`` pieces from its MSB-first encoding.

        Raises ``ValueError`` if ``data`` is not exactly ``ceil(count / 8)``
        bytes long or if any spare bit past ``count`` is set.
        """
        self = cls(count)
        n = _nbytes(count)
        if len(data) != n:
            raise ValueError(
                f"bitmap of {count} pieces needs {n} bytes, got {len(data)}"
            )
        bits = bytearray(data)
        spare = (n << 3) - count
        if spare and bits[-1] & ((1 << spare) - 1):
            raise ValueError(f"bitmap of {count} pieces has spare bits set")
        self._bits = bits
        self._set = int.from_bytes(bits, "big").bit_count()
        return self

    def to_bytes(self) -> bytes:
        """Return the MSB-first encoding (``ceil(count / 8)`` bytes)."""
        return bytes(self._bits)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.count:
            raise IndexError(f"piece index {i} is outside 0..{self.count - 1}")

    def set(self, i: int) -> None:
        """Mark piece ``i`` as present; raises ``IndexError`` if out of range."""
        self._check(i)
        mask = 0x80 >> (i & 7)
        byte = self._bits[i >> 3]
        if not byte & mask:
            self._bits[i >> 3] = byte | mask
            self._set += 1

    def clear(self, i: int) -> None:
        """Mark piece ``i`` as absent; raises ``IndexError`` if out of range."""
        self._check(i)
        mask = 0x80 >> (i & 7)
        byte = self._bits[i >> 3]
        if byte & mask:
            self._bits[i >> 3] = byte & ~mask
            self._set -= 1

    def __contains__(self, i: object) -> bool:
        """Return whether piece ``i`` is set (False when out of range)."""
        if not isinstance(i, int) or not 0 <= i < self.count:
            return False
        return bool(self._bits[i >> 3] & (0x80 >> (i & 7)))

    def __len__(self) -> int:
        """Return the number of set pieces."""
        return self._set

    @property
    def complete(self) -> bool:
        """True when every piece is set (vacuously true for ``count == 0``)."""
        return self._set == self.count

    def __iter__(self) -> Iterator[int]:
        """Yield the set piece indices in ascending order."""
        bits_table = _BITS
        for n, byte in enumerate(self._bits):
            if byte:
                base = n << 3
                for j in bits_table[byte]:
                    yield base + j

    def missing(self) -> Iterator[int]:
        """Yield the unset piece indices in ascending order."""
        bits_table = _BITS
        count = self.count
        for n, byte in enumerate(self._bits):
            if byte != 0xFF:
                base = n << 3
                for j in bits_table[byte ^ 0xFF]:
                    idx = base + j
                    if idx >= count:
                        return
                    yield idx

    def copy(self) -> Bitmap:
        """Return an independent copy."""
        other = Bitmap.__new__(Bitmap)
        other.count = self.count
        other._bits = bytearray(self._bits)
        other._set = self._set
        return other

    def __eq__(self, other: object) -> bool:
        """Bitmaps are equal when they have the same size and bits."""
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.count == other.count and self._bits == other._bits

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"<Bitmap {self._set}/{self.count}>"
