"""DataComp uid lists.

A uid is 32 lowercase hex characters, i.e. a 128-bit number. DataComp stores a subset as a numpy
structured array of dtype ``np.dtype("u8,u8")`` (``f0`` = high 64 bits, ``f1`` = low 64 bits,
native little-endian), sorted ascending by ``(f0, f1)`` and saved with ``np.save``. A uid listed
twice is written twice by the resharder (upsampling), so duplicates are kept everywhere here.

Conversions are vectorised (no per-row Python), so 10M uids convert in well under a second.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from dcdb.errors import OutputError, UidError

UID_DTYPE = np.dtype("u8,u8")
UID_HEX_LEN = 32
FORMATS = ("npy", "parquet", "txt")  # the uid list files dcdb writes (write_file)
_RAW_RECORD = 16

# ASCII byte -> nibble value; 255 marks a byte that is not a lowercase hex digit.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10, dtype=np.uint8)
_NIBBLE[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)
_SHIFTS = np.arange(60, -4, -4, dtype=np.uint64)  # nibble i of a 16-char half -> bit offset


def empty() -> np.ndarray:
    return np.empty(0, dtype=UID_DTYPE)


def _nibbles_to_u64(nib: np.ndarray) -> np.ndarray:
    """(n, 16) nibble matrix -> (n,) uint64."""
    return np.bitwise_or.reduce(nib.astype(np.uint64) << _SHIFTS, axis=1)


def _bytes_matrix_to_uids(mat: np.ndarray, source: str = "uids") -> np.ndarray:
    """(n, 32) uint8 ASCII matrix -> uid array (unsorted, validated)."""
    nib = _NIBBLE[mat]
    bad = (nib == 255).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        text = bytes(mat[i]).decode("ascii", "replace")
        raise UidError(
            f"{source}: {int(bad.sum())} uid(s) are not 32 lowercase hex characters, "
            f"first at row {i}: {text!r}",
            hint="a DataComp uid is a 128-bit number written as 32 lowercase hex digits",
        )
    out = np.empty(len(mat), dtype=UID_DTYPE)
    out["f0"] = _nibbles_to_u64(nib[:, :16])
    out["f1"] = _nibbles_to_u64(nib[:, 16:])
    return out


def from_hex(values: Iterable[str] | np.ndarray, source: str = "uids") -> np.ndarray:
    """Hex strings -> uid array, in the given order (not sorted). Raises UidError on bad input."""
    if isinstance(values, np.ndarray) and values.dtype == UID_DTYPE:
        return values.copy()
    vals = list(values) if not isinstance(values, np.ndarray) else values.tolist()
    if not vals:
        return empty()
    for i, v in enumerate(vals):
        if not isinstance(v, str) or len(v) != UID_HEX_LEN:
            raise UidError(
                f"{source}: uid at row {i} is {v!r}, not a string of 32 hex characters",
                hint="a DataComp uid is a 128-bit number written as 32 lowercase hex digits",
            )
    try:
        buf = "".join(vals).encode("ascii")
    except UnicodeEncodeError as exc:
        raise UidError(f"{source}: a uid contains non-ASCII characters; uids are 32 lowercase hex digits",
                       hint="fix or drop that row") from exc
    mat = np.frombuffer(buf, dtype=np.uint8).reshape(-1, UID_HEX_LEN)
    return _bytes_matrix_to_uids(mat, source)


def from_arrow(array, source: str = "uids", out: np.ndarray | None = None) -> np.ndarray:
    """A pyarrow string array/ChunkedArray of hex uids -> uid array (same order); with ``out``
    (a uid array of the same length) the uids are decoded into it and it is returned.

    Works on the Arrow buffers directly: no Python string per row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        if out is None:
            out = np.empty(len(array), dtype=UID_DTYPE)
        at = 0
        for c in array.chunks:
            from_arrow(c, source, out[at : at + len(c)])
            at += len(c)
        return out
    if out is not None and len(out) != len(array):
        raise ValueError(f"out has {len(out)} rows, the array {len(array)}")
    if array.null_count:
        i = int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0])
        raise UidError(f"{source}: uid at row {i} is NULL", hint="every row needs a uid")
    if pa.types.is_large_string(array.type) or pa.types.is_string_view(array.type):
        array = array.cast(pa.string())
    if not pa.types.is_string(array.type):
        if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
            array = array.cast(pa.string())
        else:
            raise UidError(f"{source}: the uid column has type {array.type}, expected strings",
                       hint="select the uid as 32 hex characters: SELECT uid FROM pool ...")
    n = len(array)
    if n == 0:
        return empty() if out is None else out
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + n + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)
    bad = np.diff(offsets) != UID_HEX_LEN  # byte lengths, straight from the offsets
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = array[i].as_py()
        if len(value) == UID_HEX_LEN:
            raise UidError(f"{source}: uid at row {i} is {value!r}: it contains non-ASCII characters",
                           hint="a DataComp uid is a 128-bit number written as 32 lowercase hex digits")
        raise UidError(
            f"{source}: uid at row {i} is {value!r} ({len(value)} characters, expected 32 lowercase hex)",
            hint="a DataComp uid is a 128-bit number written as 32 lowercase hex digits",
        )
    start, stop = int(offsets[0]), int(offsets[-1])  # every uid is 32 bytes: stop - start = 32 n
    return _decode_hex_block(data[start:stop], n, source, out)


