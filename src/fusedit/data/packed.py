"""Strings packed into two numpy arrays, for per-sample tables of millions of rows.

A Python list of str costs about 50 bytes per string beyond its characters, and, worse, each DataLoader worker
process that reads it copies the memory pages it touches: forked workers share the parent's pages until a
reference count is written, and reading a list item writes the item's count (pytorch/pytorch#13246). An index of
10 million captions held as a list of dicts (about 7 GB) so grows by a copy per worker over an epoch. Here the
strings are one UTF-8 buffer and their end offsets: reading item i writes nothing into either array, so the
workers keep sharing them, and the table takes its characters plus 8 bytes per item.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

# Any str survives the round trip, including the lone surrogates that os.walk gives for file names that are
# not UTF-8 (read with surrogateescape): they are written as their 3-byte forms and read back as such.
_ERRORS = "surrogatepass"


class Packer:
    """Strings appended one at a time into the buffers of a :class:`PackedStrings` (``packed()``), so that a
    table read row by row is never held as a list of str first."""

    def __init__(self) -> None:
        self.data, self.ends = bytearray(), array("q")

    def append(self, item: str) -> None:
        self.data += item.encode("utf-8", _ERRORS)
        self.ends.append(len(self.data))

    def __len__(self) -> int:
        return len(self.ends)

    def packed(self) -> PackedStrings:
        """The strings appended so far; this packer is then empty (its buffers are the table's)."""
        table = PackedStrings.__new__(PackedStrings)
        table._adopt(self.data, self.ends)
        self.data, self.ends = bytearray(), array("q")
        return table


class PackedStrings(Sequence[str]):
    """An immutable sequence of str stored as one uint8 buffer and int64 end offsets."""

    def __init__(self, items: Iterable[str] = ()):
        packer = Packer()
        for item in items:
            packer.append(item)
        self._adopt(packer.data, packer.ends)

    @classmethod
    def of_arrays(cls, data: np.ndarray, ends: np.ndarray) -> PackedStrings:
        """The strings that ``data`` (uint8: their UTF-8) and ``ends`` (int64: their end offsets) hold, laid
        out as ``Packer`` writes them, such as arrays mapped from files (np.load(mmap_mode="r")): used as
        they are, not copied, and read-only here."""
        table = cls.__new__(cls)
        table._adopt(data, ends)
        return table

    def _adopt(self, data: bytearray | np.ndarray, ends: array | np.ndarray) -> None:
        # Views of the buffers just built (no copy at the peak of a load), read-only from here on.
        self._data = np.frombuffer(data, dtype=np.uint8)  # (total bytes,)
        self._ends = np.frombuffer(ends, dtype=np.int64)  # (n,): item i is data[ends[i-1]:ends[i]]
        self._data.flags.writeable = self._ends.flags.writeable = False

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self._ends)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} strings")
        i %= n
        start = int(self._ends[i - 1]) if i else 0
        return self._data[start : int(self._ends[i])].tobytes().decode("utf-8", _ERRORS)

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, PackedStrings):
            return np.array_equal(self._ends, other._ends) and np.array_equal(self._data, other._data)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None  # mutable-looking sequences (list) are unhashable too; equality is by content

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings, {self._data.nbytes} bytes)"

    @property
    def nbytes(self) -> int:
        """The memory the table holds: its characters (UTF-8) and 8 bytes per string."""
        return self._data.nbytes + self._ends.nbytes
