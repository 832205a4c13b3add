"""The one tar reader and writer: USTAR and pax, with ``os.pread``, in webdataset's sample layout.

Every tar dcdb writes, and every plain tar it reads itself, goes through here: the shard index and
the resharder (img2dataset and resharded shards), the training loader, the demo world's shards and
eval tasks, the toy fixtures.

**Reading** works on a file descriptor with ``pread`` (no seek, no stream): :func:`walk_tar` reads
the headers only and yields each regular member (name, where its headers start, where its data is,
its size) and any damage met; :class:`WindowReader` serves small reads from a read-ahead window
when the data is wanted too; :func:`range_members` splits a byte range already in memory (one
sample's range from the shard index) into its members. Pax ``path`` records and GNU long names
are applied. A damaged header is skipped by resynchronising on the next valid header, so one bad
block costs the samples it touches, not the rest of the tar (Python's ``tarfile`` silently stops
at the first bad header after the first member). :func:`group_samples` groups members into
webdataset samples (key = the path up to the first dot of the file name).

**Writing** (:class:`TarWriter`) produces the bytes ``tarfile`` writes with webdataset
``TarWriter``'s member fields (mode 0444, owner and group ``bigdata``) and mtime 0, so the same
members give the same bytes: a USTAR header per member (a pax header carrying the ``path`` before
it when the name is longer than 100 bytes, as ``tarfile``'s pax format does), the data padded to a
512-byte block, then two zero blocks and zeros up to a whole 10240-byte record.
:func:`write_samples` and :func:`write_sample_shards` write webdataset samples (``__key__`` and
extension -> bytes, str or int) as members ``<key>.<ext>`` in sorted extension order, each tar
atomically (temporary name, then rename).

Compressed tars cannot be read with ``pread``: the training loader hands those to webdataset's
reader, and the evaluation streams its tasks through webdataset (``filters.vectors.eval_images``
still opens task tars with ``tarfile``, which reads compressed ones too).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dcdb.io import atomic_path

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
RECORD = 20 * BLOCK  # tarfile pads an archive to a multiple of this
RESYNC_CHUNK = 1 << 16
NAME_MAX = 100  # bytes of a USTAR name field; longer names get a pax header
MAX_SIZE = 8**11 - 1  # largest size a USTAR size field holds
# webdataset's base_plus_ext: the key is the path up to the first dot of the file name.
KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
REGULAR_TYPES = (b"0", b"\0", b"7")
PAX_TYPES = (b"x", b"X")


# ------------------------------------------------------------------------------- headers


class TarHeaderError(ValueError):
    """A 512-byte block that is not a valid tar header (bad checksum, bad number field)."""


class TarRangeError(ValueError):
    """A byte range that is not a whole, well-formed run of tar members."""


class TarNameError(ValueError):
    """A member name longer than a USTAR header holds, given to a writer that writes no pax headers."""

    def __init__(self, name: bytes):
        super().__init__(f"member name {name!r} is longer than {NAME_MAX} bytes")
        self.name = name


def pad(size: int) -> int:
    """``size`` rounded up to a whole number of 512-byte blocks."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def _number(field: bytes) -> int:
    """A tar number field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80/0xff)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[0] == 0xFF else n
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarHeaderError(f"bad number field {bytes(field)!r}") from None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    unsigned = sum(block) - sum(block[148:156]) + 256
    if stored == unsigned:
        return True
    signed = (
        sum(b - 256 if b > 127 else b for b in block)
        - sum(b - 256 if b > 127 else b for b in block[148:156])
        + 256
    )
    return stored == signed


def parse_header(block: bytes) -> tuple[bytes, int, bytes]:
    """(name, size, typeflag) of a 512-byte tar header; TarHeaderError if it is not one."""
    if len(block) < BLOCK:
        raise TarHeaderError("truncated header")
    if not _checksum_ok(block):
        raise TarHeaderError("bad header checksum")
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000":  # POSIX ustar: a long name is split into prefix/name
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size = _number(block[124:136])
    if size < 0:
        raise TarHeaderError(f"negative member size {size}")
    return name, size, block[156:157]


def pax_path(data: bytes) -> bytes | None:
    """The ``path`` record of a pax extended header ("<len> path=<value>\\n" records)."""
    if b" path=" not in data:  # most pax headers (tarfile's, webdataset's) hold only an mtime
        return None
    pos, found = 0, None
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        record = data[space + 1 : pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == b"path":
            found = v
        pos += length
    return found


def _ustar_template() -> tuple[bytes, int]:
    """A USTAR header with webdataset TarWriter's fields (mode 0444, bigdata:bigdata) and mtime 0,
    name and size left empty, checksum field blank; and the byte sum of that template."""
    h = bytearray(BLOCK)
    h[100:108] = b"0000444\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8  # checksum placeholder
    h[156:157] = b"0"  # regular file
    h[257:265] = b"ustar\x0000"
    h[265:272] = b"bigdata"
    h[297:304] = b"bigdata"  # devmajor/devminor stay empty, as tarfile leaves them for files
    return bytes(h), sum(h)


def _pax_template() -> tuple[bytes, int]:
    """The header ``tarfile`` puts before a pax extended header's records (name ``././@PaxHeader``,
    type ``x``, every other field zero or empty), size left empty, checksum field blank."""
    h = bytearray(BLOCK)
    h[0:14] = b"././@PaxHeader"
    h[100:108] = b"0000000\0"  # mode
    h[108:116] = b"0000000\0"  # uid
    h[116:124] = b"0000000\0"  # gid
    h[136:148] = b"00000000000\0"  # mtime
    h[148:156] = b" " * 8
    h[156:157] = b"x"
    h[257:265] = b"ustar\x0000"
    return bytes(h), sum(h)


_TEMPLATE, _TEMPLATE_SUM = _ustar_template()
_PAX_TEMPLATE, _PAX_TEMPLATE_SUM = _pax_template()


def _fill(template: bytes, template_sum: int, name: bytes, size: int) -> bytes:
    if size > MAX_SIZE:
        raise ValueError(f"member of {size} bytes: a USTAR header holds at most {MAX_SIZE}")
    size_field = b"%011o\0" % size
    h = bytearray(template)
    h[0 : len(name)] = name
    h[124:136] = size_field
    h[148:156] = b"%06o\0 " % (template_sum + sum(name) + sum(size_field))
    return bytes(h)


def ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte header ``tarfile`` writes for this member with TarWriter's defaults, mtime 0
    (a name of at most 100 bytes; :func:`member_header` handles longer ones)."""
    if len(name) > NAME_MAX:
        raise TarNameError(name)
    return _fill(_TEMPLATE, _TEMPLATE_SUM, name, size)