def _decode_hex_block(block: np.ndarray, n: int, source: str, out: np.ndarray | None = None) -> np.ndarray:
    """n concatenated 32-char uids (uint8 ASCII) -> uid array. binascii does the hex decoding in C
    (~15x faster than a numpy nibble table) straight from the buffer. It accepts upper case too;
    among hex digits exactly the upper-case letters lack bit 0x20, so one AND-reduction over
    8-byte words checks lower case (~20x faster than comparing with ``bytes.lower()``). On any
    error the slow path finds and names the first bad uid."""
    block = np.ascontiguousarray(block)
    try:
        raw = binascii.unhexlify(memoryview(block))
    except (binascii.Error, ValueError):
        raw = None
    if raw is None or not _all_have_bit_0x20(block):
        arr = _bytes_matrix_to_uids(block.reshape(n, UID_HEX_LEN), source)
        if out is None:
            return arr
        out[:] = arr
        return out
    if out is None:
        out = np.empty(n, dtype=UID_DTYPE)
    # one byte-swapping copy of the big-endian words (f0, f1 of each uid are adjacent words)
    np.copyto(out.view(np.uint64), np.frombuffer(raw, dtype=">u8"), casting="unsafe")
    return out


def _all_have_bit_0x20(block: np.ndarray) -> bool:
    """True when every byte of ``block`` (length a multiple of 8) has bit 0x20 set."""
    words = block.view(np.uint64)
    mask = np.uint64(0x2020202020202020)
    return bool(np.bitwise_and.reduce(words) & mask == mask) if len(words) else True


def to_hex(uids: np.ndarray) -> list[str]:
    """uid array -> list of 32-char lowercase hex strings (same order)."""
    return to_hex_array(uids).tolist()


def _hex_block(uids: np.ndarray) -> bytes:
    """uid array -> n*32 ASCII bytes of lowercase hex (binascii in C: ~20x a numpy nibble table)."""
    uids = check_dtype(uids)
    be = np.empty((len(uids), 2), dtype=">u8")
    be[:, 0] = uids["f0"]
    be[:, 1] = uids["f1"]
    return binascii.hexlify(be.tobytes())


def to_hex_array(uids: np.ndarray) -> np.ndarray:
    """uid array -> numpy array of fixed-width unicode hex strings ('<U32')."""
    block = _hex_block(uids)
    return np.frombuffer(block, dtype=f"S{UID_HEX_LEN}").astype(f"U{UID_HEX_LEN}")


def to_arrow(uids: np.ndarray):
    """uid array -> pyarrow string array of hex uids."""
    import pyarrow as pa

    block = _hex_block(uids)
    n = len(block) // UID_HEX_LEN
    offsets = np.arange(0, (n + 1) * UID_HEX_LEN, UID_HEX_LEN, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(block)])


def check_dtype(uids: np.ndarray) -> np.ndarray:
    """``uids`` as an array of DataComp's dtype ``u8,u8`` (any byte order converted); UidError if
    it is not a uid array."""
    uids = np.asarray(uids)
    if uids.dtype != UID_DTYPE:
        if uids.dtype.names == ("f0", "f1") and all(
            uids.dtype[f].kind == "u" and uids.dtype[f].itemsize == 8 for f in ("f0", "f1")
        ):
            return uids.astype(UID_DTYPE)
        raise UidError(f"expected a uid array of dtype {UID_DTYPE}, got {uids.dtype}",
                       hint="build it with dcdb.uids.from_hex, or np.array(pairs, np.dtype('u8,u8'))")
    return uids


