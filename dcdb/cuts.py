"""Exact top-fraction thresholds in linear time: DataComp's ``clip_score`` cut by radix selection.

DataComp keeps the rows whose score is at least the value at index ``n = int(N*f)`` of the pool's
scores sorted in descending order (float32, NaN last, N counting every row; an index on a NaN keeps
nothing). Sorting is O(N log N); this module selects that one value in O(N) time and O(1) memory
beyond the scores' own stream, exactly:

* **keys**: a float's bits read as an unsigned integer of its width (uint32 for float32, uint64 for
  float64) sort like the float once the sign is folded in (negative: every bit flipped; positive:
  the sign bit set): -inf < ... < -0.0 < +0.0 < ... < +inf. NaN never becomes a key (no score).
  The value of ascending rank m among the scores is the key of rank m; -0.0 and +0.0, equal in
  every comparison, come out in that order, so every path gives the same bits.
* **rounds** (:class:`RadixSelect`): a histogram of the next ``RADIX_BITS`` bits of the keys that
  share the prefix found so far (65536 bins); the cumulated counts name the digit holding rank m,
  the prefix grows by that digit and m becomes the rank inside it. Two rounds fix a float32 key;
  once at most ``limit`` candidates are left they are gathered and partitioned instead.

Two callers share it: ``clip_cut`` on a local connection (dcdb.filters.baselines streams the score
column from the pool's Parquet files through :func:`descending_nth`) and the Ray driver
(dcdb.dist.execute: every task returns the histogram of its buckets' keys, the driver narrows with
:class:`RadixSelect` and gathers the last candidates from the tasks).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np

RADIX_BITS = 16
DIGITS = 1 << RADIX_BITS
COLLECT_LIMIT = 1 << 22  # gather the candidates once at most this many are left (8 B each at most)
KEPT_LIMIT = 1 << 20  # the same for keys in memory: a round there costs ~3 ns per key, np.partition ~10 per candidate
KEEP_BYTES = 1 << 28  # descending_nth keeps a pass's keys (4 or 8 B per score) up to this size, else re-reads


def sort_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned keys that sort like ``values`` (float32 -> uint32, any other float -> float64's
    uint64). ``values`` must hold no NaN."""
    if values.dtype != np.float32:
        values = np.asarray(values, dtype=np.float64)
    signed, unsigned = (np.int32, np.uint32) if values.dtype == np.float32 else (np.int64, np.uint64)
    values = np.ascontiguousarray(values)
    flip = (values.view(signed) >> (8 * values.itemsize - 1)).view(unsigned)  # all ones if negative
    flip |= unsigned(1 << (8 * values.itemsize - 1))  # negative: every bit; positive: the sign bit
    flip ^= values.view(unsigned)
    return flip


def key_value(key: int, width: int) -> float:
    """The float (as a Python float) whose :func:`sort_keys` key of ``width`` bits is ``key``."""
    unsigned, floating = (np.uint32, np.float32) if width == 32 else (np.uint64, np.float64)
    k = unsigned(key)
    sign = unsigned(1 << (width - 1))
    bits = k & ~sign if k & sign else ~k
    return float(np.array([bits], dtype=unsigned).view(floating)[0])