def pax_record(keyword: bytes, value: bytes) -> bytes:
    """One pax record, ``"<length> <keyword>=<value>\\n"``, the length counting itself."""
    fixed = len(keyword) + len(value) + 3  # " ", "=", "\n"
    length = fixed
    while fixed + len(str(length)) != length:
        length = fixed + len(str(length))
    return b"%d %s=%s\n" % (length, keyword, value)


def member_header(name: str, size: int) -> bytes:
    """The header block(s) ``tarfile`` writes for a member with TarWriter's defaults and mtime 0:
    one USTAR block when the name (UTF-8) fits its 100 bytes, else a pax extended header with the
    ``path`` and a USTAR block with the name cut to 100 ASCII bytes (tarfile's pax format)."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= NAME_MAX:
        return _fill(_TEMPLATE, _TEMPLATE_SUM, raw, size)
    try:
        name.encode("utf-8")
        records = pax_record(b"path", raw)
    except UnicodeEncodeError:  # undecodable bytes: tarfile marks the records binary
        records = b"21 hdrcharset=BINARY\n" + pax_record(b"path", raw)
    short = name.encode("ascii", "replace")[:NAME_MAX]
    return (
        _fill(_PAX_TEMPLATE, _PAX_TEMPLATE_SUM, b"", len(records))
        + records
        + ZERO_BLOCK[: pad(len(records)) - len(records)]
        + _fill(_TEMPLATE, _TEMPLATE_SUM, short, size)
    )


# ------------------------------------------------------------------------------- reading


@dataclass(slots=True)
class Member:
    """A regular file member: its name, where its headers start, where its data is, its size."""

    name: str
    start: int  # first header block (pax/longname headers included)
    offset: int  # data
    size: int

    @property
    def end(self) -> int:
        return self.offset + pad(self.size)


@dataclass(slots=True)
class Damage:
    """Something wrong at ``offset``: a bad header, a truncated member or header, or a missing
    end-of-archive marker; ``fatal`` when nothing after it could be read."""

    offset: int
    reason: str
    fatal: bool
    name: str | None = None  # the member it hit, when known
    harmless: bool = False  # only the end-of-archive marker is missing: every member is whole


def _resync(fd: int, start: int, file_size: int) -> int | None:
    """Offset of the first valid, non-empty header block at or after ``start`` (block-aligned)."""
    pos = start
    while pos + BLOCK <= file_size:
        chunk = os.pread(fd, min(RESYNC_CHUNK, file_size - pos), pos)
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            block = chunk[i : i + BLOCK]
            if block != ZERO_BLOCK:
                try:
                    parse_header(block)
                    return pos + i
                except TarHeaderError:
                    pass
        pos += len(chunk) - len(chunk) % BLOCK or BLOCK
    return None


class WindowReader:
    """``pread(n, offset)`` of one file through a read-ahead window: reads that fall in the last
    window are served from memory, others read a new window of ``window`` bytes from their offset
    (larger reads go straight to the file). For walking a tar whose data is wanted too: a member
    of a few kB costs a slice instead of three system calls."""

    def __init__(self, fd: int, file_size: int, window: int = 1 << 20):
        self.fd, self.file_size, self.window = fd, file_size, window
        self.start, self.buf = 0, b""

    def __call__(self, n: int, offset: int) -> bytes:
        at = offset - self.start
        if 0 <= at and at + n <= len(self.buf):
            return self.buf[at : at + n]
        if n >= self.window:
            return os.pread(self.fd, n, offset)
        self.start, self.buf = offset, os.pread(self.fd, max(0, min(self.window, self.file_size - offset)), offset)
        return self.buf[:n]


def walk_tar(fd: int, file_size: int, pread: Callable[[int, int], bytes] | None = None) -> Iterator[Member | Damage]:
    """The regular members of a tar (read with pread: headers only), and any damage met.

    Stops at the end-of-archive block. A bad header yields a Damage and reading resumes at the
    next valid header; a member whose data runs past the end of the file yields a fatal Damage.
    ``pread(n, offset)`` reads the file (default ``os.pread`` on ``fd``; a :class:`WindowReader`
    when the data will be read as well).
    """
    if pread is None:
        def pread(n: int, offset: int) -> bytes:
            return os.pread(fd, n, offset)
    off, start, long_name = 0, None, None
    while True:
        block = pread(BLOCK, off) if off < file_size else b""
        if not block:
            yield Damage(
                off, "the tar ends without an end-of-archive marker (truncated?)", fatal=False, harmless=True
            )
            return
        if len(block) < BLOCK:
            yield Damage(off, f"truncated header at byte {off}", fatal=True)
            return
        if block == ZERO_BLOCK:
            return
        try:
            name, size, typ = parse_header(block)
        except TarHeaderError as exc:
            nxt = _resync(fd, off + BLOCK, file_size)
            yield Damage(off, f"{exc} at byte {off}", fatal=nxt is None)
            if nxt is None:
                return
            off, start, long_name = nxt, None, None
            continue
        data_off = off + BLOCK
        if data_off + size > file_size:
            shown = (long_name or name).decode("utf-8", "surrogateescape")
            reason = f"member {shown!r} truncated: {size} bytes at {data_off}, the file ends at {file_size}"
            yield Damage(off, reason, fatal=True, name=shown)
            return
        if start is None:
            start = off
        if typ in PAX_TYPES:
            long_name = pax_path(pread(size, data_off)) or long_name
        elif typ == b"L":
            long_name = pread(size, data_off).split(b"\0", 1)[0]
        elif typ == b"g":
            pass  # global pax header: nothing per member
        else:
            if typ in REGULAR_TYPES:
                yield Member((long_name or name).decode("utf-8", "surrogateescape"), start, data_off, size)
            start, long_name = None, None
        off = data_off + pad(size)


def range_members(view: memoryview) -> Iterator[tuple[str, memoryview]]:
    """The regular members (name, data) of a byte range that holds whole members and nothing else
    (one sample's range from the shard index). TarRangeError at a bad or truncated header, an
    end-of-archive marker or a member whose data the range does not hold."""
    pos, long_name = 0, None
    while pos < len(view):
        block = bytes(view[pos : pos + BLOCK])
        if len(block) < BLOCK:
            raise TarRangeError("truncated header")
        if block == ZERO_BLOCK:
            raise TarRangeError("end-of-archive marker inside the sample's byte range")
        try:
            name, size, typ = parse_header(block)
        except TarHeaderError as exc:
            raise TarRangeError(str(exc)) from None
        data = view[pos + BLOCK : pos + BLOCK + size]
        if len(data) < size:
            raise TarRangeError(f"member truncated ({len(data)} of {size} bytes)")
        pos += BLOCK + pad(size)
        if typ in PAX_TYPES:
            long_name = pax_path(bytes(data)) or long_name
            continue
        if typ == b"L":
            long_name = bytes(data).split(b"\0", 1)[0]
            continue
        if typ not in REGULAR_TYPES:
            long_name = None
            continue
        yield (long_name or name).decode("utf-8", "surrogateescape"), data
        long_name = None


class TarReader:
    """One tar file opened for :func:`walk_tar` and member reads through a :class:`WindowReader`
    (OSError from opening it is the caller's to report)."""

    def __init__(self, path: str | os.PathLike, window: int = 1 << 20):
        self.path = Path(path)
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.size = os.fstat(self.fd).st_size
        except OSError:
            os.close(self.fd)
            raise
        self.pread = WindowReader(self.fd, self.size, window)

    def __enter__(self) -> TarReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def starts_like_a_tar(self) -> bool:
        """Whether the file opens with a valid header or a zero block (an empty tar); a compressed
        tar, or one whose first header is damaged, does not."""
        first = os.pread(self.fd, BLOCK, 0)
        try:
            parse_header(first)
        except TarHeaderError:
            return not first.strip(b"\0")
        return True

    def walk(self) -> Iterator[Member | Damage]:
        return walk_tar(self.fd, self.size, self.pread)

    def read(self, member: Member) -> bytes:
        """The data of a member found by :meth:`walk`."""
        return self.pread(member.size, member.offset)


# ------------------------------------------------------------------------------- samples


def split_key(name: str) -> tuple[str | None, str]:
    """webdataset's (key, extension) of a member name; (None, "") when it has no extension."""
    m = KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else (None, "")


@dataclass
class Sample:
    """Consecutive members sharing a key: one webdataset sample."""

    key: str
    members: list[tuple[str, Member]] = field(default_factory=list)  # (ext, member)
    damage: str | None = None

    @property
    def start(self) -> int:
        return self.members[0][1].start

    @property
    def end(self) -> int:
        return self.members[-1][1].end


def group_samples(items: Iterator[Member | Damage], damages: list[Damage]) -> Iterator[Sample]:
    """Group members into samples as webdataset does (a new key, or a repeated extension, starts
    a new sample). The samples on both sides of a damaged stretch are marked damaged."""
    current: Sample | None = None
    taint: str | None = None
    for item in items:
        if isinstance(item, Damage):
            damages.append(item)
            hit = split_key(item.name)[0] if item.name is not None else None
            if not item.harmless:
                if current is not None and (hit is None or hit == current.key):
                    current.damage = current.damage or item.reason
                taint = item.reason
            continue
        key, ext = split_key(item.name)
        if key is None:
            continue
        ext = ext.lower()
        if taint is not None and current is not None and key == current.key:
            taint = None  # reading resumed inside the damaged sample: the next one is whole
        if current is None or key != current.key or any(e == ext for e, _ in current.members):
            if current is not None:
                yield current
            current = Sample(key, damage=taint)
            taint = None
        current.members.append((ext, item))
    if current is not None:
        yield current


# ------------------------------------------------------------------------------- writing


class TarWriter:
    """Writes members to an open binary file as a tar (see the module docstring); counts bytes.

    ``pax=False`` refuses a name longer than 100 bytes (TarNameError) instead of writing a pax
    header for it."""

    def __init__(self, f, *, pax: bool = True):
        self.f = f
        self.pax = pax
        self.bytes = 0

    def add(self, name: str, data) -> None:
        size = len(data)
        if self.pax:
            header = member_header(name, size)
        else:
            header = ustar_header(name.encode("utf-8", "surrogateescape"), size)
        self.f.write(header)
        self.f.write(data)
        padding = pad(size) - size
        if padding:
            self.f.write(ZERO_BLOCK[:padding])
        self.bytes += len(header) + size + padding

    def add_sample(self, sample: Mapping[str, Any]) -> None:
        """A webdataset sample's members (:func:`sample_members`)."""
        for name, data in sample_members(sample):
            self.add(name, data)

    def close(self) -> None:
        """End-of-archive blocks, then zeros up to a whole record, like ``tarfile``. (The file
        itself is the caller's to close.)"""
        end = self.bytes + 2 * BLOCK
        end += -end % RECORD
        self.f.write(bytes(end - self.bytes))
        self.bytes = end


def _encode(ext: str, value: Any) -> bytes:
    """A sample value as member data, as webdataset's TarWriter encodes it: bytes as they are,
    str as UTF-8, an int (a ``.cls`` label) as its decimal digits."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    raise TypeError(f"sample value {ext!r} is a {type(value).__name__}, not bytes, str or int")


def sample_members(sample: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """The members ``<key>.<ext>`` of a webdataset sample (``__key__`` and ext -> value), in sorted
    extension order, skipping ``_``-prefixed entries (webdataset TarWriter's order and rule)."""
    key = sample["__key__"]
    return [(f"{key}.{ext}", _encode(ext, sample[ext])) for ext in sorted(k for k in sample if not k.startswith("_"))]


def write_tar(path: str | os.PathLike, members: Iterable[tuple[str, Any]]) -> int:
    """Write ``(name, data)`` members as the tar ``path``, atomically; returns its size."""
    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        tar = TarWriter(f)
        for name, data in members:
            tar.add(name, data)
        tar.close()
    return tar.bytes


def write_samples(path: str | os.PathLike, samples: Iterable[Mapping[str, Any]]) -> int:
    """Write webdataset samples as the tar ``path``, atomically; returns its size."""
    return write_tar(path, (m for s in samples for m in sample_members(s)))


def write_sample_shards(
    folder: str | os.PathLike, name_format: str, samples: Iterable[Mapping[str, Any]], maxcount: int
) -> list[int]:
    """Write webdataset samples into the tars ``folder/name_format.format(0)``, ``...format(1)``,
    ... (each atomically) of at most ``maxcount`` samples, as webdataset's ShardWriter cuts them;
    returns the number of samples in each (no tar for no samples)."""
    if maxcount < 1:
        raise ValueError(f"maxcount must be at least 1, got {maxcount}")
    folder = Path(folder)
    counts: list[int] = []
    it = iter(samples)
    sample = next(it, None)
    while sample is not None:
        with atomic_path(folder / name_format.format(len(counts))) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
            tar, n = TarWriter(f), 0
            while sample is not None and n < maxcount:
                tar.add_sample(sample)
                n += 1
                sample = next(it, None)
            tar.close()
        counts.append(n)
    return counts