def sort(uids: np.ndarray, *, copy: bool = True) -> np.ndarray:
    """Sorted copy, ascending by (f0, f1) -- the order of ``np.sort`` on the structured array.
    With ``copy=False`` an input that is already sorted is returned as it is.

    uids are hashes, so the high word's top bits almost order them: the row index is packed into
    the low bits of the high word and the resulting uint64 keys are sorted in place (numpy's SIMD
    sort, ~5x faster than a structured or an arg sort); the few runs of equal keys (duplicates,
    mostly) are then re-sorted by (f0, f1).
    """
    uids = check_dtype(uids)
    n = len(uids)
    if n < 2 or is_sorted(uids):  # a linear check: pools laid out in uid order come out sorted
        return uids.copy() if copy else uids
    bits = int(n - 1).bit_length()
    mask = np.uint64((1 << bits) - 1)
    key = uids["f0"] & ~mask
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    # row indexes < 2**63: the same bits as intp; gathered as opaque 16-byte records (V16, a
    # memcpy each), ~4.5x faster than numpy's field-by-field copy of the structured dtype
    out = uids.view("V16")[(key & mask).view(np.intp)].view(UID_DTYPE)
    key &= ~mask
    tie = key[1:] == key[:-1]
    if tie.any():
        in_run = np.zeros(n, dtype=bool)
        in_run[1:] |= tie
        in_run[:-1] |= tie
        sub = out[in_run]
        out[in_run] = sub[np.lexsort((sub["f1"], sub["f0"]))]
    return out


def is_sorted(uids: np.ndarray) -> bool:
    """Whether ``uids`` is in ascending (f0, f1) order: one pass over the high words, then the
    few places where a high word does not grow (equal uids, ties, disorder) are looked at."""
    uids = check_dtype(uids)
    if len(uids) < 2:
        return True
    f0, f1 = uids["f0"], uids["f1"]
    flat = np.flatnonzero(f0[1:] <= f0[:-1])
    if len(flat) > len(uids) // 8:  # many ties (a list of repeated uids): compare everything
        return bool(np.all((f0[1:] > f0[:-1]) | ((f0[1:] == f0[:-1]) & (f1[1:] >= f1[:-1]))))
    return bool(np.all((f0[flat + 1] == f0[flat]) & (f1[flat + 1] >= f1[flat])))


def count_unique(uids: np.ndarray) -> int:
    """Number of distinct uids; O(n) when the array is sorted (a filter's output), else a sort."""
    uids = check_dtype(uids)
    if len(uids) == 0:
        return 0
    if not is_sorted(uids):
        uids = sort(uids)
    f0, f1 = uids["f0"], uids["f1"]
    return int(1 + np.count_nonzero((f0[1:] != f0[:-1]) | (f1[1:] != f1[:-1])))


# ----------------------------------------------------------------------------------- files


def save(path: str | os.PathLike, uids: np.ndarray, *, sorted_: bool = False) -> Path:
    """Write a DataComp uid list (``np.save``, sorted) atomically: temp name, fsync, rename."""
    from dcdb.io import atomic_path

    uids = check_dtype(uids)
    if not sorted_:
        uids = sort(uids)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, uids)
    return path


def write_file(path: str | os.PathLike, uids: np.ndarray, fmt: str) -> None:
    """A sorted uid list into ``path`` as ``fmt`` (one of FORMATS), written where it is: give it a
    temp name (``dcdb.io.atomic_path``) and rename it."""
    if fmt == "npy":
        with open(path, "wb") as f:
            np.save(f, check_dtype(uids))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"uid": to_arrow(uids)}), path)
    elif fmt == "txt":
        with open(path, "w") as f:
            for chunk in range(0, len(uids), 1 << 20):
                f.write("\n".join(to_hex(uids[chunk : chunk + (1 << 20)])))
                f.write("\n")
    else:  # pragma: no cover -- output_format validated it
        raise OutputError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")