def histogram(keys: np.ndarray, prefix: int = 0, known: int = 0) -> np.ndarray:
    """Counts (int64, ``DIGITS`` bins) of the next ``RADIX_BITS`` bits of the keys whose top
    ``known`` bits are ``prefix``."""
    width = 8 * keys.dtype.itemsize
    if known:
        keys = with_prefix(keys, prefix, known)
    if known == 0 and RADIX_BITS == 16 and sys.byteorder == "little":
        digits = keys.view(np.uint16)[width // 16 - 1 :: width // 16]  # the top 16 bits, no arithmetic
    else:
        shift = keys.dtype.type(width - known - RADIX_BITS)
        digits = ((keys >> shift) & keys.dtype.type(DIGITS - 1)).astype(np.intp)
    return np.bincount(digits, minlength=DIGITS).astype(np.int64, copy=False)


def with_prefix(keys: np.ndarray, prefix: int, known: int) -> np.ndarray:
    """The keys whose top ``known`` bits are ``prefix``."""
    if not known:
        return keys
    width = 8 * keys.dtype.itemsize
    return keys[(keys >> keys.dtype.type(width - known)) == keys.dtype.type(prefix)]


class RadixSelect:
    """The search for the key of ascending rank ``rank`` among ``count`` keys of ``width`` bits.

    Feed :meth:`narrow` the histogram (:func:`histogram` with this object's ``prefix`` and
    ``known``) of every key, summed over any split of them, until ``fixed`` (the key is
    ``prefix``) or few enough ``count`` candidates are left; then :meth:`pick` among the keys
    that share the prefix (:func:`with_prefix`)."""

    def __init__(self, rank: int, count: int, width: int):
        if not 0 <= rank < count:
            raise ValueError(f"rank {rank} outside 0..{count - 1}")
        self.rank, self.count, self.width = int(rank), int(count), int(width)
        self.prefix, self.known = 0, 0

    @property
    def fixed(self) -> bool:
        return self.known >= self.width

    def narrow(self, hist: np.ndarray) -> None:
        """One round: keep the digit whose keys hold the rank."""
        cum = np.cumsum(hist)
        if int(cum[-1]) != self.count:
            raise ValueError(f"a radix round counted {int(cum[-1])} keys, expected {self.count}")
        digit = int(np.searchsorted(cum, self.rank, side="right"))
        below = int(cum[digit - 1]) if digit else 0
        self.rank, self.count = self.rank - below, int(cum[digit]) - below
        self.prefix, self.known = (self.prefix << RADIX_BITS) | digit, self.known + RADIX_BITS

    def pick(self, candidates: np.ndarray) -> int:
        """The key, from every key that shares the prefix (nothing needed once ``fixed``)."""
        if self.fixed:
            return self.prefix
        if len(candidates) != self.count:
            raise ValueError(f"gathered {len(candidates)} candidates, expected {self.count}")
        return int(np.partition(candidates, self.rank)[self.rank])

    def value(self, candidates: np.ndarray | None = None) -> float:
        return key_value(self.pick(candidates if candidates is not None else np.empty(0)), self.width)


def select_desc(values: np.ndarray, index: int) -> float | None:
    """The value at ``index`` of ``values`` (no NaN) sorted in descending order; None when the
    index is past the end. In memory (``np.partition`` on the keys: the same bits as the rounds)."""
    if not 0 <= index < len(values):
        return None
    keys = sort_keys(values)
    m = len(keys) - 1 - index
    return key_value(int(np.partition(keys, m)[m]), 8 * keys.dtype.itemsize)


def descending_nth(batches: Callable[[], Iterable[np.ndarray]], index_of: Callable[[int, int], int], *,
                   limit: int | None = None, keep_bytes: int | None = None) -> tuple[float | None, int, int]:
    """The value at descending index ``index_of(rows, scored)`` of the scores that ``batches()``
    yields (float arrays of one dtype, NaN = no score; ``rows`` counts every value, ``scored`` the
    others); returns ``(value, rows, scored)``, value None when the index falls on a NaN.

    The first pass counts and takes the first histogram; the keys are kept for the next rounds
    while they fit in ``keep_bytes`` (default ``KEEP_BYTES``), else each round calls ``batches()``
    again (a stream of any length in constant memory: a float32 column is read twice at most).
    Rounds narrow while more than ``limit`` candidates are left (default ``KEPT_LIMIT`` for kept
    keys, ``COLLECT_LIMIT`` when a round re-reads the stream)."""
    keep_bytes = KEEP_BYTES if keep_bytes is None else keep_bytes
    rows = scored = 0
    width = 0
    hist = np.zeros(DIGITS, dtype=np.int64)
    kept: list[np.ndarray] | None = []
    size = 0

    def keys_of(v: np.ndarray) -> np.ndarray:
        nonlocal width
        keys = sort_keys(v[~np.isnan(v)])
        w = 8 * keys.dtype.itemsize
        if width and w != width:
            raise ValueError(f"score batches of {width} and {w} bits")
        width = w
        return keys

    for v in batches():
        rows += len(v)
        keys = keys_of(v)
        scored += len(keys)
        hist += histogram(keys)
        if kept is not None:
            kept.append(keys)
            size += keys.nbytes
            if size > keep_bytes:
                kept = None
    n = index_of(rows, scored)
    if not 0 <= n < scored:
        return None, rows, scored

    def again() -> Iterable[np.ndarray]:
        return kept if kept is not None else (keys_of(v) for v in batches())

    if limit is None:
        limit = KEPT_LIMIT if kept is not None else COLLECT_LIMIT
    sel = RadixSelect(scored - 1 - n, scored, width)
    while not sel.fixed and sel.count > limit:  # the first round is the first pass's histogram
        if hist is None:
            hist = np.zeros(DIGITS, dtype=np.int64)
            for keys in again():
                hist += histogram(keys, sel.prefix, sel.known)
        sel.narrow(hist)
        hist = None
    if sel.fixed:
        return sel.value(), rows, scored
    found = [with_prefix(keys, sel.prefix, sel.known) for keys in again()]
    return sel.value(np.concatenate(found) if found else np.empty(0, np.uint64)), rows, scored