def load(path: str | os.PathLike) -> np.ndarray:
    """Read a uid list: a ``.npy`` of DataComp's dtype ``u8,u8`` or headerless raw 16-byte records.

    Accepted ``.npy`` dtypes: ``u8,u8`` (fields ``f0``, ``f1``; either byte order, converted to
    native little-endian) and ``V16`` (opaque 16-byte records, read like the headerless raw form).
    Anything else (``f8,f8``, ``S8,S8``, ``i8,i8``, another shape, an object array) is a UidError;
    a pickled array is never loaded. Order is kept as in the file (use ``sort`` / ``is_sorted``);
    duplicates are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise UidError(f"uid file {str(path)!r} does not exist",
                       hint="check the path: a uid list is a .npy written by `dcdb query -o` or DataComp")
    try:
        with open(path, "rb") as f:
            head = f.read(_RAW_RECORD * 2 + 1)
            if head[:6] == b"\x93NUMPY":
                f.seek(0)
                dtype, shape = _npy_header(f, path)
    except OSError as exc:
        raise UidError(f"cannot read uid file {str(path)!r}: {exc}", hint="check its permissions") from None
    if head[:6] == b"\x93NUMPY":
        _check_npy_layout(path, dtype, shape)
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # truncated data and the like: numpy raises several kinds
            raise UidError(f"{path}: not a readable .npy file ({exc})",
                           hint="the file is damaged: write it again") from None
        if arr.dtype.names is None:  # V16: the raw records
            return arr.view(UID_DTYPE)
        return arr if arr.dtype == UID_DTYPE else arr.astype(UID_DTYPE)
    if head[:4] == b"PK\x03\x04":
        raise UidError(f"{path} is an .npz (zip) archive, not a uid list",
                       hint="save the uid array alone with np.save(path, uids)")
    if len(head) > UID_HEX_LEN and head[UID_HEX_LEN] in b"\r\n" and all(c in b"0123456789abcdef" for c in head[:32]):
        raise UidError(f"{path} is a text file of hex uids, not a uid list",
                       hint="convert it: dcdb.uids.save(path, dcdb.uids.from_hex(open(txt).read().split()))")
    size = path.stat().st_size
    if size % _RAW_RECORD:
        raise UidError(
            f"{path}: {size} bytes is not a whole number of 16-byte uid records and the file has "
            f"no .npy header",
            hint="uid files are np.save'd arrays of dtype u8,u8 or raw 16-byte records",
        )
    return np.fromfile(path, dtype=UID_DTYPE)


_LOAD_HINT = "write it with np.save(path, uids) where uids has dtype np.dtype('u8,u8') (DataComp's format)"


def _npy_header(f, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) from a .npy header, without reading the data (or unpickling anything)."""
    try:
        major, _minor = np.lib.format.read_magic(f)
        read = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
        if read is None:
            raise ValueError(f".npy format version {major} is not supported")
        shape, _fortran, dtype = read(f)
    except (ValueError, EOFError, SyntaxError) as exc:
        raise UidError(f"{path}: not a readable .npy file ({exc})", hint="the file is damaged: write it again") from None
    return np.dtype(dtype), tuple(shape)


def _check_npy_layout(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    """A UidError unless ``dtype``/``shape`` is a 1-d list of u8,u8 (either byte order) or V16."""
    if dtype.hasobject:
        raise UidError(f"{path}: the .npy holds Python objects (dtype {dtype}); uid files are never unpickled",
                       hint=_LOAD_HINT)
    raw = dtype.names is None and dtype.kind == "V" and dtype.itemsize == _RAW_RECORD
    pair = (
        dtype.names == ("f0", "f1")
        and dtype.itemsize == _RAW_RECORD
        and all(dtype.fields[f][1] == off for f, off in (("f0", 0), ("f1", 8)))
        and all(dtype[f].kind == "u" and dtype[f].itemsize == 8 and dtype[f].shape == () for f in ("f0", "f1"))
    )
    if not (raw or pair) or len(shape) != 1:
        raise UidError(
            f"{path}: .npy has dtype {dtype} and shape {shape}; a DataComp uid list is a 1-d array of "
            f"dtype np.dtype('u8,u8') (f0 = high, f1 = low 64 bits of the uid)",
            hint=_LOAD_HINT,
        )


# ----------------------------------------------------------------------------- set algebra
# Multiset semantics, because duplicates mean upsampling:
#   union      -> each uid with the larger of its two counts
#   intersect  -> each uid present in both, with the smaller of its two counts
#   minus      -> every copy of each uid of A that does not occur in B
# All return sorted arrays.


def _counts(uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, c = np.unique(check_dtype(uids), return_counts=True)
    return u, c


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ca = _counts(a)
    ub, cb = _counts(b)
    allu = np.concatenate([ua, ub])
    allc = np.concatenate([ca, cb])
    order = np.argsort(allu, kind="stable")
    allu, allc = allu[order], allc[order]
    u, start = np.unique(allu, return_index=True)
    c = np.maximum.reduceat(allc, start) if len(allc) else allc
    return np.repeat(u, c)


def intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua, ca = _counts(a)
    ub, cb = _counts(b)
    common, ia, ib = np.intersect1d(ua, ub, assume_unique=True, return_indices=True)
    return np.repeat(common, np.minimum(ca[ia], cb[ib]))


def minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = sort(a)
    keep = ~np.isin(a, check_dtype(b))
    return a[keep]
